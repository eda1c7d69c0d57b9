"""PostDiff's caches on a ControlNet (`ControlNetModel`, or each net of a `MultiControlNetModel`).

On DeepCache's cached steps the U-Net runs only its shallow branch, which still reads the ControlNet
residuals of the live skips s_0..s_b. `PostDiffConfig.controlnet_cache` says how they arrive:
- "reuse" (default): the net's last full-step residuals, rescaled to the step's conditioning scale (nothing
  of the ControlNet runs, so its cost is divided by k like the U-Net's deep part);
- "shallow": the ControlNet's own deep part (its down layers past s_b and its mid block: it is a copy of
  the U-Net's encoder) reuses its last full-step output, the rest runs, so the residuals the shallow
  branch reads are exactly a full run's (the output equals "full"'s);
- "full": the ControlNet runs every step.
docs/controlnet_cache.md measures the three (compute, and distance to "off" at equal MACs): "shallow" and
"full" give the same images, "reuse" loses 0.2-0.4 dB PSNR to them at the same k and wins at equal MACs.

The cross-attention cache covers the ControlNet's cross-attention too (CFG stop: it runs on the
conditional batch, as the U-Net). Entries are kept under "controlnet.<net>." names, apart from the U-Net's.
"""

from __future__ import annotations

import torch

from ..config import PostDiffConfig
from . import cross_attention, deepcache
from .hooks import install
from .state import RunState


def controlnet_nets(controlnet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ControlNetModels a pipeline's `controlnet` runs: itself, or the nets of a MultiControlNetModel."""
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None else [controlnet]


class ControlNetReuseHook(deepcache.DeepCacheHook):
    """"reuse" on one net: its last full-step residuals, rescaled to this step's `conditioning_scale` (the
    residuals are linear in it, guess mode's per-skip scales too), so a control window that closes on a cached
    step closes there; a window that opened since the last full step (residuals recorded at scale 0) runs the
    net."""

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step, scale = self.state.step, kwargs.get("conditioning_scale", 1.0)
        cached = self.slot.value
        if step is not None and step.deep == "cached" and cached is not None and cached[2] != 0.0:
            down, mid, recorded = cached
            ratio = scale / recorded
            if ratio != 1.0:
                down, mid = [d * ratio for d in down], mid * ratio
            return down, mid
        output = forward(*args, **kwargs)
        if step is not None:  # the scale as a Python number: a tensor's value would break a compiled graph
            self.slot.value = (output[0], output[1], float(scale))
        return output


def install_controlnet_caches(controlnet: torch.nn.Module, config: PostDiffConfig, state: RunState) -> None:
    """The hooks `config` needs on every net of a pipeline's `controlnet`; the branch was validated on the
    U-Net (same encoder layout)."""
    for index, net in enumerate(controlnet_nets(controlnet)):
        install_net_caches(net, config, state, prefix=f"controlnet.{index}.")


def install_net_caches(net: torch.nn.Module, config: PostDiffConfig, state: RunState, prefix: str) -> None:
    """One ControlNetModel's hooks; its cache entries are kept under `prefix`."""
    if config.deepcache and config.controlnet_cache == "reuse":
        install(net, ControlNetReuseHook(state, state.declare(state.deep, prefix)))
    elif config.deepcache and config.controlnet_cache == "shallow":
        deepcache.hook_modules(net, deepcache.encoder_deep_modules(net, config.cache_branch), state, prefix)
    if config.cross_attention_cache:
        cross_attention.apply_cross_attention_cache(net, config.ca_mode, state, prefix)
