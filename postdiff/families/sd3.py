"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): a rectified-flow MM-DiT (`SD3Transformer2DModel`)
with CFG as a batch [negative, prompt], and the embedded flow model (`TestbedFlowPipeline`).

Every step before and after the loop is the pipeline's own (check_inputs, encode_prompt, prepare_latents,
the time shift, the VAE decode with its shift factor, postprocess), in the pipeline's order, so "off"
reproduces `StableDiffusion3Pipeline.__call__` bit for bit.

Low resolution: SD3's patch embedding crops its position-embedding table at the centre for a smaller
token grid (`pos_embed_max_size`), as SD3 does for any image below its largest size, so a low-resolution
phase sees the centre of the table. By default the whole call runs on one sigma schedule, the one of the
requested size (SD3's static `shift`; with `use_dynamic_shifting`, mu from the full-resolution token count),
so the low-resolution steps are the baseline's first steps and the switch re-enters at the baseline's next
sigma; `low_res_shift="own"` runs a low-resolution phase on its own size's schedule (`own_schedule`).
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from .base import Family, register


@register
class StableDiffusion3Family(Family):
    name = "sd3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    engine = True
    denoiser_attribute = "transformer"
    denoiser_kind = "sd3"
    max_text_length = 77 + 256  # CLIP tokens, then T5's max_sequence_length

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    # -- before any compute
    def check(self) -> None:
        super().check()
        pipe, a = self.pipe, self.args
        pipe.check_inputs(
            a["prompt"], a["prompt_2"], a["prompt_3"], self.height, self.width,
            negative_prompt=a["negative_prompt"], negative_prompt_2=a["negative_prompt_2"],
            negative_prompt_3=a["negative_prompt_3"], prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )
        pipe._guidance_scale = a["guidance_scale"]
        pipe._skip_layer_guidance_scale = a["skip_layer_guidance_scale"]
        pipe._clip_skip = a["clip_skip"]
        pipe._joint_attention_kwargs = a["joint_attention_kwargs"]
        pipe._interrupt = False

    def text_length(self) -> int:
        """The CLIP tokens, then `max_sequence_length` T5 tokens (zeros when there is no T5)."""
        return self.pipe.tokenizer_max_length + self.args["max_sequence_length"]

    def timesteps(self) -> torch.Tensor:
        """The pipeline's schedule for the requested size (its `mu` when the scheduler shifts dynamically)."""
        pipe = self.pipe
        mu = self.args["mu"]
        if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            mu = self.shift_mu(self.latent_hw)
        timesteps = self.set_schedule(pipe.scheduler, mu)
        pipe._num_timesteps = len(timesteps)
        return timesteps

    def own_schedule(self, latent_hw: tuple[int, int]):
        """A fresh scheduler on the schedule of an image of `latent_hw`, and its timesteps. Dynamic shifting: mu
        from that size's token count, as the pipeline computes it. A static shift: the configured shift times the
        linear scale to the requested size (SD3's resolution-dependent shift, the square root of the ratio of
        pixel counts), in a scheduler built with that shift as a user would configure it."""
        config = self.pipe.scheduler.config
        if "shift" not in config:
            return None
        if config.get("use_dynamic_shifting", None):
            scheduler = type(self.pipe.scheduler).from_config(config)
            return scheduler, self.set_schedule(scheduler, self.shift_mu(latent_hw))
        scheduler = type(self.pipe.scheduler).from_config(config, shift=config.shift * latent_hw[0] / self.latent_hw[0])
        return scheduler, self.set_schedule(scheduler, None)

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

    def shift_mu(self, latent_hw: tuple[int, int]) -> float:
        config, patch = self.pipe.scheduler.config, self.pipe.transformer.config.patch_size
        return calculate_shift((latent_hw[0] // patch) * (latent_hw[1] // patch), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.16))

    def set_schedule(self, scheduler, mu: float | None) -> torch.Tensor:
        timesteps, _ = retrieve_timesteps(scheduler, self.args["num_inference_steps"], self.device, sigmas=self.args["sigmas"],
                                          **({"mu": mu} if mu is not None else {}))
        return timesteps

    # -- compute
    def encode(self) -> None:
        pipe, a = self.pipe, self.args
        kwargs = a["joint_attention_kwargs"]
        lora_scale = kwargs.get("scale", None) if kwargs is not None else None
        (self.prompt_embeds, self.negative_prompt_embeds, self.pooled, self.negative_pooled) = pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"], negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
            do_classifier_free_guidance=self.do_cfg, prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=self.device,
            clip_skip=a["clip_skip"], num_images_per_prompt=a["num_images_per_prompt"],
            max_sequence_length=a["max_sequence_length"], lora_scale=lora_scale,
        )
        self.cfg_embeds = self.cfg_pooled = None
        if self.do_cfg:
            self.cfg_embeds = torch.cat([self.negative_prompt_embeds, self.prompt_embeds], dim=0)
            self.cfg_pooled = torch.cat([self.negative_pooled, self.pooled], dim=0)

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        factor = pipe.vae_scale_factor
        return pipe.prepare_latents(self.num_images, pipe.transformer.config.in_channels, latent_hw[0] * factor,
                                    latent_hw[1] * factor, self.prompt_embeds.dtype, self.device, a["generator"], a["latents"])

    def extra_step_kwargs(self) -> dict:
        return {}

    def predict(self, scheduler, latents: torch.Tensor, t, cfg: bool, scale: float) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if cfg else latents  # flow matching: no input scaling
        output = self.denoise(model_input, t, cfg, scale)
        return self.guide(output) if cfg else output

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        timestep = t.expand(model_input.shape[0])
        return self.pipe.transformer(
            hidden_states=model_input, timestep=timestep,
            encoder_hidden_states=self.cfg_embeds if cfg else self.prompt_embeds,
            pooled_projections=self.cfg_pooled if cfg else self.pooled,
            joint_attention_kwargs=self.pipe.joint_attention_kwargs, return_dict=False,
        )[0]

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        cfg = self.do_cfg
        return {"latents": latents, "prompt_embeds": self.cfg_embeds if cfg else self.prompt_embeds,
                "pooled_prompt_embeds": self.cfg_pooled if cfg else self.pooled}

    def take_callback_outputs(self, outputs: dict) -> None:
        """Returned `prompt_embeds` / `pooled_prompt_embeds` (CFG batch under CFG) as the pipeline goes on with
        them; after PostDiff's CFG stop their conditional half."""
        n = self.num_images
        if "prompt_embeds" in outputs:
            embeds = outputs["prompt_embeds"]
            self.cfg_embeds, self.prompt_embeds = (embeds, embeds[n:]) if self.do_cfg else (None, embeds)
        if "pooled_prompt_embeds" in outputs:
            pooled = outputs["pooled_prompt_embeds"]
            self.cfg_pooled, self.pooled = (pooled, pooled[n:]) if self.do_cfg else (None, pooled)

    def decode(self, latents: torch.Tensor):
        pipe, a = self.pipe, self.args
        if a["output_type"] == "latent":
            image = latents
        else:
            latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
            image = pipe.vae.decode(latents, return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        return self.output(image)

    def output(self, image):
        if not self.args["return_dict"]:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)


@register
class TestbedFlowFamily(StableDiffusion3Family):
    """The embedded flow model: SD3's loop in pixel space, so decoding is only post-processing."""

    __test__ = False
    name = "testbed-flow"
    pipeline_names = ("TestbedFlowPipeline",)

    def text_length(self) -> int:
        return self.pipe.tokenizer_max_length  # no T5 tokens at all (flow_model.py)

    def decode(self, latents: torch.Tensor):
        from ..testbed.model import decode_pixels

        self.pipe.maybe_free_model_hooks()
        return self.output(decode_pixels(self.pipe, latents, self.args["output_type"]))
