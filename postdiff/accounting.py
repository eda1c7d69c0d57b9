"""Compute accounting from the step plan: every step of the plan is executed on a meta-device copy of the
denoiser, with the same cache hooks the sampler installs, under `torch.utils.flop_counter.FlopCounterMode`.
Meta tensors carry shapes only, so full-size models are counted instantly and without weights, and what
is counted is exactly what the hooks let run.

Conventions:
- "macs": the paper's (calflops-style) multiply-accumulates of the denoiser: convolutions and linear
  layers, at the batch the step runs at (2 x images under CFG); attention score and value products
  (Q K^T and A V) are not counted.
- "flops": floating-point operations of every matrix product and convolution, attention included
  (2 per multiply-accumulate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from .caching import install_transformer_caches, install_unet_caches
from .caching.state import RunState
from .config import PostDiffConfig
from .plan import Step, StepPlan

CONVENTIONS = ("macs", "flops")
ATTENTION_PRODUCTS = ("bmm", "baddbmm")  # the classic attention processor's score and value products


@dataclass(frozen=True)
class DenoiserSpec:
    """What the counter needs: the denoiser's kind and config, and the text length its cross-attention sees."""

    config: dict
    text_length: int = 77
    kind: str = "unet"  # key of DENOISER_KINDS


class DenoiserKind:
    """How to build a denoiser of one kind on the meta device, feed it, and install PostDiff's caches on it."""

    def build(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def inputs(self, spec: DenoiserSpec, batch: int, latent_hw: tuple[int, int]) -> dict:
        raise NotImplementedError

    def install_caches(self, model: torch.nn.Module, config: PostDiffConfig, state: RunState) -> None:
        raise NotImplementedError


class UNetKind(DenoiserKind):
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

    def install_caches(self, model, config, state) -> None:
        install_unet_caches(model, config, state)


class PixArtKind(DenoiserKind):
    """`PixArtTransformer2DModel`. On the meta device the sin-cos `pos_embed` buffer is only a shape, which is
    all counting needs (it is never materialized with `to_empty`); at other sizes `PatchEmbed` recomputes it
    from the input's grid, as on real tensors (elementwise work, not counted)."""

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

    def install_caches(self, model, config, state) -> None:
        install_transformer_caches(model, config, state)


DENOISER_KINDS: dict[str, DenoiserKind] = {"unet": UNetKind(), "pixart": PixArtKind()}


def meta_denoiser(spec: DenoiserSpec) -> torch.nn.Module:
    model = DENOISER_KINDS[spec.kind].build(spec.config)
    # The classic processor computes attention with bmm/baddbmm, which the counter sees and can separate.
    model.set_attn_processor(AttnProcessor())
    return model


@dataclass(frozen=True)
class StepCost:
    step: Step
    macs: float  # without attention products
    attention_macs: float

    def value(self, convention: str) -> float:
        return in_convention(self.macs, self.attention_macs, convention)


def in_convention(macs: float, attention_macs: float, convention: str) -> float:
    return macs if convention == "macs" else 2 * (macs + attention_macs)


def count_forward(model, inputs: dict) -> tuple[float, float]:
    return count_call(lambda: model(**inputs, return_dict=False))


def count_call(run, scope: str = "Global") -> tuple[float, float]:
    """(MACs without attention products, attention-product MACs) of `run()`; `scope` names the top-level module
    (its class name, as the counter records it) whose work alone is counted, or "Global" for everything."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    by_op = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts().get(scope, {}).items()}
    attention = sum(by_op.get(name, 0) for name in ATTENTION_PRODUCTS)
    return (sum(by_op.values()) - attention) / 2, attention / 2


def plan_costs(spec: DenoiserSpec, plan: StepPlan, num_images: int = 1) -> list[StepCost]:
    """Cost of every step of `plan`, counted by running it on the meta device with PostDiff's hooks."""
    kind = DENOISER_KINDS[spec.kind]
    model = meta_denoiser(spec)
    state = RunState()
    kind.install_caches(model, plan.config, state)
    state.begin(num_images, guidance_scale=2.0)
    costs, counted = [], {}
    with torch.no_grad():
        for step in plan.steps:
            state.enter(step)  # events (switch, CFG stop) act on the caches exactly as in the sampler
            step_kind = (step.latent_hw, step.cfg, step.unet, step.cross_attention)
            if step_kind not in counted:  # the caches a step reads were filled by an earlier step of the plan
                batch = num_images * (2 if step.cfg else 1)
                counted[step_kind] = count_forward(model, kind.inputs(spec, batch, step.latent_hw))
            costs.append(StepCost(step, *counted[step_kind]))
    state.reset()
    return costs


def total(costs: list[StepCost], convention: str = "macs") -> float:
    return sum(cost.value(convention) for cost in costs)


@dataclass(frozen=True)
class ComponentSpec:
    """A pipeline component run once per call, outside the denoising loop: the VAE decoder or a text encoder.

    class_name: "AutoencoderKL" (diffusers), or a transformers text model ("CLIPTextModel",
    "CLIPTextModelWithProjection", "T5EncoderModel"); config: its public config values."""

    class_name: str
    config: dict

    @property
    def is_vae(self) -> bool:
        return self.class_name == "AutoencoderKL"

    def cost(self, latent_hw: tuple[int, int], text_length: int, batch: int = 1) -> tuple[float, float]:
        """(MACs, attention MACs): a decode of `batch` latents of `latent_hw`, or an encode of `batch` prompts."""
        model = self._meta_model()
        with torch.no_grad():
            if self.is_vae:
                latents = torch.empty(batch, self.config.get("latent_channels", 4), *latent_hw, device="meta")
                return count_call(lambda: model.decode(latents, return_dict=False))
            input_ids = torch.zeros(batch, text_length, dtype=torch.int64, device="meta")
            return count_call(lambda: model(input_ids=input_ids))

    def _meta_model(self) -> torch.nn.Module:
        if self.is_vae:
            from diffusers import AutoencoderKL

            with torch.device("meta"):
                model = AutoencoderKL.from_config(self.config)
            model.set_attn_processor(AttnProcessor())
            return model
        import transformers

        model_class = getattr(transformers, self.class_name)
        config = model_class.config_class(**self.config)
        config._attn_implementation = "eager"  # attention as matmuls the counter can see and separate
        with torch.device("meta"):
            return model_class(config)
