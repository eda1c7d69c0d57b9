"""HunyuanVideo-1.5 (`HunyuanVideo15Pipeline`, text-to-video): a rectified-flow video DiT
(`HunyuanVideo15Transformer3DModel`: 54 two-stream blocks over the video tokens and one text stream of
Qwen2.5-VL tokens, ByT5 glyph tokens and SigLIP image tokens, zeros for text-to-video) on (B, C, F, H, W) latents.
The pipeline's own call runs every step.

- **Guidance** is diffusers' `ClassifierFreeGuidance` guider: a conditional then an unconditional pass a step,
  each in `cache_context("pred_cond")` / `("pred_uncond")`, so the CFG stop answers the unconditional pass
  (caching/guidance.py) and the text-stream cache records in the conditional one (caching/text_stream.py: the
  blocks' `ff_context` and `attn.to_add_out` only feed the text stream). The guider decides per step from the
  step index and count it is given, which a segment gives as its own: a guider other than CFG, or a CFG window
  (`start` > 0 or `stop` < 1), is refused. The transformer packs each sample's valid text tokens first, so a
  record combined over the two passes ("ave", "cfg") mixes tokens of the two prompts at the same positions:
  "cond" is the mode that keeps the text stream of one prompt.
- **Blocks**: `HunyuanVideo15TransformerBlock` is not in diffusers' block registry (0.42.1); its layout, (image,
  text) out from `hidden_states`, `encoder_hidden_states` in, is in `UNLISTED_LAYOUTS` (caching/blocks.py).
- **Low resolution**: patch 1, so any latent side works; the RoPE grid follows the input. `low_res_shift="own"`
  runs a lower segment on its static `shift` times the phase's scale (the shipped settings: 5 at 480p, 9 at 720p).
- **Counting** on the meta device: the transformer reads its image embedding's values (`torch.all(image_embeds
  == 0)`) and selects each sample's valid text tokens by mask, then the others; on meta tensors the embedding reads
  as text-to-video (zeros) and the prompt masks as all valid (`_MetaMasks`): the same token count and products as
  a real call.
"""

from __future__ import annotations

import functools

import torch
from diffusers import ClassifierFreeGuidance
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ConfigError
from ..denoisers import TransformerKind, register_kind
from .wan import VideoFamily
from .base import register

BYT5_TOKENS = 256  # the pipeline's tokenizer_2_max_length
IMAGE_TOKENS = 729  # the pipeline's vision_num_semantic_tokens (SigLIP, zeros for text-to-video)


class _MetaMasks(TorchDispatchMode):
    """Meta tensors have shapes, not values; the transformer reads values twice: `if torch.all(image_embeds == 0)`
    (text-to-video, read as True) and each sample's tokens selected by boolean masks (`image[image_mask]`, then
    `image[~image_mask]`). Masks made all ones or all zeros are followed through the casts, views and negations the
    model applies, so a selection by one gives all its tokens or none, as on real tensors."""

    FILLS = {torch.ops.aten.ones.default: True, torch.ops.aten.zeros.default: False,
             torch.ops.aten.ones_like.default: True, torch.ops.aten.zeros_like.default: False}
    KEEPS = {torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.view.default,
             torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
             torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.unsqueeze.default,
             torch.ops.aten.expand.default, torch.ops.aten.unbind.int}
    NEGATES = {torch.ops.aten.bitwise_not.default, torch.ops.aten.logical_not.default}

    def __init__(self, all_true: tuple[torch.Tensor, ...]):
        super().__init__()
        self.values = {id(mask): (mask, True) for mask in all_true}  # id -> (the tensor, kept so its id stays its, value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return self.values.get(id(args[0]), (None, True))[1]
        if func is torch.ops.aten.index.Tensor and any(self._known(i) for i in args[1]):
            args = (args[0], [self._positions(i) if self._known(i) else i for i in args[1]])
        output = func(*args, **kwargs)
        value = self.FILLS.get(func)
        if value is None and func in self.KEEPS | self.NEGATES and self._known(args[0]):
            value = self.values[id(args[0])][1] != (func in self.NEGATES)
        if value is not None:
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                self.values[id(tensor)] = (tensor, value)
        return output

    def _known(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.is_meta and id(tensor) in self.values

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """The positions a 1-D mask of known value selects: all of them or none."""
        return torch.arange(mask.shape[0] if self.values[id(mask)][1] else 0, device="meta")


def _counted_on_meta(forward, *args, **kwargs):
    masks = tuple(kwargs[name] for name in ("encoder_attention_mask", "encoder_attention_mask_2") if name in kwargs)
    with _MetaMasks(masks):
        return forward(*args, **kwargs)


class HunyuanVideo15Kind(TransformerKind):
    model_class = "HunyuanVideo15Transformer3DModel"
    video = True

    def prepare_for_counting(self, model) -> None:
        model.forward = functools.partial(_counted_on_meta, model.forward)

    def inputs(self, spec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        text = spec.text_length
        return {
            "hidden_states": torch.empty(batch, config["in_channels"], spec.latent_frames, *latent_hw, device="meta"),
            "timestep": torch.full((batch,), 500.0, device="meta"),
            "encoder_hidden_states": torch.empty(batch, text, config["text_embed_dim"], device="meta"),
            "encoder_attention_mask": torch.ones(batch, text, device="meta"),
            "encoder_hidden_states_2": torch.empty(batch, BYT5_TOKENS, config["text_embed_2_dim"], device="meta"),
            "encoder_attention_mask_2": torch.ones(batch, BYT5_TOKENS, device="meta"),
            "image_embeds": torch.zeros(batch, IMAGE_TOKENS, config["image_embed_dim"], device="meta"),
        }


register_kind("hunyuan-video15", HunyuanVideo15Kind())


@register
class HunyuanVideo15Family(VideoFamily):
    name = "hunyuan-video15"
    pipeline_names = ("HunyuanVideo15Pipeline",)
    denoiser_kind = "hunyuan-video15"
    max_text_length = 1000  # the pipeline's tokenizer_max_length (Qwen2.5-VL tokens after the template)
    cfg_passes = 2  # the guider's conditional pass, then its unconditional one

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        height, width = arguments["height"], arguments["width"]
        if height is None and width is None:  # the pipeline's default: its target size at 16:9
            aspect_w, aspect_h = pipe.default_aspect_ratio
            height, width = pipe.video_processor.calculate_default_height_width(aspect_h, aspect_w, pipe.target_size)
        self.height, self.width = height, width

    def check_arguments(self) -> None:
        guider = self.pipe.guider
        if not isinstance(guider, ClassifierFreeGuidance):
            raise ConfigError(f"{type(guider).__name__} guides with its own passes: postdiff plans HunyuanVideo-1.5 with "
                              "diffusers' ClassifierFreeGuidance guider only")
        if guider._start != 0.0 or guider._stop != 1.0:
            raise ConfigError(f"a CFG window (guider start={guider._start}, stop={guider._stop}) is computed from the step "
                              "index and count of each segment's call, not the call's: use start=0, stop=1 (or cfg_stop)")

    @property
    def do_cfg(self) -> bool:
        guider = self.pipe.guider
        return bool(guider._enabled and guider.num_conditions > 1)

    @property
    def guidance_scale(self) -> float:
        return self.pipe.guider.guidance_scale

    @property
    def latent_hw(self) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor_spatial
        return (int(self.height) // factor, int(self.width) // factor)

    def text_length(self) -> int:
        return self.pipe.tokenizer_max_length  # the prompt's template tokens, padded to it after the crop

    def own_scheduler(self, scheduler, phase):
        config = scheduler.config
        if "shift" not in config or config.get("use_dynamic_shifting"):
            return None
        return type(scheduler).from_config(config, shift=config.shift * phase.latent_hw[0] / self.latent_hw[0])

