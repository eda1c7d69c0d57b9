"""Z-Image and Z-Image-Turbo (`ZImagePipeline`) and Z-Image image-to-image (`ZImageImg2ImgPipeline`): a
single-stream rectified-flow DiT (`ZImageTransformer2DModel`) on (B, C, H, W) latents, Qwen3 text. The
pipelines' own calls run every step.

- **Blocks.** The transformer refines the image tokens (`noise_refiner`: 2 blocks, modulated by the timestep)
  and the caption tokens (`context_refiner`: 2 blocks, no timestep) separately, then runs its `layers` on the
  two concatenated. Block caching spans `layers` only: the refiners keep running, because they are where the
  current x_t and timestep first reach the image tokens (the analog of a DiT's first block, which the span never
  covers), and a span reaching into them would join streams of different tokens (image only, caption only,
  both), whose residual has no one shape.
- **CFG** is one batch, but a list: `[cond x n, uncond x n]` images, captions and timesteps, and the guidance is
  `cond + s (cond - uncond)`. `ZImageGuidanceHook` puts the batch in diffusers' order `[uncond, cond]` for the
  transformer (so the caches' conditional half is the second, as everywhere) and back for the pipeline; after the
  CFG stop it runs the conditional half only and answers both halves with it, so the guidance is the
  conditional output exactly. The captions are cut to their own token counts (padded to 32 inside the
  transformer), so a conditional-only batch after the stop can be shorter than the CFG batch whose span
  residual it reuses: the residual is cut to the batch's tokens (each image's tokens come first in it).
  `cfg_truncation < 1` (the pipeline dropping CFG on its late steps by itself) is refused under PostDiff: the plan
  would count those steps as guided.
- **No cross-attention cache.** The caption tokens are part of the one stream, so there is neither a
  cross-attention nor a separate text stream to read from a cache: `cfg_stop` works with `ca_mode="none"`, the
  other modes are refused.
- **Low resolution.** RoPE positions and the time shift (`mu` from the segment's token count; a static `shift`
  under `low_res_shift="own"` scaled as SD3's) follow the segment's latents, as the pipeline makes them.
"""

from __future__ import annotations

import torch

from ..caching.blocks import LayoutBlockSpanHook
from ..caching.hooks import Hook, install
from ..caching.state import RunState
from ..config import ConfigError
from ..denoisers import DenoiserSpec, TransformerKind, register_kind
from .base import Family, packed_latent_hw, register
from .sd import StableDiffusionImg2ImgFamily
from .sd3 import StableDiffusion3Family


class SpanResidualTrimHook(Hook):
    """Outside the span's first block: on a cached step, the stored residual cut to the tokens of the batch that
    runs (a conditional batch after the CFG stop can have fewer caption tokens than the CFG batch it was stored
    from; the tokens it has come first)."""

    def __init__(self, state: RunState, span_hook: LayoutBlockSpanHook):
        self.state = state
        self.slots = [slots.residual for slots in span_hook.slots.values()]

    def new_forward(self, module, forward, x, *args, **kwargs):
        step = self.state.step
        if step is not None and step.deep == "cached":
            for slot in self.slots:
                if slot.value is not None and slot.value[0].shape[1] > x.shape[1]:
                    slot.value = (slot.value[0][:, : x.shape[1]], slot.value[1])
        return forward(x, *args, **kwargs)


class ZImageKind(TransformerKind):
    """`ZImageTransformer2DModel`: block caching over `layers` (the refiners keep running, see above)."""

    model_class = "ZImageTransformer2DModel"
    block_lists = ("layers",)

    def size_multiple(self, model) -> int:
        return model.config.all_patch_size[0]  # the pipeline's (and the transformer's default) patch size

    def check(self, model, config) -> None:
        super().check(model, config)
        if config.cross_attention_cache:
            raise ConfigError(f"ca_mode={config.ca_mode!r} needs a cross-attention or a text stream to cache; Z-Image's "
                              "layers run one stream of image and caption tokens together: use ca_mode='none' "
                              "(the CFG stop without a cache)")

    def install_caches(self, model, config, state) -> None:
        super().install_caches(model, config, state)
        if config.deepcache:
            first = model.get_submodule(self.block_names(model)[config.cache_branch + 1])
            span_hook = next(hook for hook in first._postdiff_hooks if isinstance(hook, LayoutBlockSpanHook))
            install(first, SpanResidualTrimHook(state, span_hook))

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        return {
            "x": [torch.empty(config["in_channels"], 1, *latent_hw, device="meta") for _ in range(batch)],
            "t": torch.full((batch,), 0.5, device="meta"),
            "cap_feats": [torch.empty(spec.text_length, config["cap_feat_dim"], device="meta") for _ in range(batch)],
        }


register_kind("z-image", ZImageKind())


def swapped_halves(value, n: int):
    """[a x n, b x n] -> [b x n, a x n] for the batched lists and tensors of a call (the rest unchanged)."""
    if isinstance(value, list) and len(value) == 2 * n:
        return value[n:] + value[:n]
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 2 * n:
        return torch.cat([value[n:], value[:n]])
    return value


def with_sample(output, sample: list):
    """The transformer's output (a tuple, or its output class) with `sample` as its image list."""
    return (sample,) if isinstance(output, tuple) else type(output)(sample=sample)


class ZImageGuidanceHook(Hook):
    """The CFG batch of the Z-Image pipelines as the caches expect it, and the CFG stop (see the module's doc)."""

    def __init__(self, state: RunState):
        self.state = state

    def new_forward(self, module, forward, x, t, cap_feats, *args, **kwargs):
        state, n = self.state, self.state.num_images
        if state.step is None or not state.cfg_call or len(x) != 2 * n:
            return forward(x, t, cap_feats, *args, **kwargs)  # a conditional batch (no CFG, or its truncation)
        if not state.step.cfg:  # after the stop: the conditional half, answering both halves
            output = forward(x[:n], t[:n], cap_feats[:n], *args, **kwargs)
            return with_sample(output, list(output[0]) * 2)
        output = forward(*(swapped_halves(value, n) for value in (x, t, cap_feats)), *args, **kwargs)
        return with_sample(output, swapped_halves(list(output[0]), n))


@register
class ZImageFamily(Family):
    name = "z-image"
    pipeline_names = ("ZImagePipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "z-image"
    max_text_length = 512  # the pipeline's default max_sequence_length

    @classmethod
    def install_caches(cls, pipe, config, state) -> None:
        """The caches, then the guidance hook outermost: Z-Image's own (its CFG batch is a list, cond first)."""
        cls.kind().install_caches(pipe.transformer, config, state)
        if not config.is_off:
            install(pipe.transformer, ZImageGuidanceHook(state))

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = arguments["height"] or 1024, arguments["width"] or 1024  # the pipeline's defaults

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 0  # the pipelines' own test

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]

    @property
    def num_images(self) -> int:
        """Prompts (or embedding lists) times images per prompt."""
        a = self.args
        prompt = a["prompt"]
        batch = 1 if isinstance(prompt, str) else len(prompt if prompt is not None else a["prompt_embeds"])
        return batch * a["num_images_per_prompt"]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return packed_latent_hw(self.height, self.width, self.pipe.vae_scale_factor)

    def text_length(self) -> int:
        """The longest caption of the call (prompt or negative prompt: the CFG batch is padded to it), as encoded by
        the probe; before it, the most the call allows."""
        encoded = [len(caption) for result in self.encodings.get("encode_prompt", []) for captions in result
                   for caption in captions]
        return max(encoded, default=self.args["max_sequence_length"])

    def check_plan(self, plan) -> None:
        truncation = self.args.get("cfg_truncation")
        if self.do_cfg and truncation is not None and float(truncation) < 1 and not plan.config.is_off:
            raise ConfigError(f"cfg_truncation={truncation} makes the pipeline drop CFG on its late steps by itself, which "
                              "PostDiff's plan does not see (it would count them as guided): use cfg_truncation=1.0 and "
                              "PostDiff's cfg_stop instead")

    own_scheduler = StableDiffusion3Family.own_scheduler  # dynamic: the pipeline's mu; static: shift times the scale


@register
class ZImageImg2ImgFamily(StableDiffusionImg2ImgFamily, ZImageFamily):
    """Starts from the init image's latents noised to the strength's first timestep, as SD image-to-image
    (sd.py, `begin_offset`): the size is the call's height and width, else the preprocessed image's. Low
    resolution: the preprocessed image is area-downscaled to the phase's size (an anti-aliased downscale) and
    encoded by the pipeline's own `prepare_latents` (sd.py's `segment_methods`); later segments start from
    `latents=`."""

    name = "z-image-img2img"
    preset_family = "z-image"
    pipeline_names = ("ZImageImg2ImgPipeline",)

    def __init__(self, pipe, arguments: dict):
        Family.__init__(self, pipe, arguments)
        image = arguments["image"]
        self.image = None if image is None else pipe.image_processor.preprocess(image)
        size = (None, None) if self.image is None else self.image.shape[-2:]
        self.height, self.width = arguments["height"] or size[0], arguments["width"] or size[1]

    latent_hw = ZImageFamily.latent_hw
    segment_size = Family.segment_size  # the segment's height and width set its latents' size (and mu)
