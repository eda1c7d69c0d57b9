"""Inpainting (SD 1.x/2.x): 9- and 4-channel U-Nets exactly as diffusers, and the known region kept at every
resolution of a mixed-resolution call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from recorder import UNetRecorder
from test_img2img import init_image
from tiny import sd_pipeline, sd_unet

import postdiff
from postdiff import ConfigError, PostDiffConfig


def inpaint_pipeline(folder, channels: int = 9, scheduler: str = "ddim") -> StableDiffusionInpaintPipeline:
    components = sd_pipeline(folder, scheduler=scheduler).components
    if channels == 9:
        torch.manual_seed(1)
        components["unet"] = sd_unet(in_channels=9)
    pipe = StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_image(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255  # repaint the right half
    return Image.fromarray(mask)


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", image=init_image(), mask_image=mask_image(), negative_prompt="",
                     height=32, width=32, num_inference_steps=8, guidance_scale=5.0, output_type="np",
                     generator=torch.Generator().manual_seed(seed))
    arguments.update(overrides)
    return pipe(**arguments).images


OFF_CASES = [
    (9, "ddim", dict()),
    (9, "euler", dict(strength=0.6, num_images_per_prompt=2)),
    (9, "dpmpp_2m", dict(output_type="latent")),
    (4, "ddim", dict()),
    (4, "euler", dict(strength=0.6)),
    (4, "pndm", dict(num_images_per_prompt=2, output_type="latent")),
]


@pytest.mark.parametrize("channels, scheduler, arguments", OFF_CASES)
def test_off_is_bit_identical_to_diffusers(model_dir, channels, scheduler, arguments):
    pipe = inpaint_pipeline(model_dir, channels, scheduler)
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    assert torch.equal(torch.as_tensor(np.asarray(call(pipe, **arguments))), torch.as_tensor(np.asarray(baseline)))


def test_off_with_given_masked_image_latents_and_a_mask_callback_is_bit_identical(model_dir):
    pipe = inpaint_pipeline(model_dir, 9)
    masked = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    def halve_mask(pipeline, step, t, tensors):
        return {**tensors, "mask": tensors["mask"] * 0.5} if step == 2 else tensors

    arguments = dict(masked_image_latents=masked, callback_on_step_end=halve_mask,
                     callback_on_step_end_tensor_inputs=["latents", "mask"])
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(call(pipe, **arguments), baseline)


@pytest.mark.parametrize("channels", [9, 4])
def test_mixed_resolution_conditions_each_phase_at_its_size(model_dir, channels):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, channels), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=6))
    recorder = UNetRecorder(pipe.unet)
    latents = call(pipe, output_type="latent")
    recorder.remove()
    assert [c["shape"][1:] for c in recorder.calls] == [(channels, 8, 8)] * 4 + [(channels, 16, 16)] * 2 + [(channels, 16, 16)] * 2
    assert [c["shape"][0] for c in recorder.calls] == [2] * 6 + [1] * 2
    assert latents.shape == (1, 4, 16, 16)
    if channels == 4:  # the last blend puts the known region's own latents back, at full resolution
        replay = torch.Generator().manual_seed(0)  # the call's draws: its low-resolution start and conditioning,
        low = pipe.image_processor.preprocess(init_image(), height=16, width=16)
        pipe._encode_vae_image(low, generator=replay)
        randn_tensor((1, 4, 8, 8), generator=replay)
        pipe._encode_vae_image(low * (pipe.mask_processor.preprocess(mask_image(), height=16, width=16) < 0.5), generator=replay)
        randn_tensor((1, 4, 16, 16), generator=replay)  # the switch's noise, then the full-resolution image latents
        known = pipe._encode_vae_image(pipe.image_processor.preprocess(init_image(), height=32, width=32), generator=replay)
        keep = pipe.mask_processor.preprocess(mask_image(), height=32, width=32)
        keep = torch.nn.functional.interpolate(keep, size=(16, 16)) < 0.5
        torch.testing.assert_close(latents[keep.expand_as(latents)], known[keep.expand_as(known)])


def test_refused_before_any_compute(model_dir):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, 9), PostDiffConfig(beta=0.5, switch=0.5))
    recorder = UNetRecorder(pipe.unet)
    with pytest.raises(ConfigError, match="padding_mask_crop is not supported"):
        call(pipe, padding_mask_crop=4)
    with pytest.raises(ConfigError, match="leaves 0 steps at scale 1.0"):
        call(pipe, strength=0.125)
    with pytest.raises(ConfigError, match="mask_image holds 2 masks for 3 images"):
        call(pipe, mask_image=[mask_image()] * 2, num_images_per_prompt=3)
    with pytest.raises(ConfigError, match="masked_image_latents has shape \\(1, 4, 8, 8\\): expected \\(n, C, 16, 16\\)"):
        call(pipe, masked_image_latents=torch.zeros(1, 4, 8, 8))
    assert recorder.calls == []
