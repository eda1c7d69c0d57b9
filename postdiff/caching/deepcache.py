"""DeepCache for `UNet2DConditionModel`, as hooks: on "cached" steps the deep modules return their output
from the last "full" step instead of running, so only the shallow branch computes.

Skip connections s_0 (conv_in), s_1, ... are the outputs of the down path's layers in order (a layer is a
resnet with its attention, or a down-sampler). Branch b keeps s_0..s_b live: conv_in and the first b down
layers run, and so do the up layers that consume those skips. Everything between (deeper down layers, the
mid block, deeper up layers and their up-samplers) is the deep part. This is the DeepCache package's
`cache_branch_id`: on SD's layout (2 resnets and a down-sampler a block, which its `id // 3`, `id % 3`
indexing assumes) postdiff's branch b and its `cache_branch_id` b run the same modules, bit for bit
(tests/test_external.py); on other layouts postdiff counts by skip, which is what DeepCache means.
Branch 0 (conv_in and the last up layer only) is DeepCache's default and fastest; branch 1 reproduces the
paper's DeepCache FLOPs. Valid branches: 0 .. number of down layers (the last caches only the mid block).
Whole blocks inside the deep part are hooked as one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hooks import Hook, install
from .state import RunState, Slot


@dataclass(frozen=True)
class Layer:
    block: str  # "down_blocks.0"
    modules: tuple[str, ...]  # module names relative to the U-Net
    skip: int | None  # down: index of the skip it produces; up: index it consumes; None for up-samplers


def down_layers(model: torch.nn.Module) -> list[Layer]:
    """The down layers of a U-Net or a ControlNet (its copy of the U-Net's encoder), producing skips s_1...,
    in execution order."""
    down, skip = [], 0
    for block_index, block in enumerate(model.down_blocks):
        name = f"down_blocks.{block_index}"
        for layer in range(len(block.resnets)):
            skip += 1
            down.append(Layer(name, _resnet_and_attention(block, name, layer), skip))
        if getattr(block, "downsamplers", None) is not None:
            skip += 1
            down.append(Layer(name, _indexed(block.downsamplers, f"{name}.downsamplers"), skip))
    return down


def unet_layers(unet: torch.nn.Module) -> tuple[list[Layer], list[Layer]]:
    """The down layers (producing skips s_1...) and up layers (consuming skips), in execution order."""
    down = down_layers(unet)
    up, consumed = [], len(down)
    for block_index, block in enumerate(unet.up_blocks):
        name = f"up_blocks.{block_index}"
        for layer in range(len(block.resnets)):
            up.append(Layer(name, _resnet_and_attention(block, name, layer), consumed))
            consumed -= 1
        if getattr(block, "upsamplers", None) is not None:
            up.append(Layer(name, _indexed(block.upsamplers, f"{name}.upsamplers"), None))
    if consumed != -1:
        raise NotImplementedError(f"{type(unet).__name__}: up path consumes skips differently from the down path")
    return down, up


def _indexed(modules: torch.nn.ModuleList, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{index}" for index in range(len(modules)))


def _resnet_and_attention(block, name: str, layer: int) -> tuple[str, ...]:
    modules = [f"{name}.resnets.{layer}"]
    if getattr(block, "attentions", None) is not None:
        modules.append(f"{name}.attentions.{layer}")
    return tuple(modules)


def max_branch(unet: torch.nn.Module) -> int:
    down, _ = unet_layers(unet)
    return len(down)


def deep_modules(unet: torch.nn.Module, branch: int) -> list[str]:
    """Names of the modules skipped on cached steps (whole blocks where a block is entirely deep); `branch`
    was validated by the denoiser kind (0..max_branch)."""
    down, up = unet_layers(unet)
    deep_down = [layer for layer in down if layer.skip > branch]  # skips s_0..s_branch stay live
    first_live_up = next(i for i, layer in enumerate(up) if layer.skip is not None and layer.skip <= branch)
    deep_up = up[:first_live_up]
    names = _coarsen(deep_down, down) + ["mid_block"] * (unet.mid_block is not None) + _coarsen(deep_up, up)
    return names


def _coarsen(deep: list[Layer], every: list[Layer]) -> list[str]:
    """Replace a block's layers by the block itself when all of its layers are deep."""
    names = []
    for block in dict.fromkeys(layer.block for layer in deep):
        block_layers = [layer for layer in every if layer.block == block]
        if all(layer in deep for layer in block_layers):
            names.append(block)
        else:
            names.extend(name for layer in deep if layer.block == block for name in layer.modules)
    return names


class DeepCacheHook(Hook):
    """Runs the module on full steps (keeping its output in its slot) and returns that output on cached steps."""

    def __init__(self, state: RunState, slot: Slot):
        self.state = state
        self.slot = slot  # `state.deep`'s entry under a name unique across the models one call runs

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step = self.state.step
        if step is not None and step.deep == "cached":
            return self.slot.value
        output = forward(*args, **kwargs)
        if step is not None:
            self.slot.value = output
        return output


def apply_deepcache(unet: torch.nn.Module, branch: int, state: RunState) -> list[str]:
    names = deep_modules(unet, branch)
    hook_modules(unet, names, state)
    return names


def encoder_deep_modules(model: torch.nn.Module, branch: int) -> list[str]:
    """A ControlNet's modules that feed only the U-Net's deep part at `branch`: its down layers past s_branch
    and its mid block (the residuals of cached skips are never read on a cached step)."""
    down = down_layers(model)
    return _coarsen([layer for layer in down if layer.skip > branch], down) + ["mid_block"]


def hook_modules(model: torch.nn.Module, names: list[str], state: RunState, prefix: str = "") -> None:
    """DeepCache hooks on `model`'s modules `names`, their outputs kept in `state.deep` under `prefix` + name."""
    for name in names:
        install(model.get_submodule(name), DeepCacheHook(state, state.declare(state.deep, prefix + name)))
