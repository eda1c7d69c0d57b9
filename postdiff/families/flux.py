"""FLUX.1 (`FluxPipeline`: dev, guidance-distilled, and schnell): a rectified-flow MM-DiT on packed latents. The
pipeline's own call runs every step.

- **Guidance.** FLUX.1-dev takes its guidance scale as an input (`guidance_embeds`): one conditional pass a
  step, no CFG batch, so PostDiff's CFG stop has nothing to stop. True CFG (`true_cfg_scale > 1` with a
  negative prompt) is two passes a step in the pipeline's `cache_context("cond")` / `("uncond")`; that is what
  `cfg_stop` stops (caching/guidance.py), and each pass keeps its own block-cache state.
- **Packed latents.** The pipeline packs each 2x2 latent patch into one token; the switch unpacks the x0,
  resamples it spatially and packs the re-noised latents for the next segment's `latents=`.
- **Low resolution.** A segment's RoPE image ids are those of its token grid, as the pipeline makes them for
  an image of that size. `low_res_shift="full"` replays the requested size's schedule (mu from the full token
  count) in the lower segments; `"own"` lets the pipeline set its size's (`own_scheduler`).
"""

from __future__ import annotations

import torch

from .base import Family, packed_latent_hw, register


@register
class FluxFamily(Family):
    name = "flux"
    cfg_passes = 2  # true CFG: a conditional pass, then an unconditional one
    pipeline_names = ("FluxPipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "flux"
    max_text_length = 512  # the pipeline's default max_sequence_length (T5)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    @property
    def do_cfg(self) -> bool:
        """True CFG: the pipeline runs it when `true_cfg_scale > 1` and a negative prompt is given."""
        a = self.args
        has_negative = a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None)
        return a["true_cfg_scale"] > 1 and has_negative

    @property
    def guidance_scale(self) -> float:
        return self.args["true_cfg_scale"]

    def text_length(self) -> int:
        return self.args["max_sequence_length"]

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Even latent sides (the pipeline rounds down to whole 2x2 patches)."""
        return packed_latent_hw(self.height, self.width, self.pipe.vae_scale_factor)

    def own_scheduler(self, scheduler, phase):
        return type(scheduler).from_config(scheduler.config)  # the pipeline's mu follows the segment's token count

    def spatial_latents(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        return self.unpack(latents, latent_hw)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pack(latents)

    def unpack(self, packed: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, latent_hw[0] * factor, latent_hw[1] * factor, factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)
