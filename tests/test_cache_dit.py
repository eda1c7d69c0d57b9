"""cache-dit (the PyPI package, pinned 1.5.3) as an external method: its DBCache, with and without its TaylorSeer,
on tiny SD3 and FLUX pipelines and a tiny embedded flow model (our pipeline class: cache-dit's SD3 adapter layout,
built on it). Blocks run are counted from hooks on the blocks' own attention projections, independently of
cache-dit's statistics and of postdiff's counter; the measured MACs are checked against them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("cache_dit", reason="cache-dit is not installed (pip install cache-dit==1.5.3: the `external` extra)")

from test_flow import call, flux_pipeline, sd3_pipeline  # noqa: E402
from tiny import sd_pipeline  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from postdiff import ConfigError, PostDiffConfig  # noqa: E402
from postdiff.accounting import ATTENTION_PRODUCTS  # noqa: E402
from postdiff.evaluation.baselines import (  # noqa: E402
    ExternalMethod,
    counted_block_calls,
    countable_attention,
    measured_denoiser_macs,
)
from postdiff.testbed.flow_model import build_flow_pipeline  # noqa: E402

STEPS = 8
LOOSE = "cache-dit:rdt=0.5,Fn=1,ws=2"  # after 2 warmup steps, most steps of these tiny models fall under 0.5


def tiny_flow_pipeline(folder, seed: int = 0):
    """The embedded flow model's pipeline class (not one cache-dit registers), tiny, with weights that make every
    block depend on its input (adaLN-Zero starts each block as the identity)."""
    pipe = build_flow_pipeline(folder / "flow-tokenizer", seed=seed, num_layers=4, num_attention_heads=2,
                               attention_head_dim=8, caption_projection_dim=16)
    for parameter in pipe.transformer.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd3": sd3_pipeline, "flux": flux_pipeline, "testbed-flow": tiny_flow_pipeline}


def run(pipe, seed: int = 0):
    if type(pipe).__name__ == "TestbedFlowPipeline":
        return pipe("a photo of a bag", negative_prompt="", num_inference_steps=STEPS, guidance_scale=3.0,
                    output_type="np", generator=torch.Generator().manual_seed(seed)).images
    return call(pipe, seed)


def blocks_of(transformer) -> list:
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


class AttentionRecorder:
    """Per transformer call, the blocks whose attention query projection ran: a block that runs projects its
    queries; a block whose output comes from a cache does not."""

    def __init__(self, transformer):
        self.calls: list[list[int]] = []
        self.handles = [transformer.register_forward_pre_hook(lambda m, a: self.calls.append([]))]
        self.handles += [block.attn.to_q.register_forward_pre_hook(lambda m, a, index=index: self.calls[-1].append(index))
                         for index, block in enumerate(blocks_of(transformer))]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def leftovers(pipe, call_before) -> list[str]:
    """What cache-dit could leave on the pipeline once removed."""
    found = [f"{type(m).__name__}.{name}" for m in pipe.transformer.modules() for name in ("forward", "_is_patched", "_is_cached",
                                                                                           "_context_manager", "_original_forward")
             if name in vars(m)]
    found += [name for name in ("_context_manager", "_is_cached", "_original_call") if hasattr(pipe, name)]
    if vars(type(pipe)).get("__call__") is not call_before:
        found.append(f"{type(pipe).__name__}.__call__")
    return found


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("spec", [LOOSE, "cache-dit:rdt=0.5,Fn=1,Bn=1,ws=2", "cache-dit:rdt=0.5,Fn=2,ws=4,taylorseer=1"])
def test_cache_dit_skips_middle_blocks_repeats_a_seeded_call_and_leaves_no_trace(model_dir, name, spec):
    pipe = BUILDERS[name](model_dir)
    own_call = vars(type(pipe)).get("__call__")
    baseline = run(pipe)
    method = ExternalMethod.parse(spec)
    arguments = dict(method.arguments)
    recorder = AttentionRecorder(pipe.transformer)
    with method.applied(pipe, STEPS) as before_call, counted_block_calls(pipe.transformer) as counted:
        before_call(0)
        first = run(pipe)
        before_call(0)
        second = run(pipe)
    recorder.remove()
    assert counted == recorder.calls  # the method's block count is what ran, counted another way
    everything = list(range(len(blocks_of(pipe.transformer))))
    always = everything[:arguments["Fn"]] + everything[len(everything) - arguments.get("Bn", 0):]
    assert all(ran in (everything, always) for ran in counted)  # a step runs every block, or only the Fn + Bn ones
    skipped_steps = [step for step, ran in enumerate(counted[:STEPS]) if ran == always]
    assert skipped_steps and min(skipped_steps) >= arguments["ws"]  # nothing cached in the warmup
    assert counted[:STEPS] == counted[STEPS:]  # reset between calls: the same seed runs the same blocks
    assert np.array_equal(first, second)
    assert not np.array_equal(first, baseline)
    assert np.array_equal(run(pipe), baseline)  # removed: diffusers' own pipeline again, exactly
    assert leftovers(pipe, own_call) == []


@pytest.mark.parametrize("name", ["sd3", "testbed-flow"])
def test_taylorseer_forecasts_the_cached_steps_instead_of_reusing_them(model_dir, name):
    """Once it has a first derivative, TaylorSeer changes what the cached steps add. cache-dit 1.5.3 forms it at
    the 4th computed step (its states count from the step after they are made): with 3 warmup steps it has none
    when the caching starts, and every step after is cached, so nothing changes."""
    pipe = BUILDERS[name](model_dir)
    outputs = {}
    for warmup, taylorseer in itertools.product((3, 4), (0, 1)):
        with ExternalMethod.parse(f"cache-dit:rdt=0.5,Fn=1,ws={warmup},taylorseer={taylorseer}").applied(pipe, STEPS):
            outputs[warmup, taylorseer] = run(pipe)
    assert np.array_equal(outputs[3, 0], outputs[3, 1])
    assert not np.array_equal(outputs[4, 0], outputs[4, 1])


def block_macs(pipe) -> list[float]:
    """MACs of one call of each block (without attention products, as `measured_denoiser_macs` counts), from the
    counter's per-module table of a plain call, in which every block runs once a step."""
    counter = FlopCounterMode(display=False)
    with countable_attention(pipe.transformer), counter:
        run(pipe)
    table, root = counter.get_flop_counts(), type(pipe.transformer).__name__
    names = [f"{root}.transformer_blocks.{i}" for i in range(len(pipe.transformer.transformer_blocks))]
    names += [f"{root}.single_transformer_blocks.{i}" for i in range(len(getattr(pipe.transformer, "single_transformer_blocks", [])))]
    return [sum(flops for op, flops in table[name].items() if str(op).split(".")[1] not in ATTENTION_PRODUCTS) / 2 / STEPS
            for name in names]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_measured_macs_are_the_plain_calls_less_the_blocks_that_did_not_run(model_dir, name):
    pipe = BUILDERS[name](model_dir)
    arguments = (dict(prompt="a photo of a bag", negative_prompt="", guidance_scale=3.0) if name == "testbed-flow" else
                 dict(prompt="a photo of a sneaker", height=32, width=32, max_sequence_length=16,
                      **(dict(guidance_scale=5.0, negative_prompt="") if name == "sd3" else {})))
    arguments.update(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    per_block = block_macs(pipe)
    plain = measured_denoiser_macs(pipe, **arguments)
    with ExternalMethod.parse(LOOSE).applied(pipe, STEPS), counted_block_calls(pipe.transformer) as counted:
        cached = measured_denoiser_macs(pipe, **{**arguments, "generator": torch.Generator().manual_seed(0)})
    skipped = sum(per_block[i] for ran in counted for i in range(len(per_block)) if i not in ran)
    assert len(counted) == STEPS and skipped > 0
    assert cached == pytest.approx(plain - skipped, rel=1e-12)


REFUSED = [
    ("cache-dit:Fn=1", "missing rdt"),
    ("cache-dit:rdt=0.1,Fn=1,fn=2", "'fn' is not allowed for cache-dit; expected rdt, Fn, Bn"),
    ("cache-dit:rdt=high,Fn=1", "rdt='high' is not a float"),
    ("cache-dit:rdt=0.1,Fn=0", "Fn must be >= 1"),
    ("cache-dit:rdt=-1,Fn=1,mcc=-2", "rdt .* must be >= 0; mcc must be -1 .no limit. or >= 0"),
    ("cache-dit:rdt=0.1,Fn=1,taylorseer=2", "taylorseer must be 0 .off. or 1 .on."),
    ("cache-dit:rdt=0.1,Fn=1,order=2", "order is TaylorSeer's: give it with taylorseer=1"),
]


@pytest.mark.parametrize("spec, message", REFUSED)
def test_a_bad_spec_is_refused_when_read(spec, message):
    with pytest.raises(ConfigError, match=message):
        ExternalMethod.parse(spec)


@pytest.mark.parametrize("name, spec, message", [
    ("sd3", "cache-dit:rdt=0.1,Fn=3,Bn=2", "Fn \\+ Bn = 5 blocks always run, which leaves none of the 5 cached blocks of SD3"),
    ("flux", "cache-dit:rdt=0.1,Fn=4,Bn=1", "none of the 5 cached blocks of FluxTransformer2DModel"),  # 2 double + 3 single
    ("testbed-flow", "cache-dit:rdt=0.1,Fn=4", "none of the 4 cached blocks"),
    ("sd", "cache-dit:rdt=0.1,Fn=1", "cache-dit on StableDiffusionPipeline .UNet2DConditionModel.: cache-dit caches the blocks"),
])
def test_a_spec_the_model_cannot_take_is_refused_before_any_compute_and_leaves_it_as_it_was(model_dir, name, spec, message):
    pipe = sd_pipeline(model_dir) if name == "sd" else BUILDERS[name](model_dir)
    own_call = vars(type(pipe)).get("__call__")
    denoiser = pipe.unet if name == "sd" else pipe.transformer
    calls = []
    for module in (denoiser, pipe.text_encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=message):
        with ExternalMethod.parse(spec).applied(pipe, STEPS):
            run(pipe)
    assert calls == []
    if name != "sd":
        assert leftovers(pipe, own_call) == []


def test_the_sweep_grid_and_its_macs_take_cache_dit_points(model_dir):
    from postdiff.evaluation.sweep import SweepPoint, grid, point_macs
    from postdiff.evaluation.workloads import Workload

    workload = Workload()
    workload.prompts = ["a photo of a bag"]
    workload.call_arguments = dict(negative_prompt="")
    points = grid([6], externals=["cache-dit:Fn=1,ws=2,rdt=0.5"])
    assert [point.external for point in points if point.external] == ["cache-dit:Fn=1,rdt=0.5,ws=2"]  # one spelling a key
    pipe = tiny_flow_pipeline(model_dir)
    cached = point_macs(pipe, points[-1], 3.0, workload)
    plain = point_macs(pipe, SweepPoint(PostDiffConfig(), 6), 3.0, workload)
    assert 0 < cached < plain
