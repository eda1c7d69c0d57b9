"""Model families: the adapters the engine (engine.py) asks how a pipeline's segments differ from its call.
Every module of this package is imported (each registers its families, and its transformer's denoiser kind
where the model brings a new one), so a new model is one new module."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Family, family_for, supported_pipelines  # noqa: F401
from . import controlnet, flux, inpaint, pixart, sd, sd3, sdxl  # noqa: F401  (registers the families)
from . import sdxl_edit  # noqa: F401  (registers SDXL img2img and inpainting)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
