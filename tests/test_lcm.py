"""Latent consistency models: LCM pipeline, and SD / SDXL pipelines with LCMScheduler, at 4 to 8 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from recorder import UNetRecorder
from tiny import lcm_pipeline, sd_pipeline, sdxl_pipeline

import postdiff
from postdiff import PostDiffConfig


def lcm_call(pipe, seed=0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=4, guidance_scale=8.5, height=32, width=32,
                     output_type="np", generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides}).images


def with_lcm_scheduler(pipe):
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


BUILDERS = {
    "lcm-pipeline": lcm_pipeline,
    "sd+lcm": lambda folder: with_lcm_scheduler(sd_pipeline(folder)),
    "sdxl+lcm": lambda folder: with_lcm_scheduler(sdxl_pipeline(folder)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("steps", [4, 8])
def test_off_is_bit_identical(model_dir, name, steps):
    pipe = BUILDERS[name](model_dir)
    extra = {} if name == "lcm-pipeline" else dict(guidance_scale=1.5)
    baseline = lcm_call(pipe, num_inference_steps=steps, **extra)
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(lcm_call(pipe, num_inference_steps=steps, **extra), baseline)


@pytest.mark.parametrize("config", [PostDiffConfig(beta=0.5, switch=0.5), PostDiffConfig(cache_interval=2), PostDiffConfig(cfg_stop=2)],
                         ids=["mixed", "deepcache", "cross-attention"])
def test_each_technique_changes_the_lcm_output_and_repeats_exactly(model_dir, config):
    pipe = lcm_pipeline(model_dir)
    baseline = lcm_call(pipe)
    postdiff.apply(pipe, config)
    first = lcm_call(pipe)
    assert np.abs(first - baseline).max() > 1e-6  # the random tiny U-Net's cross-attention moves outputs little
    lcm_call(pipe, seed=9, num_inference_steps=6)
    assert np.array_equal(lcm_call(pipe), first)


def test_lcm_pipeline_never_runs_cfg_batches(model_dir):
    pipe = postdiff.apply(lcm_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5, cfg_stop=2))
    recorder = UNetRecorder(pipe.unet)
    lcm_call(pipe, num_images_per_prompt=2)
    assert [call["shape"] for call in recorder.calls] == [(2, 4, 8, 8)] * 2 + [(2, 4, 16, 16)] * 2


def test_switch_renoises_the_schedulers_denoised(model_dir):
    """x0 at the switch is LCM's `denoised`, upsampled and diffused to the next timestep with fresh noise."""
    pipe = postdiff.apply(lcm_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    denoised, inputs = [], []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))

    def keep(pipeline, index, t, tensors):
        denoised.append(tensors["denoised"].clone())
        return tensors

    lcm_call(pipe, seed=5, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents", "denoised"])
    handle.remove()
    generator = torch.Generator().manual_seed(5)
    randn_tensor((1, 4, 8, 8), generator=generator)  # initial latents
    for _ in range(2):
        randn_tensor((1, 4, 8, 8), generator=generator)  # LCM's noise after each low-resolution step
    noise = randn_tensor((1, 4, 16, 16), generator=generator)
    alpha = pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[2])]
    expected = alpha.sqrt() * F.interpolate(denoised[1], size=(16, 16), mode="bilinear") + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(inputs[2], expected, rtol=1e-5, atol=1e-5)
