"""Block caching for diffusion transformers (DeepCache's analog for DiT), as hooks: on "full" steps every
block runs and the residual that a span of middle blocks adds is stored (output of the span's last block
minus input of its first block); on "cached" steps the span does not run and the stored residual is added
to the span's input.

The span and `cache_branch`. A DiT has no skip branches; what DeepCache keeps is the shallow part that
turns the current input into features and features back into the output. The analog here: branch b keeps
the first b + 1 and the last b + 1 blocks running on every step and caches the blocks between them,
`transformer_blocks[b + 1 : N - b - 1]`. Branch 0 (the default) caches everything but the first and the
last block, as U-Net branch 0 caches everything below the outermost level. Why both ends: the
first block is the only one that sees the fresh patch embedding of the current x_t (and the current
timestep's modulation) before the span, and the last block maps the features back right before the output
projection, so the step's own input and timestep always reach the output through computed blocks. Valid
branches are 0 .. (N - 3) // 2 (the span keeps at least one block): 0..12 for PixArt's 28 blocks.

Why a residual and not the span's output: the span's input changes on cached steps (the first blocks
run on the new x_t), so the stored change is added to the fresh input, as Delta-DiT and FORA-style caches
do; with the span's output alone the first blocks' work would be thrown away.

State lives in the call's RunState (`state.deep`, beside DeepCache's features), so the events act on it as
on DeepCache: cut to its conditional half at the CFG stop (exact for a conditional-only batch), dropped at
a resolution switch (the token count changes), cleared at the start and end of every call.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..config import ConfigError
from .state import RunState

HOOK_NAME = "postdiff_block_cache"
RESIDUAL = "blocks:residual"  # keys in RunState.deep
SPAN_INPUT = "blocks:span_input"  # the span's input during a full step, until its last block has run


def max_block_branch(num_blocks: int) -> int:
    """The deepest branch whose span keeps at least one block: (N - 3) // 2 (-1 when N < 3: none)."""
    return (num_blocks - 3) // 2


def cached_span(num_blocks: int, branch: int) -> range:
    """Indices of the blocks skipped on cached steps: all but the first and last `branch + 1`."""
    limit = max_block_branch(num_blocks)
    if limit < 0:
        raise ConfigError(f"block caching needs at least 3 transformer blocks; this denoiser has {num_blocks}")
    if not 0 <= branch <= limit:
        raise ConfigError(f"cache_branch={branch} is not allowed: this transformer ({num_blocks} blocks) has branches 0..{limit}")
    return range(branch + 1, num_blocks - branch - 1)


class BlockSpanHook(ModelHook):
    """On one block of the span: the first records the span's input (full) or adds the residual (cached),
    the last stores the residual (full); on cached steps no block of the span runs."""

    def __init__(self, state: RunState, first: bool, last: bool):
        super().__init__()
        self.state = state
        self.first = first
        self.last = last

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        state = self.state
        step = state.step
        if step is None:  # outside a PostDiff call: the block as it is
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if step.unet == "cached":
            return hidden_states + state.deep[RESIDUAL] if self.first else hidden_states
        if self.first:
            state.deep[SPAN_INPUT] = hidden_states
        output = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if self.last:
            state.deep[RESIDUAL] = output - state.deep.pop(SPAN_INPUT)
        return output


def apply_block_cache(model: torch.nn.Module, branch: int, state: RunState, blocks: str = "transformer_blocks") -> list[str]:
    """Hook the blocks of the cached span of `model.<blocks>`; returns their names."""
    span = cached_span(len(model.get_submodule(blocks)), branch)
    names = []
    for index in span:
        name = f"{blocks}.{index}"
        registry = HookRegistry.check_if_exists_or_initialize(model.get_submodule(name))
        registry.register_hook(BlockSpanHook(state, first=index == span[0], last=index == span[-1]), HOOK_NAME)
        names.append(name)
    return names
