"""Chroma (`ChromaPipeline`, `ChromaImg2ImgPipeline`: real CFG as two unnamed passes) and FLUX.1-Kontext
(`FluxKontextPipeline`: guidance-distilled editing with a condition image, optional true CFG as two unnamed passes)
against diffusers (tiny random models of the real classes, built here), the passes named by their order, the
condition image's tokens at every resolution, block spans, costs, refusals, the shipped configs."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ChromaImg2ImgPipeline,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from diffusers.utils.torch_utils import randn_tensor
from test_accounting import PerCallFlops
from test_flow import tiny_t5, tiny_vae
from test_qwen_image import test_image
from tiny import t5_tokenizer, text_encoder, tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs
from postdiff.caching.state import PASS_NAMES
from postdiff.cli import app
from postdiff.denoisers import DENOISER_KINDS, meta_denoiser
from postdiff.models import load_model_spec, spec_from_pipeline

NUM_BLOCKS = 5  # 2 double-stream + 3 single-stream blocks: branches 0..1
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
CONDITION_TOKENS = 8 * 8  # Kontext's 32 px condition image: a 16 x 16 latent, packed 2x2


def chroma_components(seed: int) -> dict:
    torch.manual_seed(seed)
    t5_tok = t5_tokenizer()
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
                text_encoder=tiny_t5(len(t5_tok)), tokenizer=t5_tok, transformer=transformer)


def chroma_pipeline(seed: int = 0) -> ChromaPipeline:
    pipe = ChromaPipeline(**chroma_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_img2img_pipeline(seed: int = 0) -> ChromaImg2ImgPipeline:
    pipe = ChromaImg2ImgPipeline(**chroma_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def clip_tokenizer():
    """A CLIP tokenizer from generated files, in a folder of its own that lives as long as the test session."""
    folder = tempfile.TemporaryDirectory(prefix="postdiff-kontext-")
    _FOLDERS.append(folder)
    return tokenizer(Path(folder.name))


_FOLDERS: list[tempfile.TemporaryDirectory] = []


def kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                               vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=text_encoder(len(tok)),
                               tokenizer=tok, text_encoder_2=tiny_t5(len(t5_tok)), tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"chroma": chroma_pipeline, "chroma-img2img": chroma_img2img_pipeline, "kontext": kontext_pipeline,
            "kontext-cfg": kontext_pipeline}
GUIDED = ("chroma", "chroma-img2img", "kontext-cfg")  # two passes a CFG step


def arguments(name: str, seed: int = 0, **overrides) -> dict:
    call = dict(prompt="a photo of a sneaker", num_inference_steps=8, height=32, width=32, max_sequence_length=16,
                output_type="latent", generator=torch.Generator().manual_seed(seed))
    if name.startswith("chroma"):
        call.update(negative_prompt="a drawing of a bag", guidance_scale=4.0)
    if name == "chroma-img2img":
        call.update(image=test_image(32), strength=0.75)
    if name.startswith("kontext"):
        # max_area: the requested size's own (the default rescales any size to 1024^2); no auto-resize of the
        # condition image to a 1024 px Kontext resolution (a tiny model's test would then run 65536 tokens)
        call.update(image=test_image(32, seed=1), max_area=32 * 32, _auto_resize=False, guidance_scale=3.5)
    if name == "kontext-cfg":
        call.update(negative_prompt="a drawing of a bag", true_cfg_scale=3.0)
    call.update(overrides)
    return call


def run(pipe, name: str, seed: int = 0, **overrides):
    return pipe(**arguments(name, seed, **overrides)).images


@functools.cache
def plain_latents(name: str) -> torch.Tensor:
    return run(BUILDERS[name](), name)


def as_tensor(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images))


def steps_of(name: str) -> int:
    return 6 if name == "chroma-img2img" else 8  # strength 0.75 of 8 steps


OFF_CASES = [(name, output) for name in BUILDERS for output in ("latent", "np")] + [
    ("chroma", dict(guidance_scale=1.0, seed=3)), ("kontext", "pil"), ("kontext", dict(image=None)),
    ("chroma", dict(num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"]))]


@pytest.mark.parametrize("name, case", OFF_CASES)
def test_off_is_bit_identical_to_diffusers(name, case):
    overrides = case if isinstance(case, dict) else dict(output_type=case)
    pipe = BUILDERS[name]()
    baseline = run(pipe, name, **overrides)
    postdiff.apply(pipe, "off")
    output = run(pipe, name, **overrides)
    if overrides.get("output_type") == "pil":
        baseline, output = [np.asarray(image) for image in baseline], [np.asarray(image) for image in output]
    assert torch.equal(as_tensor(output), as_tensor(baseline))


TECHNIQUES = {
    "paper": "paper",
    "blocks": PostDiffConfig(cache_interval=2, cache_branch=0),
    "mixed-full": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"),
    "mixed-own": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"),
    "cfg-stop-none": PostDiffConfig(cfg_stop=3, ca_mode="none"),
    **{f"cfg-stop-{mode}": PostDiffConfig(cfg_stop=3, ca_mode=mode) for mode in ("cond", "ave", "cfg")},
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_output_repeats_and_is_removed_without_a_trace(name, technique):
    pipe, baseline = BUILDERS[name](), plain_latents(name)
    postdiff.apply(pipe, TECHNIQUES[technique])
    first, second = run(pipe, name), run(pipe, name)
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert torch.equal(first, baseline) == (technique == "cfg-stop-none" and name not in GUIDED)  # nothing to stop
    assert torch.equal(first, second)
    postdiff.remove(pipe)
    assert torch.equal(run(pipe, name), baseline)


def test_the_presets_are_chromas_and_fluxs():
    assert postdiff.api.preset_family(chroma_pipeline()) == postdiff.api.preset_family(chroma_img2img_pipeline()) == "chroma"
    assert postdiff.api.preset_family(kontext_pipeline()) == "flux"
    pipe = postdiff.apply(kontext_pipeline(), "paper")
    assert postdiff.config_of(pipe) == PostDiffConfig.preset("paper", family="flux")
    postdiff.apply(pipe, "paper")
    seen, handle = _inputs_seen(pipe)
    run(pipe, "kontext")
    handle.remove()
    assert [k["hidden_states"].shape[1] for k in seen] == [36 + CONDITION_TOKENS] * 4 + [64 + CONDITION_TOKENS] * 4


def _inputs_seen(pipe) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("name", ["chroma", "kontext-cfg"])
def test_unnamed_passes_are_named_by_their_order_and_the_second_stops_with_cfg(name):
    """The pipelines call the transformer twice a CFG step without `cache_context`: the gate names the first the
    conditional pass, the second the unconditional one; after the CFG stop only the first runs."""
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cfg_stop=5, ca_mode="none"))
    state = pipe._postdiff.state
    names, prompts = [], []

    def record(module, args, kwargs):
        names.append(state.pass_name)
        prompts.append(kwargs["encoder_hidden_states"])

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    run(pipe, name)
    handle.remove()
    assert names == list(PASS_NAMES) * 5 + [PASS_NAMES[0]] * 3
    assert all(torch.equal(prompts[0], prompts[i]) for i in range(0, 10, 2))  # the prompt's pass first
    assert not torch.equal(prompts[0], prompts[1])  # then the negative prompt's
    assert state.pass_name == PASS_NAMES[0]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_mixed_resolution_runs_the_low_resolution_segment_first_on_its_own_grid(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    run(pipe, name)
    handle.remove()
    passes, half = (2 if name in GUIDED else 1), steps_of(name) // 2
    condition = CONDITION_TOKENS if name.startswith("kontext") else 0  # full size at every resolution
    tokens = [k["hidden_states"].shape[1] for k in seen]
    assert tokens == [16 + condition] * half * passes + [64 + condition] * half * passes
    grids = [int(k["img_ids"][:tokens[0] - condition if i < half * passes else 64, 1].max()) + 1 for i, k in enumerate(seen)]
    assert grids == [4] * half * passes + [8] * half * passes
    if name.startswith("chroma"):  # the text mask extended by the segment's image tokens
        assert [k["attention_mask"].shape[1] for k in seen] == [16 + 16] * half * passes + [16 + 64] * half * passes
    else:  # the condition's ids: a grid of its own, first coordinate 1, the same at both sizes
        assert all(torch.equal(k["img_ids"][-condition:], seen[0]["img_ids"][-condition:]) for k in seen)
        assert (seen[0]["img_ids"][-condition:, 0] == 1).all()


def test_kontext_switch_renoises_the_x0_of_the_image_tokens_only():
    pipe = postdiff.apply(kontext_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    _, traced = postdiff.trace_x0(pipe, **{**arguments("kontext"), "generator": torch.Generator().manual_seed(2)})
    handle.remove()
    replay = torch.Generator().manual_seed(2)
    randn_tensor((1, 4, 8, 8), generator=replay)  # the low-resolution start
    upsampled = F.interpolate(traced[3], size=(16, 16), mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=replay)
    sigma = pipe.scheduler.sigmas[4]
    expected = pipe._pack_latents((1 - sigma) * upsampled + sigma * noise, 1, 4, 16, 16)
    assert traced[3].shape == (1, 4, 8, 8)
    torch.testing.assert_close(seen[4]["hidden_states"][:, :64], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[4]["hidden_states"][:, 64:], seen[0]["hidden_states"][:, 16:])  # the condition


def _flow_timesteps(tokens: int, steps: int = 8) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    return scheduler.timesteps / 1000  # the pipelines feed timestep / 1000


@pytest.mark.parametrize("name", ["chroma", "kontext"])
@pytest.mark.parametrize("shift", ["full", "own"])
def test_low_res_shift_takes_mu_from_the_requested_or_the_segments_image_tokens(name, shift):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift=shift))
    seen, handle = _inputs_seen(pipe)
    run(pipe, name)
    handle.remove()
    low, full = _flow_timesteps(16 if shift == "own" else 64), _flow_timesteps(64)  # Kontext: not its condition's
    timesteps = torch.cat([k["timestep"] for k in seen[:: 2 if name in GUIDED else 1]])
    torch.testing.assert_close(timesteps, torch.cat([low[:4], full[4:]]))


@pytest.mark.parametrize("name, branch", [("chroma", 0), ("chroma", 1), ("chroma-img2img", 0), ("kontext", 1),
                                          ("kontext-cfg", 0)])
def test_block_caching_skips_exactly_the_planned_span(name, branch):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cache_interval=3, cache_branch=branch))
    plan = postdiff.plan_call(pipe, **arguments(name))
    calls, handles = [], [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append([]))]
    kind = DENOISER_KINDS[spec_from_pipeline(pipe).denoiser.kind]
    for index, block_name in enumerate(kind.block_names(pipe.transformer)):
        projection = pipe.transformer.get_submodule(block_name).attn.to_q  # skipped blocks: their wrapper runs, not this
        handles.append(projection.register_forward_pre_hook(lambda m, a, index=index: calls[-1].append(index)))
    run(pipe, name)
    for handle in handles:
        handle.remove()
    passes = 2 if name in GUIDED else 1  # each pass (named by its order) keeps its own residual
    assert len(calls) == passes * len(plan)
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for index, ran in enumerate(calls):
        step = plan.steps[index // passes]
        assert ran == [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span], (index, step)


@pytest.mark.parametrize("name", ["chroma", "kontext-cfg"])
def test_the_text_stream_cache_skips_the_text_only_work_after_the_cfg_stop(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cfg_stop=5))
    block = pipe.transformer.transformer_blocks[1]
    mlp, text_out = [], []
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: mlp.append(0)),
               block.ff_context.net[0].proj.register_forward_pre_hook(lambda m, a: mlp.__setitem__(-1, 1)),
               block.register_forward_hook(lambda m, a, output: text_out.append(output[0].clone()))]
    run(pipe, name)
    for handle in handles:
        handle.remove()
    assert mlp == [1] * 10 + [0] * 3
    torch.testing.assert_close(text_out[10], text_out[8])  # the conditional pass's last record
    assert all(torch.equal(text_out[10], later) for later in text_out[11:])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_callback_on_step_end_sees_the_calls_global_steps(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append((index, pipeline.num_timesteps, tuple(tensors["latents"].shape)))
        return {}

    run(pipe, name, callback_on_step_end=callback)
    steps = steps_of(name)
    assert seen == [(i, steps, (1, 16 if i < steps // 2 else 64, 16)) for i in range(steps)]


def test_kontext_encodes_its_condition_at_full_size_once_per_call_and_reuses_it_after_the_switch():
    pipe = postdiff.apply(kontext_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    encoded = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(tuple(a[0].shape)))
    run(pipe, "kontext")
    handle.remove()
    assert encoded == [(1, 3, 32, 32)] * 2  # the probe's and the first segment's (the probe runs to the schedule)


def test_kontext_plans_the_preferred_resolution_of_its_condition_and_the_max_area_output():
    pipe = postdiff.apply(kontext_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    image = test_image(32).resize((64, 24))  # aspect 8:3
    _, width, height = min((abs(64 / 24 - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    plan = postdiff.plan_call(pipe, **arguments("kontext", image=image, _auto_resize=True, height=None, width=None,
                                                 max_area=48 * 48))
    assert plan.facts.condition_hw == (height // 2, width // 2)  # the VAE factor is 2 here
    assert plan.facts.latent_hw == (24, 24)  # the default size's square at max_area pixels


def test_chroma_img2img_encodes_the_area_downscaled_image_at_low_resolution():
    pipe = postdiff.apply(chroma_img2img_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    encoded = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(a[0].clone()))
    run(pipe, "chroma-img2img")
    handle.remove()
    full = pipe.image_processor.preprocess(test_image(32), height=32, width=32)
    assert len(encoded) == 1  # once, by the first (low-resolution) segment; the second starts from latents=
    torch.testing.assert_close(encoded[0], F.interpolate(full, size=(16, 16), mode="area"))


REFUSED = [
    ("chroma", PostDiffConfig(cache_interval=2, cache_branch=2), {},
     "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    ("kontext", PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.8x0.8 latent .* multiple of 2 per side is 0x0: a side of 0"),
    ("chroma", PostDiffConfig(beta=0.5, switch=0.5), dict(latents=torch.zeros(1, 64, 16)), "latents= cannot be given"),
    ("chroma-img2img", PostDiffConfig(cfg_stop=7), {}, "cfg_stop=7 is out of range for 6 steps"),
]


@pytest.mark.parametrize("name, config, overrides, message", REFUSED)
def test_bad_settings_are_refused_before_any_compute(name, config, overrides, message):
    pipe = BUILDERS[name]()
    calls = []
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae.encoder, pipe.vae.decoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
        run(pipe, name, **overrides)
    assert calls == []


@pytest.mark.parametrize("mode", ["ave", "cfg"])
def test_combined_text_streams_of_embeddings_of_different_lengths_are_refused_before_denoising(mode):
    pipe = postdiff.apply(chroma_pipeline(), PostDiffConfig(cfg_stop=3, ca_mode=mode))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(m))
    embeddings = dict(prompt=None, negative_prompt=None, prompt_embeds=torch.randn(1, 10, 32),
                      prompt_attention_mask=torch.ones(1, 10), negative_prompt_embeds=torch.randn(1, 12, 32),
                      negative_prompt_attention_mask=torch.ones(1, 12))
    with pytest.raises(ConfigError, match=f"ca_mode='{mode}' combines the text streams .* prompt has 10 text tokens "
                                          "and its negative prompt 12"):
        run(pipe, "chroma", **embeddings)
    assert calls == []
    postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode="cond"))
    assert run(pipe, "chroma", **embeddings).shape == (1, 64, 16)


COST_CASES = [("chroma", technique) for technique in ("off", "mixed-full", "blocks", "cfg-stop-cond", "paper")] + [
    ("chroma-img2img", "paper"), ("kontext", "mixed-full"), ("kontext", "paper"), ("kontext-cfg", "cfg-stop-ave")]


@pytest.mark.parametrize("name, technique", COST_CASES)
def test_real_run_costs_exactly_what_the_plan_predicts(name, technique):
    pipe = postdiff.apply(BUILDERS[name](), TECHNIQUES.get(technique, "off"))
    plan = postdiff.plan_call(pipe, **arguments(name, num_images_per_prompt=2))
    counted = PerCallFlops(pipe.transformer)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        run(pipe, name, num_images_per_prompt=2)
    counted.remove()
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=2)]
    passes = [2 if step.cfg and name in GUIDED else 1 for step in plan.steps]  # planned as one batch of 4 a CFG step
    bounds = np.cumsum([0, *passes])
    assert bounds[-1] == len(counted.flops)
    assert [sum(counted.flops[a:b]) for a, b in zip(bounds, bounds[1:])] == predicted


# -- the shipped full-size configs

def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _hand_counted_flux(config: dict) -> int:
    """FluxTransformer2DModel: a double-stream block has two 6d adaLN projections, the joint attention's 8 d x d
    projections (biased) and two 4x GELU MLPs; a single-stream block a 3d adaLN projection, the q, k, v projections,
    the MLP's input and the joint output projection (5d -> d); the time, guidance and pooled-text embedders."""
    d, channels, text = config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"], config["joint_attention_dim"]
    mlp = _linear(d, 4 * d) + _linear(4 * d, d)
    double = 2 * _linear(d, 6 * d) + 8 * _linear(d, d) + 2 * mlp
    single = _linear(d, 3 * d) + 3 * _linear(d, d) + _linear(d, 4 * d) + _linear(5 * d, d)
    embedders = 2 * (_linear(256, d) + _linear(d, d)) + _linear(config["pooled_projection_dim"], d) + _linear(d, d)
    around = _linear(channels, d) + _linear(text, d) + _linear(d, 2 * d) + _linear(d, channels)
    return config["num_layers"] * double + config["num_single_layers"] * single + embedders + around


def _hand_counted_chroma(config: dict) -> int:
    """ChromaTransformer2DModel: FLUX.1's blocks without their adaLN projections (the modulation comes from the
    approximator: in, n residual 2-layer MLPs with RMSNorms, out to d), no guidance or pooled-text embedders."""
    d, channels, text = config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"], config["joint_attention_dim"]
    mlp = _linear(d, 4 * d) + _linear(4 * d, d)
    double = 8 * _linear(d, d) + 2 * mlp
    single = 3 * _linear(d, d) + _linear(d, 4 * d) + _linear(5 * d, d)
    hidden = config["approximator_hidden_dim"]
    approximator = (_linear(config["approximator_num_channels"], hidden)
                    + config["approximator_layers"] * (2 * _linear(hidden, hidden) + hidden) + _linear(hidden, d))
    around = _linear(channels, d) + _linear(text, d) + _linear(d, channels)
    return config["num_layers"] * double + config["num_single_layers"] * single + approximator + around


@pytest.mark.parametrize("model, counter, billions, cfg", [
    ("flux1-kontext-dev-1024", _hand_counted_flux, (11.8, 12.0), False),
    ("chroma1-hd-1024", _hand_counted_chroma, (8.8, 9.0), True)])
def test_the_shipped_configs_build_and_their_flops_run(model, counter, billions, cfg):
    spec = load_model_spec(model)
    built = meta_denoiser(spec.denoiser)
    counted = sum(p.numel() for p in built.parameters())
    assert abs(counted - counter(spec.denoiser.config)) / counted < 0.02
    assert billions[0] * 1e9 < counted < billions[1] * 1e9  # FLUX.1 "12B", Chroma1-HD "8.9B" (the model cards)
    assert spec.latent_hw == (128, 128) and spec.runs_cfg() == cfg
    result = CliRunner().invoke(app, ["flops", "--model", model, "--steps", "4", "--json", "--with-vae", "--with-text"])
    assert result.exit_code == 0, result.output
    per_step = json.loads(result.output)["per_step"]
    assert len(per_step) == 4 and len(set(per_step)) == 1 and per_step[0] > 0
    result = CliRunner().invoke(app, ["flops", "--model", model, "--steps", "28", "--preset", "paper", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["denoiser"] < 28 * per_step[0] * 0.8


def test_kontext_counts_its_condition_tokens_in_every_step():
    """FLUX.1-dev's transformer at 4096 + 4096 image tokens (the 1024 px condition) against 4096: about twice."""
    kontext, dev = (load_model_spec(name) for name in ("flux1-kontext-dev-1024", "flux1-dev-1024"))
    assert kontext.denoiser.config == dev.denoiser.config and kontext.denoiser.condition_hw == (128, 128)
    costs = [plan_costs(spec.denoiser, spec.plan(PostDiffConfig(), 1, do_cfg=False))[0].macs for spec in (kontext, dev)]
    assert 1.8 < costs[0] / costs[1] < 2.0
