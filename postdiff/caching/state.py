"""RunState: everything one pipeline call's caches hold, reset at the start and the end of every call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Step


@dataclass
class RunState:
    step: Step | None = None  # None outside a PostDiff call: hooks then run the module unchanged
    latent_hw: tuple[int, int] | None = None
    num_images: int = 0  # conditional batch size (images per call)
    guidance_scale: float = 1.0
    pass_name: str = ""  # which denoiser pass of a step runs: "" (the CFG batch), "uncond:" (FLUX's second pass)
    deep: dict = field(default_factory=dict)  # DeepCache: module name -> output of the last full step; block caching: residual
    cross_attention: dict = field(default_factory=dict)  # module name -> CrossAttentionEntry

    def begin(self, num_images: int, guidance_scale: float) -> None:
        self.reset()
        self.num_images = num_images
        self.guidance_scale = guidance_scale

    def reset(self) -> None:
        self.step = None
        self.latent_hw = None
        self.pass_name = ""
        self.deep.clear()
        self.cross_attention.clear()

    def enter(self, step: Step) -> None:
        """Apply the events before `step` and make it the current step of every hook."""
        if "switch" in step.events:
            self.reset_deep_cache()
        if "cfg_stop" in step.events:
            self.drop_unconditional()
        self.step, self.latent_hw = step, step.latent_hw

    def reset_deep_cache(self) -> None:
        """The deep features have the old spatial size after a resolution switch: drop them."""
        self.deep.clear()

    def drop_unconditional(self) -> None:
        """At the CFG stop, keep the conditional half of cached deep features (exact for a cond-only batch)."""
        self.deep = {name: conditional_half(value, self.num_images) for name, value in self.deep.items()}


def conditional_half(value, num_images: int):
    """diffusers batches CFG as [uncond x n, cond x n]: take the second half of every tensor in `value`."""
    if isinstance(value, torch.Tensor):
        return value[num_images:] if value.shape[0] == 2 * num_images else value
    if isinstance(value, (tuple, list)):
        return type(value)(conditional_half(item, num_images) for item in value)
    if value is None:
        return None
    raise TypeError(f"cannot take the conditional half of a cached {type(value).__name__}")
