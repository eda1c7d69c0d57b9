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

from .state import RunState

HOOK_NAME = "postdiff_block_cache"
RESIDUAL = "blocks:residual"  # keys in RunState.deep
SPAN_INPUT = "blocks:span_input"  # the span's input during a full step, until its last block has run


def max_block_branch(num_blocks: int) -> int:
    """The deepest branch whose span keeps at least one block: (N - 3) // 2 (-1 when N < 3: none)."""
    return (num_blocks - 3) // 2


def cached_span(num_blocks: int, branch: int) -> range:
    """Indices of the blocks skipped on cached steps: all but the first and last `branch + 1` (`branch` was
    validated by the denoiser kind: 0..max_block_branch)."""
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
        if step.deep == "cached":
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


class JointBlockSpanHook(ModelHook):
    """The same span cache for MM-DiT blocks (SD3's joint blocks, FLUX's double- and single-stream blocks),
    which take and return two streams, `(hidden_states, encoder_hidden_states) -> (encoder_hidden_states,
    hidden_states)`: the span's residual is kept for both, the image and the text stream. Keys carry the
    denoiser pass (`state.pass_name`), so FLUX's separate conditional and unconditional passes of true CFG
    keep separate residuals."""

    def __init__(self, state: RunState, first: bool, last: bool):
        super().__init__()
        self.state = state
        self.first = first
        self.last = last

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        step = state.step
        if step is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden, text = _streams(args, kwargs)
        residual, span_input = f"{state.pass_name}{RESIDUAL}", f"{state.pass_name}{SPAN_INPUT}"
        if step.deep == "cached":
            if not self.first:
                return text, hidden
            text_residual, hidden_residual = state.deep[residual]
            return text + text_residual, hidden + hidden_residual
        if self.first:
            state.deep[span_input] = (text, hidden)
        text_out, hidden_out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            text_in, hidden_in = state.deep.pop(span_input)
            state.deep[residual] = (text_out - text_in, hidden_out - hidden_in)
        return text_out, hidden_out


def _streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, encoder_hidden_states) of an MM-DiT block call, by keyword or position."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return hidden, text


def apply_joint_block_cache(model: torch.nn.Module, block_names: list[str], branch: int, state: RunState) -> list[str]:
    """Hook the cached span of the MM-DiT blocks named in execution order; returns the hooked names."""
    span = [block_names[index] for index in cached_span(len(block_names), branch)]
    for name in span:
        registry = HookRegistry.check_if_exists_or_initialize(model.get_submodule(name))
        registry.register_hook(JointBlockSpanHook(state, first=name == span[0], last=name == span[-1]), HOOK_NAME)
    return span
