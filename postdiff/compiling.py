"""torch.compile with PostDiff.

The step plan fixes, before any compute, what every step runs, and the cache hooks branch only on the step's
kind (plain Python attributes, which dynamo guards on), never on tensor values; the values they read and write
live in slots made when they are installed, and the one piece of work that depends on more than the step kind
(resampling a cross-attention record to a new resolution) runs between steps. So a compiled denoiser, whole
(`pipe.unet = torch.compile(pipe.unet)`) or by region (diffusers' `compile_repeated_blocks`, or `.compile()`
on each transformer block), is traced once per kind of step without a graph break, and the graphs are
reused by every later step and call of that kind.

Dynamo compiles a function at most `torch._dynamo.config.recompile_limit` times (8 by default) and runs it
uncompiled after that, silently but for a log line; a call whose plan needs more graphs than that warns
before any compute.
"""

from __future__ import annotations

import warnings

import torch
from diffusers.utils.torch_utils import is_compiled_module

from .plan import StepPlan


def is_compiled(model: torch.nn.Module) -> bool:
    """Compiled whole (an `OptimizedModule`) or by region (a submodule compiled with `Module.compile`)."""
    return is_compiled_module(model) or any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def graphs_needed(step_kinds: list[tuple], cfg_passes: int = 1) -> int:
    """The graphs a compiled denoiser makes for these `Step.kind`s: one a kind, times the passes of a CFG step
    where CFG runs as separate passes (FLUX's true CFG: `cfg_passes` 2)."""
    return sum(cfg_passes if cfg else 1 for _, cfg, *_ in step_kinds)


def check_recompile_limit(model: torch.nn.Module, plan: StepPlan, cfg_passes: int = 1) -> None:
    """Warn when `model` is compiled and `plan` needs more graphs than dynamo compiles for one function."""
    if not is_compiled(model):
        return
    limit, needed = torch._dynamo.config.recompile_limit, graphs_needed(plan.step_kinds(), cfg_passes)
    if needed > limit:
        warnings.warn(
            f"this call runs {needed} kinds of denoiser steps (plan.step_kinds()), and the compiled denoiser needs a "
            f"graph for each, but torch._dynamo.config.recompile_limit is {limit}: steps past the limit would run "
            f"uncompiled. Set torch._dynamo.config.recompile_limit = {needed} (or more) before the call.",
            stacklevel=4,
        )
