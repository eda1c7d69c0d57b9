"""PixArt-alpha and PixArt-Sigma: a DiT (`PixArtTransformer2DModel`) conditioned on T5 text with a mask, CFG as a
[negative, prompt] batch. The pipelines' own calls run every step.

Resolution binning (`use_resolution_binning`): the plan's size is the binned one, as the pipeline bins it. A
lower-resolution segment runs at the binned size times its scale without binning again (the bins are for
full-size images), so the patch embedding recomputes its sin-cos position embeddings for the smaller token
grid, and PixArt-alpha 1024's resolution condition is that size (the aspect ratio unchanged), as the pipeline
builds it for an image of that size; the last segment bins and resizes back as a plain call does.
"""

from __future__ import annotations

from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha_pipeline
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma_pipeline

from .base import Family, register


@register
class PixArtAlphaFamily(Family):
    name = "pixart"
    pipeline_names = ("PixArtAlphaPipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "pixart"
    max_text_length = 120  # the pipeline's default max_sequence_length
    # transformer sample_size -> aspect-ratio bins of `use_resolution_binning`
    bins = {128: alpha_pipeline.ASPECT_RATIO_1024_BIN, 64: alpha_pipeline.ASPECT_RATIO_512_BIN, 32: alpha_pipeline.ASPECT_RATIO_256_BIN}

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        a = self.args
        config = pipe.transformer.config
        self.height = a["height"] or config.sample_size * pipe.vae_scale_factor
        self.width = a["width"] or config.sample_size * pipe.vae_scale_factor
        if a["use_resolution_binning"]:
            if config.sample_size not in self.bins:
                raise ValueError("Invalid sample size")
            self.height, self.width = pipe.image_processor.classify_height_width_bin(self.height, self.width, ratios=self.bins[config.sample_size])

    def segment_size(self, phase) -> dict:
        return {**super().segment_size(phase), "use_resolution_binning": False}

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 1.0  # the pipelines decide it from the argument

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]


@register
class PixArtSigmaFamily(PixArtAlphaFamily):
    """PixArt-Sigma: 300 text tokens and a 2048 bin."""

    pipeline_names = ("PixArtSigmaPipeline",)
    max_text_length = 300
    bins = {256: sigma_pipeline.ASPECT_RATIO_2048_BIN, **PixArtAlphaFamily.bins}
