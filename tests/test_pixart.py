"""PixArt-alpha and PixArt-Sigma: exactness against diffusers, each technique, block caching's span, state across
calls, and accounting against the real run. Tiny random models of the real classes, built here (no hub)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from test_accounting import PerCallFlops
from tiny import hook_leftovers, t5_tokenizer
from transformers import T5Config, T5EncoderModel
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs, total
from postdiff.caching.blocks import RESIDUAL, SPAN_INPUT, apply_block_cache, cached_span
from postdiff.caching.state import RunState
from postdiff.cli import app
from postdiff.models import spec_from_pipeline

PIPELINES = {"alpha": PixArtAlphaPipeline, "sigma": PixArtSigmaPipeline}
SCHEDULERS = {"dpmpp_2m": DPMSolverMultistepScheduler, "ddim": lambda: DDIMScheduler(clip_sample=False)}
NUM_BLOCKS = 5


def pixart_pipeline(kind: str = "alpha", scheduler: str = "dpmpp_2m", sample_size: int = 32, seed: int = 0):
    """sample_size 32: the 256 px aspect-ratio bins (32x32 latent); 128: PixArt-alpha 1024's resolution condition."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=NUM_BLOCKS,
        cross_attention_dim=24, caption_channels=16, sample_size=sample_size, patch_size=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(  # four levels: vae_scale_factor 8, as PixArt's
        block_out_channels=(8,) * 4, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32,
    )
    pipe = PIPELINES[kind](tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=SCHEDULERS[scheduler]())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioned_pipeline(**kwargs):
    """PixArt-alpha with sample_size 128 (resolution and aspect-ratio conditions), run small without binning."""
    return pixart_pipeline("alpha", sample_size=128, **kwargs)


SMALL = dict(use_resolution_binning=False, height=64, width=64)  # for the sample_size-128 model: an 8x8 latent


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, guidance_scale=4.5, output_type="np",
                     clean_caption=False, generator=torch.Generator().manual_seed(seed))
    arguments.update(overrides)
    output = pipe(**arguments)
    return output[0] if isinstance(output, tuple) else output.images


class Recorder:
    """Per transformer call: batch, latent size, added conditions, and which blocks really ran (a pre-hook on a
    leaf inside each block: a hooked-and-skipped block still fires its own pre-hook, its leaves do not)."""

    def __init__(self, transformer):
        self.calls: list[dict] = []
        self.handles = [transformer.register_forward_pre_hook(self._call, with_kwargs=True)]
        for index, block in enumerate(transformer.transformer_blocks):
            self.handles.append(block.attn1.to_q.register_forward_pre_hook(self._ran(index)))

    def _call(self, module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        self.calls.append({"shape": tuple(args[0].shape), "blocks": [],
                           "resolution": None if added["resolution"] is None else added["resolution"].tolist(),
                           "aspect_ratio": None if added["aspect_ratio"] is None else added["aspect_ratio"].tolist()})

    def _ran(self, index):
        def hook(module, args):
            self.calls[-1]["blocks"].append(index)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


# -- "off" is diffusers, bit for bit


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_off_is_bit_identical_to_diffusers(kind, scheduler):
    pipe = pixart_pipeline(kind, scheduler)
    baseline = call(pipe)
    binned = call(pipe, height=200, width=296)  # binned to 224x288, decoded, resized and cropped back
    postdiff.apply(pipe, PostDiffConfig.preset("off"))
    assert np.array_equal(call(pipe), baseline)
    ours = call(pipe, height=200, width=296)
    assert ours.shape == (1, 200, 296, 3) and np.array_equal(ours, binned)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(guidance_scale=1.0),
        dict(prompt=["a bag", "a black coat"], negative_prompt="a small bag", num_images_per_prompt=2),
        dict(output_type="latent", return_dict=False),
        dict(use_resolution_binning=False, height=64, width=96, output_type="pt", eta=0.5),
        dict(max_sequence_length=24),
    ],
)
def test_off_is_bit_identical_across_call_arguments(arguments):
    pipe = pixart_pipeline("alpha", "ddim")
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    output = call(pipe, **arguments)
    assert torch.equal(torch.as_tensor(np.asarray(output)), torch.as_tensor(np.asarray(baseline)))


def test_off_is_bit_identical_with_resolution_conditions_prompt_embeds_and_one_step():
    pipe = conditioned_pipeline(scheduler="ddim")
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a bag", max_sequence_length=16)
    with_embeds = dict(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                       negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask, **SMALL)
    expected = [call(pipe, **SMALL), call(pipe, **with_embeds), call(pipe, num_inference_steps=1, **SMALL)]
    postdiff.apply(pipe, PostDiffConfig())
    ours = [call(pipe, **SMALL), call(pipe, **with_embeds), call(pipe, num_inference_steps=1, **SMALL)]
    assert all(np.array_equal(a, b) for a, b in zip(ours, expected))  # one step: alpha decodes the scheduler's x0


def test_off_calls_the_legacy_callback_as_the_pipeline_does():
    pipe = pixart_pipeline("sigma")
    seen = {"pipe": [], "ours": []}
    call(pipe, callback=lambda i, t, latents: seen["pipe"].append((i, int(t), latents.clone())), callback_steps=3)
    postdiff.apply(pipe, PostDiffConfig())
    call(pipe, callback=lambda i, t, latents: seen["ours"].append((i, int(t), latents.clone())), callback_steps=3)
    assert [s[:2] for s in seen["ours"]] == [s[:2] for s in seen["pipe"]] and len(seen["pipe"]) == 3
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen["ours"], seen["pipe"]))


# -- each technique


NEUTRAL = [PostDiffConfig(beta=0.75, switch=0.0), PostDiffConfig(cache_interval=1, cache_branch=1), PostDiffConfig(cfg_stop=None, ca_mode="ave")]
TECHNIQUES = [PostDiffConfig(beta=0.75, switch=0.5), PostDiffConfig(beta=0.5, switch=0.5), PostDiffConfig(cache_interval=2),
              PostDiffConfig(cfg_stop=4), PostDiffConfig(cfg_stop=4, ca_mode="none")]


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
def test_neutral_settings_reduce_to_the_baseline_and_each_technique_changes_the_output(kind):
    pipe = pixart_pipeline(kind)
    baseline = call(pipe)
    for neutral in NEUTRAL:
        postdiff.apply(pipe, neutral)
        assert np.array_equal(call(pipe), baseline), neutral
    for technique in TECHNIQUES:
        postdiff.apply(pipe, technique)
        output = call(pipe)
        assert output.shape == baseline.shape and np.isfinite(output).all()
        assert np.abs(output - baseline).max() > 1e-4, technique


def test_low_resolution_phase_scales_the_resolution_condition_and_uses_low_resolution_position_embeddings():
    pipe = postdiff.apply(conditioned_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    recorder = Recorder(pipe.transformer)
    embedder = pipe.transformer.pos_embed
    embeddings = []
    handle = embedder.register_forward_hook(lambda m, args, out: embeddings.append((args[0].shape[-2:], out - m.proj(args[0]).flatten(2).transpose(1, 2))))
    call(pipe, use_resolution_binning=False, height=64, width=128)
    handle.remove()
    recorder.remove()
    assert [c["shape"][2:] for c in recorder.calls] == [(4, 8)] * 4 + [(8, 16)] * 4
    assert [c["resolution"][0] for c in recorder.calls] == [[32.0, 64.0]] * 4 + [[64.0, 128.0]] * 4
    assert all(c["aspect_ratio"][0] == [0.5] for c in recorder.calls)
    for size, added in embeddings:  # sin-cos embeddings of the grid actually given, over the model's base extent
        grid = (size[0] // 2, size[1] // 2)
        expected = get_2d_sincos_pos_embed(24, grid, base_size=embedder.base_size, interpolation_scale=embedder.interpolation_scale)
        torch.testing.assert_close(added, expected.float()[None].expand_as(added), atol=1e-4, rtol=1e-4)


# -- block caching


@pytest.mark.parametrize("branch, skipped", [(0, [1, 2, 3]), (1, [2])])
def test_block_caching_skips_exactly_the_span(branch, skipped):
    assert list(cached_span(NUM_BLOCKS, branch)) == skipped
    pipe = postdiff.apply(pixart_pipeline("alpha"), PostDiffConfig(cache_interval=3, cache_branch=branch, beta=0.75, switch=0.5))
    plan = postdiff.plan_call(pipe, "a bag", num_inference_steps=8)
    recorder = Recorder(pipe.transformer)
    call(pipe)
    recorder.remove()
    assert [s.deep for s in plan.steps] == ["full", "cached", "cached", "full"] + ["full", "cached", "cached", "full"]
    everything = list(range(NUM_BLOCKS))
    for step, recorded in zip(plan.steps, recorder.calls):
        expected = everything if step.deep == "full" else [i for i in everything if i not in skipped]
        assert recorded["blocks"] == expected, step


def test_a_cached_step_adds_the_stored_residual_to_the_new_input():
    transformer = pixart_pipeline("alpha").transformer
    state = RunState()
    apply_block_cache(transformer, 0, state)
    plan = postdiff.make_plan(PostDiffConfig(cache_interval=2), 2, postdiff.ModelFacts((8, 8), 2, 1, denoiser=f"transformer ({NUM_BLOCKS} blocks)"))
    inputs = dict(encoder_hidden_states=torch.randn(2, 5, 16), timestep=torch.tensor([500, 500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    x = torch.randn(2, 4, 8, 8)
    state.begin(1, 4.5)
    with torch.no_grad():
        state.enter(plan.steps[0])
        full = transformer(x, **inputs)[0]
        residual = state.deep[RESIDUAL].value
        state.enter(plan.steps[1])
        cached = transformer(x, **inputs)[0]  # same input: the span's input and residual are the full step's
        state.enter(plan.steps[1])
        shifted = transformer(x + 1, **inputs)[0]
    assert torch.allclose(cached, full, atol=1e-5) and not torch.equal(shifted, full)
    assert residual.shape == (2, 16, 24) and state.deep[SPAN_INPUT].value is None  # released once the span has run
    state.enter(postdiff.plan.Step(2, 0, (8, 8), False, "cached", "computed", False, ("cfg_stop",)))
    assert state.deep[RESIDUAL].value.shape == (1, 16, 24)  # the CFG stop keeps the conditional half
    state.reset()
    assert set(state.deep) == {RESIDUAL, SPAN_INPUT} and all(slot.value is None for slot in state.deep.values())


def test_branches_are_validated_before_any_compute_and_remove_restores_the_model():
    pipe = pixart_pipeline("sigma")
    with pytest.raises(ConfigError, match="cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"):
        postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=2))
    assert postdiff.plan_call(postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1)), "a").facts.max_cache_branch == 1
    with pytest.raises(ConfigError, match="beta=0.03 gives a 0.96x0.96 latent .* multiple of 2 per side is 0x0: a side of 0"):
        postdiff.apply(pipe, PostDiffConfig(beta=0.03, switch=0.5))
        call(pipe)
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cfg_stop=3))
    postdiff.remove(pipe)
    assert hook_leftovers(pipe.transformer) == []


# -- state across calls


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
def test_repeated_and_interleaved_calls_match_a_fresh_pipeline(kind):
    config = PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cfg_stop=3)
    expected = call(postdiff.apply(pixart_pipeline(kind), config), seed=1)
    pipe = postdiff.apply(pixart_pipeline(kind), config)
    first = call(pipe, seed=1)
    call(pipe, seed=5, num_inference_steps=6, height=192, width=256, use_resolution_binning=False, num_images_per_prompt=2)
    assert np.array_equal(call(pipe, seed=1), first) and np.array_equal(first, expected)
    postdiff.apply(pipe, config)
    assert np.array_equal(call(pipe, seed=1), expected)


# -- accounting


CONFIGS = {
    "off": PostDiffConfig(),
    "mixed": PostDiffConfig(beta=0.5, switch=0.5),
    "blocks-b1": PostDiffConfig(cache_interval=3, cache_branch=1),
    "cfg-stop-cond": PostDiffConfig(cfg_stop=3),
    "paper+ca-at-low-res": PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=2, ca_mode="ave"),
}


@pytest.mark.parametrize("kind", ["alpha", "sigma"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_real_run_costs_exactly_what_the_plan_predicts(kind, name):
    pipe = conditioned_pipeline() if kind == "alpha" else pixart_pipeline("sigma")
    pipe.transformer.set_attn_processor(AttnProcessor())
    postdiff.apply(pipe, CONFIGS[name])
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, num_images_per_prompt=2)
    if kind == "alpha":
        arguments.update(SMALL)
    plan = postdiff.plan_call(pipe, **arguments)
    counted = PerCallFlops(pipe.transformer)
    call(pipe, **arguments)
    counted.remove()
    spec = spec_from_pipeline(pipe).denoiser
    assert spec.kind == "pixart" and spec.text_length == (120 if kind == "alpha" else 300)
    predicted = [cost.value("flops") for cost in plan_costs(spec, plan, num_images=2)]
    assert counted.flops == predicted
    off_total = total(plan_costs(spec, postdiff.make_plan(PostDiffConfig(), len(plan.steps), plan.facts), num_images=2), "flops")
    assert (sum(predicted) < off_total) == (name != "off")


def test_flops_cli_counts_pixart_alpha_1024_as_the_paper():
    """PAPER.md: PixArt-alpha, 20 steps, 85.640 T (macs, CFG batch 2): the 1024 px model."""
    def flops(*flags):
        result = CliRunner().invoke(app, ["flops", "--json", "--model", "pixart-alpha-1024", "--steps", "20", *flags])
        assert result.exit_code == 0, result.output
        return __import__("json").loads(result.output.strip().splitlines()[-1])["total"]

    base = flops()
    assert base == pytest.approx(85.640, rel=1e-3)
    assert flops("--preset", "paper") < flops("--beta", "0.75", "--switch", "0.5") < base
