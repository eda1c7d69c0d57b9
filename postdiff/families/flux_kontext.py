"""FLUX.1-Kontext (`FluxKontextPipeline`): FLUX.1-dev's MM-DiT (flux.py) editing an image: the condition image's
packed latents are concatenated to the image tokens of every step, on a RoPE grid of their own (first id 1). The
pipeline's own call runs every step.

- **Guidance** as FLUX.1-dev: the guidance scale is embedded, one pass a step; true CFG (`true_cfg_scale > 1`
  with a negative prompt) is a second pass, which this pipeline runs WITHOUT naming it in `cache_context`: the
  engine names the two passes of a step by their order (conditional first, caching/guidance.py), so `cfg_stop`
  stops the second and each pass keeps its own block-cache state.
- **Output size.** The pipeline rescales the requested size to `max_area` pixels at its aspect ratio (1024^2 by
  default), in multiples of 16: the plan's size is that one. A lower segment runs at the segment's size with
  `max_area` set to it, so the pipeline keeps it.
- **The condition image is encoded once, at its full size, and reused by every segment.** The pipeline sizes it
  from the input image alone (its aspect ratio's preferred Kontext resolution), whatever the output size, so a
  plain call conditions on the same tokens at any size; downscaling it at low resolution would blur the details
  an edit must keep while the low-resolution phase sets the layout, and the switch's x0 would then be denoised
  further against another condition. The price: its tokens are a fixed cost of every step, so the low-resolution
  steps save less than in text-to-image (the accounting counts them: `ModelFacts.condition_hw`). Later segments
  reuse the first segment's latents (`_encode_vae_image`: the VAE runs once per segment call otherwise).
- **Low resolution.** The image tokens' RoPE ids are the pipeline's for the segment's grid; mu follows the image
  token count (not the condition's): `low_res_shift` as FLUX.1's (flux.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from ..denoisers import DenoiserSpec, FluxKind, register_kind
from ..plan import ModelFacts
from .base import register
from .flux import FluxFamily


class FluxKontextKind(FluxKind):
    """`FluxTransformer2DModel` as Kontext feeds it: the condition image's tokens after the image's."""

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        inputs = super().inputs(spec, batch, latent_hw)
        if spec.condition_hw is None:
            return inputs
        extra = (spec.condition_hw[0] // 2) * (spec.condition_hw[1] // 2)
        hidden, ids = inputs["hidden_states"], inputs["img_ids"]
        inputs["hidden_states"] = torch.empty(batch, hidden.shape[1] + extra, hidden.shape[2], device="meta")
        inputs["img_ids"] = torch.zeros(ids.shape[0] + extra, 3, device="meta")
        return inputs


register_kind("flux-kontext", FluxKontextKind())


@register
class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    preset_family = "flux"
    pipeline_names = ("FluxKontextPipeline",)
    denoiser_kind = "flux-kontext"
    passes_in_cache_context = False  # its true-CFG passes are two plain calls, conditional first

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.output_size()
        self.condition_hw = self.condition_latent_size(arguments["image"])

    def output_size(self) -> tuple[int, int]:
        """The size the pipeline generates at: the requested one's aspect ratio at `max_area` pixels, in whole 16s."""
        height, width = self.requested_size()
        area, multiple = self.args["max_area"], self.pipe.vae_scale_factor * 2
        width, height = round((area * width / height) ** 0.5), round((area * height / width) ** 0.5)
        return height // multiple * multiple, width // multiple * multiple

    def condition_latent_size(self, image) -> tuple[int, int] | None:
        """The condition image's latent size, as the pipeline sizes it (latents given as `image` keep theirs)."""
        if image is None:
            return None
        if isinstance(image, torch.Tensor) and image.shape[1] == self.pipe.latent_channels:
            return tuple(image.shape[-2:])
        first = image[0] if isinstance(image, list) else image
        height, width = self.pipe.image_processor.get_default_height_width(first)
        if self.args["_auto_resize"]:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple, factor = self.pipe.vae_scale_factor * 2, self.pipe.vae_scale_factor
        return (height // multiple * multiple // factor, width // multiple * multiple // factor)

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        facts = super().facts(latent_hw)
        return facts if self.condition_hw is None else replace(facts, condition_hw=self.condition_hw)

    def segment_size(self, phase) -> dict:
        """The segment's size, kept by the pipeline: `max_area` is its own area."""
        size = super().segment_size(phase)
        return {**size, "max_area": size["height"] * size["width"]}

    def segment_methods(self, phase, first: bool, latents) -> dict:
        return self.computed_once(("_encode_vae_image",), first)
