"""Module-level caches, installed as diffusers `ModelHook`s and driven by the step plan through one RunState."""

from __future__ import annotations

from ..config import ConfigError, PostDiffConfig
from . import blocks, cross_attention, deepcache
from .state import RunState

HOOK_NAMES = [deepcache.HOOK_NAME, cross_attention.HOOK_NAME, blocks.HOOK_NAME]


def install_unet_caches(unet, config: PostDiffConfig, state: RunState) -> None:
    """DeepCache and the cross-attention cache on a `UNet2DConditionModel`, as the config asks."""
    if config.deepcache:
        limit = deepcache.max_branch(unet)
        if config.cache_branch > limit:
            raise ConfigError(f"cache_branch={config.cache_branch} is not allowed: this U-Net has branches 0..{limit}")
        deepcache.apply_deepcache(unet, config.cache_branch, state)
    if config.cross_attention_cache:
        cross_attention.apply_cross_attention_cache(unet, config.ca_mode, state)


def install_transformer_caches(transformer, config: PostDiffConfig, state: RunState) -> None:
    """Block caching (blocks.py) and the cross-attention cache on a DiT with `transformer_blocks`."""
    if config.deepcache:
        blocks.apply_block_cache(transformer, config.cache_branch, state)
    if config.cross_attention_cache:
        cross_attention.apply_cross_attention_cache(transformer, config.ca_mode, state)


def remove_caches(model) -> None:
    for hook_name in HOOK_NAMES:
        deepcache.remove_hooks(model, hook_name)
