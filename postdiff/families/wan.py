"""Wan 2.1 and 2.2 (`WanPipeline`, `WanImageToVideoPipeline`): a rectified-flow video DiT
(`WanTransformer3DModel`: one-stream blocks that cross-attend to UMT5 text) on (B, C, F, H, W) latents of a
causal video VAE. The pipelines' own calls run every step.

- **Guidance.** CFG is two passes a step, each in diffusers' `cache_context("cond")` / `("uncond")` (as FLUX's
  true CFG): the CFG stop answers the unconditional pass (caching/guidance.py) and the cross-attention cache
  records in the conditional pass (caching/cross_attention.py).
- **Wan 2.2's two experts** (`boundary_ratio` with `transformer_2`): the steps whose timestep is at least
  `boundary_ratio x num_train_timesteps` run on `transformer`, the others on `transformer_2`. Both carry the
  caches; the plan knows where the denoiser changes (`plan_for`, from each segment's own timesteps) and resets
  the block cache there, as at a switch: a span's residual is what that expert's blocks added, and the other
  expert's blocks would add something else, so the first step of the new expert computes every block. Their
  cross-attention records are kept apart (the second expert's under "transformer_2."), and a cross-attention
  cache that an expert would read without having recorded one is refused.
- **Low resolution.** The pipeline rounds sides down to whole patches of its VAE (`latent_hw`); a lower
  segment calls it at its own size, and with `temporal_beta` < 1 at its own `num_frames` ((F' - 1) x the VAE's
  temporal factor + 1, a count the pipeline keeps). The image-to-video pipeline makes its condition (the image
  VAE-encoded into the first frame, the frame mask) itself from the segment's size and frame count, so the
  condition channels are those of a plain call at that size. `low_res_shift="own"` runs a lower segment on its
  size's schedule: Wan's `flow_shift` (UniPC; `shift` for FlowMatchEuler) times the phase's scale, as Wan's own
  settings go from 3.0 at 480p to 5.0 at 720p.
- The embedded video model (`TestbedVideoPipeline`, postdiff/testbed/video_model.py) is Wan's pipeline in pixel
  space: the same adapter, with the testbed's text length.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..caching.guidance import apply_guidance_hook
from ..config import ConfigError
from ..denoisers import TransformerKind, register_kind
from ..engine import phase_timesteps
from ..plan import ModelFacts, StepPlan, make_plan
from .base import Family, register

CLIP_IMAGE_TOKENS = 257  # Wan 2.1 I2V's image condition: CLIP ViT-H/14's hidden states at 224 px (16 x 16 + 1)


class WanKind(TransformerKind):
    """`WanTransformer3DModel`: one list of one-stream blocks, cross-attention to the text (and, Wan 2.1 I2V, to
    CLIP image tokens in the same attention module)."""

    model_class = "WanTransformer3DModel"
    block_lists = ("blocks",)
    video = True

    def inputs(self, spec, batch: int, latent_hw: tuple[int, int]) -> dict:
        config = spec.config
        inputs = {
            "hidden_states": torch.empty(batch, config["in_channels"], spec.latent_frames, *latent_hw, device="meta"),
            "timestep": torch.full((batch,), 500.0, device="meta"),
            "encoder_hidden_states": torch.empty(batch, spec.text_length, config["text_dim"], device="meta"),
        }
        if config.get("image_dim"):
            inputs["encoder_hidden_states_image"] = torch.empty(batch, CLIP_IMAGE_TOKENS, config["image_dim"], device="meta")
        return inputs


register_kind("wan", WanKind())


class VideoFamily(Family):
    """What Wan's and HunyuanVideo-1.5's adapters share: (B, C, F, H, W) latents, `num_frames` and
    `num_videos_per_prompt` arguments, VAE factors named `vae_scale_factor_spatial` / `_temporal`."""

    denoiser_attribute = "transformer"

    @property
    def num_images(self) -> int:
        prompt = self.args["prompt"]
        if isinstance(prompt, str):
            batch = 1
        else:
            batch = len(prompt) if prompt is not None else self.args["prompt_embeds"].shape[0]
        return batch * (self.args["num_videos_per_prompt"] or 1)

    def video_frames(self) -> int:
        """The frame count the pipeline generates for the call's `num_frames`."""
        return self.args["num_frames"]

    @property
    def latent_frames(self) -> int:
        return (max(self.video_frames(), 1) - 1) // self.pipe.vae_scale_factor_temporal + 1

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        return replace(super().facts(latent_hw), latent_frames=self.latent_frames)

    def segment_size(self, phase) -> dict:
        """The phase's height and width; with `temporal_beta` its `num_frames`, (F' - 1) x the temporal factor + 1."""
        factor = self.pipe.vae_scale_factor_spatial
        size = {"height": phase.latent_hw[0] * factor, "width": phase.latent_hw[1] * factor}
        if phase.latent_frames != self.latent_frames:
            size["num_frames"] = (phase.latent_frames - 1) * self.pipe.vae_scale_factor_temporal + 1
        return size


@register
class WanFamily(VideoFamily):
    name = "wan"
    pipeline_names = ("WanPipeline",)
    denoiser_kind = "wan"
    max_text_length = 512  # the pipeline's default max_sequence_length (UMT5)
    cfg_passes = 2  # a conditional pass, then an unconditional one

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = arguments["height"], arguments["width"]
        self.step_models: list[str] | None = None  # per step of the plan, the expert that runs it (Wan 2.2)

    @classmethod
    def denoiser_attributes(cls, pipe) -> tuple[str, ...]:
        return ("transformer", "transformer_2") if getattr(pipe, "transformer_2", None) is not None else ("transformer",)

    @classmethod
    def cached_models(cls, pipe) -> list[torch.nn.Module]:
        return [getattr(pipe, attribute) for attribute in cls.denoiser_attributes(pipe)]

    @classmethod
    def install_caches(cls, pipe, config, state) -> None:
        if getattr(pipe, "transformer", None) is None:
            raise ConfigError(f"{type(pipe).__name__} without `transformer` (only `transformer_2`): postdiff plans its "
                              "steps on `transformer`; load the pipeline with both experts")
        for attribute in cls.denoiser_attributes(pipe):
            model = getattr(pipe, attribute)
            cls.kind().install_caches(model, config, state, prefix="" if attribute == "transformer" else attribute + ".")
            if not config.is_off:
                apply_guidance_hook(model, state)

    def video_frames(self) -> int:
        """Wan rounds `num_frames` to the next k x temporal factor + 1 below it; a temporal factor of 1 (the embedded
        video model, in pixel space) generates the count it is given."""
        frames, factor = self.args["num_frames"], self.pipe.vae_scale_factor_temporal
        if factor > 1 and frames % factor != 1:
            frames = frames // factor * factor + 1
        return max(frames, 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Sides rounded down to whole patches, as the pipeline rounds them."""
        factor = self.pipe.vae_scale_factor_spatial
        _, patch_h, patch_w = self.pipe.transformer.config.patch_size
        return (int(self.height) // (factor * patch_h) * patch_h, int(self.width) // (factor * patch_w) * patch_w)

    def text_length(self) -> int:
        return self.args["max_sequence_length"]  # the prompt is zero-padded to it

    # -- Wan 2.2: which expert runs each step
    def plan_for(self, config, timesteps: torch.Tensor, facts: ModelFacts, scheduler, do_cfg: bool = True) -> StepPlan:
        plan = make_plan(config, len(timesteps), facts, do_cfg=do_cfg)
        self.step_models = self.experts(plan, timesteps, scheduler)
        if self.step_models is None:
            return plan
        changes = tuple(i for i in range(1, len(plan)) if self.step_models[i] != self.step_models[i - 1])
        return make_plan(config, len(timesteps), replace(facts, denoiser_changes=changes), do_cfg=do_cfg) if changes else plan

    def experts(self, plan: StepPlan, timesteps: torch.Tensor, scheduler) -> list[str] | None:
        """Per step, the expert the pipeline picks from the step's timestep (None: one transformer)."""
        ratio = self.pipe.config.get("boundary_ratio")
        if ratio is None or getattr(self.pipe, "transformer_2", None) is None:
            return None
        boundary = ratio * scheduler.config.num_train_timesteps
        steps = self.step_timesteps(plan, timesteps, scheduler)
        return ["transformer" if float(t) >= boundary else "transformer_2" for t in steps]

    def step_timesteps(self, plan: StepPlan, timesteps: torch.Tensor, scheduler) -> list:
        """The timestep every step of `plan` runs at: the call's schedule, or a lower phase's own
        (`low_res_shift="own"`)."""
        shown = []
        for phase in plan.phases:
            schedule = timesteps
            if phase is not plan.phases[-1] and plan.config.low_res_shift == "own":
                own = self.own_scheduler(scheduler, phase)
                if own is not None:  # else the engine refuses "own" before any step
                    own.set_timesteps(self.args["num_inference_steps"])
                    schedule = own.timesteps
            shown.extend(phase_timesteps(schedule, phase))
        return shown

    def check_plan(self, plan: StepPlan) -> None:
        """A cross-attention cache is read by an expert only where that expert recorded one before the CFG stop."""
        if self.step_models is None or not plan.config.cross_attention_cache:
            return
        recorded = {model for step, model in zip(plan.steps, self.step_models) if step.capture_cross_attention}
        for step, model in zip(plan.steps, self.step_models):
            if step.cross_attention == "cached" and model not in recorded:
                raise ConfigError(
                    f"cfg_stop={plan.config.cfg_stop} with ca_mode={plan.config.ca_mode!r}: {model} first runs at step "
                    f"{step.index}, after the CFG stop, so it has no cross-attention output recorded to reuse; put "
                    f"cfg_stop after step {step.index}, or use ca_mode='none'")

    def enter_step(self, step) -> None:
        """The low-noise expert guides with `guidance_scale_2` (what ca_mode='cfg' combines with)."""
        if self.step_models is not None and self.step_models[step.index] == "transformer_2":
            self.state.guidance_scale = float(self.pipe._guidance_scale_2)
        elif self.step_models is not None:
            self.state.guidance_scale = float(self.guidance_scale)

    def own_scheduler(self, scheduler, phase):
        """Wan's static shift times the phase's linear scale (UniPC on flow sigmas: `flow_shift`; FlowMatchEuler:
        `shift`); None with a dynamic shift (Wan passes no `mu`)."""
        config = scheduler.config
        if config.get("use_dynamic_shifting"):
            return None
        scale = phase.latent_hw[0] / self.latent_hw[0]
        if config.get("use_flow_sigmas") and "flow_shift" in config:
            return type(scheduler).from_config(config, flow_shift=config.flow_shift * scale)
        if "shift" in config:
            return type(scheduler).from_config(config, shift=config.shift * scale)
        return None


@register
class WanImageToVideoFamily(WanFamily):
    """`WanImageToVideoPipeline`: the image's VAE latents as extra channels (Wan 2.1 also CLIP image tokens in the
    cross-attention); the pipeline makes both per segment from the segment's size."""

    pipeline_names = ("WanImageToVideoPipeline",)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.image_embeds = None

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """The CLIP image embedding does not depend on the segment's size: encoded once for all segments."""
        return {"encode_image": self.encode_image_once}

    def encode_image_once(self, image, device=None):
        if self.image_embeds is None:
            self.image_embeds = type(self.pipe).encode_image(self.pipe, image, device)
        return self.image_embeds


@register
class TestbedVideoFamily(WanFamily):
    """The embedded video model: Wan's pipeline in pixel space, its text at the tokenizer's length."""

    __test__ = False  # not a pytest class
    pipeline_names = ("TestbedVideoPipeline",)

    def text_length(self) -> int:
        return self.pipe.tokenizer.model_max_length

