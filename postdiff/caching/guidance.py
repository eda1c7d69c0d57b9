"""The CFG stop and the passes of a guided step, as one hook on the denoiser: the pipeline's own loop keeps
guiding, and after the stop the guidance it computes is exactly the conditional output.

- One [uncond, cond] batch a step (SD, SDXL, PixArt, SD3): after the stop the denoiser runs on the conditional
  half of every batched input and returns its output twice, so `uncond + s * (cond - uncond)` is `cond` to the
  bit (x - x = 0) and the step costs one conditional pass.
- Separate passes (FLUX's true CFG: conditional, then unconditional, each in diffusers' `cache_context`): the
  engine names each pass where the pipeline enters its context (`RunState.pass_name`, for the caches that keep
  state per pass), and after the stop answers the unconditional pass with the conditional pass's output
  (`SeparatePassGate`), so `neg + s * (cond - neg)` is `cond`. Both happen outside the denoiser, so a compiled
  denoiser is not traced for a pass that does not run.
- Extra guidance passes the plan does not count (SD3's skip-layer guidance: a call with `skip_layers`) run the
  plain model, outside the step's caches, whose state they would otherwise overwrite.
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
        if step is not None and kwargs.get("skip_layers") is not None:
            return self.outside_the_caches(forward, *args, **kwargs)
        if step is None or not state.cfg_call or state.cfg_passes == 2 or step.cfg:
            return forward(*args, **kwargs)
        n = state.num_images
        sample = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(sample, torch.Tensor) or sample.shape[0] != 2 * n:
            return forward(*args, **kwargs)  # a conditional batch already (a ControlNet in guess mode)
        return doubled(forward(*batch_half(args, n), **batch_half(kwargs, n)))

    def outside_the_caches(self, forward, *args, **kwargs):
        state = self.state
        step, state.step = state.step, None
        try:
            return forward(*args, **kwargs)
        finally:
            state.step = step

class SeparatePassGate:
    """The denoiser as a pipeline with separate CFG passes sees it during an engine call: every attribute is the
    denoiser's; a call in the unconditional pass of a step after the CFG stop returns the step's conditional
    output without running anything. `by_order`: the pipeline calls its denoiser twice a step without naming the
    passes in `cache_context` (Chroma, FLUX.1-Kontext), conditional first: the gate names them by their order."""

    def __init__(self, denoiser, state: RunState, by_order: bool = False):
        object.__setattr__(self, "_denoiser", denoiser)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_by_order", by_order)
        object.__setattr__(self, "_calls", (None, 0))  # (step index, calls of the denoiser in that step so far)

    def __call__(self, *args, **kwargs):
        if not self._by_order:
            return self._gated(*args, **kwargs)
        state = self._state
        state.pass_name = self._pass_by_order()
        try:
            return self._gated(*args, **kwargs)
        finally:
            state.pass_name = PASS_NAMES[0]

    def _pass_by_order(self) -> str:
        """The first call of a step is its conditional pass, the next its unconditional one."""
        step = self._state.step
        index = None if step is None else step.index
        last, calls = self._calls
        calls = calls + 1 if index == last else 0
        object.__setattr__(self, "_calls", (index, calls))
        return PASS_NAMES[min(calls, 1)]

    def _gated(self, *args, **kwargs):
        state = self._state
        step = state.step
        if step is None or step.cfg or not state.cfg_call:
            return self._denoiser(*args, **kwargs)
        if state.pass_name == PASS_NAMES[1]:
            return state.conditional_output
        state.conditional_output = self._denoiser(*args, **kwargs)
        return state.conditional_output

    def __getattr__(self, name: str):
        return getattr(self._denoiser, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._denoiser, name, value)


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


class ControlWindowHook(Hook):
    """A ControlNet's `conditioning_scale` of the call's step (`RunState.control_scale`): the pipeline computes its
    guidance window from the step index and count of the segment it runs, the engine from the call's."""

    def __init__(self, state: RunState):
        self.state = state

    def new_forward(self, module, forward, *args, **kwargs):
        if self.state.step is not None and self.state.control_scale is not None:
            kwargs["conditioning_scale"] = self.state.control_scale
        return forward(*args, **kwargs)


def apply_guidance_hook(model: torch.nn.Module, state: RunState) -> None:
    """Installed last, so it is the outermost hook: the caches inside see the batch that actually runs."""
    install(model, GuidanceHook(state))
