"""ControlNet text-to-image: `StableDiffusionControlNetPipeline` and `StableDiffusionXLControlNetPipeline`, one
ControlNet or several (`MultiControlNetModel`). The pipelines' own calls run every step, ControlNet and all.

- The requested size is the control image's, as the pipelines prepare it (or `height`/`width`).
- Low resolution: a lower segment's control image is prepared at the requested size by the pipeline's own
  `prepare_image`, then area-averaged down to the segment's size (`segment_methods`). Area averaging is the
  anti-aliased downscale: an edge or pose line stays a (fainter) line instead of disappearing between sampled
  pixels, and it treats PIL, NumPy and tensor inputs alike.
- `control_guidance_start/end` are fractions of the call's steps; the pipeline computes them on the segment it
  runs, so the step's `conditioning_scale` is the call's (`ControlWindowHook`, from `step_conditioning_scale`).
- After the CFG stop the ControlNet runs on the conditional half, as the U-Net (caching/guidance.py).
- An image returned by `callback_on_step_end` replaces the control image for the rest of its segment only.

DeepCache: see caching/controlnet.py (`PostDiffConfig.controlnet_cache`, default "reuse": measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import unwrap_module

from ..caching.controlnet import controlnet_nets, install_controlnet_caches
from ..caching.guidance import ControlWindowHook, apply_guidance_hook
from ..caching.hooks import install
from ..caching.deepcache import down_layers
from ..config import ConfigError
from .base import register
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily


class ControlNetMixin:
    """What a ControlNet adds to a U-Net family's adapter; mixed in before the family (SD or SDXL)."""

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
        if not config.is_off:  # outermost: the caches inside see the call's scale and the batch that runs
            install(unwrap_module(pipe.controlnet), ControlWindowHook(state))
            apply_guidance_hook(unwrap_module(pipe.controlnet), state)

    def _init_control(self) -> None:
        a = self.args
        self.controlnet = unwrap_module(self.pipe.controlnet)
        self.multi = hasattr(self.controlnet, "nets")
        nets = len(self.controlnet.nets) if self.multi else 1
        self.control_guidance_start, self.control_guidance_end = _aligned_windows(
            a["control_guidance_start"], a["control_guidance_end"], nets)
        scale = a["controlnet_conditioning_scale"]
        self.conditioning_scale = [scale] * nets if self.multi and isinstance(scale, float) else scale
        self.control_size = None  # (height, width) of the control image as the pipeline prepares it

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The control image's size as the pipeline prepares it (or `height`/`width`, to which it is resized)."""
        if self.control_size is None:
            prepared = self.pipe.prepare_image(
                image=self._first_image(), width=self.args["width"], height=self.args["height"], batch_size=1,
                num_images_per_prompt=1, device="cpu", dtype=torch.float32)
            self.control_size = self.height, self.width = prepared.shape[-2:]
        factor = self.pipe.vae_scale_factor
        return (int(self.height) // factor, int(self.width) // factor)

    def _first_image(self):
        image = self.args["image"]
        while isinstance(image, list):
            image = image[0]
        return image

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        self.schedule_length = len(timesteps)  # the control windows are fractions of the schedule
        return super().planned_timesteps(timesteps)

    def enter_step(self, step) -> None:
        self.state.control_scale = self.step_conditioning_scale(step.index)

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """A lower-resolution segment's control image: prepared at the requested size by the pipeline's own
        `prepare_image`, then area-averaged down to the segment's size."""
        methods = super().segment_methods(phase, first, latents)
        if phase.latent_hw == self.latent_hw:
            return methods
        prepare, factor = self.pipe.prepare_image, self.pipe.vae_scale_factor
        size = (phase.latent_hw[0] * factor, phase.latent_hw[1] * factor)

        def at_segment_size(*args, **kwargs):
            full = prepare(*args, **{**kwargs, "height": self.height, "width": self.width})
            return F.interpolate(full, size=size, mode="area")

        methods["prepare_image"] = at_segment_size
        return methods

    def step_conditioning_scale(self, i: int):
        """The pipeline's `controlnet_keep`: a net is on while step i of the call's timesteps lies in its window."""
        count = self.schedule_length
        keeps = [1.0 - float(i / count < s or (i + 1) / count > e)
                 for s, e in zip(self.control_guidance_start, self.control_guidance_end)]
        if self.multi:
            return [c * k for c, k in zip(self.conditioning_scale, keeps)]
        scale = self.conditioning_scale[0] if isinstance(self.conditioning_scale, list) else self.conditioning_scale
        return scale * keeps[0]


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


@register
class StableDiffusionXLControlNetFamily(ControlNetMixin, StableDiffusionXLFamily):
    name = "sdxl-controlnet"
    preset_family = "sdxl"
    pipeline_names = ("StableDiffusionXLControlNetPipeline",)

    def __init__(self, pipe, arguments: dict):
        StableDiffusionFamily.__init__(self, pipe, arguments)  # the size comes from the control image (check)
        self._init_control()
