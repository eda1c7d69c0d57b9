"""Module-level caches, installed as diffusers `ModelHook`s and driven by the step plan through one RunState."""
