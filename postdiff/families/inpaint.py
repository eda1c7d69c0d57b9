"""Inpainting (`StableDiffusionInpaintPipeline`, SD 1.x/2.x): 9-channel inpainting U-Nets (latents, mask and
masked-image latents concatenated) and 4-channel text-to-image U-Nets (the known region blended back after
every step), with a strength as in img2img.

Every step before and after the loop is the pipeline's own (check_inputs, the image and mask processors,
prepare_latents, prepare_mask_latents, the blend, the decode), so "off" reproduces the pipeline bit for bit.

Low resolution: each phase has its own conditioning, made by the pipeline's own code at the phase's size:
the image and the mask are preprocessed at that size (the processors resize them as they resize any input),
masked-image latents are encoded from that image (a given `masked_image_latents` is area-resized), and the
4-channel blend uses image latents of that size with that phase's noise (the low phase's from
`prepare_latents`, the full phase's the switch's re-noising noise), so the known region is kept at every
resolution. Not supported (refused): `padding_mask_crop` and `AsymmetricAutoencoderKL` VAEs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .base import Family, call_with, register
from .sd import StableDiffusionFamily, StableDiffusionImg2ImgFamily


@dataclass
class PhaseConditioning:
    mask: torch.Tensor  # at the latent size, CFG-duplicated as the pipeline makes it
    masked_image_latents: torch.Tensor
    image_latents: torch.Tensor | None  # 4-channel U-Nets: the known region's latents, for the blend
    noise: torch.Tensor  # the noise the blend re-noises the known region with


@register
class StableDiffusionInpaintFamily(StableDiffusionImg2ImgFamily):
    name = "sd-inpaint"
    preset_family = "sd"
    engine = False  # still the mirrored loop (postdiff/sampler.py)
    pipeline_names = ("StableDiffusionInpaintPipeline",)
    unsupported_arguments = ("ip_adapter_image", "ip_adapter_image_embeds", "padding_mask_crop")  # not in its mirror

    def __init__(self, pipe, arguments: dict):
        StableDiffusionFamily.__init__(self, pipe, arguments)
        self.conditioning: PhaseConditioning | None = None

    def check(self) -> None:
        Family.check(self)
        pipe, a = self.pipe, self.args
        call_with(pipe.check_inputs, a, height=self.height, width=self.width, callback_steps=self.callback_steps)
        if type(pipe.vae).__name__ == "AsymmetricAutoencoderKL":
            raise ConfigError("AsymmetricAutoencoderKL is not supported by postdiff's inpainting; use an AutoencoderKL")
        latent, unet_in = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
        if unet_in not in (latent, 2 * latent + 1):  # SD: 4 (blend) or 9 (concatenated); pixel space: 1 or 3
            raise ValueError(f"The unet {pipe.unet.__class__} should have either {latent} or {2 * latent + 1} input channels "
                             f"(the VAE's {latent} latent channels, or them with a mask and masked-image latents), not {unet_in}.")
        self._check_masks()
        self.set_call_fields()

    def _check_masks(self) -> None:
        """What the pipeline would find only after encoding: mask and masked-image batches that do not divide the
        call's images, masked-image latents of another size."""
        a = self.args
        mask, masked = a["mask_image"], a["masked_image_latents"]
        masks = len(mask) if isinstance(mask, list) else mask.shape[0] if torch.is_tensor(mask) and mask.ndim == 4 else 1
        if self.num_images % masks:
            raise ConfigError(f"mask_image holds {masks} masks for {self.num_images} images: the images must be a multiple of the masks")
        if masked is not None and (tuple(masked.shape[-2:]) != self.latent_hw or self.num_images % masked.shape[0]):
            raise ConfigError(f"masked_image_latents has shape {tuple(masked.shape)}: expected (n, C, {self.latent_hw[0]}, "
                              f"{self.latent_hw[1]}), the latent size of a {self.height}x{self.width} image, with n dividing {self.num_images}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return Family.latent_hw.fget(self)  # the requested size, as text-to-image

    @property
    def blends(self) -> bool:
        """4-channel U-Nets keep the known region by blending; 9-channel ones are conditioned on it."""
        return self.pipe.unet.config.in_channels == self.pipe.vae.config.latent_channels

    def timesteps(self) -> torch.Tensor:
        timesteps = super().timesteps()
        if len(timesteps) < 1:
            raise ValueError(f"After adjusting the num_inference_steps by strength parameter: {self.args['strength']}, the "
                             f"number of pipeline steps is {len(timesteps)} which is < 1 and not appropriate for this pipeline.")
        return timesteps

    # -- compute
    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        image = self._image(latent_hw)
        full_size = latent_hw == self.latent_hw
        outputs = pipe.prepare_latents(
            self.num_images, pipe.vae.config.latent_channels, *self._pixels(latent_hw), self.prompt_embeds.dtype,
            self.device, a["generator"], a["latents"] if full_size else None, image=image,
            timestep=self.latent_timestep.repeat(self.num_images), is_strength_max=a["strength"] == 1.0,
            return_noise=True, return_image_latents=self.blends, **self.latent_options(),
        )
        latents, noise, image_latents = outputs if self.blends else (*outputs, None)
        self.conditioning = self._conditioning(latent_hw, image, image_latents, noise)
        return latents

    def begin_phase(self, latent_hw: tuple[int, int], noise: torch.Tensor) -> None:
        image = self._image(latent_hw)
        image_latents = None
        if self.blends:
            encoded = self.pipe._encode_vae_image(image.to(self.device, self.prompt_embeds.dtype), generator=self.args["generator"])
            image_latents = encoded.repeat(self.num_images // encoded.shape[0], 1, 1, 1)
        self.conditioning = self._conditioning(latent_hw, image, image_latents, noise)

    def _pixels(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] * self.pipe.vae_scale_factor, latent_hw[1] * self.pipe.vae_scale_factor

    def _image(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        height, width = self._pixels(latent_hw)
        return self.pipe.image_processor.preprocess(self.args["image"], height=height, width=width).to(dtype=torch.float32)

    def _conditioning(self, latent_hw, image, image_latents, noise) -> PhaseConditioning:
        pipe, a = self.pipe, self.args
        height, width = self._pixels(latent_hw)
        mask_condition = pipe.mask_processor.preprocess(a["mask_image"], height=height, width=width)
        given = a["masked_image_latents"]
        if given is None:
            masked_image = image * (mask_condition < 0.5)
        else:
            masked_image = given if tuple(given.shape[-2:]) == latent_hw else F.interpolate(given, size=latent_hw, mode="area")
        mask, masked_latents = pipe.prepare_mask_latents(mask_condition, masked_image, self.num_images, height, width,
                                                         self.prompt_embeds.dtype, self.device, a["generator"], self.do_cfg)
        return PhaseConditioning(mask, masked_latents, image_latents, noise)

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        if not self.blends:  # after the CFG stop, the conditional half of the CFG-duplicated conditioning
            c = self.conditioning
            mask, masked = (c.mask, c.masked_image_latents) if cfg or not self.do_cfg else \
                (c.mask[self.num_images :], c.masked_image_latents[self.num_images :])
            model_input = torch.cat([model_input, mask, masked], dim=1)
        return super().denoise(model_input, t, cfg, scale)

    def after_step(self, scheduler, latents: torch.Tensor, next_t) -> torch.Tensor:
        """4-channel U-Nets: the known region is the image latents, noised to the next timestep (none after the last)."""
        if not self.blends:
            return latents
        c = self.conditioning
        known = c.image_latents
        if next_t is not None:
            known = scheduler.add_noise(known, c.noise, torch.tensor([next_t]))
        mask = c.mask.chunk(2)[0] if self.do_cfg else c.mask
        return (1 - mask) * known + mask * latents

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {**super().callback_tensors(latents), "mask": self.conditioning.mask,
                "masked_image_latents": self.conditioning.masked_image_latents}

    def take_callback_outputs(self, outputs: dict) -> None:
        super().take_callback_outputs(outputs)
        self.conditioning.mask = outputs.get("mask", self.conditioning.mask)
        self.conditioning.masked_image_latents = outputs.get("masked_image_latents", self.conditioning.masked_image_latents)
