"""Rectified-flow MM-DiTs: Stable Diffusion 3 and FLUX.1 against diffusers (tiny random models of the real
classes, built here), the flow switch against an independent computation, block spans, costs, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from test_accounting import PerCallFlops
from tiny import t5_tokenizer, text_encoder, tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import T5Config, T5EncoderModel

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs
from postdiff.denoisers import DENOISER_KINDS
from postdiff.models import spec_from_pipeline

NUM_BLOCKS = 5  # branches 0..1


def tiny_vae(**overrides) -> AutoencoderKL:
    config = dict(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)
    return AutoencoderKL(**{**config, **overrides})


def tiny_t5(vocab_size: int, width: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def sd3_pipeline(folder, seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    t5_tok = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=NUM_BLOCKS, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=text_encoder(len(tok), projection=True), tokenizer=tok,
        text_encoder_2=text_encoder(len(tok), projection=True), tokenizer_2=tok,
        text_encoder_3=tiny_t5(len(t5_tok)) if with_t5 else None, tokenizer_3=t5_tok if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(folder, seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1-dev layout (guidance embedding, dynamic shifting) or schnell's (neither)."""
    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder(len(tok)), tokenizer=tok, text_encoder_2=tiny_t5(len(t5_tok)), tokenizer_2=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, height=32, width=32, output_type="np",
                     max_sequence_length=16, generator=torch.Generator().manual_seed(seed))
    if isinstance(pipe, StableDiffusion3Pipeline):
        arguments.update(guidance_scale=5.0, negative_prompt="")
    arguments.update(overrides)
    return pipe(**arguments).images


BUILDERS = {"sd3": sd3_pipeline, "flux": flux_pipeline, "flux-true-cfg": flux_pipeline,
            "flux-schnell": lambda folder, seed=0: flux_pipeline(folder, seed, guidance_embeds=False)}
TRUE_CFG = dict(negative_prompt="a bag", true_cfg_scale=3.0)


def _arguments(name: str, **overrides) -> dict:
    return {**(TRUE_CFG if name == "flux-true-cfg" else {}), **overrides}


OFF_CASES = [
    ("sd3", dict()),
    ("sd3", dict(seed=3, guidance_scale=1.0)),
    ("sd3", dict(max_sequence_length=24, num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"])),
    ("sd3", dict(output_type="latent")),
    ("flux", dict()),
    ("flux", dict(seed=5, guidance_scale=7.0, num_images_per_prompt=2, max_sequence_length=24)),
    ("flux", dict(output_type="latent")),
    ("flux-true-cfg", dict()),
    ("flux-schnell", dict(num_inference_steps=4)),
]


@pytest.mark.parametrize("name, arguments", OFF_CASES)
def test_off_is_bit_identical_to_diffusers(model_dir, name, arguments):
    pipe = BUILDERS[name](model_dir)
    arguments = _arguments(name, **arguments)
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    assert torch.equal(torch.as_tensor(np.asarray(call(pipe, **arguments))), torch.as_tensor(np.asarray(baseline)))


TECHNIQUES = {
    "mixed": PostDiffConfig(beta=0.5, switch=0.5),
    "blocks": PostDiffConfig(cache_interval=2),
    "cfg-stop": PostDiffConfig(cfg_stop=4, ca_mode="none"),
    "paper": PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=6, ca_mode="none"),
    "text-stream": PostDiffConfig(cfg_stop=4),
    "all": PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=3, ca_mode="ave"),
}


@pytest.mark.parametrize("name", ["sd3", "flux", "flux-true-cfg"])
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_output_and_keeps_its_shape(model_dir, name, technique):
    pipe = BUILDERS[name](model_dir)
    baseline = call(pipe, **_arguments(name))
    postdiff.apply(pipe, TECHNIQUES[technique])
    output = call(pipe, **_arguments(name))
    assert output.shape == baseline.shape == (1, 32, 32, 3)
    no_cfg_to_stop = name == "flux" and technique == "cfg-stop"  # FLUX-dev has no CFG: nothing to stop, nothing cached
    assert np.array_equal(output, baseline) == no_cfg_to_stop


def test_sd3_switch_equals_an_independent_x0_upsample_renoise(model_dir):
    pipe = sd3_pipeline(model_dir, with_t5=False)
    postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].clone()), with_kwargs=True)
    call(pipe, seed=3)
    handle.remove()

    postdiff.remove(pipe)  # the independent computation: the bare diffusers components
    generator = torch.Generator().manual_seed(3)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a sneaker", None, None, negative_prompt="",
                                                                    max_sequence_length=16)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(8)
    latents = randn_tensor((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps[:4]:
            output = pipe.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2),
                                      encoder_hidden_states=torch.cat([negative, embeds]),
                                      pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
            uncond, cond = output.chunk(2)
            velocity = uncond + 5.0 * (cond - uncond)
            x0 = latents - scheduler.sigmas[scheduler.step_index or 0] * velocity
            latents = scheduler.step(velocity, t, latents).prev_sample
    upsampled = F.interpolate(x0, size=(16, 16), mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=generator)
    sigma = scheduler.sigmas[4]
    expected = (1 - sigma) * upsampled + sigma * noise
    assert seen[4].shape == (2, 4, 16, 16)
    torch.testing.assert_close(seen[4][1:], expected, rtol=1e-5, atol=1e-5)


def test_flux_switch_renoises_the_traced_x0_at_the_next_sigma_on_the_low_resolution_rope_grid(model_dir):
    pipe = postdiff.apply(flux_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    generator = torch.Generator().manual_seed(2)
    _, traced = postdiff.trace_x0(pipe, "a photo of a sneaker", num_inference_steps=8, height=32, width=32,
                                  max_sequence_length=16, output_type="latent", generator=generator)
    handle.remove()
    assert [k["hidden_states"].shape[1] for k in seen] == [16] * 4 + [64] * 4  # packed 2x2: 8x8 then 16x16 latents
    assert seen[0]["img_ids"][:, 1].max() == 3 and seen[4]["img_ids"][:, 1].max() == 7  # the grid of each size
    replay = torch.Generator().manual_seed(2)
    randn_tensor((1, 4, 8, 8), generator=replay)  # the initial low-resolution latents
    upsampled = F.interpolate(traced[3], size=(16, 16), mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=replay)
    scheduler = pipe.scheduler  # the call left the pipeline's own scheduler set for its 8 steps
    sigma = scheduler.sigmas[4]
    expected = pipe._pack_latents((1 - sigma) * upsampled + sigma * noise, 1, 4, 16, 16)
    torch.testing.assert_close(seen[4]["hidden_states"], expected, rtol=1e-5, atol=1e-5)


def _block_recorder(pipe):
    names = DENOISER_KINDS[spec_from_pipeline(pipe).denoiser.kind].block_names(pipe.transformer)
    calls, handles = [], []
    handles.append(pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append([])))
    for index, name in enumerate(names):
        block = pipe.transformer.get_submodule(name)
        # A skipped block's hook wrapper still runs; its attention projections do not.
        projection = block.attn.to_q
        handles.append(projection.register_forward_pre_hook(lambda m, a, index=index: calls[-1].append(index)))
    return calls, handles


@pytest.mark.parametrize("name", ["sd3", "flux", "flux-true-cfg"])
@pytest.mark.parametrize("branch", [0, 1])
def test_block_caching_skips_exactly_the_planned_span(model_dir, name, branch):
    pipe = postdiff.apply(BUILDERS[name](model_dir), PostDiffConfig(cache_interval=3, cache_branch=branch))
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=7, height=32, width=32, max_sequence_length=16,
                     **_arguments(name))
    plan = postdiff.plan_call(pipe, **arguments)
    calls, handles = _block_recorder(pipe)
    call(pipe, **arguments)
    for handle in handles:
        handle.remove()
    passes = 2 if name == "flux-true-cfg" else 1  # FLUX's true CFG: two passes a step, each with its own cache
    assert len(calls) == passes * len(plan)
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for index, ran in enumerate(calls):
        step = plan.steps[index // passes]
        expected = [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span]
        assert ran == expected, (index, step)


@pytest.mark.parametrize("name", ["sd3", "flux", "flux-true-cfg"])
@pytest.mark.parametrize("config", list(TECHNIQUES) + ["off"])
def test_real_run_costs_exactly_what_the_plan_predicts(model_dir, name, config):
    pipe = BUILDERS[name](model_dir)
    postdiff.apply(pipe, TECHNIQUES.get(config, PostDiffConfig()))
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, height=32, width=32, max_sequence_length=16,
                     num_images_per_prompt=2, **_arguments(name))
    plan = postdiff.plan_call(pipe, **arguments)
    counted = PerCallFlops(pipe.transformer)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        call(pipe, **arguments)
    counted.remove()
    spec = spec_from_pipeline(pipe).denoiser
    predicted = [cost.value("flops") for cost in plan_costs(spec, plan, num_images=2)]
    if name == "flux-true-cfg":  # two passes of batch 2 a CFG step, planned as one batch of 4
        # After the CFG stop the pipeline's unconditional call is answered before the transformer (caching/
        # guidance.py's SeparatePassGate): one call a step.
        counted_steps, index = [], 0
        for step in plan.steps:
            counted_steps.append(sum(counted.flops[index : index + (2 if step.cfg else 1)]))
            index += 2 if step.cfg else 1
        assert index == len(counted.flops)
        counted.flops = counted_steps
    assert counted.flops == predicted


@pytest.mark.parametrize("name", ["sd3", "flux-true-cfg"])
def test_repeated_interleaved_and_reapplied_calls_match_a_fresh_pipeline(model_dir, name):
    build, arguments = BUILDERS[name], _arguments(name)
    config = TECHNIQUES["paper"]
    expected = call(postdiff.apply(build(model_dir), config), seed=1, **arguments)
    expected_base = call(build(model_dir), seed=2, **arguments)
    pipe = postdiff.apply(build(model_dir), config)
    first = call(pipe, seed=1, **arguments)
    call(pipe, seed=7, **{**arguments, "num_inference_steps": 7, "height": 48, "width": 48})
    assert np.array_equal(call(pipe, seed=1, **arguments), first) and np.array_equal(first, expected)
    postdiff.remove(pipe)
    assert np.array_equal(call(pipe, seed=2, **arguments), expected_base)
    postdiff.apply(pipe, config)
    assert np.array_equal(call(pipe, seed=1, **arguments), expected)


REFUSED = [
    ("flux", PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.8x0.8 latent .* multiple of 2 per side is 0x0: a side of 0"),
    ("sd3", PostDiffConfig(cache_interval=2, cache_branch=2), {}, "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    ("flux", PostDiffConfig(cache_interval=2, cache_branch=2), {}, "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
]


def test_text_stream_cache_skips_the_text_only_work_and_reads_the_recorded_stream(model_dir):
    pipe = postdiff.apply(sd3_pipeline(model_dir), PostDiffConfig(cfg_stop=5))
    block = pipe.transformer.transformer_blocks[1]
    feed_forward, projected, text_out = [], [], []
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: feed_forward.append(0)),
               block.ff_context.net[0].proj.register_forward_pre_hook(lambda m, a: feed_forward.__setitem__(-1, 1)),
               block.attn.to_add_out.register_forward_hook(lambda m, a, output: projected.append(bool(output.any()))),
               block.register_forward_hook(lambda m, a, output: text_out.append(output[0].clone()))]
    call(pipe)
    for handle in handles:
        handle.remove()
    # The text feed-forward and output projection run before the stop only (the skipped projection gives zeros).
    assert feed_forward == [1] * 5 + [0] * 3 and projected == [True] * 5 + [False] * 3
    torch.testing.assert_close(text_out[5], text_out[4][1:])  # the conditional half of the last record
    assert all(torch.equal(text_out[5], later) for later in text_out[6:])


@pytest.mark.parametrize("name", ["sd3", "flux-true-cfg"])
def test_text_stream_modes_differ(model_dir, name):
    pipe = BUILDERS[name](model_dir)
    outputs = {mode: call(postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode=mode)), **_arguments(name))
               for mode in ("cond", "ave", "cfg")}
    assert not np.array_equal(outputs["cond"], outputs["ave"]) and not np.array_equal(outputs["cond"], outputs["cfg"])


@pytest.mark.parametrize("name, config, arguments, message", REFUSED)
def test_bad_settings_are_refused_before_any_compute(model_dir, name, config, arguments, message):
    pipe = BUILDERS[name](model_dir)
    calls = []
    for module in (pipe.transformer, pipe.text_encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
        call(pipe, **arguments)
    assert calls == []


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("spec", ["first-block-cache:threshold=0.5", "taylorseer:interval=3,warmup=2", "magcache:threshold=0.5"])
def test_diffusers_caches_run_as_external_methods_with_measured_macs(model_dir, name, spec):
    from postdiff.evaluation.baselines import ExternalMethod, measured_denoiser_macs

    pipe = BUILDERS[name](model_dir)
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, height=32, width=32, max_sequence_length=16)
    baseline_macs = measured_denoiser_macs(pipe, **arguments)
    baseline = call(pipe)
    method = ExternalMethod.parse(spec)
    calibrations = []
    with method.applied(pipe, 8, calibration_call=lambda: calibrations.append(call(pipe))) as before_call:
        # MagCache calibrates SD3's ratios on the one call; FLUX's are diffusers' published ones.
        assert len(calibrations) == (spec.startswith("magcache") and name == "sd3")
        before_call(0)
        cached_macs = measured_denoiser_macs(pipe, **arguments)
        before_call(0)
        first = call(pipe)
        before_call(0)
        assert np.array_equal(call(pipe), first)  # reset before every call: no state from the last one
    assert cached_macs < baseline_macs
    assert not np.array_equal(first, baseline)
    assert np.array_equal(call(pipe), baseline)  # removed without a trace
    assert not any("_diffusers_hook" in m.__dict__ and m._diffusers_hook.hooks for m in pipe.transformer.modules())


def _residual_ratios(pipe, run) -> list[float]:
    """MagCache's ratios computed here: the image stream's residual across all blocks (the last block's output
    minus the first block's input) at each step; the mean over tokens of |res_t| / |res_t-1|, 1 at step 0."""
    blocks = pipe.transformer.transformer_blocks
    inputs, residuals = [], []
    handles = [blocks[0].register_forward_pre_hook(lambda m, a, k: inputs.append(k["hidden_states"]), with_kwargs=True),
               blocks[-1].register_forward_hook(lambda m, a, output: residuals.append(output[1] - inputs[-1]))]
    run()
    for handle in handles:
        handle.remove()
    norms = [residual.float().norm(dim=-1) for residual in residuals]
    return [1.0] + [(now / (before + 1e-8)).mean().item() for before, now in zip(norms, norms[1:])]


def test_magcache_calibrates_sd3_to_the_residual_ratios_computed_independently(model_dir):
    import logging

    from postdiff.evaluation.baselines import calibrated_mag_ratios

    pipe = sd3_pipeline(model_dir)
    run = lambda: call(pipe, seed=4, output_type="latent")  # noqa: E731
    expected = _residual_ratios(pipe, run)
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    before = (logger.level, logger.propagate, list(logger.handlers))
    ratios = calibrated_mag_ratios(pipe.transformer, 8, run)
    assert len(expected) == 8 and max(abs(r - 1) for r in expected) > 0.01  # not trivially all ones
    torch.testing.assert_close(ratios, torch.tensor(expected), rtol=0, atol=1e-5)
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
    assert type(pipe.transformer) is SD3Transformer2DModel and not pipe.transformer._diffusers_hook.hooks
    assert not any(m._diffusers_hook.hooks for m in pipe.transformer.modules() if "_diffusers_hook" in m.__dict__)


def test_magcache_on_sd3_skips_steps_and_repeats_a_seeded_call_exactly(model_dir):
    from postdiff.evaluation.baselines import ExternalMethod

    pipe = sd3_pipeline(model_dir)
    calls, handles = _block_recorder(pipe)
    call(pipe)
    assert [len(ran) for ran in calls] == 8 * [NUM_BLOCKS]  # without the cache
    method = ExternalMethod.parse("magcache:threshold=10,max_skip=2")  # retention 0.2: 2 of 8 steps never skipped
    with method.applied(pipe, 8, calibration_call=lambda: call(pipe, output_type="latent")) as before_call:
        del calls[:]  # the plain call and the calibration call
        before_call(0)
        first = call(pipe)
        before_call(0)
        second = call(pipe)
    for handle in handles:
        handle.remove()
    computed = [0, 1, 4, 7]  # after 2 skipped steps (max_skip) the next is computed; the threshold never binds
    assert [len(ran) for ran in calls] == 2 * [NUM_BLOCKS if step in computed else 0 for step in range(8)]
    assert np.array_equal(first, second)


def test_magcache_off_flux_without_a_calibration_call_is_refused_before_any_compute(model_dir):
    from postdiff.evaluation.baselines import ExternalMethod

    pipe = sd3_pipeline(model_dir)
    calls = []
    for module in (pipe.transformer, pipe.text_encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match="magcache on SD3Transformer2DModel: .* pass calibration_call"):
        with ExternalMethod.parse("magcache:threshold=0.5").applied(pipe, 8):
            pass
    assert calls == [] and type(pipe.transformer) is SD3Transformer2DModel


def test_the_sweep_calibrates_magcache_on_the_workloads_first_prompt_from_seed_0(model_dir, monkeypatch):
    from postdiff.evaluation.sweep import SweepPoint
    from postdiff.evaluation.workloads import Workload

    workload = Workload()
    workload.prompts = ["a bag", "a coat"]
    workload.call_arguments = dict(negative_prompt="", height=32, width=32, max_sequence_length=16)
    pipe = sd3_pipeline(model_dir)
    seen, original = [], StableDiffusion3Pipeline.__call__
    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", lambda self, *a, **k: seen.append((a, k)) or original(self, *a, **k))
    with SweepPoint(PostDiffConfig(), 6, "magcache:threshold=0.5").applied(pipe, workload, 4.0):
        pass
    (args, keywords), = seen
    assert keywords.pop("generator").initial_seed() == 0
    assert args == ("a bag",) and keywords == dict(num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                                                    **workload.call_arguments)


def test_block_noise_keeps_the_low_resolution_noise_in_its_block_means():
    from postdiff.engine import block_noise

    generator = torch.Generator().manual_seed(0)
    low, fresh = torch.randn(64, 4, 8, 8, generator=generator), torch.randn(64, 4, 16, 16, generator=generator)
    noise = block_noise(fresh, low)
    torch.testing.assert_close(F.avg_pool2d(noise, 2), low / 2, rtol=0, atol=1e-6)
    assert abs(noise.std().item() - 1) < 0.01 and abs(noise.mean().item()) < 0.01  # still unit normal per element


def test_block_switch_noise_renoises_around_the_noise_of_the_last_low_resolution_state(model_dir):
    pipe = postdiff.apply(sd3_pipeline(model_dir, with_t5=False), PostDiffConfig(beta=0.5, switch=0.5, switch_noise="block"))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"][1:].clone()), with_kwargs=True)
    _, traced = postdiff.trace_x0(pipe, "a photo of a sneaker", negative_prompt="", num_inference_steps=8, height=32,
                                  width=32, max_sequence_length=16, output_type="latent", guidance_scale=5.0,
                                  generator=torch.Generator().manual_seed(4))
    handle.remove()
    sigmas = pipe.scheduler.sigmas
    low_noise = (seen[3] - (1 - sigmas[3]) * traced[3]) / sigmas[3]  # what the last low-resolution state holds
    upsampled = F.interpolate(traced[3], size=(16, 16), mode="bilinear", align_corners=False)
    noise = (seen[4] - (1 - sigmas[4]) * upsampled) / sigmas[4]
    torch.testing.assert_close(F.avg_pool2d(noise, 2), low_noise / 2, rtol=1e-4, atol=1e-4)
    iid = call(postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5)), output_type="latent")
    assert not np.array_equal(call(postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5, switch_noise="block")),
                                   output_type="latent"), iid)


def test_block_switch_noise_needs_whole_factors_and_new_fields_leave_stored_keys_alone(model_dir):
    pipe = postdiff.apply(sd3_pipeline(model_dir), PostDiffConfig(beta=0.75, switch=0.5, switch_noise="block"))
    with pytest.raises(ConfigError, match="switch_noise='block' needs whole upsampling factors; \\(12, 12\\) -> \\(16, 16\\)"):
        postdiff.plan_call(pipe, "a bag", height=32, width=32)
    with pytest.raises(ConfigError, match="switch_noise='pink' is not allowed"):
        PostDiffConfig(switch_noise="pink")
    assert "switch_noise" not in PostDiffConfig(beta=0.5, switch=0.5).to_dict()  # the sweep store's keys stay valid
    assert PostDiffConfig(beta=0.5, switch=0.5, switch_noise="block").to_dict()["switch_noise"] == "block"


def _timesteps_seen(pipe) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    return seen, handle


def test_sd3_own_low_resolution_shift_steps_its_own_schedule_and_reenters_at_the_full_one(model_dir):
    """low_res_shift="own", static shift 3 at beta 1/2: the low phase steps along shift 1.5's sigmas (SD3's
    resolution-dependent shift, times the linear scale), its x0 is re-noised at the full schedule's next sigma."""
    pipe = postdiff.apply(sd3_pipeline(model_dir, with_t5=False), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"))
    seen, handle = _timesteps_seen(pipe)
    call(pipe, seed=3)
    handle.remove()

    postdiff.remove(pipe)
    generator = torch.Generator().manual_seed(3)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a sneaker", None, None, negative_prompt="",
                                                                    max_sequence_length=16)
    low = FlowMatchEulerDiscreteScheduler(shift=1.5)
    low.set_timesteps(8)
    full = FlowMatchEulerDiscreteScheduler(shift=3.0)
    full.set_timesteps(8)
    latents = randn_tensor((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        for index, t in enumerate(low.timesteps[:4]):
            output = pipe.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2),
                                      encoder_hidden_states=torch.cat([negative, embeds]),
                                      pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
            uncond, cond = output.chunk(2)
            velocity = uncond + 5.0 * (cond - uncond)
            x0 = latents - low.sigmas[index] * velocity
            latents = low.step(velocity, t, latents).prev_sample
    noise = randn_tensor((1, 4, 16, 16), generator=generator)
    upsampled = F.interpolate(x0, size=(16, 16), mode="bilinear", align_corners=False)
    expected = (1 - full.sigmas[4]) * upsampled + full.sigmas[4] * noise
    assert [float(k["timestep"][0]) for k in seen] == [float(t) for t in [*low.timesteps[:4], *full.timesteps[4:]]]
    assert not torch.equal(low.timesteps[:4], full.timesteps[:4])
    torch.testing.assert_close(seen[4]["hidden_states"][1:], expected, rtol=1e-5, atol=1e-5)


def test_flux_own_low_resolution_shift_takes_mu_from_the_low_resolution_token_count(model_dir):
    pipe = postdiff.apply(flux_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"))
    seen, handle = _timesteps_seen(pipe)
    call(pipe, seed=2)
    handle.remove()
    expected = []
    for tokens in (16, 64):  # 8x8 then 16x16 latents, packed 2x2
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
        expected.append(scheduler.timesteps / 1000)  # FLUX feeds timestep / 1000
    low, full = expected
    assert not torch.equal(low, full)
    torch.testing.assert_close(torch.cat([k["timestep"] for k in seen]), torch.cat([low[:4], full[4:]]))


def test_own_low_resolution_shift_changes_nothing_without_a_switch_and_is_refused_without_a_size_dependent_schedule(model_dir):
    from tiny import sd_pipeline

    pipe = sd3_pipeline(model_dir, with_t5=False)
    off = call(pipe)
    assert np.array_equal(call(postdiff.apply(pipe, PostDiffConfig(low_res_shift="own"))), off)
    assert np.array_equal(call(postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"))),
                          call(postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5))))
    assert "low_res_shift" not in PostDiffConfig(beta=0.5, switch=0.5).to_dict()  # the sweep store's keys stay valid
    with pytest.raises(ConfigError, match="low_res_shift='sideways' is not allowed"):
        PostDiffConfig(low_res_shift="sideways")
    unet = postdiff.apply(sd_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"))
    calls = []
    unet.unet.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match="low_res_shift='own' needs a sigma schedule that depends on the image size.*"
                                          "StableDiffusionPipeline with DDIMScheduler has none"):
        unet("a photo of a sneaker", num_inference_steps=4, height=32, width=32)
    assert calls == []


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_paper_preset_for_the_flow_families_is_the_measured_one_and_runs(model_dir, name):
    """beta 3/4, s 1/2, block caching k 2 over all but the first and last block, the low phase on its own
    schedule (the flow study's choice); the 12x12 low-resolution phase then 16x16, as planned."""
    family = postdiff.api.family_name(BUILDERS[name](model_dir))
    preset = PostDiffConfig.preset("paper", family=family)
    assert preset == PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cache_branch=0, low_res_shift="own")
    assert PostDiffConfig.preset("deepcache", family=family) == PostDiffConfig(cache_interval=2, cache_branch=0)
    assert PostDiffConfig.preset("paper", family="testbed-flow") == preset
    pipe = postdiff.apply(BUILDERS[name](model_dir), preset)
    seen, handle = _timesteps_seen(pipe)
    images = call(pipe)
    handle.remove()
    assert images.shape == call(BUILDERS[name](model_dir)).shape and np.isfinite(images).all()
    sizes = [k["hidden_states"].shape[-1] if name == "sd3" else k["hidden_states"].shape[1] for k in seen]
    assert sizes == ([12] * 4 + [16] * 4 if name == "sd3" else [36] * 4 + [64] * 4)  # FLUX: packed tokens
    with pytest.raises(ConfigError, match="family='sd4' is not allowed: expected one of sd, testbed, sdxl, pixart, sd3, flux"):
        PostDiffConfig.preset("paper", family="sd4")
