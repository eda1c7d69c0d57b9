"""How postdiff's caches attach to modules: the module's class is swapped for a subclass of it, with the same
name, whose `forward` runs the module's hooks, outermost first, around the class's own forward. A hook is one
small object kept on the module (`_postdiff_hooks`) with a `new_forward(module, forward, *args, **kwargs)`,
where `forward` runs the inner hooks and then the module itself. `remove_hooks` restores every class and drops
the attribute, so a removed model is the original again.

Why not diffusers' `HookRegistry`, whose pattern this otherwise follows: it sets a `functools.partial` per
module as the instance's `forward`, and torch.compile guards such an object by its identity, so a model
compiled by region (`compile_repeated_blocks`, or `.compile()` on each block) would be traced again for every
block instance. A class-level `forward`, with each hook's per-module state reached through attributes, is the
same code for every instance: one graph per kind of step, whatever the number of blocks
(tests/test_compile.py). The subclass keeps the class's name, so diffusers' matching by class name
(`_repeated_blocks`, `_no_split_modules`) still finds the module; `isinstance` holds as before.
"""

from __future__ import annotations

import functools
import types

import torch
from diffusers.utils.torch_utils import unwrap_module

ATTRIBUTE = "_postdiff_hooks"
# A `forward` set on the instance by someone else before us (accelerate's offload hooks, a package's leftover
# wrapper): it would shadow the class's, so it is moved here, called innermost, and put back on removal.
INSTANCE_FORWARD = "_postdiff_instance_forward"


class Hook:
    """One cache's behaviour on one module. `variant`: what makes this hook trace differently from another of
    its class (a role, such as the first block of a span): part of the key of the module's hooked class."""

    variant: tuple = ()

    def new_forward(self, module: torch.nn.Module, forward, *args, **kwargs):
        raise NotImplementedError


def install(module: torch.nn.Module, hook: Hook) -> None:
    """Add `hook` to `module` as its outermost hook."""
    module = unwrap_module(module)  # a torch.compile'd module's class is not the one to hook
    if "forward" in module.__dict__:
        module.__dict__[INSTANCE_FORWARD] = module.__dict__.pop("forward")
    hooks = (hook, *module.__dict__.get(ATTRIBUTE, ()))
    original = getattr(type(module), "_postdiff_original_class", type(module))
    module.__class__ = _hooked_class(original, tuple((type(h), h.variant) for h in hooks))
    module.__dict__[ATTRIBUTE] = hooks


def reclaim_forward(model: torch.nn.Module) -> None:
    """Hooked modules whose instance `forward` was set again after `install` (accelerate re-adds its offload
    hooks whenever a pipeline frees them, wrapping the module's original forward): that forward moves back inside
    the hooks, as `install` placed the one it found."""
    for module in model.modules():
        if ATTRIBUTE in module.__dict__ and "forward" in module.__dict__:
            module.__dict__[INSTANCE_FORWARD] = module.__dict__.pop("forward")


def remove_hooks(model: torch.nn.Module) -> None:
    """Remove every postdiff hook from `model` and its submodules, restoring their classes."""
    for module in model.modules():
        if ATTRIBUTE in module.__dict__:
            del module.__dict__[ATTRIBUTE]
            module.__class__ = type(module)._postdiff_original_class
            if INSTANCE_FORWARD in module.__dict__:
                module.__dict__["forward"] = module.__dict__.pop(INSTANCE_FORWARD)


def _run(module: torch.nn.Module, index: int, *args, **kwargs):
    hooks = getattr(module, ATTRIBUTE)
    if index == len(hooks):
        instance_forward = getattr(module, INSTANCE_FORWARD, None)
        if instance_forward is not None:
            return instance_forward(*args, **kwargs)
        return type(module)._postdiff_original_forward(module, *args, **kwargs)
    return hooks[index].new_forward(module, functools.partial(_run, module, index + 1), *args, **kwargs)


def _hooked_forward(self, *args, **kwargs):
    return _run(self, 0, *args, **kwargs)


@functools.cache
def _hooked_class(cls: type, hooks: tuple) -> type:
    """The subclass of `cls` for modules with `hooks` ((hook class, variant) pairs, outermost first).

    Its `forward` is `_hooked_forward` with a code object of its own: dynamo keeps compiled graphs per code
    object and compiles one at most `recompile_limit` times, so modules hooked alike share graphs, and modules
    hooked differently (another class, another role) do not crowd each other out. The original forward is
    kept as a plain function: dynamo cannot call `forward` on some classes it treats as in-graph (diffusers'
    `Attention`)."""
    label = "_".join([cls.__name__, *(f"{hook.__name__}{''.join(str(int(v)) for v in variant)}" for hook, variant in hooks)])
    code = _hooked_forward.__code__.replace(co_name=label, co_qualname=label)
    forward = types.FunctionType(code, _hooked_forward.__globals__, label)
    return type(cls.__name__, (cls,), {"forward": forward, "_postdiff_original_class": cls,
                                       "_postdiff_original_forward": cls.forward,
                                       "__qualname__": cls.__qualname__, "__module__": cls.__module__})
