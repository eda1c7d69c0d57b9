"""torch.compile with PostDiff: a compiled denoiser (whole, or by region) gives the eager output, is traced
without a graph break, makes at most one graph per kind of step (and per pass of FLUX's true CFG; by region:
per kind of region), and a second call compiles nothing. The "eager" backend runs dynamo's capture (the
part that breaks graphs and recompiles) without code generation, "aot_eager" adds AOT autograd's
functionalization; both keep the eager result within 1e-6. Inductor's code generation (minutes a graph on this CPU) is measured by
`bench/benchmark.py --compile`, with its output's distance to eager."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import test_controlnet
import test_flow
import test_pixart
import tiny
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import postdiff
from postdiff import PostDiffConfig
from postdiff.caching.state import RunState
from postdiff.compiling import graphs_needed

TOLERANCE = 1e-6
PAPER_SD = PostDiffConfig.preset("paper", family="sd")
MIXED_BLOCKS = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2)


def sd_case(config, **arguments):
    return tiny.sd_pipeline, tiny.call, "unet", config, arguments


def flow_case(name, config, **arguments):
    return test_flow.BUILDERS[name], test_flow.call, "transformer", config, test_flow._arguments(name, **arguments)


CASES = {
    "sd off": sd_case(PostDiffConfig()),
    "sd paper": sd_case(PAPER_SD),
    "sd paper, cross-attention recorded at low resolution (cond)": sd_case(PAPER_SD.with_changes(cfg_stop=2)),
    "sd paper, cross-attention cache ave": sd_case(PAPER_SD.with_changes(cfg_stop=5, ca_mode="ave")),
    "sd progressive, DeepCache k=3, cross-attention cache cfg": sd_case(
        PostDiffConfig(beta=0.5, switch=0.25, progressive=((0.75, 0.25),), cache_interval=3, cache_branch=0,
                       cfg_stop=3, ca_mode="cfg")),
    "sdxl paper with CFG stop": (tiny.sdxl_pipeline, tiny.call, "unet",
                                 PostDiffConfig.preset("paper", family="sdxl").with_changes(cfg_stop=4), {}),
    "pixart mixed, blocks, CFG stop": (lambda folder: test_pixart.pixart_pipeline(), test_pixart.call, "transformer",
                                       MIXED_BLOCKS.with_changes(cfg_stop=3), {}),
    "sd3 mixed, blocks, text-stream cache": flow_case("sd3", MIXED_BLOCKS.with_changes(cfg_stop=3)),
    "flux mixed, blocks, text-stream cache": flow_case("flux", MIXED_BLOCKS.with_changes(cfg_stop=3)),
    "flux true CFG, blocks, CFG stop ave": flow_case("flux-true-cfg", MIXED_BLOCKS.with_changes(cfg_stop=5, ca_mode="ave")),
    "controlnet paper, reuse, CFG stop": (test_controlnet.controlnet_pipeline, test_controlnet.call, "unet",
                                          PAPER_SD.with_changes(cfg_stop=3), {}),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def record_steps(pipe) -> list:
    """Every step the calls run, seen where the engine enters it (outside the compiled region)."""
    state, steps = pipe._postdiff.state, []

    def enter(step):
        steps.append(step)
        RunState.enter(state, step)

    state.enter = enter
    return steps


def kinds_of(steps: list) -> list[tuple]:
    return list(dict.fromkeys(step.kind for step in steps))


def as_array(images) -> np.ndarray:
    return np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)


# "aot_eager" adds AOT autograd's functionalization (what inductor compiles from) to dynamo's capture.
BACKENDS = [(case, "eager") for case in CASES] + [
    ("sd paper, cross-attention recorded at low resolution (cond)", "aot_eager"),
    ("flux true CFG, blocks, CFG stop ave", "aot_eager"),
]


@pytest.mark.parametrize("case, backend", BACKENDS)
def test_a_compiled_denoiser_gives_the_eager_output_with_one_graph_per_step_kind(model_dir, case, backend):
    build, run, attribute, config, arguments = CASES[case]
    pipe = postdiff.apply(build(model_dir), config)
    eager = as_array(run(pipe, **arguments))
    setattr(pipe, attribute, torch.compile(getattr(pipe, attribute), backend=backend, fullgraph=True))
    steps = record_steps(pipe)
    compiled = as_array(run(pipe, **arguments))
    first_graphs = graphs()
    again = as_array(run(pipe, **arguments))
    assert np.abs(compiled - eager).max() <= TOLERANCE
    assert not counters["graph_break"]
    # "off" is one plain call of the pipeline (no PostDiff step is entered): one graph.
    needed = graphs_needed(kinds_of(steps), pipe._postdiff.family.cfg_passes) if steps else 1
    assert 1 <= first_graphs <= needed, (first_graphs, needed)
    assert graphs() == first_graphs and np.array_equal(again, compiled)  # the second call compiles nothing


def compile_blocks(model, **options):
    """Regional compilation: diffusers' `compile_repeated_blocks` where the model names its repeated blocks, else
    each transformer block (SD3 and PixArt in diffusers 0.42)."""
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**options)
    else:
        for block in model.transformer_blocks:
            block.compile(**options)


def region_codes(model) -> set:
    """The code objects dynamo compiles for the regions: each compiled block class's forward (a hooked block's
    forward has a code object of its own per hooked class and role)."""
    return {type(module).forward.__code__ for module in model.modules() if getattr(module, "_compiled_call_impl", None)}


REGIONAL = ["sd paper, cross-attention recorded at low resolution (cond)", "sdxl paper with CFG stop",
            "pixart mixed, blocks, CFG stop", "sd3 mixed, blocks, text-stream cache", "flux true CFG, blocks, CFG stop ave"]


@pytest.mark.parametrize("case", REGIONAL)
def test_regionally_compiled_blocks_give_the_eager_output_and_compile_once(model_dir, case):
    build, run, attribute, config, arguments = CASES[case]
    pipe = postdiff.apply(build(model_dir), config)
    eager = as_array(run(pipe, **arguments))
    model = getattr(pipe, attribute)
    compile_blocks(model, backend="eager", fullgraph=True)
    steps = record_steps(pipe)
    compiled = as_array(run(pipe, **arguments))
    first_graphs = graphs()
    again = as_array(run(pipe, **arguments))
    assert np.abs(compiled - eager).max() <= TOLERANCE
    assert not counters["graph_break"] and first_graphs >= 1
    assert graphs() == first_graphs and np.array_equal(again, compiled)
    # One graph per step kind for every kind of region; one more where dynamo specializes on an input's strides
    # (PixArt's first block gets the patch embedding's transposed view, the others contiguous tensors).
    needed = graphs_needed(kinds_of(steps), pipe._postdiff.family.cfg_passes)
    per_region = [len(_debug_get_cache_entry_list(code)) for code in region_codes(model)]
    assert per_region and max(per_region) <= min(needed + 1, torch._dynamo.config.recompile_limit), (per_region, needed)


def test_apply_and_remove_on_an_already_compiled_denoiser(model_dir):
    pipe = tiny.sd_pipeline(model_dir)
    baseline = tiny.call(pipe)
    postdiff.apply(pipe, PAPER_SD.with_changes(cfg_stop=3))
    eager = tiny.call(pipe)
    postdiff.remove(pipe)
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    postdiff.apply(pipe, PAPER_SD.with_changes(cfg_stop=3))
    assert np.abs(tiny.call(pipe) - eager).max() <= TOLERANCE
    postdiff.remove(pipe)
    assert tiny.hook_leftovers(pipe.unet._orig_mod) == []  # (the compiled wrapper has a forward of its own)
    assert np.abs(tiny.call(pipe) - baseline).max() <= TOLERANCE  # the compiled U-Net, as diffusers runs it


def test_a_plan_needing_more_graphs_than_dynamo_compiles_warns_before_any_compute(model_dir, monkeypatch):
    config = PostDiffConfig(beta=0.5, switch=0.25, progressive=((0.75, 0.25),), cache_interval=2, cfg_stop=5)
    pipe = postdiff.apply(tiny.sd_pipeline(model_dir), config)
    plan = postdiff.plan_call(pipe, "a bag", num_inference_steps=8, height=32, width=32)
    assert graphs_needed(plan.step_kinds()) == len(plan.step_kinds()) == 7  # 3 sizes x full / cached, + CFG stop at full size
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 6)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    with pytest.warns(UserWarning, match="recompile_limit = 7"):
        postdiff.plan_call(pipe, "a bag", num_inference_steps=8, height=32, width=32)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        postdiff.plan_call(pipe, "a bag", num_inference_steps=8, height=32, width=32)
    assert graphs() == 0  # planning compiled nothing
