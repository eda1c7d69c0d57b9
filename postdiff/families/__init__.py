"""Model families: the adapters the engine (engine.py) asks how a pipeline's segments differ from its call."""

from __future__ import annotations

from .base import Family, family_for, supported_pipelines  # noqa: F401
from . import controlnet, flux, inpaint, pixart, sd, sd3, sdxl  # noqa: F401  (registers the families)
from . import sdxl_edit  # noqa: F401  (registers SDXL img2img and inpainting)
