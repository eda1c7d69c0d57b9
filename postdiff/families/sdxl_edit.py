"""SDXL image-to-image and inpainting (`StableDiffusionXLImg2ImgPipeline`, `StableDiffusionXLInpaintPipeline`).

Each is its SD 1.x/2.x counterpart (sd.py's img2img, inpaint.py) with SDXL's prompts, U-Net call and decode
(sdxl.py), plus what the two SDXL edit pipelines add over both:

- `denoising_start` replaces the strength's start (the pipeline's own `get_timesteps`), and the call then starts
  from the image's latents as they are (`add_noise=False`: the image is taken as partly denoised);
  `denoising_end` cuts the end as in text-to-image. The plan counts the steps that run.
- Time ids come as (ids, negative ids) from the pipeline's `_get_add_time_ids`, laid out [negative x n, ids x n]
  under CFG. With `requires_aesthetics_score` they are (original size, crop, aesthetic score): at a lower
  resolution the sizes and the crop scale with the latent, the score does not (it is no size).

Low resolution: img2img area-downscales the preprocessed image and encodes it with the pipeline's own
`prepare_latents` (as SD img2img); inpainting preprocesses image and mask at the phase's size (as SD
inpainting). What cannot start at low resolution is refused before any compute: latents given as the start
(`latents`, or a latent image with `denoising_start`) are noisy latents, and downscaling would average part
of their noise away, so the phase would start at a lower noise level than its timestep says; an inpainting
image given as latents cannot be preprocessed at the phase's size (the image processor passes latents through).
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .base import register
from .inpaint import StableDiffusionInpaintFamily
from .sd import StableDiffusionImg2ImgFamily
from .sdxl import StableDiffusionXLFamily, until_denoising_end


# Why latents given as a start cannot be downscaled for a low-resolution phase.
NOISY = "they are noisy latents of the full size, and downscaling would average part of their noise away"


def denoising_value_valid(value) -> bool:
    """The pipelines' own test: only a float strictly between 0 and 1 moves the start or the end."""
    return isinstance(value, float) and 0 < value < 1


class StableDiffusionXLEditMixin:
    """What SDXL img2img and inpainting add to their SD counterparts; listed first among the bases."""

    def check_arguments(self) -> None:
        """The pipeline's check of `denoising_start` against `denoising_end`, which it makes after encoding."""
        super().check_arguments()
        start, end = self.args["denoising_start"], self.args["denoising_end"]
        if denoising_value_valid(start) and denoising_value_valid(end) and start >= end:
            raise ValueError(f"`denoising_start`: {start} cannot be larger than or equal to `denoising_end`:  {end} when using type float.")

    def start_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        start = self.args["denoising_start"]
        start = start if denoising_value_valid(start) else None
        return self.pipe.get_timesteps(num_inference_steps, self.args["strength"], self.device, denoising_start=start)[0]

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The start's timesteps (`begin_offset` skipped), then the end's cut."""
        return until_denoising_end(self.pipe.scheduler, super().planned_timesteps(timesteps), self.args["denoising_end"])

    @property
    def adds_noise(self) -> bool:
        """The pipelines noise the init latents unless `denoising_start` is given (any value: they test `is None`)."""
        return self.args["denoising_start"] is None

    def _refuse_at_low_resolution(self, plan, what: str, why: str) -> None:
        if plan.phases[0].latent_hw != self.latent_hw:
            raise ConfigError(f"{what} cannot start a mixed-resolution call: {why}; use beta=1.0 (caching only) for "
                              "this call, or pass an image")


@register
class StableDiffusionXLImg2ImgFamily(StableDiffusionXLEditMixin, StableDiffusionImg2ImgFamily, StableDiffusionXLFamily):
    """Starts from the init image as SD img2img does (area-downscaled at low resolution); `latents`, when given,
    are the start itself (the pipeline skips `prepare_latents`) and set the size."""

    name = "sdxl-img2img"
    preset_family = "sdxl"
    pipeline_names = ("StableDiffusionXLImg2ImgPipeline",)

    @property
    def latent_hw(self) -> tuple[int, int]:
        given = self.args["latents"]
        return tuple(given.shape[-2:]) if given is not None else super().latent_hw

    def check_plan(self, plan) -> None:
        if self.args["latents"] is not None:
            self._refuse_at_low_resolution(plan, "Given `latents`", NOISY)
        elif not self.adds_noise and self.image.shape[1] == 4:
            self._refuse_at_low_resolution(plan, "An image given as latents with `denoising_start`", NOISY)


@register
class StableDiffusionXLInpaintFamily(StableDiffusionXLEditMixin, StableDiffusionInpaintFamily, StableDiffusionXLFamily):
    """Per-phase conditioning at each resolution, 9- and 4-channel U-Nets, as SD inpainting."""

    name = "sdxl-inpaint"
    preset_family = "sdxl"
    pipeline_names = ("StableDiffusionXLInpaintPipeline",)

    def check_plan(self, plan) -> None:
        super().check_plan(plan)
        image = self.args["image"]
        if torch.is_tensor(image) and image.ndim >= 3 and image.shape[-3] == self.pipe.vae.config.latent_channels:
            self._refuse_at_low_resolution(plan, "An image given as latents", "the image processor passes latents "
                                           "through at their size, so no phase-sized image or masked image can be made")
