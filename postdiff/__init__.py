"""postdiff: PostDiff (ICCV 2025) for diffusers pipelines: mixed-resolution denoising and hybrid module caching."""

from .api import apply, config_of, is_applied, plan_call, remove, trace_x0  # noqa: F401
from .config import CA_MODES, PRESETS, ConfigError, PostDiffConfig  # noqa: F401
from .plan import ModelFacts, StepPlan, make_plan  # noqa: F401

__version__ = "0.1.0"
