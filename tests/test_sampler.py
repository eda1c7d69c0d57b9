"""The PostDiff loop against diffusers: exactness where claimed, and what each technique really runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverSinglestepScheduler, KDPM2DiscreteScheduler, StableDiffusionSAGPipeline
from diffusers.utils.torch_utils import randn_tensor
from recorder import UNetRecorder
from tiny import SCHEDULERS, call, sd_pipeline, sdxl_pipeline

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.caching.deepcache import deep_modules

PAPER = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=3, ca_mode="cond")
BUILDERS = {"sd": sd_pipeline, "sdxl": sdxl_pipeline}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_off_is_bit_identical_to_diffusers(model_dir, family, scheduler):
    pipe = BUILDERS[family](model_dir, scheduler=scheduler)
    baseline = call(pipe)
    postdiff.apply(pipe, PostDiffConfig.preset("off"))
    assert np.array_equal(call(pipe), baseline)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_off_is_bit_identical_for_v_prediction(model_dir, scheduler):
    pipe = sd_pipeline(model_dir, scheduler=scheduler, prediction_type="v_prediction")
    baseline = call(pipe)
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(call(pipe), baseline)


@pytest.mark.parametrize(
    "arguments",
    [
        dict(guidance_scale=1.0),
        dict(num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"]),
        dict(guidance_rescale=0.7, output_type="pt", eta=0.5),
        dict(output_type="latent", return_dict=True),
    ],
)
def test_off_is_bit_identical_across_call_arguments(model_dir, arguments):
    pipe = sd_pipeline(model_dir)
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    output = call(pipe, **arguments)
    assert torch.equal(torch.as_tensor(np.asarray(output)), torch.as_tensor(np.asarray(baseline)))


def test_off_keeps_the_output_type_and_tuple_return(model_dir):
    pipe = sd_pipeline(model_dir)
    base = pipe("a bag", num_inference_steps=3, height=32, width=32, return_dict=False, generator=torch.Generator().manual_seed(1))
    postdiff.apply(pipe, PostDiffConfig())
    ours = pipe("a bag", num_inference_steps=3, height=32, width=32, return_dict=False, generator=torch.Generator().manual_seed(1))
    assert isinstance(ours, tuple) and len(ours) == len(base)
    assert np.array_equal(np.asarray(ours[0][0]), np.asarray(base[0][0]))


@pytest.mark.parametrize(
    "neutral",
    [PostDiffConfig(beta=0.5, switch=0.0), PostDiffConfig(cache_interval=1, cache_branch=2), PostDiffConfig(cfg_stop=None, ca_mode="ave")],
    ids=["switch=0", "k=1", "cfg_stop=None"],
)
def test_neutral_settings_reduce_to_the_baseline(model_dir, neutral):
    pipe = sd_pipeline(model_dir)
    baseline = call(pipe)
    postdiff.apply(pipe, neutral)
    assert np.array_equal(call(pipe), baseline)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "technique",
    [PostDiffConfig(beta=0.5, switch=0.5), PostDiffConfig(cache_interval=2), PostDiffConfig(cfg_stop=4), PostDiffConfig(cfg_stop=4, ca_mode="none")],
    ids=["mixed-resolution", "deepcache", "cross-attention-cache", "cfg-stop-only"],
)
def test_each_technique_changes_the_output(model_dir, family, technique):
    pipe = BUILDERS[family](model_dir)
    baseline = call(pipe)
    postdiff.apply(pipe, technique)
    output = call(pipe)
    assert output.shape == baseline.shape
    assert np.abs(output - baseline).max() > 1e-4


def test_ca_modes_differ(model_dir):
    pipe = sd_pipeline(model_dir)
    outputs = {}
    for mode in ("cond", "ave", "cfg"):
        postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode=mode))
        outputs[mode] = call(pipe)
    assert np.abs(outputs["cond"] - outputs["ave"]).max() > 1e-5
    assert np.abs(outputs["cond"] - outputs["cfg"]).max() > 1e-5


def _recorded(pipe, config, **arguments):
    postdiff.apply(pipe, config)
    plan = postdiff.plan_call(pipe, **{**dict(prompt="a bag", num_inference_steps=8, height=32, width=32), **arguments})
    recorder = UNetRecorder(pipe.unet)
    call(pipe, **arguments)
    recorder.remove()
    return plan, recorder.calls


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_deepcache_reuse_steps_run_only_the_shallow_blocks(model_dir, branch):
    pipe = sd_pipeline(model_dir)
    deep = deep_modules(pipe.unet, branch)
    config = PostDiffConfig(cache_interval=3, cache_branch=branch)
    plan, calls = _recorded(pipe, config)
    assert [step.deep for step in plan.steps] == ["full", "cached", "cached"] * 2 + ["full", "cached"]
    every = set(calls[0]["ran"])
    shallow = {name for name in every if not any(name.startswith(d + ".") for d in deep)}
    assert shallow and shallow != every
    for step, recorded in zip(plan.steps, calls):
        assert set(recorded["ran"]) == (every if step.deep == "full" else shallow), step


def test_cfg_stop_makes_one_conditional_forward_of_batch_images(model_dir):
    pipe = sd_pipeline(model_dir)
    plan, calls = _recorded(pipe, PostDiffConfig(cfg_stop=5), num_images_per_prompt=3)
    assert len(calls) == len(plan) == 8
    assert [c["shape"][0] for c in calls] == [6] * 5 + [3] * 3
    ran_cross_attention = [any(name.endswith("attn2.to_q") for name in c["ran"]) for c in calls]
    assert ran_cross_attention == [True] * 5 + [False] * 3  # cached cross-attention is not recomputed


def test_latent_sizes_and_timesteps_follow_the_plan(model_dir):
    pipe = sd_pipeline(model_dir, scheduler="pndm")
    plan, calls = _recorded(pipe, PAPER)
    assert [c["shape"][2:] for c in calls] == [step.latent_hw for step in plan.steps]
    assert [c["shape"][0] for c in calls] == [2 if step.cfg else 1 for step in plan.steps]
    assert plan.steps[0].latent_hw == (8, 8) and plan.steps[-1].latent_hw == (16, 16)
    timesteps = [c["t"] for c in calls]
    pndm_low = pipe.scheduler.timesteps.tolist()  # PLMS: 9 timesteps for 8 steps, the second repeated
    switch = plan.phases[1].timestep_start
    assert timesteps[:switch] == pndm_low[:switch]
    assert timesteps[switch:] == [pndm_low[switch], pndm_low[switch + 1]] + pndm_low[switch + 1 :]  # warm-up again


def test_switch_matches_an_independent_x0_upsample_renoise_for_ddim(model_dir):
    pipe = sd_pipeline(model_dir, scheduler="ddim")
    config = PostDiffConfig(beta=0.5, switch=0.5)
    postdiff.apply(pipe, config)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    call(pipe, seed=3)
    handle.remove()

    postdiff.remove(pipe)  # the independent computation uses the bare diffusers components
    generator = torch.Generator().manual_seed(3)
    positive, negative = pipe.encode_prompt("a photo of a sneaker", "cpu", 1, True, "")
    embeds = torch.cat([negative, positive])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(8)
    latents = randn_tensor((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps[:4]:
            output = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample
            uncond, cond = output.chunk(2)
            eps = uncond + 5.0 * (cond - uncond)
            alpha = scheduler.alphas_cumprod[int(t)]
            x0 = (latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            latents = scheduler.step(eps, t, latents).prev_sample
    upsampled = F.interpolate(x0, size=(16, 16), mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=generator)
    alpha_next = scheduler.alphas_cumprod[int(scheduler.timesteps[4])]
    expected = alpha_next.sqrt() * upsampled + (1 - alpha_next).sqrt() * noise
    assert seen[4].shape == (2, 4, 16, 16)
    torch.testing.assert_close(seen[4][1:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_repeated_interleaved_and_reapplied_calls_match_a_fresh_pipeline(model_dir, family):
    build = BUILDERS[family]
    fresh_paper = postdiff.apply(build(model_dir), PAPER)
    expected_paper = call(fresh_paper, seed=1)
    expected_base = call(build(model_dir), seed=2)

    pipe = postdiff.apply(build(model_dir), PAPER)
    first = call(pipe, seed=1)
    call(pipe, seed=7, num_inference_steps=6, height=48, width=48)  # a different call in between
    assert np.array_equal(call(pipe, seed=1), first)
    assert np.array_equal(first, expected_paper)
    postdiff.remove(pipe)
    assert np.array_equal(call(pipe, seed=2), expected_base)
    postdiff.apply(pipe, PAPER)
    postdiff.apply(pipe, PAPER)  # twice is the same as once
    assert np.array_equal(call(pipe, seed=1), expected_paper)


def test_a_failed_call_leaves_no_state_behind(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PAPER)
    expected = call(pipe)

    def explode(pipeline, index, t, tensors):
        if index == 5:
            raise RuntimeError("stop here")
        return tensors

    with pytest.raises(RuntimeError, match="stop here"):
        call(pipe, callback_on_step_end=explode)
    assert np.array_equal(call(pipe), expected)


def test_callback_on_step_end_sees_and_sets_latents(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    shapes = []

    def zero_last(pipeline, index, t, tensors):
        shapes.append(tuple(tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if index == 7 else tensors

    latents = call(pipe, output_type="latent", callback_on_step_end=zero_last)
    assert shapes == [(1, 4, 8, 8)] * 4 + [(1, 4, 16, 16)] * 4
    assert not latents.any()


VALIDATION = [
    (PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.8x0.8 latent .* a side of 0"),
    (PostDiffConfig(beta=0.5, switch=0.05), {}, "every resolution needs at least one step"),
    (PostDiffConfig(cfg_stop=8), {}, "cfg_stop=8 is out of range for 8 steps"),
    (PostDiffConfig(beta=0.05, switch=0.5), dict(height=40, width=40), "beta=0.05 gives a 1x1 latent for the 20x20 latent, which at the denoiser.s multiple of 4 per side is 0x0: a side of 0; scales that work here: 0.11 to 0.9"),
]


@pytest.mark.parametrize("config, arguments, message", VALIDATION)
def test_validation_errors_come_before_any_denoiser_call(model_dir, config, arguments, message):
    pipe = postdiff.apply(sd_pipeline(model_dir), config)
    recorder = UNetRecorder(pipe.unet)
    with pytest.raises(ConfigError, match=message):
        call(pipe, **arguments)
    assert recorder.calls == []


def test_unknown_ca_mode_and_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="ca_mode='mean' is not allowed: expected one of cond, ave, cfg"):
        PostDiffConfig(cfg_stop=3, ca_mode="mean")
    with pytest.raises(ConfigError, match="cache_interval=0"):
        PostDiffConfig(cache_interval=0)
    with pytest.raises(ConfigError, match="preset='fast'"):
        PostDiffConfig.preset("fast")


def test_unsupported_scheduler_pipeline_and_branch_are_refused(model_dir):
    pipe = sd_pipeline(model_dir)
    pipe.scheduler = DPMSolverSinglestepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ConfigError, match="DPMSolverSinglestepScheduler is not supported with mixed resolution.*DDIMScheduler"):
        postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5))
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2))  # no switch: any scheduler runs
    with pytest.raises(ConfigError, match="cache_branch=9 is not allowed: this U-Net has branches 0..5"):
        postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=9))
    other = StableDiffusionSAGPipeline(**pipe.components)
    with pytest.raises(ConfigError, match="StableDiffusionSAGPipeline is not supported.*StableDiffusionPipeline"):
        postdiff.apply(other, PostDiffConfig())


def test_scheduler_swapped_after_apply_is_checked_at_call(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    pipe.scheduler = KDPM2DiscreteScheduler.from_config(pipe.scheduler.config)
    recorder = UNetRecorder(pipe.unet)
    with pytest.raises(ConfigError, match="KDPM2DiscreteScheduler is not supported with mixed resolution: it is a second-order"):
        call(pipe)
    assert recorder.calls == []


def test_sdxl_time_ids_follow_the_low_resolution(model_dir):
    pipe = postdiff.apply(sdxl_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    call(pipe, height=64, width=32)
    handle.remove()
    assert seen[0][0].tolist() == [32, 16, 0, 0, 32, 16]
    assert seen[-1][0].tolist() == [64, 32, 0, 0, 64, 32]
