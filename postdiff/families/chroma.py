"""Chroma (`ChromaPipeline`, Chroma1-HD) and its image-to-image (`ChromaImg2ImgPipeline`): FLUX.1-schnell's MM-DiT
without the guidance and pooled-text embeddings (`ChromaTransformer2DModel`: 19 double-stream, then 38
single-stream blocks; its modulation comes from a small approximator network), on FLUX.1's packed latents, T5
text with an attention mask. The pipelines' own calls run every step.

- **Real CFG, as two passes.** With `guidance_scale > 1` the pipeline runs a conditional pass, then an
  unconditional one (negative prompt, "" by default), WITHOUT naming them in `cache_context`: the engine names a
  step's two passes by their order (conditional first, caching/guidance.py), so `cfg_stop` answers the second
  with the first's output (the guidance is then the conditional output exactly) and each pass keeps its own
  block-cache state. The CFG-stop cache is the text stream of the double-stream blocks (`ff_context` and
  `attn.to_add_out` skipped after the stop, caching/text_stream.py); the single-stream blocks run on it.
- **Text length.** T5 tokens padded to `max_sequence_length`, all of them in the joint attention (the mask keeps
  the prompt's and one padding token), so both passes see as many text tokens; "ave" / "cfg" combine them token
  by token (refused where given embeddings differ in length).
- **Packed latents** as FLUX.1 (flux.py): the switch unpacks the x0, resamples it and packs the re-noised latents
  for `latents=`; the attention mask, RoPE ids and mu follow the segment's image token count as the pipeline
  makes them (`low_res_shift` "full" replays the requested size's schedule, "own" the segment's).
"""

from __future__ import annotations

import torch

from ..denoisers import DenoiserSpec, FluxKind, register_kind
from .base import register
from .flux import FluxFamily
from .flux2 import check_combined_text_lengths
from .sd import CallSizedImg2ImgFamily


class ChromaKind(FluxKind):
    """`ChromaTransformer2DModel`: FLUX.1's block layout (caching/blocks.py lists Chroma's block classes); its
    inputs have no pooled text and no guidance."""

    def build(self, config: dict) -> torch.nn.Module:
        from diffusers import ChromaTransformer2DModel

        with torch.device("meta"):
            return ChromaTransformer2DModel.from_config(config)

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        return {
            "hidden_states": torch.empty(batch, tokens, config["in_channels"], device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["joint_attention_dim"], device="meta"),
            "timestep": torch.full((batch,), 0.5, device="meta"),
            "img_ids": torch.zeros(tokens, 3, device="meta"),
            "txt_ids": torch.zeros(spec.text_length, 3, device="meta"),
        }


register_kind("chroma", ChromaKind())


@register
class ChromaFamily(FluxFamily):
    name = "chroma"
    pipeline_names = ("ChromaPipeline",)
    denoiser_kind = "chroma"
    cfg_passes = 2  # a conditional pass, then an unconditional one
    passes_in_cache_context = False  # two plain calls of the transformer, conditional first

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 1  # the pipeline's own test

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]

    def text_lengths(self) -> list[int]:
        """Text tokens of the prompt and (under CFG) the negative prompt, from the probe's encoding."""
        encoded = self.encodings.get("encode_prompt", [])
        if not encoded:
            return []
        prompt, negative = encoded[0][0], encoded[0][3]
        return [prompt.shape[1]] + ([] if negative is None else [negative.shape[1]])

    def text_length(self) -> int:
        lengths = self.text_lengths()
        return lengths[0] if lengths else self.args["max_sequence_length"]

    def check_plan(self, plan) -> None:
        check_combined_text_lengths(plan, self.text_lengths(), self.do_cfg)


@register
class ChromaImg2ImgFamily(CallSizedImg2ImgFamily, ChromaFamily):
    """SD image-to-image's plan at the call's size (1024 by default; sd.py, `CallSizedImg2ImgFamily`)."""

    name = "chroma-img2img"
    preset_family = "chroma"
    pipeline_names = ("ChromaImg2ImgPipeline",)

    latent_hw = ChromaFamily.latent_hw
