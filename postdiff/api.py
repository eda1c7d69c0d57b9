"""`apply(pipe, config)` / `remove(pipe)`: the two lines a diffusers user needs.

`apply` gives the pipeline object a subclass of its own class whose `__call__` runs the PostDiff loop with
the original signature and outputs, and installs the cache hooks the config needs. It is idempotent
(apply removes first) and `remove` restores the original class and modules: no hook, no hook registry,
no instance `forward` left behind.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass, field

import torch

from .caching import remove_caches
from .caching.state import RunState
from .config import PRESETS, ConfigError, PostDiffConfig, Preset
from .families import family_for
from .families.base import Family
from .engine import Engine, shared_progress_bar
from .schedulers import check_scheduler


@dataclass
class Patch:
    config: PostDiffConfig
    family: type[Family]
    original_class: type
    state: RunState = field(default_factory=RunState)

    def reference_call(self):
        return class_reference_call(self.original_class)


def class_reference_call(cls: type):
    """The `__call__` whose signature a patched call keeps: the class's own, or, where a subclass takes `*args`
    (the embedded models' pixel-space decode), its diffusers base's."""
    for base in cls.__mro__:
        call = base.__dict__.get("__call__")
        if call is not None and _has_named_parameters(call):
            return call
    raise ConfigError(f"{cls.__name__}.__call__ has no named parameters to bind")


def reference_call(pipe):
    """`class_reference_call` of the pipeline as the user made it (under PostDiff: its original class)."""
    patch = pipe.__dict__.get("_postdiff")
    return class_reference_call(patch.original_class if patch is not None else type(pipe))


def _has_named_parameters(function) -> bool:
    kinds = [p.kind for p in inspect.signature(function).parameters.values()]
    return inspect.Parameter.VAR_POSITIONAL not in kinds


def family_name(pipe) -> str:
    return family_for(pipe).name


def preset_family(pipe) -> str:
    """The family whose presets `pipe` gets (config.PAPER_BETA): an editing pipeline its base model's."""
    family = family_for(pipe)
    return family.preset_family or family.name


def resolved_config(pipe, config: PostDiffConfig | Preset | str | None) -> PostDiffConfig:
    """`config` for `pipe`: a preset named without a family ("paper", or `PostDiffConfig.preset("paper")`) gets
    the settings of the pipeline's family."""
    if config is None:
        return PostDiffConfig()
    if isinstance(config, str):
        config = Preset(config)
    if isinstance(config, Preset):
        return config.resolve(preset_family(pipe))
    if not isinstance(config, PostDiffConfig):
        raise ConfigError(f"config={config!r} is not allowed: expected a PostDiffConfig, a preset name "
                          f"({', '.join(PRESETS)}) or None")
    return config


def apply(pipe, config: PostDiffConfig | Preset | str | None = None):
    """Run `pipe(...)` with PostDiff. `config`: a PostDiffConfig, or a preset ("paper", "deepcache", "off")
    resolved for the pipeline's family. Validates what can be checked without a call; returns `pipe`."""
    config = resolved_config(pipe, config)
    remove(pipe)
    family = family_for(pipe)
    check_scheduler(pipe.scheduler, config.mixed_resolution)
    patch = Patch(config, family, type(pipe))
    try:
        family.install_caches(pipe, config, patch.state)
    except BaseException:
        for model in family.cached_models(pipe):  # whatever went wrong, nothing half-installed stays behind
            remove_caches(model)
        raise
    pipe._postdiff = patch
    pipe.__class__ = _patched_class(type(pipe))
    return pipe


def remove(pipe):
    """Restore the original pipeline: class, forward methods, no PostDiff state. No-op if not applied."""
    patch = pipe.__dict__.get("_postdiff")
    if patch is None:
        return pipe
    for model in patch.family.cached_models(pipe):
        remove_caches(model)
    pipe.__class__ = patch.original_class
    del pipe.__dict__["_postdiff"]
    return pipe


@contextlib.contextmanager
def applied(pipe, config: PostDiffConfig | None = None):
    """`with applied(pipe, config): ...`: PostDiff on `pipe` inside the block, removed when it ends, however."""
    apply(pipe, config)
    try:
        yield pipe
    finally:
        remove(pipe)


def is_applied(pipe) -> bool:
    return "_postdiff" in pipe.__dict__


def config_of(pipe) -> PostDiffConfig | None:
    patch = pipe.__dict__.get("_postdiff")
    return patch.config if patch is not None else None


def _runner(pipe, args, kwargs, trajectory: list | None = None) -> Engine:
    """The engine for one call, its arguments bound to the pipeline's own signature (defaults applied)."""
    patch: Patch = pipe.__dict__["_postdiff"]
    bound = inspect.signature(patch.reference_call()).bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    family = patch.family(pipe, arguments)
    family.state = patch.state
    return Engine(pipe, family, patch.config, patch.state, patch.original_class.__call__, arguments, trajectory)


def _postdiff_call(self, *args, **kwargs):
    patch: Patch = self.__dict__["_postdiff"]
    if patch.config.is_off:
        return patch.original_class.__call__(self, *args, **kwargs)  # "off" is one plain call
    with torch.no_grad():
        return _runner(self, args, kwargs)()


def plan_call(pipe, *args, **kwargs):
    """The StepPlan that `pipe(*args, **kwargs)` would execute, without denoising and without touching the
    pipeline: it is planned on a view of it (its own fields, a copy of the scheduler, the same modules). Under
    the engine the pipeline's own call runs up to its schedule (input checks, prompt encoding) on the view."""
    runner = _runner(_planning_view(pipe), args, kwargs)
    with torch.no_grad(), runner.call_scope():
        return runner.prepare()


def _planning_view(pipe):
    view = copy.copy(pipe)
    view.__dict__["scheduler"] = copy.deepcopy(pipe.scheduler)  # set_timesteps acts on the copy
    return view


def trace_x0(pipe, *args, **kwargs) -> tuple[object, list[torch.Tensor]]:
    """Run `pipe(*args, **kwargs)` and return its output and the x0 prediction of every step (latent space)."""
    trajectory: list[torch.Tensor] = []
    with torch.no_grad():
        output = _runner(pipe, args, kwargs, trajectory)()
    return output, trajectory


@functools.cache
def _patched_class(cls: type) -> type:
    # Same name and module, so save_pretrained and repr read as the original pipeline.
    return type(cls.__name__, (cls,), {"__call__": _postdiff_call, "progress_bar": shared_progress_bar,
                                       "__module__": cls.__module__, "__doc__": cls.__doc__})
