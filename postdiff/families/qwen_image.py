"""Qwen-Image (`QwenImagePipeline`), its image-to-image (`QwenImageImg2ImgPipeline`) and edit
(`QwenImageEditPipeline`) pipelines: a rectified-flow MM-DiT (`QwenImageTransformer2DModel`, 60 two-stream blocks)
on packed latents, Qwen2.5-VL text. The pipelines' own calls run every step.

- **Latent layout.** The VAE's latents are 5-D (B, C, 1, H, W) (a video VAE, one frame); the pipeline packs each
  2x2 patch into a token, (B, H/2 * W/2, 4C). The switch unpacks the x0 to (B, C, H, W) (the frame axis dropped),
  resamples it and packs the re-noised latents for the next segment's `latents=`.
- **True CFG.** With `true_cfg_scale > 1` and a negative prompt: a conditional, then an unconditional pass a
  step, each in the transformer's `cache_context("cond")` / `("uncond")` (cfg_passes = 2, as FLUX); then the
  guided output is rescaled to the conditional one's norm. After the CFG stop the unconditional pass returns the
  conditional output (caching/guidance.py), so the guidance and its rescale give the conditional output exactly.
  The text-stream cache skips `txt_mlp` and `attn.to_add_out` (what only feeds the text output).
- **Text length.** The prompt's own token count (its embeddings are cut to the tokens it has, at most
  `max_sequence_length`), read from the probe's encoding; the negative prompt has its own. `ca_mode` "ave" and
  "cfg" combine the two passes' text streams token by token, so they are refused when the counts differ.
- **Low resolution.** A segment's RoPE grid (`img_shapes`) is the pipeline's for an image of the segment's size.
  `low_res_shift="full"` replays the requested size's schedule (mu from its token count) in the lower segments;
  `"own"` lets the pipeline set its size's (mu from the segment's token count: `own_scheduler`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from ..config import ConfigError
from ..denoisers import DenoiserSpec, TransformerKind, register_kind
from ..plan import ModelFacts
from .base import Family, packed_latent_hw, register
from .sd import CallSizedImg2ImgFamily


class QwenImageKind(TransformerKind):
    """`QwenImageTransformer2DModel`: one span over its two-stream blocks; packed latents (sides even). An edit's
    condition image (`DenoiserSpec.condition_hw`) adds its tokens, on a grid of their own, after the image's."""

    model_class = "QwenImageTransformer2DModel"
    text_modules = ("txt_mlp", "attn.to_add_out")

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        grids = [(1, hw[0] // 2, hw[1] // 2) for hw in (latent_hw, spec.condition_hw) if hw is not None]
        tokens = sum(grid[1] * grid[2] for grid in grids)
        return {
            "hidden_states": torch.empty(batch, tokens, config["in_channels"], device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["joint_attention_dim"], device="meta"),
            "timestep": torch.full((batch,), 0.5, device="meta"),
            "img_shapes": [grids] * batch,
        }


register_kind("qwen-image", QwenImageKind())


@register
class QwenImageFamily(Family):
    name = "qwen-image"
    pipeline_names = ("QwenImagePipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "qwen-image"
    cfg_passes = 2  # true CFG: a conditional pass, then an unconditional one
    max_text_length = 512  # the pipeline's default max_sequence_length

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    @property
    def do_cfg(self) -> bool:
        """True CFG: the pipelines run it when `true_cfg_scale > 1` and a negative prompt (or its embeddings) is given."""
        a = self.args
        return a["true_cfg_scale"] > 1 and (a["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None)

    @property
    def guidance_scale(self) -> float:
        return self.args["true_cfg_scale"]

    def text_lengths(self) -> list[int]:
        """Text tokens of each encoded prompt, in call order (the prompt's, then the negative prompt's under CFG)."""
        return [embeds.shape[1] for embeds, _ in self.encodings.get("encode_prompt", [])]

    def text_length(self) -> int:
        """The conditional pass's text tokens (before the probe has encoded: the most the call allows)."""
        lengths = self.text_lengths()
        return lengths[0] if lengths else self.args["max_sequence_length"]

    def check_plan(self, plan) -> None:
        lengths = self.text_lengths()
        combined = plan.config.cross_attention_cache and plan.config.ca_mode in ("ave", "cfg")
        if combined and self.do_cfg and len(set(lengths)) > 1:
            raise ConfigError(f"ca_mode={plan.config.ca_mode!r} combines the text streams of the conditional and the "
                              f"unconditional pass token by token, but this call's prompt has {lengths[0]} text tokens "
                              f"and its negative prompt {lengths[1]}: use ca_mode='cond' (or 'none'), or prompts of "
                              "one token count")

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Even latent sides (the pipeline rounds down to whole 2x2 patches)."""
        return packed_latent_hw(self.height, self.width, self.pipe.vae_scale_factor)

    def own_scheduler(self, scheduler, phase):
        return type(scheduler).from_config(scheduler.config)  # the pipeline's mu follows the segment's token count

    def spatial_latents(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(latents, latent_hw[0] * factor, latent_hw[1] * factor, factor)[:, :, 0]

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)


@register
class QwenImageImg2ImgFamily(CallSizedImg2ImgFamily, QwenImageFamily):
    """SD image-to-image's plan at the call's size (sd.py, `CallSizedImg2ImgFamily`)."""

    name = "qwen-image-img2img"
    preset_family = "qwen-image"
    pipeline_names = ("QwenImageImg2ImgPipeline",)

    latent_hw = QwenImageFamily.latent_hw


@register
class QwenImageEditFamily(QwenImageFamily):
    """The edit: the condition image, resized to about 1024 x 1024 pixels at its aspect ratio, is encoded once and
    its latents are concatenated to the image tokens of every step (with their own RoPE grid in `img_shapes`);
    Qwen2.5-VL also sees it with the instruction.

    Low resolution: the condition image is NOT resized. The pipeline itself sizes it from the input image alone,
    whatever the output size, so every segment conditions on the same tokens, and they agree with what the text
    encoder saw (its encoding is computed once per call). Downscaling it would blur exactly the details an edit
    must keep while the low-resolution phase sets the layout, and the switch's x0 would then be denoised further
    against another condition. The price: the condition's tokens are a fixed cost in every step, so the
    low-resolution steps save less than in text-to-image. Later segments reuse the first segment's condition
    latents (the VAE encodes once, and its posterior is sampled once, as in a plain call)."""

    name = "qwen-image-edit"
    preset_family = "qwen-image"
    pipeline_names = ("QwenImageEditPipeline",)

    def __init__(self, pipe, arguments: dict):
        Family.__init__(self, pipe, arguments)
        image = arguments["image"]
        width, height = (None, None) if image is None else self.condition_size(image)
        multiple = pipe.vae_scale_factor * 2
        self.height = (arguments["height"] or height or 0) // multiple * multiple
        self.width = (arguments["width"] or width or 0) // multiple * multiple
        factor = pipe.vae_scale_factor
        self.condition_hw = None if image is None else (height // factor, width // factor)

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        """The condition image's latent size (its tokens join every step: the accounting counts them)."""
        facts = super().facts(latent_hw)
        if self.condition_hw is None:
            return facts
        return replace(facts, condition_hw=self.condition_hw)

    @staticmethod
    def condition_size(image) -> tuple[int, int]:
        """(width, height) of the condition, as the pipeline computes them from a PIL image (or the first of a list)."""
        size = image[0].size if isinstance(image, list) else image.size
        width, height, _ = calculate_dimensions(1024 * 1024, size[0] / size[1])
        return width, height

    def segment_methods(self, phase, first: bool, latents) -> dict:
        return self.computed_once(("_encode_vae_image",), first)
