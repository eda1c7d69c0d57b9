"""RunState: everything one pipeline call's caches hold, reset at the start and the end of every call.

Each cached value lives in a `Slot`, made when its hook is installed (`declare`) and kept in a dict by name,
so the events between steps (a switch, the CFG stop, the end of a call) reach every value. A hook holds its
own slots: compiled denoisers (`torch.compile`) trace the hooks, and dynamo guards on what they read; a slot
read through the hook is the same code for every module, where a per-module name would be a constant of its
own. Work that depends on more than the step kind (resampling a cross-attention record to a new resolution)
is done here, between steps, outside any compiled region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import Step
from .tokens import resample_tokens

# Denoiser passes of one step: "" (the CFG batch, or FLUX's conditional pass), "uncond:" (FLUX's true CFG).
PASS_NAMES = ("", "uncond:")


@dataclass
class Slot:
    """One cached value (a tensor, a tuple of them, a record), or None."""

    value: object = None


@dataclass
class CrossAttentionEntry:
    """A cross-attention output recorded at `latent_hw` (and a video's `latent_frames`), and `current`: the same at
    `current_hw` and `current_frames`, the latent size of the step that reads it (resampled by `RunState.enter`)."""

    output: torch.Tensor  # (n, tokens, channels); a video's tokens are frames x grid
    latent_hw: tuple[int, int]
    latent_frames: int | None = None  # None: an image model

    def __post_init__(self):
        self.current, self.current_hw, self.current_frames = self.output, self.latent_hw, self.latent_frames

    def align(self, latent_hw: tuple[int, int], latent_frames: int | None = None) -> None:
        if (latent_hw, latent_frames) != (self.current_hw, self.current_frames):
            recorded = (latent_hw, latent_frames) == (self.latent_hw, self.latent_frames)
            self.current = self.output if recorded else resample_tokens(self.output, self.latent_hw, latent_hw,
                                                                        self.latent_frames, latent_frames)
            self.current_hw, self.current_frames = latent_hw, latent_frames


@dataclass
class RunState:
    step: Step | None = None  # None outside a PostDiff call: hooks then run the module unchanged
    latent_hw: tuple[int, int] | None = None
    latent_frames: int | None = None  # a video's latent frames in the current step (None: an image model)
    num_images: int = 0  # conditional batch size (images per call)
    guidance_scale: float = 1.0
    pass_name: str = ""  # which denoiser pass of a step runs (PASS_NAMES)
    cfg_call: bool = False  # the call guides with CFG (its steps before the CFG stop)
    cfg_passes: int = 1  # denoiser passes of a CFG step: 1 (one [uncond, cond] batch) or 2 (FLUX's true CFG)
    conditional_output: object = None  # the step's conditional pass output, where a second pass reuses it
    control_scale: object = None  # the ControlNet conditioning scale of the current step (a float or a list)
    # name -> Slot. DeepCache: a module's output of the last full step; block caching: the span's residual.
    deep: dict = field(default_factory=dict)
    # name -> Slot: a cross-attention module's CrossAttentionEntry, or a joint block's text-stream record.
    cross_attention: dict = field(default_factory=dict)

    def declare(self, store: dict, key: str) -> Slot:
        """The slot named `key` in `store` (`self.deep` or `self.cross_attention`), made on first use."""
        return store.setdefault(key, Slot())

    def begin(self, num_images: int, guidance_scale: float, cfg_call: bool = False, cfg_passes: int = 1) -> None:
        self.reset()
        self.num_images = num_images
        self.guidance_scale = guidance_scale
        self.cfg_call, self.cfg_passes = cfg_call, cfg_passes

    def reset(self) -> None:
        self.step = None
        self.latent_hw = self.latent_frames = None
        self.pass_name = ""
        self.conditional_output = self.control_scale = None
        self.reset_deep_cache()
        _empty(self.cross_attention)

    def enter(self, step: Step) -> None:
        """Apply the events before `step` and make it the current step of every hook."""
        if "switch" in step.events or "denoiser_change" in step.events:
            self.reset_deep_cache()
        if "cfg_stop" in step.events:
            self.drop_unconditional()
        if step.cross_attention == "cached":
            self.align_cross_attention(step.latent_hw, step.latent_frames)
        self.step, self.latent_hw, self.latent_frames = step, step.latent_hw, step.latent_frames
        self.conditional_output = None

    def reset_deep_cache(self) -> None:
        """The deep features have the old spatial size after a resolution switch, and are another model's after a
        denoiser change: drop them."""
        _empty(self.deep)

    def drop_unconditional(self) -> None:
        """At the CFG stop, keep the conditional half of cached deep features (exact for a cond-only batch)."""
        for slot in self.deep.values():
            slot.value = conditional_half(slot.value, self.num_images)

    def align_cross_attention(self, latent_hw: tuple[int, int], latent_frames: int | None = None) -> None:
        """Cross-attention records made at another resolution (or frame count) are resampled to it before the step."""
        for slot in self.cross_attention.values():
            if isinstance(slot.value, CrossAttentionEntry):
                slot.value.align(latent_hw, latent_frames)


def _empty(store: dict) -> None:
    for slot in store.values():
        slot.value = None


def conditional_half(value, num_images: int):
    """diffusers batches CFG as [uncond x n, cond x n]: take the second half of every tensor in `value`, as a
    tensor of its own (a view would start at an offset into its storage, which compiled code guards on)."""
    if isinstance(value, torch.Tensor):
        return value[num_images:].clone() if value.shape[0] == 2 * num_images else value
    if isinstance(value, (tuple, list)):
        return type(value)(conditional_half(item, num_images) for item in value)
    if value is None or isinstance(value, float):
        return value
    raise TypeError(f"cannot take the conditional half of a cached {type(value).__name__}")
