"""The embedded model in diffusers' image-to-image and inpainting pipelines.

The model works in pixel space, so its "autoencoder" is the identity: `PixelSpaceVAE` is a diffusers model
whose encode returns the image and whose decode returns the sample, with scaling factor 1 and a scale
factor of 1 between image and latent. With it, `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` run the embedded U-Net unchanged, so PostDiff's image-to-image and
inpainting are measured on the model trained on real data (bench/testbed_edit_quality.py). Inpainting: the
1-channel U-Net keeps the known region by blending, as SD's 4-channel U-Nets do (`TestbedInpaintPipeline`).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from .model import load_pipeline


class IdentityLatents:
    """What `retrieve_latents` reads from an encoder output: the latents themselves."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """The identity autoencoder of a pixel-space model (no weights)."""

    @register_to_config
    def __init__(self, latent_channels: int = 1, scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (1,),
                 force_upcast: bool = False):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # gives the model a device and dtype

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        return IdentityLatents(x) if return_dict else (x,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=z) if return_dict else (z,)


def _components(folder=None) -> dict:
    testbed = load_pipeline(folder)
    return dict(vae=PixelSpaceVAE(), text_encoder=testbed.text_encoder, tokenizer=testbed.tokenizer, unet=testbed.unet,
                scheduler=testbed.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def img2img_pipeline(folder=None) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(**_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestbedInpaintPipeline(StableDiffusionInpaintPipeline):
    """`StableDiffusionInpaintPipeline` for a U-Net whose input is the latent alone (the embedded model's 1 channel):
    diffusers blends the known region back after every step for U-Nets of 4 input channels (the latent channels of
    SD's VAE) and refuses other counts, so for the length of a call the U-Net's config says 4; the U-Net itself,
    and every tensor of the call, has the VAE's latent channels."""

    __test__ = False

    def __call__(self, *args, **kwargs):
        with _blending_input_channels(self.unet):
            return super().__call__(*args, **kwargs)


@contextlib.contextmanager
def _blending_input_channels(unet):
    config = unet._internal_dict
    unet._internal_dict = FrozenDict({**config, "in_channels": 4})
    try:
        yield
    finally:
        unet._internal_dict = config


def inpaint_pipeline(folder=None) -> TestbedInpaintPipeline:
    pipe = TestbedInpaintPipeline(**_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe

