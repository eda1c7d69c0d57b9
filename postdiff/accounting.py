"""Compute accounting from the step plan: every step of the plan is executed on a meta-device copy of the
denoiser, with the same cache hooks `apply` installs, under `torch.utils.flop_counter.FlopCounterMode`.
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

from dataclasses import dataclass, replace

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from .caching.state import RunState
from .denoisers import DenoiserSpec, denoiser_kind, meta_denoiser
from .plan import Step, StepPlan

CONVENTIONS = ("macs", "flops")
ATTENTION_PRODUCTS = ("bmm", "baddbmm")  # the classic attention processor's score and value products


@dataclass(frozen=True)
class StepCost:
    step: Step
    macs: float  # without attention products (ControlNets included)
    attention_macs: float
    controlnet_macs: float = 0.0  # the ControlNets' share of `macs`

    def value(self, convention: str) -> float:
        return in_convention(self.macs, self.attention_macs, convention)


def in_convention(macs: float, attention_macs: float, convention: str) -> float:
    return macs if convention == "macs" else 2 * (macs + attention_macs)


def count_forward(model, inputs: dict) -> tuple[float, float]:
    return count_call(lambda: model(**inputs, return_dict=False))


def _matmul_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# torch's counter has no formula for the int8 x int8 matmul torchao's dynamic quantization runs (postdiff/
# quantization.py): it is a matmul of the same shapes as the float one it replaces, so it counts as one.
INT8_MATMULS = {torch.ops.aten._int_mm: _matmul_flops}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter as every count here uses it: silent, the int8 matmul counted."""
    return FlopCounterMode(display=False, custom_mapping=INT8_MATMULS)


def count_call(run, scope: str = "Global") -> tuple[float, float]:
    """(MACs without attention products, attention-product MACs) of `run()`; `scope` names the top-level module
    (its class name, as the counter records it) whose work alone is counted, or "Global" for everything."""
    counter = flop_counter()
    with counter:
        run()
    by_op = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts().get(scope, {}).items()}
    attention = sum(by_op.get(name, 0) for name in ATTENTION_PRODUCTS)
    return (sum(by_op.values()) - attention) / 2, attention / 2


@dataclass(frozen=True)
class ControlNetSpec:
    """ControlNets run beside a U-Net: `count` nets of the U-Net's encoder layout (a ControlNet is a copy of
    it), with a condition embedding of `conditioning_embedding_out_channels` (its length - 1 halvings from
    the image to the latent). `guess_mode` runs them on the conditional batch only."""

    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    count: int = 1
    guess_mode: bool = False

    def build(self, unet: torch.nn.Module) -> torch.nn.Module:
        from diffusers import ControlNetModel

        with torch.device("meta"):
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=self.conditioning_embedding_out_channels,
                                            load_weights_from_unet=False)
        net.set_attn_processor(AttnProcessor())
        return net

    def inputs(self, unet_inputs: dict) -> dict:
        sample = unet_inputs["sample"]
        factor = 2 ** (len(self.conditioning_embedding_out_channels) - 1)
        batch = sample.shape[0] // 2 if self.guess_mode and sample.shape[0] > 1 else sample.shape[0]
        inputs = {name: value[:batch] if name in ("sample", "encoder_hidden_states") else value for name, value in unet_inputs.items()}
        if "added_cond_kwargs" in inputs:
            inputs["added_cond_kwargs"] = {name: value[:batch] for name, value in inputs["added_cond_kwargs"].items()}
        inputs["controlnet_cond"] = torch.empty(batch, 3, sample.shape[2] * factor, sample.shape[3] * factor, device="meta")
        return inputs


def plan_costs(spec: DenoiserSpec, plan: StepPlan, num_images: int = 1, controlnet: ControlNetSpec | None = None) -> list[StepCost]:
    """Cost of every step of `plan`, counted by running it on the meta device with PostDiff's hooks (on the
    ControlNets too, when given)."""
    if plan.facts.text_length is not None:  # the call's own text length (T5 tokens)
        spec = replace(spec, text_length=plan.facts.text_length)
    if plan.facts.condition_hw is not None:  # the call's condition image (an edit's), its tokens in every step
        spec = replace(spec, condition_hw=plan.facts.condition_hw)
    kind = denoiser_kind(spec.kind)
    model = meta_denoiser(spec)
    state = RunState()
    kind.install_caches(model, plan.config, state)  # validates the branch as `apply` does
    nets = _meta_controlnets(model, controlnet, plan, state)
    state.begin(num_images, guidance_scale=2.0)
    costs, counted = [], {}
    with torch.no_grad():
        for step in plan.steps:
            state.enter(step)  # events (switch, CFG stop) act on the caches exactly as in a call
            step_kind = (step.latent_hw, step.cfg, step.deep, step.cross_attention, step.latent_frames)
            if step_kind not in counted:  # the caches a step reads were filled by an earlier step of the plan
                batch = num_images * (2 if step.cfg else 1)
                step_spec = spec if step.latent_frames is None else replace(spec, latent_frames=step.latent_frames)
                inputs = kind.inputs(step_spec, batch, step.latent_hw)
                control = [count_forward(net, controlnet.inputs(inputs)) for net in nets]
                unet = count_forward(model, inputs)
                counted[step_kind] = (unet[0] + sum(c[0] for c in control), unet[1] + sum(c[1] for c in control),
                                      sum(c[0] for c in control))
            costs.append(StepCost(step, *counted[step_kind]))
    state.reset()
    return costs


def _meta_controlnets(unet: torch.nn.Module, controlnet: ControlNetSpec | None, plan: StepPlan, state: RunState) -> list:
    """The ControlNets on the meta device with the caches `apply` installs on them (caching/controlnet.py)."""
    if controlnet is None:
        return []
    from .caching.controlnet import install_net_caches

    nets = [controlnet.build(unet) for _ in range(controlnet.count)]
    for index, net in enumerate(nets):
        install_net_caches(net, plan.config, state, prefix=f"controlnet.{index}.")
    return nets


def total(costs: list[StepCost], convention: str = "macs") -> float:
    return sum(cost.value(convention) for cost in costs)


@dataclass(frozen=True)
class ComponentSpec:
    """A pipeline component run once per call, outside the denoising loop: the VAE decoder or a text encoder.

    class_name: "AutoencoderKL" (diffusers), or a transformers text model ("CLIPTextModel",
    "CLIPTextModelWithProjection", "T5EncoderModel"); config: its public config values."""

    class_name: str
    config: dict
    text_length: int | None = None  # a text encoder's own token count, where it differs from the denoiser's

    @property
    def is_vae(self) -> bool:
        return self.class_name.startswith("AutoencoderKL")  # AutoencoderKL, or a model's own (AutoencoderKLWan, ...)

    def cost(self, latent_hw: tuple[int, int], text_length: int, batch: int = 1) -> tuple[float, float]:
        """(MACs, attention MACs): a decode of `batch` latents of `latent_hw`, or an encode of `batch` prompts."""
        model = self._meta_model()
        with torch.no_grad():
            if self.is_vae:
                latents = torch.empty(batch, self.config.get("latent_channels", 4), *latent_hw, device="meta")
                return count_call(lambda: model.decode(latents, return_dict=False))
            input_ids = torch.zeros(batch, self.text_length or text_length, dtype=torch.int64, device="meta")
            return count_call(lambda: model(input_ids=input_ids))

    def encode_cost(self, latent_hw: tuple[int, int]) -> tuple[float, float]:
        """(MACs, attention MACs) of the VAE encoding an image whose latents are `latent_hw` (img2img's init image)."""
        model = self._meta_model()
        factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        image = torch.empty(1, self.config.get("in_channels", 3), latent_hw[0] * factor, latent_hw[1] * factor, device="meta")
        with torch.no_grad():
            return count_call(lambda: model.encode(image, return_dict=False))

    def _meta_model(self) -> torch.nn.Module:
        if self.is_vae:
            import diffusers

            with torch.device("meta"):
                model = getattr(diffusers, self.class_name).from_config(self.config)
            if hasattr(model, "set_attn_processor"):
                model.set_attn_processor(AttnProcessor())
            return model
        import transformers

        model_class = getattr(transformers, self.class_name)
        config = model_class.config_class(**self.config)
        config._attn_implementation = "eager"  # attention as matmuls the counter can see and separate
        with torch.device("meta"):
            return model_class(config)
