"""Model families: how a pipeline encodes prompts, calls its denoiser and decodes. The loop is in sampler.py."""

from __future__ import annotations

from .base import Family, family_for, supported_pipelines  # noqa: F401
from . import controlnet, flux, inpaint, pixart, sd, sd3, sdxl  # noqa: F401  (registers the families)
from . import sdxl_edit  # noqa: F401  (registers SDXL img2img and inpainting)
