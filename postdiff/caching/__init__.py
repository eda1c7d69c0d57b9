"""Module-level caches, installed as diffusers `ModelHook`s and driven by the step plan through one RunState.
Which caches a denoiser gets is decided by its kind (postdiff/denoisers.py)."""

from __future__ import annotations

import torch

from . import blocks, cross_attention, deepcache, text_stream

HOOK_NAMES = [deepcache.HOOK_NAME, cross_attention.HOOK_NAME, blocks.HOOK_NAME, text_stream.HOOK_NAME]


def remove_caches(model: torch.nn.Module) -> None:
    """Remove every postdiff hook, and what installing them added: an emptied hook registry and the instance
    `forward` the registry put on the module (unless something else had wrapped it before)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name in HOOK_NAMES:
            registry.remove_hook(hook_name, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            _drop_bound_forward(module)


def _drop_bound_forward(module: torch.nn.Module) -> None:
    forward = module.__dict__.get("forward")
    if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
        del module.__dict__["forward"]
