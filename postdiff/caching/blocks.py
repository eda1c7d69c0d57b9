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

from dataclasses import dataclass

import torch

from .hooks import Hook, install
from .state import PASS_NAMES, RunState, Slot

RESIDUAL = "blocks:residual"  # names in RunState.deep (after the pass name)
SPAN_INPUT = "blocks:span_input"  # the span's input during a full step, until its last block has run


def max_block_branch(num_blocks: int) -> int:
    """The deepest branch whose span keeps at least one block: (N - 3) // 2 (-1 when N < 3: none)."""
    return (num_blocks - 3) // 2


def cached_span(num_blocks: int, branch: int) -> range:
    """Indices of the blocks skipped on cached steps: all but the first and last `branch + 1` (`branch` was
    validated by the denoiser kind: 0..max_block_branch)."""
    return range(branch + 1, num_blocks - branch - 1)


@dataclass(frozen=True)
class SpanSlots:
    """One denoiser pass's span state: the residual of the last full step, and the span's input while a full
    step runs (until the span's last block has run)."""

    residual: Slot
    span_input: Slot


def span_slots(state: RunState, pass_names: tuple[str, ...]) -> dict[str, SpanSlots]:
    return {name: SpanSlots(state.declare(state.deep, name + RESIDUAL), state.declare(state.deep, name + SPAN_INPUT))
            for name in pass_names}


class BlockSpanHook(Hook):
    """On one block of the span: the first records the span's input (full) or adds the residual (cached),
    the last stores the residual (full); on cached steps no block of the span runs."""

    def __init__(self, state: RunState, slots: dict[str, SpanSlots], first: bool, last: bool):
        self.state = state
        self.slots = slots
        self.first = first
        self.last = last
        self.variant = (first, last)

    def new_forward(self, module: torch.nn.Module, forward, hidden_states: torch.Tensor, *args, **kwargs):
        step = self.state.step
        if step is None:  # outside a PostDiff call: the block as it is
            return forward(hidden_states, *args, **kwargs)
        slots = self.slots[self.state.pass_name]
        if step.deep == "cached":
            return hidden_states + slots.residual.value if self.first else hidden_states
        if self.first:
            slots.span_input.value = hidden_states
        output = forward(hidden_states, *args, **kwargs)
        if self.last:
            slots.residual.value, slots.span_input.value = output - slots.span_input.value, None
        return output


def apply_block_cache(model: torch.nn.Module, branch: int, state: RunState, blocks: str = "transformer_blocks") -> list[str]:
    """Hook the blocks of the cached span of `model.<blocks>`; returns their names."""
    span = cached_span(len(model.get_submodule(blocks)), branch)
    slots = span_slots(state, PASS_NAMES[:1])
    names = [f"{blocks}.{index}" for index in span]
    for index, name in zip(span, names):
        install(model.get_submodule(name), BlockSpanHook(state, slots, first=index == span[0], last=index == span[-1]))
    return names


class JointBlockSpanHook(BlockSpanHook):
    """The same span cache for MM-DiT blocks (SD3's joint blocks, FLUX's double- and single-stream blocks),
    which take and return two streams, `(hidden_states, encoder_hidden_states) -> (encoder_hidden_states,
    hidden_states)`: the span's residual is kept for both, the image and the text stream. Each denoiser pass
    (`state.pass_name`) has its own slots, so FLUX's separate conditional and unconditional passes of true CFG
    keep separate residuals."""

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step = self.state.step
        if step is None:
            return forward(*args, **kwargs)
        hidden, text = _streams(args, kwargs)
        slots = self.slots[self.state.pass_name]
        if step.deep == "cached":
            if not self.first:
                return text, hidden
            text_residual, hidden_residual = slots.residual.value
            return text + text_residual, hidden + hidden_residual
        if self.first:
            slots.span_input.value = (text, hidden)
        text_out, hidden_out = forward(*args, **kwargs)
        if self.last:
            text_in, hidden_in = slots.span_input.value
            slots.residual.value, slots.span_input.value = (text_out - text_in, hidden_out - hidden_in), None
        return text_out, hidden_out


def _streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, encoder_hidden_states) of an MM-DiT block call, by keyword or position."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return hidden, text


def apply_joint_block_cache(model: torch.nn.Module, block_names: list[str], branch: int, state: RunState) -> list[str]:
    """Hook the cached span of the MM-DiT blocks named in execution order; returns the hooked names."""
    span = [block_names[index] for index in cached_span(len(block_names), branch)]
    slots = span_slots(state, PASS_NAMES)
    for name in span:
        install(model.get_submodule(name), JointBlockSpanHook(state, slots, first=name == span[0], last=name == span[-1]))
    return span
