"""PixArt-alpha and PixArt-Sigma: a DiT (`PixArtTransformer2DModel`) conditioned on T5 text with a mask.

Every step before and after the loop is the pipeline's own (resolution binning with
`image_processor.classify_height_width_bin`, check_inputs, encode_prompt, prepare_latents, the VAE decode,
`resize_and_crop_tensor` back to the requested size, postprocess), in the pipeline's order, and the
denoiser call is built as the pipeline builds it (timestep broadcast to the batch, attention mask,
`added_cond_kwargs`), so the "off" config reproduces `PixArtAlphaPipeline.__call__` and
`PixArtSigmaPipeline.__call__` bit for bit. Learned sigma (`out_channels == 2 * in_channels`): the variance
channels are dropped from the transformer output before CFG; the pipeline drops them after CFG, which is
the same elementwise arithmetic on the same numbers.

Low resolution: the patch embedding recomputes its sin-cos position embeddings for the token grid it is
given (`PatchEmbed.forward`, `pos_embed_max_size` None: interpolated over the same `base_size` extent), so
a low-resolution pass sees the low-resolution embeddings. PixArt-alpha 1024 (`sample_size` 128) also
takes a resolution condition: in a low-resolution phase it is the binned height and width multiplied by
the phase's scale (rounded), as for SDXL's size conditions; the aspect ratio is unchanged.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha_pipeline
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma_pipeline
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from .base import Family, register


@register
class PixArtAlphaFamily(Family):
    name = "pixart"
    pipeline_names = ("PixArtAlphaPipeline",)
    engine = True
    denoiser_attribute = "transformer"
    denoiser_kind = "pixart"
    max_text_length = 120  # the pipeline's default max_sequence_length
    # transformer sample_size -> aspect-ratio bins of `use_resolution_binning`
    bins = {128: alpha_pipeline.ASPECT_RATIO_1024_BIN, 64: alpha_pipeline.ASPECT_RATIO_512_BIN, 32: alpha_pipeline.ASPECT_RATIO_256_BIN}
    resolution_condition = True  # alpha passes resolution and aspect ratio when sample_size == 128
    pipeline_module = alpha_pipeline

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        a = self.args
        if "mask_feature" in (a.get("kwargs") or {}) and self.pipeline_module is alpha_pipeline:
            deprecate("mask_feature", "1.0.0", "The use of `mask_feature` is deprecated. It is no longer used in any computation "
                      "and that doesn't affect the end results. It will be removed in a future version.", standard_warn=False)
        config = pipe.transformer.config
        self.height = a["height"] or config.sample_size * pipe.vae_scale_factor
        self.width = a["width"] or config.sample_size * pipe.vae_scale_factor
        self.requested_hw = (self.height, self.width)
        if a["use_resolution_binning"]:
            if config.sample_size not in self.bins:
                raise ValueError("Invalid sample size")
            self.height, self.width = pipe.image_processor.classify_height_width_bin(self.height, self.width, ratios=self.bins[config.sample_size])
        self.conditions = {}

    def segment_size(self, phase) -> dict:
        """A lower-resolution segment runs at the binned size times its scale, without binning it again (the bins
        are for full-size images); its resolution condition is that size, as the pipeline builds it."""
        return {**super().segment_size(phase), "use_resolution_binning": False}

    # -- before any compute
    def check(self) -> None:
        super().check()
        a = self.args
        self.pipe.check_inputs(
            a["prompt"], self.height, self.width, a["negative_prompt"], a["callback_steps"], a["prompt_embeds"],
            a["negative_prompt_embeds"], a["prompt_attention_mask"], a["negative_prompt_attention_mask"],
        )
        if a["callback"] is not None:
            a["callback_on_step_end"] = self._legacy_callback
            a["callback_on_step_end_tensor_inputs"] = ["latents"]

    @property
    def do_cfg(self) -> bool:
        return self.args["guidance_scale"] > 1.0

    @property
    def guidance_scale(self) -> float:
        return self.args["guidance_scale"]

    def _timestep_device(self):
        if self.pipeline_module.XLA_AVAILABLE or (self.pipeline_module is alpha_pipeline and self.device.type == "neuron"):
            return "cpu"
        return self.device

    def timesteps(self) -> torch.Tensor:
        a, scheduler = self.args, self.pipe.scheduler
        timesteps, self.num_inference_steps = self.pipeline_module.retrieve_timesteps(
            scheduler, a["num_inference_steps"], self._timestep_device(), a["timesteps"], a["sigmas"]
        )
        self.num_timesteps = len(timesteps)
        self._begin(scheduler)
        return timesteps

    def _begin(self, scheduler) -> None:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    # -- compute
    def encode(self) -> None:
        a = self.args
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = self.pipe.encode_prompt(
            a["prompt"], self.do_cfg, negative_prompt=a["negative_prompt"], num_images_per_prompt=a["num_images_per_prompt"],
            device=self.device, prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
            prompt_attention_mask=a["prompt_attention_mask"], negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
            clean_caption=a["clean_caption"], max_sequence_length=a["max_sequence_length"],
        )
        self.prompt_embeds, self.prompt_mask = prompt_embeds, self._mask(prompt_mask)
        self.negative_prompt_embeds = negative_embeds
        self.cfg_embeds = self.cfg_mask = None
        if self.do_cfg:
            self.cfg_embeds = torch.cat([negative_embeds, prompt_embeds], dim=0)
            self.cfg_mask = self._mask(torch.cat([negative_mask, prompt_mask], dim=0))

    def _mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(maybe_adjust_dtype_for_device(mask.dtype, mask.device))

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        pipe, a = self.pipe, self.args
        factor = pipe.vae_scale_factor
        return pipe.prepare_latents(
            self.num_images, pipe.transformer.config.in_channels, latent_hw[0] * factor, latent_hw[1] * factor,
            self.prompt_embeds.dtype, self.device, a["generator"], a["latents"],
        )

    def _conditions(self, scale: float, cfg: bool) -> dict:
        """`added_cond_kwargs` for a phase: the (scaled) resolution and the aspect ratio, as the pipeline builds them."""
        if not (self.resolution_condition and self.pipe.transformer.config.sample_size == 128):
            return {"resolution": None, "aspect_ratio": None}
        key = (scale, cfg)
        if key not in self.conditions:
            height, width = self.height, self.width
            if scale != 1.0:
                height, width = round(height * scale), round(width * scale)
            dtype, n = self.prompt_embeds.dtype, self.num_images
            resolution = torch.tensor([height, width]).repeat(n, 1).to(dtype=dtype, device=self.device)
            aspect_ratio = torch.tensor([float(self.height / self.width)]).repeat(n, 1).to(dtype=dtype, device=self.device)
            if cfg:
                resolution = torch.cat([resolution, resolution], dim=0)
                aspect_ratio = torch.cat([aspect_ratio, aspect_ratio], dim=0)
            self.conditions[key] = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.conditions[key]

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        transformer = self.pipe.transformer
        timestep = t
        if not torch.is_tensor(timestep):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            dtype = maybe_adjust_dtype_for_device(dtype, model_input.device)
            timestep = torch.tensor([timestep], dtype=dtype, device=model_input.device)
        elif len(timestep.shape) == 0:
            timestep = timestep[None].to(model_input.device)
        timestep = timestep.expand(model_input.shape[0])
        output = transformer(
            model_input,
            encoder_hidden_states=self.cfg_embeds if cfg else self.prompt_embeds,
            encoder_attention_mask=self.cfg_mask if cfg else self.prompt_mask,
            timestep=timestep,
            added_cond_kwargs=self._conditions(scale, cfg),
            return_dict=False,
        )[0]
        if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma
            output = output.chunk(2, dim=1)[0]
        return output

    def step_latents(self, output) -> torch.Tensor:
        # PixArt-alpha with a single step continues with (and decodes) the scheduler's x0 (one-step DMD models).
        return output[1] if self.num_inference_steps == 1 else output[0]

    def _legacy_callback(self, pipe, index: int, t, tensors: dict) -> dict:
        """The pipeline's `callback(step, t, latents)` every `callback_steps` steps, as its loop calls it."""
        a, order = self.args, pipe.scheduler.order
        warmup = max(self.num_timesteps - self.num_inference_steps * order, 0)
        if index == self.num_timesteps - 1 or ((index + 1) > warmup and (index + 1) % order == 0):
            if index % a["callback_steps"] == 0:
                a["callback"](index // getattr(pipe.scheduler, "order", 1), t, tensors["latents"])
        return {}

    def _vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor):
        pipe, a = self.pipe, self.args
        output_type = a["output_type"]
        if output_type != "latent":
            image = pipe.vae.decode(self._vae_input(latents), return_dict=False)[0]
            if a["use_resolution_binning"]:
                height, width = self.requested_hw
                image = pipe.image_processor.resize_and_crop_tensor(image, width, height)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        else:
            image = latents
        pipe.maybe_free_model_hooks()
        if not a["return_dict"]:
            return (image,)
        return ImagePipelineOutput(images=image)


@register
class PixArtSigmaFamily(PixArtAlphaFamily):
    """PixArt-Sigma: 300 text tokens, a 2048 bin, no resolution condition, no single-step x0, VAE in its dtype."""

    pipeline_names = ("PixArtSigmaPipeline",)
    max_text_length = 300
    bins = {256: sigma_pipeline.ASPECT_RATIO_2048_BIN, **PixArtAlphaFamily.bins}
    resolution_condition = False
    pipeline_module = sigma_pipeline

    def _begin(self, scheduler) -> None:
        pass  # the Sigma pipeline does not call set_begin_index

    def _mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def step_latents(self, output) -> torch.Tensor:
        return output[0]

    def _vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.pipe.vae.dtype) / self.pipe.vae.config.scaling_factor
