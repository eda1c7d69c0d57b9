"""Inpainting (`StableDiffusionInpaintPipeline`, SD 1.x/2.x): 9-channel inpainting U-Nets (latents, mask and
masked-image latents concatenated) and 4-channel text-to-image U-Nets (the known region blended back after
every step by the pipeline), with a strength as in img2img.

Each segment is the pipeline's own call at the segment's size, so each phase has its own conditioning made by
the pipeline: image and mask preprocessed at that size, masked-image latents encoded from that image (a given
`masked_image_latents` is area-resized), and the 4-channel blend with image latents of that size. After a
switch the blend's noise is the switch's re-noising noise (`segment_methods`). `padding_mask_crop` (a crop
found from the mask at the requested size) is refused with mixed resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .base import Family, register
from .sd import StableDiffusionFamily, StableDiffusionImg2ImgFamily


@register
class StableDiffusionInpaintFamily(StableDiffusionImg2ImgFamily):
    name = "sd-inpaint"
    preset_family = "sd"
    pipeline_names = ("StableDiffusionInpaintPipeline",)

    def __init__(self, pipe, arguments: dict):
        StableDiffusionFamily.__init__(self, pipe, arguments)  # the requested size, as text-to-image

    def check_arguments(self) -> None:
        """Refused before anything runs: a crop region (`padding_mask_crop`, found from the mask at the full size
        and pasted back there) has no meaning for a lower-resolution segment, so it is refused with mixed resolution
        (check_plan); masks that do not divide the images (the pipeline finds it only after encoding)."""
        self._check_masks()

    def check_plan(self, plan) -> None:
        if self.args.get("padding_mask_crop") is not None and len(plan.phases) > 1:
            raise ConfigError("padding_mask_crop is not supported by postdiff with mixed resolution (switch > 0): the "
                              "crop is found from the mask at the requested size; use switch=0 (caching only)")

    def segment_size(self, phase) -> dict:
        return Family.segment_size(self, phase)  # image and mask are preprocessed at the segment's size

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        segment = super().segment_arguments(arguments, phase, last, latents, guided)
        given = arguments.get("masked_image_latents")
        if given is not None and tuple(given.shape[-2:]) != phase.latent_hw:
            segment["masked_image_latents"] = F.interpolate(given, size=phase.latent_hw, mode="area")
        return segment

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """After a switch the pipeline's own `prepare_latents` takes the switch's latents and encodes the known
        image at the segment's size; the noise it blends the known region with is the switch's (given latents
        are no noise of their own)."""
        methods = {"get_timesteps": self.segment_timesteps}
        if not first:
            prepare, noise = self.pipe.prepare_latents, self.switch_noise

            def entering(*args, **kwargs):
                latents_out, _, *rest = prepare(*args, **kwargs)
                return (latents_out, noise, *rest)

            methods["prepare_latents"] = entering
        return methods

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
