"""SANA (`SanaPipeline`): a linear-attention DiT (`SanaTransformer2DModel`) on the 32x-compressed latents of a deep
compression autoencoder (`AutoencoderDC`), Gemma-2 text, flow matching on DPM-Solver++ (flow sigmas, a static
`flow_shift`). CFG is a [negative, prompt] batch. The pipeline's own call runs every step.

- **Blocks** self-attend (linear attention) and cross-attend to the text (`attn2`), so the CFG-stop cache is the
  cross-attention cache (caching/cross_attention.py), resampled to the token grid of a later resolution.
- **Resolution binning** (`use_resolution_binning`) as PixArt's (pixart.py): the plan's size is the binned one;
  a lower segment runs at that size times its scale without binning again, the last one bins and resizes back
  as a plain call does. The pipeline takes only sizes in multiples of 32 pixels, so the latent sides of every
  phase must be multiples of 32 / the VAE's factor (1 for SANA's f32 autoencoder).
- **No position embedding** at SANA's sizes up to 1024 (`interpolation_scale` None): position reaches the tokens
  through the Mix-FFN's depthwise convolution, which works on the segment's grid.
- **low_res_shift="own"**: `flow_shift` times the phase's linear scale (SD3's resolution-dependent shift,
  sqrt(m/n)); "full" keeps the requested size's schedule.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha_pipeline
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma_pipeline
from diffusers.pipelines.sana import pipeline_sana

from ..denoisers import DenoiserSpec, TransformerKind, register_kind
from ..plan import ModelFacts
from .base import Family, register
from .sd3 import StableDiffusion3Family

PIXEL_MULTIPLE = 32  # SanaPipeline.check_inputs: height and width must be multiples of 32


class SanaKind(TransformerKind):
    """`SanaTransformer2DModel`: block caching over `transformer_blocks`, the cross-attention cache on `attn2`."""

    model_class = "SanaTransformer2DModel"

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        return {
            "hidden_states": torch.empty(batch, config["in_channels"], *latent_hw, device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["caption_channels"], device="meta"),
            "encoder_attention_mask": torch.ones(batch, spec.text_length, dtype=torch.int64, device="meta"),
            "timestep": torch.full((batch,), 500.0, device="meta"),
        }


register_kind("sana", SanaKind())


@register
class SanaFamily(Family):
    name = "sana"
    pipeline_names = ("SanaPipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "sana"
    max_text_length = 300  # the pipeline's default max_sequence_length (its embeddings have exactly that many)
    # transformer sample_size -> aspect-ratio bins of `use_resolution_binning` (the pipeline's table)
    bins = {128: pipeline_sana.ASPECT_RATIO_4096_BIN, 64: sigma_pipeline.ASPECT_RATIO_2048_BIN,
            32: alpha_pipeline.ASPECT_RATIO_1024_BIN, 16: alpha_pipeline.ASPECT_RATIO_512_BIN}

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        a = self.args
        self.height, self.width = a["height"], a["width"]
        if a["use_resolution_binning"]:
            sample_size = pipe.transformer.config.sample_size
            if sample_size not in self.bins:
                raise ValueError("Invalid sample size")
            self.height, self.width = pipe.image_processor.classify_height_width_bin(self.height, self.width,
                                                                                     ratios=self.bins[sample_size])

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        """The patch size, and the latent side that makes whole multiples of 32 pixels."""
        facts = super().facts(latent_hw)
        pixels = PIXEL_MULTIPLE // math.gcd(PIXEL_MULTIPLE, self.pipe.vae_scale_factor)
        return replace(facts, size_multiple=math.lcm(facts.size_multiple, pixels))

    def segment_size(self, phase) -> dict:
        return {**super().segment_size(phase), "use_resolution_binning": False}

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 1.0  # the pipeline decides it from the argument

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]

    def text_length(self) -> int:
        return self.args["max_sequence_length"]

    def own_scheduler(self, scheduler, phase):
        """DPM-Solver on flow sigmas: `flow_shift` times the phase's linear scale; a flow-matching Euler scheduler
        as SD3's."""
        config = scheduler.config
        if config.get("use_flow_sigmas") and not config.get("use_dynamic_shifting"):
            return type(scheduler).from_config(config, flow_shift=config.flow_shift * phase.latent_hw[0] / self.latent_hw[0])
        return StableDiffusion3Family.own_scheduler(self, scheduler, phase)
