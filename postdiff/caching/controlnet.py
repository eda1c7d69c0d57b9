"""PostDiff's caches on a ControlNet (`ControlNetModel`, or each net of a `MultiControlNetModel`).

On DeepCache's cached steps the U-Net runs only its shallow branch, which still reads the ControlNet
residuals of the live skips s_0..s_b. `PostDiffConfig.controlnet_cache` says how they arrive:
- "shallow" (default): the ControlNet's own deep part (its down layers past s_b and its mid block: it is
  a copy of the U-Net's encoder) reuses its last full-step output, the rest runs, so the residuals the
  shallow branch reads are computed from the current latents;
- "reuse": the whole ControlNet output of the last full step is reused (nothing of it runs);
- "full": the ControlNet runs every step.
docs/controlnet_cache.md measures the three (compute, and distance to "off" at equal MACs).

The cross-attention cache covers the ControlNet's cross-attention too (CFG stop: it runs on the
conditional batch, as the U-Net). Entries are kept under "controlnet.<net>." names, apart from the U-Net's.
"""

from __future__ import annotations

import torch

from ..config import PostDiffConfig
from . import cross_attention, deepcache
from .state import RunState


def controlnet_nets(controlnet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ControlNetModels a pipeline's `controlnet` runs: itself, or the nets of a MultiControlNetModel."""
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


def install_controlnet_caches(controlnet: torch.nn.Module, config: PostDiffConfig, state: RunState) -> None:
    """The hooks `config` needs on every net of a pipeline's `controlnet`; the branch was validated on the
    U-Net (same encoder layout)."""
    for index, net in enumerate(controlnet_nets(controlnet)):
        install_net_caches(net, config, state, prefix=f"controlnet.{index}.")


def install_net_caches(net: torch.nn.Module, config: PostDiffConfig, state: RunState, prefix: str) -> None:
    """One ControlNetModel's hooks; its cache entries are kept under `prefix`."""
    if config.deepcache and config.controlnet_cache != "full":
        names = [""] if config.controlnet_cache == "reuse" else deepcache.encoder_deep_modules(net, config.cache_branch)
        deepcache.hook_modules(net, names, state, prefix)
    if config.cross_attention_cache:
        cross_attention.apply_cross_attention_cache(net, config.ca_mode, state, prefix)
