"""Stable Diffusion XL: two text encoders, pooled text embeddings and added time ids.

At a lower resolution the micro-conditioning follows the latent: original size, target size and crop
coordinates are multiplied by the phase's scale (rounded), so the U-Net is told it makes an image of the
size it actually makes, as SDXL was trained.
"""

from __future__ import annotations

import torch

from .base import register
from .sd import StableDiffusionFamily


def until_denoising_end(scheduler, timesteps: torch.Tensor, end) -> torch.Tensor:
    """The timesteps a `denoising_end` keeps (those at or above its cutoff), as the SDXL pipelines cut them; only a
    float strictly between 0 and 1 cuts."""
    if end is not None and isinstance(end, float) and 0 < end < 1:
        cutoff = int(round(scheduler.config.num_train_timesteps - end * scheduler.config.num_train_timesteps))
        timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
    return timesteps


@register
class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_names = ("StableDiffusionXLPipeline",)
    # Micro-conditioning sizes (pixels): scaled with the latent in a lower-resolution segment.
    size_arguments = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size",
                      "negative_target_size", "negative_crops_coords_top_left")

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return until_denoising_end(self.pipe.scheduler, timesteps, self.args["denoising_end"])

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        """The plan has cut the timesteps at `denoising_end` already; the size conditions given follow the latent
        (rounded), as the defaults do (the segment's own size)."""
        segment = super().segment_arguments(arguments, phase, last, latents, guided)
        segment["denoising_end"] = None
        if phase.scale != 1.0:
            for name in self.size_arguments:
                if segment.get(name) is not None:
                    segment[name] = tuple(round(value * phase.scale) for value in segment[name])
        return segment
