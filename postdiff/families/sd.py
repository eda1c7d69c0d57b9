"""Stable Diffusion 1.x/2.x (epsilon and v-prediction) and the embedded pixel-space testbed model.

Every step before and after the loop is the pipeline's own method (check_inputs, encode_prompt,
prepare_latents, run_safety_checker, image_processor.postprocess), called in the pipeline's order, so
the "off" config reproduces `StableDiffusionPipeline.__call__` bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .base import Family, call_with, register


@register
class StableDiffusionFamily(Family):
    name = "sd"
    pipeline_names = ("StableDiffusionPipeline",)
    engine = True

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        a = self.args
        default = pipe.unet.config.sample_size
        default = default if isinstance(default, int) else default[0]
        self.height = a["height"] or default * pipe.vae_scale_factor
        self.width = a["width"] or default * pipe.vae_scale_factor
        kwargs = a.get("kwargs") or {}
        if kwargs.get("callback") is not None:
            raise ValueError("the deprecated `callback` argument is not supported by postdiff; use callback_on_step_end")
        self.callback_steps = kwargs.get("callback_steps")

    def check(self) -> None:
        super().check()
        pipe, a = self.pipe, self.args
        call_with(pipe.check_inputs, a, height=self.height, width=self.width, callback_steps=self.callback_steps)
        self.set_call_fields()
        pipe._guidance_rescale = a["guidance_rescale"]

    def set_call_fields(self) -> None:
        """The fields the pipeline's `__call__` sets before its loop (its properties read them)."""
        pipe, a = self.pipe, self.args
        pipe._guidance_scale = a["guidance_scale"]
        pipe._clip_skip = a["clip_skip"]
        pipe._cross_attention_kwargs = a["cross_attention_kwargs"]
        pipe._interrupt = False

    def timesteps(self) -> torch.Tensor:
        a = self.args
        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, a["num_inference_steps"], self.device, a["timesteps"], a["sigmas"])
        self.pipe._num_timesteps = len(timesteps)
        return timesteps

    def encode(self) -> None:
        pipe, a = self.pipe, self.args
        cross_attention_kwargs = a["cross_attention_kwargs"]
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        self.prompt_embeds, self.negative_prompt_embeds = pipe.encode_prompt(
            a["prompt"], self.device, a["num_images_per_prompt"], self.do_cfg, a.get("negative_prompt"),
            prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a.get("negative_prompt_embeds"),
            lora_scale=lora_scale, clip_skip=a["clip_skip"],
        )
        self.cfg_embeds = torch.cat([self.negative_prompt_embeds, self.prompt_embeds]) if self.do_cfg else None
        self.timestep_cond = guidance_embedding(pipe, a["guidance_scale"], self.num_images, self.device, self.prompt_embeds.dtype)

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        factor = pipe.vae_scale_factor
        return pipe.prepare_latents(
            self.num_images, pipe.unet.config.in_channels, latent_hw[0] * factor, latent_hw[1] * factor,
            self.prompt_embeds.dtype, self.device, a["generator"], a["latents"],
        )

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        return self.pipe.unet(model_input, t, **self.unet_inputs(cfg, scale), return_dict=False)[0]

    def unet_inputs(self, cfg: bool, scale: float) -> dict:
        """The U-Net's conditioning for a step on the CFG batch (`cfg`) or the conditional one, at `scale`."""
        return dict(encoder_hidden_states=self.cfg_embeds if cfg else self.prompt_embeds, timestep_cond=self.timestep_cond,
                    cross_attention_kwargs=self.args["cross_attention_kwargs"], added_cond_kwargs=None)

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {"latents": latents, "prompt_embeds": self.cfg_embeds if self.do_cfg else self.prompt_embeds,
                "negative_prompt_embeds": self.negative_prompt_embeds}

    def take_callback_outputs(self, outputs: dict) -> None:
        """The pipeline goes on with a returned `prompt_embeds` (the CFG batch [negative, prompt] under CFG);
        after PostDiff's CFG stop the conditional half of it is used. `negative_prompt_embeds` is kept, unused
        by the loop, as in the pipeline (it was concatenated before the loop)."""
        if "prompt_embeds" in outputs:
            self.set_prompt_embeds(outputs["prompt_embeds"])
        self.negative_prompt_embeds = outputs.get("negative_prompt_embeds", self.negative_prompt_embeds)

    def set_prompt_embeds(self, embeds: torch.Tensor) -> None:
        if self.do_cfg:
            self.cfg_embeds, self.prompt_embeds = embeds, embeds[self.num_images :]
        else:
            self.prompt_embeds = embeds

    def decode(self, latents: torch.Tensor):
        pipe, a = self.pipe, self.args
        output_type = a["output_type"]
        if output_type != "latent":
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=a["generator"])[0]
            image, has_nsfw_concept = pipe.run_safety_checker(image, self.device, self.prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


def guidance_embedding(pipe, guidance_scale: float, num_images: int, device, dtype):
    """The guidance-scale embedding of guidance-distilled U-Nets (LCM), None for the others."""
    dimension = pipe.unet.config.time_cond_proj_dim
    if dimension is None:
        return None
    scale = torch.tensor(guidance_scale - 1).repeat(num_images)
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=dimension).to(device=device, dtype=dtype)


@register
class LatentConsistencyFamily(StableDiffusionFamily):
    """`LatentConsistencyModelPipeline`: no CFG (guidance is an embedding), decodes the last `denoised`."""

    name = "lcm"
    preset_family = "sd"
    pipeline_names = ("LatentConsistencyModelPipeline",)

    @property
    def eta(self):
        return None

    def check(self) -> None:
        for name in ("guidance_rescale", "negative_prompt"):
            self.args.setdefault(name, None if name == "negative_prompt" else 0.0)
        super().check()

    def timesteps(self) -> torch.Tensor:
        a = self.args
        timesteps, _ = retrieve_timesteps(self.pipe.scheduler, a["num_inference_steps"], self.device, a["timesteps"],
                                          original_inference_steps=a["original_inference_steps"])
        self.pipe._num_timesteps = len(timesteps)
        return timesteps

    def final_sample(self, latents: torch.Tensor) -> torch.Tensor:
        return self.denoised

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {"latents": latents, "denoised": self.denoised, "prompt_embeds": self.prompt_embeds, "w_embedding": self.timestep_cond}

    def take_callback_outputs(self, outputs: dict) -> None:
        self.prompt_embeds = outputs.get("prompt_embeds", self.prompt_embeds)
        self.timestep_cond = outputs.get("w_embedding", self.timestep_cond)
        self.denoised = outputs.get("denoised", self.denoised)


@register
class TestbedFamily(StableDiffusionFamily):
    """The embedded model: Stable Diffusion's loop in pixel space, so decoding is only post-processing."""

    __test__ = False
    name = "testbed"
    pipeline_names = ("TestbedPipeline",)

    def decode(self, latents: torch.Tensor):
        from ..testbed.model import decode_pixels

        pipe, a = self.pipe, self.args
        pipe.maybe_free_model_hooks()
        images = decode_pixels(pipe, latents, a["output_type"])
        if not a["return_dict"]:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


@register
class StableDiffusionImg2ImgFamily(StableDiffusionFamily):
    """`StableDiffusionImg2ImgPipeline`: the loop starts from the init image's latents noised to the strength's
    first timestep, and runs only the steps from there; a plan counts those steps, and `switch` is a fraction
    of them.

    Low resolution: the preprocessed image is resized to the phase's size (area averaging, an anti-aliased
    downscale) and encoded by the pipeline's own `prepare_latents`, so the VAE sees an image and the
    low-resolution phase starts from in-distribution latents of the smaller image, with noise of that size
    (an image given as latents is area-resized directly)."""

    name = "sd-img2img"
    preset_family = "sd"
    pipeline_names = ("StableDiffusionImg2ImgPipeline",)

    def __init__(self, pipe, arguments: dict):
        Family.__init__(self, pipe, arguments)
        kwargs = arguments.get("kwargs") or {}
        if kwargs.get("callback") is not None:
            raise ValueError("the deprecated `callback` argument is not supported by postdiff; use callback_on_step_end")
        self.callback_steps = kwargs.get("callback_steps")
        self.image = None if arguments["image"] is None else pipe.image_processor.preprocess(arguments["image"])

    def check(self) -> None:
        Family.check(self)
        pipe, a = self.pipe, self.args
        call_with(pipe.check_inputs, a, callback_steps=self.callback_steps)  # by name: SDXL's takes more
        if self.image is None:
            raise ValueError("image is required by StableDiffusionImg2ImgPipeline: got None")
        self.set_call_fields()

    @property
    def latent_hw(self) -> tuple[int, int]:
        height, width = self.image.shape[-2:]
        factor = 1 if self.image.shape[1] == 4 else self.pipe.vae_scale_factor  # an image given as latents
        return (height // factor, width // factor)

    def timesteps(self) -> torch.Tensor:
        """The pipeline's timesteps from the strength's start on (`begin_offset` of them are skipped)."""
        pipe, a = self.pipe, self.args
        all_timesteps, steps = retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], self.device, a["timesteps"], a["sigmas"])
        timesteps = self.start_timesteps(steps)
        self.begin_offset = len(all_timesteps) - len(timesteps)
        self.latent_timestep = timesteps[:1]
        pipe._num_timesteps = len(timesteps)
        return timesteps

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The strength's last timesteps; `begin_offset` counts those the pipeline skips."""
        planned = self.start_timesteps(len(timesteps))
        self.begin_offset = len(timesteps) - len(planned)
        return planned

    def segment_size(self, phase) -> dict:
        return {}  # the image (or latents) sets the size

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """`get_timesteps`: the segment's timesteps (the plan has applied the strength, or SDXL's `denoising_start`,
        once: counted again on a segment's timesteps it would cut them). `prepare_latents`: the first segment
        encodes the init image at its size (area-downscaled at low resolution) with the pipeline's own; later
        ones start from the switch's latents."""
        methods = {"get_timesteps": self.segment_timesteps}
        if not first:
            if "latents" not in self.args:
                methods["prepare_latents"] = lambda *args, **kwargs: latents
        elif phase.latent_hw != self.latent_hw:
            prepare = self.pipe.prepare_latents
            methods["prepare_latents"] = lambda image, *args, **kwargs: prepare(
                self.resized_image(image, phase.latent_hw), *args, **kwargs)
        return methods

    def segment_timesteps(self, *args, **kwargs):
        """The pipeline's `get_timesteps` in a segment: the timesteps shown after the skipped ones, the scheduler
        begun there (the stand-in maps the index into the real scheduler's tables)."""
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps[self.begin_offset :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(self.begin_offset)
        return timesteps, len(timesteps)

    def resized_image(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The preprocessed image (or latents) area-resized to `latent_hw` latents: an anti-aliased downscale."""
        factor = 1 if image.shape[1] == 4 else self.pipe.vae_scale_factor
        return F.interpolate(image, size=(latent_hw[0] * factor, latent_hw[1] * factor), mode="area")

    def start_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The pipeline's `get_timesteps` (it also sets the scheduler's begin index): the strength's last steps."""
        return self.pipe.get_timesteps(num_inference_steps, self.args["strength"], self.device)[0]

    def latent_options(self) -> dict:
        """Keyword arguments of the pipeline's `prepare_latents` beyond SD's (SDXL's `add_noise`)."""
        return {}

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        image = self.image
        if latent_hw != self.latent_hw:
            factor = 1 if image.shape[1] == 4 else pipe.vae_scale_factor
            image = F.interpolate(image, size=(latent_hw[0] * factor, latent_hw[1] * factor), mode="area")
        first = self.latent_timestep.repeat(self.num_images)
        return pipe.prepare_latents(image, first, self.num_images // a["num_images_per_prompt"], a["num_images_per_prompt"],
                                    self.prompt_embeds.dtype, self.device, a["generator"], **self.latent_options())
