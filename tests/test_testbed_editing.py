"""The embedded model in diffusers' img2img and inpainting pipelines (pixel space, identity autoencoder)."""

from __future__ import annotations

import torch

import postdiff
from postdiff import PostDiffConfig
from postdiff.testbed.data import load_split, to_model_range
from postdiff.testbed.editing import img2img_pipeline, inpaint_pipeline


def real_images(count: int = 2) -> torch.Tensor:
    images, _ = load_split("test")
    return (to_model_range(images[:count]) + 1) / 2


def call(pipe, **arguments):
    return pipe(["a photo of a t-shirt", "a photo of a trouser"], negative_prompt=["", ""], num_inference_steps=6,
                guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(0), **arguments).images


def test_img2img_off_is_bit_identical_to_diffusers_and_the_paper_preset_switches():
    pipe = img2img_pipeline()
    baseline = call(pipe, image=real_images(), strength=0.75)
    postdiff.apply(pipe, PostDiffConfig())
    assert torch.equal(call(pipe, image=real_images(), strength=0.75), baseline)
    postdiff.apply(pipe, PostDiffConfig.preset("paper", family="testbed"))
    plan = postdiff.plan_call(pipe, "a bag", image=real_images(1), strength=0.75, num_inference_steps=6)
    assert [s.latent_hw for s in plan.steps] == [(16, 16)] * 2 + [(32, 32)] * 2  # int(6 x 0.75) = 4 steps run
    output = call(pipe, image=real_images(), strength=0.75)
    assert output.shape == baseline.shape and torch.isfinite(output).all() and not torch.equal(output, baseline)


def test_inpainting_with_the_one_channel_unet_keeps_the_known_half_exactly():
    """Diffusers' own inpainting refuses U-Nets other than 4 or 9 channels; PostDiff's takes the VAE's latent
    channels (blend) or twice them plus one (concatenated), so the pixel-space model inpaints by blending."""
    pipe = postdiff.apply(inpaint_pipeline(), PostDiffConfig.preset("paper", family="testbed"))
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 16:] = 1
    images = real_images()
    output = call(pipe, image=images, mask_image=mask)
    assert torch.equal(output[..., :16], (images * 2 - 1)[..., :16])
    assert (output[..., 16:] - (images * 2 - 1)[..., 16:]).abs().max() > 0.1
