"""ControlNet text-to-image: `StableDiffusionControlNetPipeline` and `StableDiffusionXLControlNetPipeline`, one
ControlNet or several (`MultiControlNetModel`), with `controlnet_conditioning_scale`, `control_guidance_start/end`
and `guess_mode` as the pipelines apply them; "off" reproduces each pipeline bit for bit.

Each step runs the ControlNet(s) on the step's batch (after the CFG stop, the conditional one; in guess mode
always the conditional one, the unconditional half of the residuals zero) and adds the residuals to the U-Net's
skips. The requested size is the control image's, as in the pipelines (or `height`/`width`, to which the
processor resizes it).

Low resolution: the control image is prepared once at the requested size by the pipeline's own
`prepare_image`, then area-averaged down to each phase's size. Area averaging is the anti-aliased
downscale: an edge or pose line stays a (fainter) line instead of disappearing between sampled pixels, and
it treats PIL, NumPy and tensor inputs alike (the processor resizes tensors with nearest neighbours). An
image returned by `callback_on_step_end` replaces the current phase's control image; at a switch the
replacement is resized to the next phase (area down, bilinear up).

DeepCache: see caching/controlnet.py (`PostDiffConfig.controlnet_cache`, default "reuse": measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import unwrap_module

from ..caching.controlnet import controlnet_nets, install_controlnet_caches
from ..caching.deepcache import down_layers
from ..config import ConfigError
from .base import Family, register
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily


class ControlNetMixin:
    """ControlNet residuals for a U-Net family's `denoise`; mixed in before the family (SD or SDXL)."""

    engine = False  # still the mirrored loop (postdiff/sampler.py)
    unsupported_arguments = ("ip_adapter_image", "ip_adapter_image_embeds")  # not in its mirror

    @classmethod
    def cached_models(cls, pipe) -> list[torch.nn.Module]:
        return [*super().cached_models(pipe), pipe.controlnet]

    @classmethod
    def install_caches(cls, pipe, config, state) -> None:
        super().install_caches(pipe, config, state)
        expected = len(down_layers(pipe.unet))
        for index, net in enumerate(controlnet_nets(unwrap_module(pipe.controlnet))):
            if len(down_layers(net)) != expected:
                raise ConfigError(f"controlnet {index} has {len(down_layers(net))} down layers, the U-Net {expected}: "
                                  "postdiff caches ControlNets whose encoder has the U-Net's layout")
        install_controlnet_caches(unwrap_module(pipe.controlnet), config, state)

    def _init_control(self) -> None:
        a = self.args
        self.controlnet = unwrap_module(self.pipe.controlnet)
        self.multi = hasattr(self.controlnet, "nets")
        nets = len(self.controlnet.nets) if self.multi else 1
        self.control_guidance_start, self.control_guidance_end = _aligned_windows(
            a["control_guidance_start"], a["control_guidance_end"], nets)
        scale = a["controlnet_conditioning_scale"]
        self.conditioning_scale = [scale] * nets if self.multi and isinstance(scale, float) else scale
        first = self.controlnet.nets[0] if self.multi else self.controlnet
        self.guess_mode = a["guess_mode"] or first.config.global_pool_conditions
        self.control = None  # latent size -> the control image (a list with several nets), as the loop passes it

    def check(self) -> None:
        """The pipeline's checks, then the control image prepared at the requested size (it fixes the size)."""
        Family.check(self)
        self.check_control_inputs()
        self.set_call_fields()
        full = self._prepare_control_images()
        self.height, self.width = (full[0] if self.multi else full).shape[-2:]
        self.control = {self.latent_hw: full}

    def _prepare_control_images(self):
        pipe, a = self.pipe, self.args
        image = a["image"]
        if self.multi and isinstance(image[0], list):  # nested lists: one list per prompt -> one per net
            image = [list(t) for t in zip(*image)]

        def prepare(one):
            return pipe.prepare_image(image=one, width=a["width"], height=a["height"], batch_size=self.num_images,
                                      num_images_per_prompt=a["num_images_per_prompt"], device=self.device,
                                      dtype=self.controlnet.dtype, do_classifier_free_guidance=self.do_cfg,
                                      guess_mode=self.guess_mode)

        return [prepare(one) for one in image] if self.multi else prepare(image)

    # -- per step
    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        inputs = self.unet_inputs(cfg, scale)
        down, mid = self.control_residuals(model_input, t, cfg, inputs)
        return self.pipe.unet(model_input, t, **inputs, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0]

    def control_residuals(self, model_input: torch.Tensor, t, cfg: bool, inputs: dict):
        """The ControlNet call of the pipeline's loop, on the step's batch; in guess mode with CFG, the conditional
        half only, the unconditional residuals zero."""
        guess_cfg = self.guess_mode and cfg
        embeds, added = inputs["encoder_hidden_states"], inputs["added_cond_kwargs"]
        if guess_cfg:
            model_input, embeds = model_input.chunk(2)[1], embeds.chunk(2)[1]
            added = None if added is None else {name: value.chunk(2)[1] for name, value in added.items()}
        down, mid = self.pipe.controlnet(
            model_input, t, encoder_hidden_states=embeds, controlnet_cond=self.control_image(cfg),
            conditioning_scale=self.step_conditioning_scale(), guess_mode=self.guess_mode,
            added_cond_kwargs=added, return_dict=False,
        )
        if guess_cfg:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def step_conditioning_scale(self):
        """The pipeline's `controlnet_keep`: a net is on while step i of the call's timesteps lies in its window."""
        i, count = self.state.step.index, len(self.pipe.scheduler.timesteps)
        keeps = [1.0 - float(i / count < s or (i + 1) / count > e)
                 for s, e in zip(self.control_guidance_start, self.control_guidance_end)]
        if self.multi:
            return [c * k for c, k in zip(self.conditioning_scale, keeps)]
        scale = self.conditioning_scale[0] if isinstance(self.conditioning_scale, list) else self.conditioning_scale
        return scale * keeps[0]

    def control_image(self, cfg: bool):
        """The current phase's control image; after the CFG stop its conditional half (guess mode has no other)."""
        image = self.control[self.state.latent_hw] if self.state.latent_hw in self.control else self._resized_control()
        if cfg or not self.do_cfg or self.guess_mode:
            return image
        return [one[self.num_images :] for one in image] if self.multi else image[self.num_images :]

    def _resized_control(self):
        """The control image of a new phase: area-averaged down (or bilinear up, from a callback's replacement)."""
        (source_hw, source), = list(self.control.items())[-1:]
        factor = self.pipe.vae_scale_factor
        size = (self.state.latent_hw[0] * factor, self.state.latent_hw[1] * factor)
        mode = "area" if self.state.latent_hw[0] < source_hw[0] else "bilinear"

        def resize(image):
            return F.interpolate(image, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))

        image = [resize(one) for one in source] if self.multi else resize(source)
        self.control[self.state.latent_hw] = image
        return image

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {**super().callback_tensors(latents), "image": self.control_image(True)}

    def take_callback_outputs(self, outputs: dict) -> None:
        super().take_callback_outputs(outputs)
        if "image" in outputs:  # from now on the replacement is the control image (other phases: resized from it)
            self.control = {self.state.latent_hw: outputs["image"]}


def _aligned_windows(start, end, nets: int) -> tuple[list[float], list[float]]:
    """`control_guidance_start/end` as lists of one window per net, as the pipelines align them."""
    if not isinstance(start, list) and isinstance(end, list):
        return len(end) * [start], end
    if not isinstance(end, list) and isinstance(start, list):
        return start, len(start) * [end]
    if not isinstance(start, list):
        return nets * [start], nets * [end]
    return start, end


@register
class StableDiffusionControlNetFamily(ControlNetMixin, StableDiffusionFamily):
    name = "sd-controlnet"
    preset_family = "sd"
    pipeline_names = ("StableDiffusionControlNetPipeline",)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        self._init_control()

    def check_control_inputs(self) -> None:
        a = self.args
        self.pipe.check_inputs(a["prompt"], a["image"], self.callback_steps, a["negative_prompt"], a["prompt_embeds"],
                               a["negative_prompt_embeds"], a["ip_adapter_image"], a["ip_adapter_image_embeds"],
                               a["controlnet_conditioning_scale"], self.control_guidance_start, self.control_guidance_end,
                               a["callback_on_step_end_tensor_inputs"])


@register
class StableDiffusionXLControlNetFamily(ControlNetMixin, StableDiffusionXLFamily):
    name = "sdxl-controlnet"
    preset_family = "sdxl"
    pipeline_names = ("StableDiffusionXLControlNetPipeline",)

    def __init__(self, pipe, arguments: dict):
        StableDiffusionFamily.__init__(self, pipe, arguments)  # the size comes from the control image (check)
        self._init_control()

    def check_control_inputs(self) -> None:
        a = self.args
        self.pipe.check_inputs(a["prompt"], a["prompt_2"], a["image"], self.callback_steps, a["negative_prompt"],
                               a["negative_prompt_2"], a["prompt_embeds"], a["negative_prompt_embeds"],
                               a["pooled_prompt_embeds"], a["ip_adapter_image"], a["ip_adapter_image_embeds"],
                               a["negative_pooled_prompt_embeds"], a["controlnet_conditioning_scale"],
                               self.control_guidance_start, self.control_guidance_end,
                               a["callback_on_step_end_tensor_inputs"])

    def set_call_fields(self) -> None:
        super().set_call_fields()
        self.pipe._denoising_end = self.args["denoising_end"]
