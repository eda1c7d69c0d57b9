"""Cross-attention caching with CFG stopped at step m (PAPER.md): the cross-attention modules record their
output on the steps before m and return it afterwards instead of computing.

Modes (what is kept from a CFG batch [uncond x n, cond x n]): "cond" the conditional half, "ave" the mean
of the halves (T-GATE), "cfg" the guided combination uncond + w (cond - uncond). Each module keeps the
output of the last step on which it ran before m (with DeepCache, deep modules last ran on a full step).
A cache recorded at a lower resolution is resampled bilinearly to the current token grid before the step that
reuses it (by the RunState, outside the hook: compiled code sees the same work on every cached step); a video's
frame by frame, and linearly in time where the frame count changed. Pipelines that run CFG as separate passes
(Wan, HunyuanVideo-1.5) record in the conditional pass; for "ave" / "cfg" the unconditional pass combines with it.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from .hooks import Hook, install
from .state import PASS_NAMES, CrossAttentionEntry, RunState, Slot


def combine(output: torch.Tensor, mode: str, num_images: int, guidance_scale: float) -> torch.Tensor:
    if output.shape[0] != 2 * num_images:  # no CFG on this step: the batch is conditional already
        return output
    uncond, cond = output[:num_images], output[num_images:]
    if mode == "cond":
        return cond
    if mode == "ave":
        return (uncond + cond) / 2
    if mode == "cfg":
        return uncond + guidance_scale * (cond - uncond)
    raise ValueError(f"ca_mode={mode!r} has no cache")


class CrossAttentionCacheHook(Hook):
    def __init__(self, state: RunState, mode: str, slot: Slot):
        self.state = state
        self.mode = mode
        self.slot = slot

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step = self.state.step
        if step is not None and step.cross_attention == "cached":  # resampled to this step's size by the RunState
            return self.slot.value.current
        output = forward(*args, **kwargs)
        if step is not None and step.capture_cross_attention:
            self._record(output)
        return output

    def _record(self, output: torch.Tensor) -> None:
        state = self.state
        if state.pass_name == PASS_NAMES[1]:  # the unconditional pass of separate CFG passes, after the conditional one
            if self.mode != "cond":
                cond = self.slot.value.output
                kept = combine(torch.cat([output, cond]), self.mode, len(cond), state.guidance_scale)
                self.slot.value = CrossAttentionEntry(kept, state.latent_hw, state.latent_frames)
            return
        kept = combine(output, self.mode, state.num_images, state.guidance_scale)
        self.slot.value = CrossAttentionEntry(kept, state.latent_hw, state.latent_frames)


def cross_attention_modules(model: torch.nn.Module) -> list[str]:
    """Every attention module that attends to the text (`Attention`, or a model's own class such as Wan's)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (Attention, AttentionModuleMixin)) and getattr(module, "is_cross_attention", False)]


def apply_cross_attention_cache(model: torch.nn.Module, mode: str, state: RunState, prefix: str = "") -> list[str]:
    """Hooks on every cross-attention of `model`; entries are kept under `prefix` + name, so that the models of
    one call (a U-Net and its ControlNets share module names) keep theirs apart."""
    names = cross_attention_modules(model)
    for name in names:
        slot = state.declare(state.cross_attention, prefix + name)
        install(model.get_submodule(name), CrossAttentionCacheHook(state, mode, slot))
    return names
