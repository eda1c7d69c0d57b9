"""FLUX.2 (`Flux2Pipeline`: FLUX.2-dev) and FLUX.2 [klein] (`Flux2KleinPipeline`): a rectified-flow MM-DiT
(`Flux2Transformer2DModel`: double-stream, then single-stream blocks) on patchified, batch-normalized latents;
Mistral-3 (dev) or Qwen3 (klein) text. The pipelines' own calls run every step.

- **Latent layout.** The VAE's latents (B, C, H, W) (C = 32) are patchified 2x2 into (B, 4C, H/2, W/2), normalized
  by the VAE's batch-norm statistics (per patchified channel) and packed one token per patch. The noise is drawn
  and the flow runs in that normalized space, so that is where the switch re-noises: `spatial_latents` unpacks a
  step's tokens and un-patchifies them to (B, C, H, W) *still normalized* (the plan's latent size, H and W even),
  where the bilinear resize is spatial and the noise is N(0, 1) as the model's; `pipeline_latents` patchifies
  back into what `latents=` takes, (B, 4C, H/2, W/2). The resize mixes the four sub-positions of a 2x2 patch,
  which the batch norm normalizes with statistics of their own; the re-noised latents are exactly the normalized
  upsampled x0 where a channel's four sub-positions share their statistics (a translation-invariant latent has no
  preferred 2x2 phase). Klein's `output_type="latent"` is the denormalized, un-patchified latent: only an
  interrupted call reads it, and `spatial_latents` normalizes it into the same space first.
- **Guidance.** FLUX.2-dev is guidance-distilled: the guidance scale is an embedded input, one conditional pass a
  step, no CFG to stop (`cfg_stop` with `ca_mode="cond"` still reads the text stream from its cache after the
  stop). Klein's base models run real CFG (`guidance_scale > 1`, not `is_distilled`): a conditional pass, then an
  unconditional one on the empty prompt, each in the transformer's `cache_context("cond")` / `("uncond")`
  (cfg_passes = 2, as FLUX.1's true CFG); the distilled klein models run one pass.
- **Reference images** (`image=`, one or several): each is encoded once, at its own size (the pipeline sizes it
  from the image alone, at most 1024 x 1024 pixels, whatever the output size), and its tokens join every step
  on a RoPE grid of their own. A low-resolution segment conditions on the same full-size reference tokens (as
  Qwen-Image-Edit, qwen_image.py): downscaling them would blur the details an edit must keep while the layout
  is set. Later segments reuse the first segment's encoding (`prepare_image_latents`); the accounting counts the
  reference tokens in every step (`ModelFacts.condition_hw`; several references as one strip of their token total).
- **Low resolution.** A segment's RoPE ids are the pipeline's for its token grid. The time shift is FLUX.2's
  empirical mu, a function of the image token count and the step count: `low_res_shift="full"` replays the
  requested size's schedule in the lower segments, `"own"` lets the pipeline compute the segment's mu from its
  own token count (`own_scheduler`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError
from ..denoisers import DenoiserSpec, TransformerKind, register_kind
from ..plan import ModelFacts
from .base import Family, packed_latent_hw, register

REFERENCE_AREA = 1024 * 1024  # Flux2Pipeline resizes a reference image above this many pixels down to it


class Flux2Kind(TransformerKind):
    """`Flux2Transformer2DModel`: one span over its double- then single-stream blocks (caching/blocks.py cuts it
    where the layout changes); the text stream of the double-stream blocks is what the CFG-stop cache reads.
    Latent sides are even (whole 2x2 patches); reference images (`DenoiserSpec.condition_hw`) add their tokens."""

    model_class = "Flux2Transformer2DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def size_multiple(self, model) -> int:
        return 2

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        tokens = sum((hw[0] // 2) * (hw[1] // 2) for hw in (latent_hw, spec.condition_hw) if hw is not None)
        inputs = {
            "hidden_states": torch.empty(batch, tokens, config["in_channels"], device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["joint_attention_dim"], device="meta"),
            "timestep": torch.full((batch,), 0.5, device="meta"),
            "img_ids": torch.zeros(tokens, 4, device="meta"),
            "txt_ids": torch.zeros(spec.text_length, 4, device="meta"),
        }
        if config.get("guidance_embeds", True):  # the class's default: FLUX.2-dev's guidance embedding
            inputs["guidance"] = torch.full((batch,), 4.0, device="meta")
        return inputs


register_kind("flux2", Flux2Kind())


def reference_strip(latent_sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The reference images' latent sizes as one condition size of the same token count (the accounting counts
    tokens: one image is its own size, several a 2-latent-high strip of their total)."""
    if not latent_sizes:
        return None
    if len(latent_sizes) == 1:
        return latent_sizes[0]
    tokens = sum((h // 2) * (w // 2) for h, w in latent_sizes)
    return (2, 2 * tokens)


def check_combined_text_lengths(plan, lengths: list[int], do_cfg: bool) -> None:
    """`ca_mode` "ave" / "cfg" combine the two passes' text streams token by token: refused before any denoising
    when the prompt's and the negative prompt's token counts differ (embeddings given of different lengths)."""
    combined = plan.config.cross_attention_cache and plan.config.ca_mode in ("ave", "cfg")
    if combined and do_cfg and len(set(lengths)) > 1:
        raise ConfigError(f"ca_mode={plan.config.ca_mode!r} combines the text streams of the conditional and the "
                          f"unconditional pass token by token, but this call's prompt has {lengths[0]} text tokens and "
                          f"its negative prompt {lengths[1]}: use ca_mode='cond' (or 'none'), or embeddings of one length")


@register
class Flux2Family(Family):
    name = "flux2"
    pipeline_names = ("Flux2Pipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "flux2"
    max_text_length = 512  # the pipelines' default max_sequence_length (prompts are padded to it)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        sizes = [self.reference_size(image) for image in self.reference_images()]
        default = pipe.default_sample_size * pipe.vae_scale_factor
        last = sizes[-1] if sizes else (None, None)  # the pipeline defaults the output to the last reference's size
        self.height = arguments["height"] or last[0] or default
        self.width = arguments["width"] or last[1] or default
        factor = pipe.vae_scale_factor
        self.condition_hw = reference_strip([(h // factor, w // factor) for h, w in sizes])

    def reference_images(self) -> list:
        image = self.args["image"]
        return [] if image is None else list(image) if isinstance(image, list) else [image]

    def reference_size(self, image) -> tuple[int, int]:
        """(height, width) in pixels at which the pipeline encodes a reference image (a PIL image)."""
        if image.size[0] * image.size[1] > REFERENCE_AREA:
            image = self.pipe.image_processor._resize_to_target_area(image, REFERENCE_AREA)
        multiple = self.pipe.vae_scale_factor * 2
        width, height = image.size
        return (height // multiple * multiple, width // multiple * multiple)

    @property
    def do_cfg(self) -> bool:
        return False  # guidance-distilled: the guidance scale is embedded, one pass a step

    @property
    def guidance_scale(self) -> float:
        return 1.0  # no CFG combination (the embedded guidance is an input of the transformer)

    def text_lengths(self) -> list[int]:
        """Text tokens of each encoded prompt, in call order (the probe's encodings)."""
        return [embeds.shape[1] for embeds, _ in self.encodings.get("encode_prompt", [])]

    def text_length(self) -> int:
        lengths = self.text_lengths()
        return lengths[0] if lengths else self.args["max_sequence_length"]

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        """The reference images' latent size: their tokens join every step (the accounting counts them)."""
        facts = super().facts(latent_hw)
        return facts if self.condition_hw is None else replace(facts, condition_hw=self.condition_hw)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Even latent sides (the pipeline rounds down to whole 2x2 patches)."""
        return packed_latent_hw(self.height, self.width, self.pipe.vae_scale_factor)

    def own_scheduler(self, scheduler, phase):
        return type(scheduler).from_config(scheduler.config)  # the pipeline's mu follows the segment's token count

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """The reference images' latents (and an upsampled caption) computed by the first segment, reused after."""
        return self.computed_once(("prepare_image_latents", "upsample_prompt"), first)

    # -- the latent layout (see the module's doc)
    def spatial_latents(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Packed tokens (a step's) or a denormalized (B, C, H, W) latent (klein's latent output) as the normalized
        (B, C, H, W) latent."""
        if latents.ndim == 4:
            return self.pipe._unpatchify_latents(self.normalized(self.pipe._patchify_latents(latents)))
        batch, _, channels = latents.shape
        patches = latents.permute(0, 2, 1).reshape(batch, channels, latent_hw[0] // 2, latent_hw[1] // 2)
        return self.pipe._unpatchify_latents(patches)  # the inverse of the pipeline's `_pack_latents`

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._patchify_latents(latents)  # what `latents=` takes: (B, 4C, H/2, W/2), normalized

    def normalized(self, patches: torch.Tensor) -> torch.Tensor:
        """Patchified latents normalized by the VAE's batch-norm statistics, as the pipeline encodes an image."""
        bn, eps = self.pipe.vae.bn, self.pipe.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(patches)
        return (patches - mean) / std


@register
class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein]: the base models run real CFG as two passes (see the module's doc), the step-distilled ones
    (`is_distilled`) one conditional pass."""

    name = "flux2-klein"
    pipeline_names = ("Flux2KleinPipeline",)
    cfg_passes = 2  # a conditional pass, then an unconditional one

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 1 and not self.pipe.config.is_distilled  # the pipeline's own test

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]

    def check_plan(self, plan) -> None:
        check_combined_text_lengths(plan, self.text_lengths(), self.do_cfg)

    def segment_methods(self, phase, first: bool, latents) -> dict:
        return self.computed_once(("prepare_image_latents",), first)
