"""Stable Diffusion XL: two text encoders, pooled text embeddings and added time ids.

At a lower resolution the micro-conditioning follows the latent: original size, target size and crop
coordinates are multiplied by the phase's scale (rounded), so the U-Net is told it makes an image of the
size it actually makes, as SDXL was trained.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils.torch_utils import get_module_execution_device

from .base import call_with, register
from .sd import StableDiffusionFamily, guidance_embedding


def until_denoising_end(scheduler, timesteps: torch.Tensor, end) -> torch.Tensor:
    """The timesteps a `denoising_end` keeps (those at or above its cutoff), as the SDXL pipelines cut them; only a
    float strictly between 0 and 1 cuts."""
    if end is not None and isinstance(end, float) and 0 < end < 1:
        cutoff = int(round(scheduler.config.num_train_timesteps - end * scheduler.config.num_train_timesteps))
        timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
    return timesteps


@register
class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_names = ("StableDiffusionXLPipeline",)
    # Micro-conditioning sizes (pixels): scaled with the latent in a lower-resolution segment.
    size_arguments = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size",
                      "negative_target_size", "negative_crops_coords_top_left")

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()

    def check(self) -> None:
        super().check()
        self.pipe._denoising_end = self.args["denoising_end"]

    def timesteps(self) -> torch.Tensor:
        a, scheduler = self.args, self.pipe.scheduler
        timesteps, _ = retrieve_timesteps(scheduler, a["num_inference_steps"], self.device, a["timesteps"], a["sigmas"])
        timesteps = until_denoising_end(scheduler, timesteps, a["denoising_end"])
        self.pipe._num_timesteps = len(timesteps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return timesteps

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return until_denoising_end(self.pipe.scheduler, timesteps, self.args["denoising_end"])

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        """The plan has cut the timesteps at `denoising_end` already; the size conditions given follow the latent
        (rounded), as the defaults do (the segment's own size)."""
        segment = super().segment_arguments(arguments, phase, last, latents, guided)
        segment["denoising_end"] = None
        if phase.scale != 1.0:
            for name in self.size_arguments:
                if segment.get(name) is not None:
                    segment[name] = tuple(round(value * phase.scale) for value in segment[name])
        return segment

    def encode(self) -> None:
        pipe, a = self.pipe, self.args
        cross_attention_kwargs = a["cross_attention_kwargs"]
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        (self.prompt_embeds, self.negative_prompt_embeds, self.pooled, self.negative_pooled) = call_with(
            pipe.encode_prompt, a, device=self.device, do_classifier_free_guidance=self.do_cfg, lora_scale=lora_scale
        )
        if pipe.text_encoder_2 is None:
            self.projection_dim = int(self.pooled.shape[-1])
        else:
            self.projection_dim = pipe.text_encoder_2.config.projection_dim
        self.cfg_embeds = torch.cat([self.negative_prompt_embeds, self.prompt_embeds], dim=0) if self.do_cfg else None
        self.cfg_text_embeds = torch.cat([self.negative_pooled, self.pooled], dim=0) if self.do_cfg else None
        self.add_time_ids = self._full_resolution_time_ids()
        self.time_ids = {}  # (scale, cfg) -> the ids a phase passes
        self.timestep_cond = guidance_embedding(pipe, a["guidance_scale"], self.num_images, self.device, self.prompt_embeds.dtype)

    def _full_resolution_time_ids(self) -> torch.Tensor:
        """Added time ids as the pipeline builds them (cat [negative, ids] under CFG, then repeat per image)."""
        a = self.args
        full = (self.height, self.width)
        ids = self._ids(a["original_size"] or full, a["crops_coords_top_left"], a["target_size"] or full)
        if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
            negative = self._ids(a["negative_original_size"], a["negative_crops_coords_top_left"], a["negative_target_size"])
        else:
            negative = ids
        ids = torch.cat([negative, ids], dim=0) if self.do_cfg else ids
        return ids.to(self.device).repeat(self.num_images, 1)

    def _ids(self, original_size, crops, target_size) -> torch.Tensor:
        return self.pipe._get_add_time_ids(original_size, crops, target_size, dtype=self.prompt_embeds.dtype,
                                           text_encoder_projection_dim=self.projection_dim)

    def _time_ids(self, scale: float, cfg: bool) -> torch.Tensor:
        """A phase's ids: sizes and crop scaled with the latent (rounded); after the CFG stop, the rows the
        conditional images had under CFG."""
        key = (scale, cfg)
        if key not in self.time_ids:
            ids = self.add_time_ids if cfg or not self.do_cfg else self.add_time_ids[self.num_images :]
            self.time_ids[key] = ids if scale == 1.0 else self._scaled_ids(ids, scale)
        return self.time_ids[key]

    def _scaled_ids(self, ids: torch.Tensor, scale: float) -> torch.Tensor:
        """(original size, crop, target size): every entry is a size in pixels."""
        return torch.round(ids * scale)

    def unet_inputs(self, cfg: bool, scale: float) -> dict:
        added = {"text_embeds": (self.cfg_text_embeds if cfg else self.pooled).to(self.device),
                 "time_ids": self._time_ids(scale, cfg)}
        return dict(encoder_hidden_states=(self.cfg_embeds if cfg else self.prompt_embeds).to(self.device),
                    timestep_cond=self.timestep_cond, cross_attention_kwargs=self.args["cross_attention_kwargs"],
                    added_cond_kwargs=added)

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        cfg = self.do_cfg
        return {"latents": latents, "prompt_embeds": self.cfg_embeds if cfg else self.prompt_embeds,
                "add_text_embeds": self.cfg_text_embeds if cfg else self.pooled,
                "add_time_ids": self.add_time_ids, "negative_prompt_embeds": self.negative_prompt_embeds,
                "negative_pooled_prompt_embeds": self.negative_pooled}

    def take_callback_outputs(self, outputs: dict) -> None:
        """`prompt_embeds`, `add_text_embeds` and `add_time_ids` as the pipeline goes on with them (CFG layout
        under CFG); later phases and the CFG stop derive their inputs from the returned tensors."""
        super().take_callback_outputs(outputs)
        if "add_text_embeds" in outputs:
            embeds = outputs["add_text_embeds"]
            if self.do_cfg:
                self.cfg_text_embeds, self.pooled = embeds, embeds[self.num_images :]
            else:
                self.pooled = embeds
        if "add_time_ids" in outputs:
            self.add_time_ids, self.time_ids = outputs["add_time_ids"], {}

    def decode(self, latents: torch.Tensor):
        pipe, a = self.pipe, self.args
        output_type = a["output_type"]
        if output_type == "latent":
            image = latents
        else:
            image = self._vae_decode(latents)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            self.pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        if needs_upcasting:
            vae.to(dtype=torch.float16)
        return image
