"""postdiff: PostDiff (ICCV 2025) for diffusers pipelines: mixed-resolution denoising and hybrid module caching."""

import importlib

from .config import CA_MODES, PRESETS, ConfigError, PostDiffConfig, Preset  # noqa: F401

__version__ = "0.1.0"

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
