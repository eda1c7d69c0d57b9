"""postdiff: PostDiff (ICCV 2025) for diffusers pipelines: mixed-resolution denoising and hybrid module caching."""

import importlib

from .config import CA_MODES, PRESETS, ConfigError, PostDiffConfig, Preset  # noqa: F401

__version__ = "0.1.0"

# The diffusers releases the test suite has passed on (pyproject.toml states the same range). postdiff runs each
# pipeline's own `__call__`, but its adapters read some of the pipelines' names (`prepare_latents`,
# `get_timesteps`, `cache_context`): another release may have moved them.
TESTED_DIFFUSERS = ("0.42.1", "0.43")  # from, and below


def _check_diffusers_version() -> None:
    import warnings
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("diffusers")
    except PackageNotFoundError:
        return
    release = tuple(int(part) for part in found.split("+")[0].split(".")[:3] if part.isdigit())
    low, high = (tuple(int(part) for part in bound.split(".")) for bound in TESTED_DIFFUSERS)
    if not low <= release < high:
        warnings.warn(f"postdiff is tested with diffusers >={TESTED_DIFFUSERS[0]},<{TESTED_DIFFUSERS[1]}; this is diffusers "
                      f"{found}: pipelines may behave differently under PostDiff", stacklevel=2)


_check_diffusers_version()

# Loaded on first use rather than here: importing postdiff must not import diffusers (and transformers) before
# the command line has set their logging (cli.py). `postdiff.apply`, `from postdiff import plan_call` and
# `postdiff.api` work as before.
LAZY_NAMES = {"apply": "api", "applied": "api", "config_of": "api", "is_applied": "api", "plan_call": "api", "remove": "api",
              "trace_x0": "api", "ModelFacts": "plan", "StepPlan": "plan", "make_plan": "plan"}


def __getattr__(name: str):
    if name.startswith("__"):  # probes such as __wrapped__ name no submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name = f"{__name__}.{LAZY_NAMES.get(name, name)}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # a submodule that exists but lacks one of its own imports
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(module, name) if name in LAZY_NAMES else module
