"""FLUX.1 (`FluxPipeline`: dev, guidance-distilled, and schnell): a rectified-flow MM-DiT on packed latents.

Every step before and after the loop is the pipeline's own (check_inputs, encode_prompt, prepare_latents,
the dynamically shifted schedule, the VAE decode), in the pipeline's order, and the transformer is called
as the pipeline calls it, so "off" reproduces `FluxPipeline.__call__` bit for bit.

- **Guidance.** FLUX.1-dev takes its guidance scale as an input (`guidance_embeds`): one conditional pass a
  step, no CFG batch, so PostDiff's CFG stop has nothing to stop. True CFG (`true_cfg_scale > 1` with a
  negative prompt) is two passes a step, conditional then unconditional, as in the pipeline; that is what
  `cfg_stop` stops. Each pass keeps its own block-cache state (`RunState.pass_name`).
- **Packed latents.** The pipeline packs each 2x2 latent patch into one token. The loop keeps latents
  unpacked (B, C, H, W), so the switch resamples them spatially; packing is a permutation, and every
  per-step operation is elementwise, so this changes no number. Callbacks see packed latents, as in the
  pipeline, and `output_type="latent"` returns them packed.
- **Low resolution.** The RoPE image ids are those of the low-resolution token grid (positions 0..h/2 - 1),
  what FLUX sees for an image of that size. By default the whole call runs on one sigma schedule, the
  pipeline's for the requested size (mu from the full-resolution token count), so the switch re-enters at
  the baseline's next sigma; `low_res_shift="own"` runs a low-resolution phase on the schedule the pipeline
  gives an image of its size (mu from its token count), and re-enters at the baseline's next sigma.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from .base import Family, register


@register
class FluxFamily(Family):
    name = "flux"
    engine = True
    cfg_passes = 2  # true CFG: a conditional pass, then an unconditional one
    pipeline_names = ("FluxPipeline",)
    denoiser_attribute = "transformer"
    denoiser_kind = "flux"
    max_text_length = 512  # the pipeline's default max_sequence_length (T5)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self.height, self.width = self.requested_size()
        self.image_ids = {}  # latent size -> RoPE ids of its token grid

    # -- before any compute
    def check(self) -> None:
        super().check()
        pipe, a = self.pipe, self.args
        pipe.check_inputs(
            a["prompt"], a["prompt_2"], self.height, self.width, negative_prompt=a["negative_prompt"],
            negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
            negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
            max_sequence_length=a["max_sequence_length"],
        )
        pipe._guidance_scale = a["guidance_scale"]
        pipe._joint_attention_kwargs = a["joint_attention_kwargs"]
        pipe._current_timestep = None
        pipe._interrupt = False
        if self.do_cfg and a["prompt_embeds"] is not None and a["negative_prompt_embeds"] is not None:
            if a["prompt_embeds"].shape != a["negative_prompt_embeds"].shape:
                raise ValueError(f"`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                                 f"directly, but got: `prompt_embeds` {a['prompt_embeds'].shape} != "
                                 f"`negative_prompt_embeds` {a['negative_prompt_embeds'].shape}.")

    @property
    def do_cfg(self) -> bool:
        """True CFG: the pipeline runs it when `true_cfg_scale > 1` and a negative prompt is given."""
        a = self.args
        has_negative = a["negative_prompt"] is not None or (
            a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None)
        return a["true_cfg_scale"] > 1 and has_negative

    @property
    def guidance_scale(self) -> float:
        return self.args["true_cfg_scale"]

    def text_length(self) -> int:
        return self.args["max_sequence_length"]

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Even latent sides (the pipeline rounds down to whole 2x2 patches)."""
        factor = self.pipe.vae_scale_factor * 2
        return (2 * (int(self.height) // factor), 2 * (int(self.width) // factor))

    def timesteps(self) -> torch.Tensor:
        timesteps = self.set_schedule(self.pipe.scheduler, self.latent_hw)
        self.pipe._num_timesteps = len(timesteps)
        return timesteps

    def own_schedule(self, latent_hw: tuple[int, int]):
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        return scheduler, self.set_schedule(scheduler, latent_hw)

    def set_schedule(self, scheduler, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The pipeline's schedule for an image of `latent_hw`: mu from its token count (2x2 packed)."""
        a = self.args
        steps, config = a["num_inference_steps"], scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps) if a["sigmas"] is None else a["sigmas"]
        if hasattr(config, "use_flow_sigmas") and config.use_flow_sigmas:
            sigmas = None
        height, width = latent_hw
        mu = calculate_shift((height // 2) * (width // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    # -- compute
    def encode(self) -> None:
        pipe, a = self.pipe, self.args
        kwargs = a["joint_attention_kwargs"]
        lora_scale = kwargs.get("scale", None) if kwargs is not None else None
        common = dict(device=self.device, num_images_per_prompt=a["num_images_per_prompt"],
                      max_sequence_length=a["max_sequence_length"], lora_scale=lora_scale)
        self.prompt_embeds, self.pooled, self.text_ids = pipe.encode_prompt(
            prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_embeds=a["prompt_embeds"],
            pooled_prompt_embeds=a["pooled_prompt_embeds"], **common)
        if self.do_cfg:
            self.negative_prompt_embeds, self.negative_pooled, self.negative_text_ids = pipe.encode_prompt(
                prompt=a["negative_prompt"], prompt_2=a["negative_prompt_2"], prompt_embeds=a["negative_prompt_embeds"],
                pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], **common)
        if pipe.joint_attention_kwargs is None:
            pipe._joint_attention_kwargs = {}

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        channels = pipe.transformer.config.in_channels // 4
        factor = pipe.vae_scale_factor
        packed, _ = pipe.prepare_latents(self.num_images, channels, latent_hw[0] * factor, latent_hw[1] * factor,
                                         self.prompt_embeds.dtype, self.device, a["generator"], a["latents"])
        self.guidance = None
        if pipe.transformer.config.guidance_embeds:
            self.guidance = torch.full([1], a["guidance_scale"], device=self.device, dtype=torch.float32).expand(self.num_images)
        return self.unpack(packed, latent_hw)

    def own_scheduler(self, scheduler, phase):
        return type(scheduler).from_config(scheduler.config)  # the pipeline's mu follows the segment's token count

    def spatial_latents(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        return self.unpack(latents, latent_hw)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pack(latents)

    def unpack(self, packed: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, latent_hw[0] * factor, latent_hw[1] * factor, factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _image_ids(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        if latent_hw not in self.image_ids:
            self.image_ids[latent_hw] = self.pipe._prepare_latent_image_ids(
                self.num_images, latent_hw[0] // 2, latent_hw[1] // 2, self.device, self.prompt_embeds.dtype)
        return self.image_ids[latent_hw]

    def extra_step_kwargs(self) -> dict:
        return {}

    def predict(self, scheduler, latents: torch.Tensor, t, cfg: bool, scale: float) -> torch.Tensor:
        """The pipeline's step: a conditional pass, and under true CFG an unconditional one after it."""
        self.pipe._current_timestep = t
        packed = self.pack(latents)
        output = self._pass(packed, t, self.prompt_embeds, self.pooled, self.text_ids, "cond", latents.shape[-2:])
        if cfg:
            self.state.pass_name = "uncond:"
            negative = self._pass(packed, t, self.negative_prompt_embeds, self.negative_pooled, self.negative_text_ids,
                                  "uncond", latents.shape[-2:])
            self.state.pass_name = ""
            output = negative + self.guidance_scale * (output - negative)
        return self.unpack(output, tuple(latents.shape[-2:]))

    def _pass(self, packed, t, embeds, pooled, text_ids, context: str, latent_hw) -> torch.Tensor:
        transformer = self.pipe.transformer
        timestep = t.expand(packed.shape[0]).to(packed.dtype)
        with transformer.cache_context(context):
            return transformer(
                hidden_states=packed, timestep=timestep / 1000, guidance=self.guidance, pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=self._image_ids(tuple(latent_hw)),
                joint_attention_kwargs=self.pipe.joint_attention_kwargs, return_dict=False,
            )[0]

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {"latents": self.pack(latents), "prompt_embeds": self.prompt_embeds}

    def take_callback_outputs(self, outputs: dict) -> None:
        self.prompt_embeds = outputs.get("prompt_embeds", self.prompt_embeds)

    def callback_latents(self, outputs: dict, latents: torch.Tensor) -> torch.Tensor:
        return self.unpack(outputs["latents"], tuple(latents.shape[-2:])) if "latents" in outputs else latents

    def decode(self, latents: torch.Tensor):
        pipe, a = self.pipe, self.args
        pipe._current_timestep = None
        if a["output_type"] == "latent":
            image = self.pack(latents)
        else:
            vae = pipe.vae
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
            image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return (image,)
        return FluxPipelineOutput(images=image)
