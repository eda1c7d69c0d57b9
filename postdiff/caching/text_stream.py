"""The cross-attention cache's analog for MM-DiTs (SD3's joint blocks, FLUX's double-stream blocks): after
the CFG stop m, the text stream is not carried forward but read from a cache.

An MM-DiT has no cross-attention: text and image tokens attend jointly, and the text stream is updated in
every block. What can be reused is the text stream itself. On the steps before m every joint block records
the text stream entering and leaving it, combined over the CFG batch as `ca_mode` says ("cond": the
conditional half, "ave": the mean of the halves, "cfg": the guided combination); from m on, each block is
given its recorded text input, its text output is replaced by the recorded one, and the work that only
feeds the text output is skipped: the text feed-forward (`ff_context`) and the text attention output
projection (`attn.to_add_out`). What still runs for the text tokens is what the image tokens need from
them: the adaLN of the text (it carries the current timestep) and its key/value projections (the query
projection too, as diffusers' joint processors compute all three). FLUX's single-stream blocks, which
process text and image with shared weights, run as they are on the cached text.

Text tokens do not depend on the image size, so a cache recorded at low resolution is reused as it is.
FLUX's true CFG runs the conditional and unconditional passes separately: the conditional pass records,
and for "ave" / "cfg" the unconditional pass combines with it.
"""

from __future__ import annotations

import torch

from .blocks import BlockLayout, block_layout
from .cross_attention import combine
from .hooks import Hook, install
from .state import RunState, Slot
SKIPPED_MODULES = ("ff_context", "attn.to_add_out")  # only feed the text stream's output (SD3's, FLUX's names)


class TextStreamBlockHook(Hook):
    """On a joint block: records its text input and output before the stop; reads them after."""

    def __init__(self, state: RunState, mode: str, in_cached_span: bool, slot: Slot, layout: BlockLayout):
        self.state = state
        self.layout = layout
        self.mode = mode
        self.in_cached_span = in_cached_span  # skipped by block caching on its cached steps: nothing to record then
        self.slot = slot  # (text input, text output)
        self.variant = (in_cached_span,)

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        step, layout = self.state.step, self.layout
        if step is not None and step.cross_attention == "cached":
            text_in, text_out = self.slot.value
            args, kwargs = layout.with_text_input(args, kwargs, text_in)
            return layout.output(layout.split(forward(*args, **kwargs))[0], text_out)
        output = forward(*args, **kwargs)
        ran = not (self.in_cached_span and step is not None and step.deep == "cached")
        if step is not None and step.capture_cross_attention and ran:  # keep what the block last computed
            self._record(layout.text_input(args, kwargs), layout.split(output)[1])
        return output

    def _record(self, text_in: torch.Tensor, text_out: torch.Tensor) -> None:
        state = self.state
        if state.pass_name == "uncond:":  # FLUX's second pass: combine with the conditional pass's record
            if self.mode != "cond":
                cond_in, cond_out = self.slot.value
                self.slot.value = (self._passes(text_in, cond_in), self._passes(text_out, cond_out))
            return
        self.slot.value = tuple(combine(x, self.mode, state.num_images, state.guidance_scale) for x in (text_in, text_out))

    def _passes(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return combine(torch.cat([uncond, cond]), self.mode, len(cond), self.state.guidance_scale)


class SkipOnCachedTextHook(Hook):
    """On a module whose output only feeds the text stream's output: zeros of its output's shape while the
    text stream is read from the cache (the block's text output is replaced anyway)."""

    def __init__(self, state: RunState):
        self.state = state

    def new_forward(self, module: torch.nn.Module, forward, hidden_states: torch.Tensor, *args, **kwargs):
        step = self.state.step
        if step is not None and step.cross_attention == "cached":
            width = module.out_features if isinstance(module, torch.nn.Linear) else hidden_states.shape[-1]
            return hidden_states.new_zeros(*hidden_states.shape[:-1], width)
        return forward(hidden_states, *args, **kwargs)


def text_stream_blocks(model: torch.nn.Module, block_names: list[str], skipped: tuple[str, ...] = SKIPPED_MODULES) -> list[str]:
    """The blocks with a text stream of their own to cache: two-stream blocks that update the text (they have
    the modules `skipped` names: not SD3's `context_pre_only` last block, not FLUX's single-stream blocks)."""
    return [name for name in block_names if block_layout(model.get_submodule(name)).two_streams
            and all(_has(model.get_submodule(name), part) for part in skipped)]


def _has(module: torch.nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
        return True
    except AttributeError:
        return False


def apply_text_stream_cache(model: torch.nn.Module, block_names: list[str], mode: str, state: RunState,
                            cached_span: list[str] = (), skipped: tuple[str, ...] = SKIPPED_MODULES, prefix: str = "") -> list[str]:
    """Hook the two-stream blocks (after block caching, so this hook is the outer one); `skipped`: the block's
    modules that only feed its text output (the model's names); records kept under `prefix` + block name. Returns
    the hooked blocks' names."""
    names = text_stream_blocks(model, block_names, skipped)
    for name in names:
        block = model.get_submodule(name)
        slot = state.declare(state.cross_attention, prefix + name)
        install(block, TextStreamBlockHook(state, mode, name in cached_span, slot, block_layout(block)))
        for part in skipped:
            install(block.get_submodule(part), SkipOnCachedTextHook(state))
    return names
