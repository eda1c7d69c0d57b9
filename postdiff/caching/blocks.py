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

import inspect
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import unwrap_module

from ..config import ConfigError
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


# Block classes diffusers' `TransformerBlockRegistry` does not list (0.42.1): class name -> (index of the image
# stream in the block's output, index of the text stream or None where the block returns the image stream alone).
UNLISTED_LAYOUTS = {
    "ChromaTransformerBlock": (1, 0),
    "ChromaSingleTransformerBlock": (0, None),
    "SanaTransformerBlock": (0, None),
    "HunyuanVideo15TransformerBlock": (0, 1),
}


@dataclass(frozen=True)
class BlockLayout:
    """How one transformer block class takes and returns its streams: the image stream (`hidden`) and, for
    two-stream (MM-DiT) blocks, the text stream (`text`), by argument name and output index. A one-stream block
    (a DiT block, or a single-stream block on concatenated tokens) returns its image stream as a tensor."""

    block_class: type
    hidden_argument: str = "hidden_states"
    text_argument: str | None = None  # None: one stream
    hidden_output: int = 0
    text_output: int | None = None
    # The forward's argument names after `self`, read once here: a compiled block cannot trace `inspect.signature`.
    parameters: tuple[str, ...] = ()

    @property
    def two_streams(self) -> bool:
        return self.text_output is not None

    def streams(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image stream, text stream or None) of a call of the block."""
        return self._argument(self.hidden_argument, args, kwargs), self.text_input(args, kwargs)

    def text_input(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return self._argument(self.text_argument, args, kwargs) if self.two_streams else None

    def with_text_input(self, args: tuple, kwargs: dict, text: torch.Tensor) -> tuple[tuple, dict]:
        """The call's arguments with the text stream replaced."""
        index = self.parameters.index(self.text_argument)
        if self.text_argument in kwargs or index >= len(args):
            return args, {**kwargs, self.text_argument: text}
        return (*args[:index], text, *args[index + 1:]), kwargs

    def output(self, hidden: torch.Tensor, text: torch.Tensor | None):
        """A block output in the class's own layout."""
        if not self.two_streams:
            return hidden
        out = [None, None]
        out[self.hidden_output], out[self.text_output] = hidden, text
        return tuple(out)

    def split(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image stream, text stream or None) of a block's output."""
        if not self.two_streams:
            return (output[self.hidden_output] if isinstance(output, tuple) else output), None
        return output[self.hidden_output], output[self.text_output]

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        index = self.parameters.index(name)
        return args[index] if index < len(args) else None


def block_layout(block: torch.nn.Module) -> BlockLayout:
    """The layout of `block`'s class: from diffusers' transformer block registry (what its own caches read),
    else from UNLISTED_LAYOUTS."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for cls in type(unwrap_module(block)).__mro__:  # PostDiff's hooked subclass first, then the model's class
        if "_postdiff_original_class" in cls.__dict__:  # the hooked subclass keeps the name, not the signature
            continue
        try:
            metadata = TransformerBlockRegistry.get(cls)
        except ValueError:
            if cls.__name__ not in UNLISTED_LAYOUTS:
                continue
            hidden_output, text_output = UNLISTED_LAYOUTS[cls.__name__]
            hidden_argument, text_argument = "hidden_states", "encoder_hidden_states"
        else:
            hidden_output, text_output = metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index
            hidden_argument, text_argument = metadata.hidden_states_argument_name, metadata.encoder_hidden_states_argument_name
        break
    else:
        raise ConfigError(f"{type(unwrap_module(block)).__name__} is not in diffusers' transformer block registry nor in "
                          "postdiff's UNLISTED_LAYOUTS: its stream layout is unknown, so its blocks cannot be cached")
    parameters = list(inspect.signature(cls.forward).parameters)
    if hidden_argument not in parameters:  # ZImage's blocks name the image stream `x`
        hidden_argument = parameters[1]
    two = text_output is not None
    return BlockLayout(cls, hidden_argument, text_argument if two else None, hidden_output or 0, text_output,
                       tuple(parameters[1:]))


class LayoutBlockSpanHook(BlockSpanHook):
    """The span cache on blocks of any registered layout: one-stream blocks (Wan, Z-Image, SANA, the
    single-stream blocks of FLUX.2 and Chroma) keep the image stream's residual, two-stream blocks (SD3's joint
    blocks, FLUX's, Qwen-Image's, HunyuanVideo-1.5's) the residuals of both streams. Each denoiser pass
    (`state.pass_name`) has its own slots, so separate conditional and unconditional passes of true CFG keep
    separate residuals."""

    def __init__(self, state: RunState, slots: dict[str, SpanSlots], first: bool, last: bool, layout: BlockLayout):
        super().__init__(state, slots, first, last)
        self.layout = layout

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step = self.state.step
        if step is None:
            return forward(*args, **kwargs)
        layout = self.layout
        hidden, text = layout.streams(args, kwargs)
        slots = self.slots[self.state.pass_name]
        if step.deep == "cached":
            if not self.first:
                return layout.output(hidden, text)
            hidden_residual, text_residual = slots.residual.value
            return layout.output(hidden + hidden_residual, None if text is None else text + text_residual)
        if self.first:
            slots.span_input.value = (hidden, text)
        output = forward(*args, **kwargs)
        if self.last:
            hidden_out, text_out = layout.split(output)
            hidden_in, text_in = slots.span_input.value
            text_residual = None if text_out is None else text_out - text_in
            slots.residual.value, slots.span_input.value = (hidden_out - hidden_in, text_residual), None
        return output


def span_runs(model: torch.nn.Module, names: list[str]) -> list[list[str]]:
    """The span cut where the stream layout changes (FLUX.2's and Chroma's double- then single-stream blocks: the
    single-stream blocks take the two streams concatenated): each run keeps a residual of its own."""
    runs: list[list[str]] = []
    previous = None
    for name in names:
        two = block_layout(model.get_submodule(name)).two_streams
        if runs and two == previous:
            runs[-1].append(name)
        else:
            runs.append([name])
        previous = two
    return runs


def apply_layout_block_cache(model: torch.nn.Module, block_names: list[str], branch: int, state: RunState) -> list[str]:
    """Hook the cached span of the transformer blocks named in execution order; returns the hooked names."""
    span = [block_names[index] for index in cached_span(len(block_names), branch)]
    for run_index, run in enumerate(span_runs(model, span)):
        prefix = f"run{run_index}:" if run_index else ""
        slots = {name: SpanSlots(state.declare(state.deep, name + prefix + RESIDUAL),
                                 state.declare(state.deep, name + prefix + SPAN_INPUT)) for name in PASS_NAMES}
        for name in run:
            block = model.get_submodule(name)
            install(block, LayoutBlockSpanHook(state, slots, first=name == run[0], last=name == run[-1], layout=block_layout(block)))
    return span
