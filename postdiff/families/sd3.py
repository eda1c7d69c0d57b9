"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): a rectified-flow MM-DiT (`SD3Transformer2DModel`)
with CFG as a batch [negative, prompt], and the embedded flow model (`TestbedFlowPipeline`). The pipelines'
own calls run every step.

Low resolution: SD3's patch embedding crops its position-embedding table at the centre for a smaller token
grid (`pos_embed_max_size`), as SD3 does for any image below its largest size. `low_res_shift="full"` (the
default) replays the requested size's `set_timesteps` in the lower segments, so the low-resolution steps are
the baseline's first steps; `"own"` runs them on their size's schedule (`own_scheduler`). Skip-layer guidance
(`skip_guidance_layers`) runs on the call's steps (`segment_arguments`), outside the caches (caching/guidance.py).
"""

from __future__ import annotations

from .base import Family, register


@register
class StableDiffusion3Family(Family):
    name = "sd3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "sd3"
    max_text_length = 77 + 256  # CLIP tokens, then T5's max_sequence_length

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    def text_length(self) -> int:
        """The CLIP tokens, then `max_sequence_length` T5 tokens (zeros when there is no T5)."""
        return self.pipe.tokenizer_max_length + self.args["max_sequence_length"]

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        """Skip-layer guidance runs on the steps i with start * m < i < stop * m, i counted in the segment and m
        the pipeline's `num_inference_steps` (the call's, or the segment's timesteps where `sigmas` are given):
        remapped so that they are the call's steps (global index, the call's step count)."""
        segment = super().segment_arguments(arguments, phase, last, latents, guided)
        if arguments.get("skip_guidance_layers") is not None:
            multiplier = phase.num_steps if arguments.get("sigmas") is not None else arguments["num_inference_steps"]
            for name in ("skip_layer_guidance_start", "skip_layer_guidance_stop"):
                segment[name] = (arguments[name] * self.planned_steps - phase.first_step) / multiplier
        return segment

    def own_scheduler(self, scheduler, phase):
        """Dynamic shifting: a fresh copy (the pipeline's mu follows the segment's token count). A static shift:
        the configured shift times the linear scale to the requested size (SD3's resolution-dependent shift, the
        square root of the ratio of pixel counts)."""
        config = scheduler.config
        if "shift" not in config:
            return None
        if config.get("use_dynamic_shifting", None):
            return type(scheduler).from_config(config)
        return type(scheduler).from_config(config, shift=config.shift * phase.latent_hw[0] / self.latent_hw[0])


@register
class TestbedFlowFamily(StableDiffusion3Family):
    """The embedded flow model: SD3's pipeline in pixel space (testbed/flow_model.py)."""

    __test__ = False
    name = "testbed-flow"
    pipeline_names = ("TestbedFlowPipeline",)

    def text_length(self) -> int:
        return self.pipe.tokenizer_max_length  # no T5 tokens at all (flow_model.py)
