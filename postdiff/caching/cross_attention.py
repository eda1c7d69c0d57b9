"""Cross-attention caching with CFG stopped at step m (PAPER.md): the cross-attention modules record their
output on the steps before m and return it afterwards instead of computing.

Modes (what is kept from a CFG batch [uncond x n, cond x n]): "cond" the conditional half, "ave" the mean
of the halves (T-GATE), "cfg" the guided combination uncond + w (cond - uncond). Each module keeps the
output of the last step on which it ran before m (with DeepCache, deep modules last ran on a full step).
A cache recorded at a lower resolution is resampled bilinearly to the current token grid when reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention

from .state import RunState

HOOK_NAME = "postdiff_cross_attention"


@dataclass
class CrossAttentionEntry:
    output: torch.Tensor  # (n, tokens, channels)
    latent_hw: tuple[int, int]  # latent size of the step that recorded it
    resized: dict = field(default_factory=dict)  # token count -> resampled output


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


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) grid of a U-Net level: the latent size halved (rounding up) until it has `tokens` cells."""
    height, width = latent_hw
    while height * width > tokens:
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens do not form a level of a {latent_hw} latent")
    return height, width


def resample_tokens(output: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int], tokens: int) -> torch.Tensor:
    source = token_grid(source_hw, output.shape[1])
    target = token_grid(target_hw, tokens)
    grid = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], *source)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class CrossAttentionCacheHook(ModelHook):
    def __init__(self, name: str, state: RunState, mode: str):
        super().__init__()
        self.name = name
        self.state = state
        self.mode = mode

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        step = self.state.step
        if step is not None and step.cross_attention == "cached":
            return self._cached(hidden_states)
        output = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if step is not None and step.capture_cross_attention:
            kept = combine(output, self.mode, self.state.num_images, self.state.guidance_scale)
            self.state.cross_attention[self.name] = CrossAttentionEntry(kept, self.state.latent_hw)
        return output

    def _cached(self, hidden_states: torch.Tensor) -> torch.Tensor:
        entry = self.state.cross_attention[self.name]
        tokens = hidden_states.shape[1]
        if entry.output.shape[1] == tokens:
            return entry.output
        if tokens not in entry.resized:
            entry.resized[tokens] = resample_tokens(entry.output, entry.latent_hw, self.state.latent_hw, tokens)
        return entry.resized[tokens]


def cross_attention_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Attention) and module.is_cross_attention]


def apply_cross_attention_cache(model: torch.nn.Module, mode: str, state: RunState, prefix: str = "") -> list[str]:
    """Hooks on every cross-attention of `model`; entries are kept under `prefix` + name, so that the models of
    one call (a U-Net and its ControlNets share module names) keep theirs apart."""
    names = cross_attention_modules(model)
    for name in names:
        registry = HookRegistry.check_if_exists_or_initialize(model.get_submodule(name))
        registry.register_hook(CrossAttentionCacheHook(prefix + name, state, mode), HOOK_NAME)
    return names
