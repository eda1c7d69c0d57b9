"""Module-level caches, installed as hooks (caching/hooks.py) and driven by the step plan through one RunState.
Which caches a denoiser gets is decided by its kind (postdiff/denoisers.py)."""

from __future__ import annotations

from .hooks import remove_hooks as remove_caches

__all__ = ["remove_caches"]
