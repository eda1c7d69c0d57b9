"""The CFG stop and the passes of a guided step, as one hook on the denoiser: the pipeline's own loop keeps
guiding, and after the stop the guidance it computes is exactly the conditional output.

- One [uncond, cond] batch a step (SD, SDXL, PixArt, SD3): after the stop the denoiser runs on the conditional
  half of every batched input and returns its output twice, so `uncond + s * (cond - uncond)` is `cond` to the
  bit (x - x = 0) and the step costs one conditional pass.
- Separate passes (FLUX's true CFG: conditional, then unconditional): each pass is named for the caches that
  keep state per pass (`RunState.pass_name`); after the stop the second pass is not run and returns the first
  pass's output, so `neg + s * (cond - neg)` is `cond`.
"""

from __future__ import annotations

import torch
from diffusers.utils import BaseOutput

from .hooks import Hook, install
from .state import PASS_NAMES, RunState


class GuidanceHook(Hook):
    def __init__(self, state: RunState):
        self.state = state

    def new_forward(self, module, forward, *args, **kwargs):
        state, step = self.state, self.state.step
        if step is None or not state.cfg_call:
            return forward(*args, **kwargs)
        if state.cfg_passes == 2:
            return self.separate_pass(forward, step.cfg, *args, **kwargs)
        if step.cfg:
            return forward(*args, **kwargs)
        n = state.num_images
        return doubled(forward(*batch_half(args, n), **batch_half(kwargs, n)))

    def separate_pass(self, forward, guided: bool, *args, **kwargs):
        state = self.state
        index = state.pass_index
        state.pass_index += 1
        if index > 0 and not guided:
            return state.conditional_output
        state.pass_name = PASS_NAMES[min(index, 1)]
        try:
            output = forward(*args, **kwargs)
        finally:
            state.pass_name = ""
        if index == 0 and not guided:
            state.conditional_output = output
        return output


def batch_half(value, num_images: int):
    """The conditional half of every tensor batched as [uncond x n, cond x n] in `value` (dicts, lists and
    tuples followed); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[num_images:] if value.ndim > 0 and value.shape[0] == 2 * num_images else value
    if isinstance(value, dict):
        return {key: batch_half(item, num_images) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(batch_half(item, num_images) for item in value)
    return value


def doubled(output):
    """A conditional output as the CFG batch [cond, cond] (tensors, tuples, diffusers' output classes)."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, BaseOutput):
        return type(output)(**{key: doubled(item) for key, item in output.items()})
    if isinstance(output, (list, tuple)):
        return type(output)(doubled(item) for item in output)
    return output


def apply_guidance_hook(model: torch.nn.Module, state: RunState) -> None:
    """Installed last, so it is the outermost hook: the caches inside see the batch that actually runs."""
    install(model, GuidanceHook(state))
