"""Denoiser kinds: everything postdiff knows about one kind of denoiser network, in one place, for the
engine and the accounting alike: how its plan facts are read (latent size rule, cache branches), how its
cache branch is validated, how PostDiff's caches are installed on it, and how it is built and fed on the
meta device for counting. Families (pipelines) name their kind; nothing here knows about pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caching import blocks, cross_attention, deepcache, text_stream
from .caching.state import RunState
from .config import ConfigError, PostDiffConfig
from .plan import ModelFacts, check_cache_branch


@dataclass(frozen=True)
class DenoiserSpec:
    """A denoiser known by its config: its kind, the config, and the text length its cross-attention sees."""

    config: dict
    text_length: int = 77
    kind: str = "unet"  # key of DENOISER_KINDS
    latent_frames: int = 1  # a video model's latent frames (its VAE's temporal compression applied)
    condition_hw: tuple[int, int] | None = None  # latent size of a condition image whose tokens join every step (an edit)


class DenoiserKind:
    name = "denoiser"
    video = False  # denoises (B, C, F, H, W) clips: plans know its latent frames (`DenoiserSpec.latent_frames`)

    # -- structure
    def describe(self, model: torch.nn.Module) -> str:
        """How error messages name the model ("U-Net", "transformer (28 blocks)")."""
        return self.name

    def size_multiple(self, model: torch.nn.Module) -> int:
        raise NotImplementedError

    def max_cache_branch(self, model: torch.nn.Module) -> int | None:
        """The deepest valid `cache_branch`; None when the model has nothing to cache."""
        raise NotImplementedError

    def facts(self, model: torch.nn.Module, latent_hw: tuple[int, int], restart_repeats: int = 0) -> ModelFacts:
        return ModelFacts(latent_hw, self.size_multiple(model), self.max_cache_branch(model), restart_repeats,
                          denoiser=self.describe(model))

    def check(self, model: torch.nn.Module, config: PostDiffConfig) -> None:
        check_cache_branch(config, self.max_cache_branch(model), self.describe(model))
        if config.temporal_beta != 1 and not self.video:
            raise ConfigError(f"temporal_beta={config.temporal_beta} is for video pipelines: this {self.describe(model)} "
                              "denoises images (no frames to shorten); use temporal_beta=1")

    # -- caches
    def install_caches(self, model: torch.nn.Module, config: PostDiffConfig, state: RunState) -> None:
        """Validate, then install the hooks the config needs (the deep / block cache and the cross-attention cache)."""
        self.check(model, config)
        if config.deepcache:
            self.install_deep_cache(model, config.cache_branch, state)
        if config.cross_attention_cache:
            cross_attention.apply_cross_attention_cache(model, config.ca_mode, state)

    def install_deep_cache(self, model: torch.nn.Module, branch: int, state: RunState) -> None:
        raise NotImplementedError

    # -- counting on the meta device
    def build(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def prepare_for_counting(self, model: torch.nn.Module) -> None:
        """The classic processor computes attention with bmm/baddbmm, which the counter sees and can separate."""
        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        raise NotImplementedError


class UNetKind(DenoiserKind):
    """`UNet2DConditionModel` (SD 1.x/2.x, SDXL, LCM, the embedded model): DeepCache (caching/deepcache.py)."""

    name = "U-Net"

    def size_multiple(self, model) -> int:
        return 2 ** sum(getattr(block, "downsamplers", None) is not None for block in model.down_blocks)

    def max_cache_branch(self, model) -> int:
        return deepcache.max_branch(model)

    def install_deep_cache(self, model, branch, state) -> None:
        deepcache.apply_deepcache(model, branch, state)

    def build(self, config: dict) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        inputs = {
            "sample": torch.empty(batch, config["in_channels"], *latent_hw, device="meta"),
            "timestep": torch.tensor(500, device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["cross_attention_dim"], device="meta"),
        }
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and time ids
            text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, text_dim, device="meta"),
                "time_ids": torch.empty(batch, 6, device="meta"),
            }
        return inputs


class PixArtKind(DenoiserKind):
    """`PixArtTransformer2DModel`: block caching of `transformer_blocks` (caching/blocks.py).

    On the meta device the sin-cos `pos_embed` buffer is only a shape, which is all counting needs (it is
    never materialized with `to_empty`); at other sizes `PatchEmbed` recomputes it from the input's grid, as
    on real tensors (elementwise work, not counted)."""

    name = "transformer"

    def describe(self, model) -> str:
        return f"transformer ({len(model.transformer_blocks)} blocks)"

    def size_multiple(self, model) -> int:
        return model.config.patch_size

    def max_cache_branch(self, model) -> int | None:
        deepest = blocks.max_block_branch(len(model.transformer_blocks))
        return deepest if deepest >= 0 else None

    def install_deep_cache(self, model, branch, state) -> None:
        blocks.apply_block_cache(model, branch, state)

    def build(self, config: dict) -> torch.nn.Module:
        from diffusers import PixArtTransformer2DModel

        with torch.device("meta"):
            return PixArtTransformer2DModel.from_config(config)

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        caption_channels = config.get("caption_channels") or config.get("cross_attention_dim", 1152)
        inputs = {
            "hidden_states": torch.empty(batch, config.get("in_channels", 4), *latent_hw, device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, caption_channels, device="meta"),
            "encoder_attention_mask": torch.ones(batch, spec.text_length, dtype=torch.int64, device="meta"),
            "timestep": torch.full((batch,), 500, dtype=torch.int64, device="meta"),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        additional = config.get("use_additional_conditions")
        if additional or (additional is None and config.get("sample_size", 128) == 128):  # PixArt-alpha 1024
            inputs["added_cond_kwargs"] = {"resolution": torch.empty(batch, 2, device="meta"),
                                           "aspect_ratio": torch.empty(batch, 1, device="meta")}
        return inputs


class TransformerKind(DenoiserKind):
    """Diffusion transformers with blocks in one or more lists (`block_lists`, in execution order): block caching
    over a middle span of all their blocks, whatever the blocks' stream layout (caching/blocks.py reads it from
    diffusers' transformer block registry); after the CFG stop the text stream of two-stream (MM-DiT) blocks is
    read from a cache (caching/text_stream.py), or, in models whose blocks cross-attend to the text (Wan,
    SANA), the cross-attention output (caching/cross_attention.py). Attention through
    `scaled_dot_product_attention`, which the counter decomposes on the meta device into the same bmm products
    it separates for the classic processor.

    A new model is an instance (or a small subclass for its meta-device inputs): its diffusers class, its block
    lists and, where its text modules are named otherwise than SD3's, the modules that only feed the text output."""

    name = "transformer"
    block_lists: tuple[str, ...] = ("transformer_blocks",)  # in execution order
    text_modules: tuple[str, ...] = text_stream.SKIPPED_MODULES  # a two-stream block's modules that only feed its text output
    model_class: str = ""  # the diffusers class, built on the meta device for counting

    def block_names(self, model) -> list[str]:
        return [f"{lists}.{index}" for lists in self.block_lists for index in range(len(model.get_submodule(lists)))]

    def describe(self, model) -> str:
        return f"transformer ({len(self.block_names(model))} blocks)"

    def size_multiple(self, model) -> int:
        """The patch's spatial side (video models give (frames, height, width) patches)."""
        patch = model.config.patch_size
        return patch[-1] if isinstance(patch, (tuple, list)) else (patch or 1)

    def max_cache_branch(self, model) -> int | None:
        deepest = blocks.max_block_branch(len(self.block_names(model)))
        return deepest if deepest >= 0 else None

    def install_caches(self, model, config, state, prefix: str = "") -> None:
        """Block caching, then the text-stream cache of the two-stream blocks, or the cross-attention cache; their
        records under `prefix` + module name (models of one call keep theirs apart: Wan 2.2's two experts)."""
        self.check(model, config)
        names = self.block_names(model)
        span = blocks.apply_layout_block_cache(model, names, config.cache_branch, state) if config.deepcache else []
        if config.cross_attention_cache:
            if not text_stream.apply_text_stream_cache(model, names, config.ca_mode, state, span, self.text_modules, prefix):
                cross_attention.apply_cross_attention_cache(model, config.ca_mode, state, prefix)

    def build(self, config: dict) -> torch.nn.Module:
        import diffusers

        with torch.device("meta"):
            return getattr(diffusers, self.model_class).from_config(config)

    def prepare_for_counting(self, model) -> None:
        pass


MMDiTKind = TransformerKind  # SD3's and FLUX's kinds, the first of them


class SD3Kind(MMDiTKind):
    """`SD3Transformer2DModel` (SD3, SD3.5): joint blocks; the patch embedding crops its position table."""

    def size_multiple(self, model) -> int:
        return model.config.patch_size

    def build(self, config: dict) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        with torch.device("meta"):
            return SD3Transformer2DModel.from_config(config)

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        return {
            "hidden_states": torch.empty(batch, config["in_channels"], *latent_hw, device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["joint_attention_dim"], device="meta"),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"], device="meta"),
            "timestep": torch.full((batch,), 500.0, device="meta"),
        }


class FluxKind(MMDiTKind):
    """`FluxTransformer2DModel` (FLUX.1): 19 double-stream then 38 single-stream blocks, one span over both. Its
    latents are packed 2x2 (a token per 2x2 latent patch), so latent sides must be even."""

    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def size_multiple(self, model) -> int:
        return 2

    def build(self, config: dict) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            return FluxTransformer2DModel.from_config(config)

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        inputs = {
            "hidden_states": torch.empty(batch, tokens, config["in_channels"], device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["joint_attention_dim"], device="meta"),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"], device="meta"),
            "timestep": torch.full((batch,), 0.5, device="meta"),
            "img_ids": torch.zeros(tokens, 3, device="meta"),
            "txt_ids": torch.zeros(spec.text_length, 3, device="meta"),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch,), 3.5, device="meta")
        return inputs


DENOISER_KINDS: dict[str, DenoiserKind] = {"unet": UNetKind(), "pixart": PixArtKind(), "sd3": SD3Kind(), "flux": FluxKind()}


def register_kind(name: str, kind: DenoiserKind) -> DenoiserKind:
    """Add a denoiser kind (a model family's module registers its transformer's kind, postdiff/families/)."""
    DENOISER_KINDS[name] = kind
    return kind


def denoiser_kind(name: str) -> DenoiserKind:
    """The kind named `name`; the families' modules (which register the newer models' kinds) are imported first."""
    from . import families  # noqa: F401

    return DENOISER_KINDS[name]


def meta_denoiser(spec: DenoiserSpec) -> torch.nn.Module:
    kind = denoiser_kind(spec.kind)
    model = kind.build(spec.config)
    kind.prepare_for_counting(model)
    return model
