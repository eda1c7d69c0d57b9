"""External accelerators run on the same pipeline, prompts and seeds as PostDiff, for side-by-side rows.

A method is named by a short spec, "name:key=value,key=value":
- "tomesd:ratio=0.5" - token merging with the PyPI package `tomesd` (its own `apply_patch`). Merging is
  applied at the highest-resolution U-Net level that has attention: `max_downsample=1` on SD 1.x/2.x (the
  package default), 2 on the embedded model, whose first level has no attention. Its random partition
  generator is re-seeded for every prompt, so results do not depend on the order or sharding of prompts.
- "deepcache-package:interval=2,branch=1" - the PyPI `DeepCache` package's own `DeepCacheSDHelper`
  (`cache_interval`, `cache_branch_id` in its numbering; branch 1 there is our branch 0 on the embedded model).

The cost of a method postdiff does not plan is measured: one real 1-image call under torch's FLOP counter,
keeping the denoiser's own count (same "macs" convention as the plan-based accounting; tested equal to it
on PostDiff's own configurations).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor

from ..accounting import count_call
from ..config import ConfigError

KNOWN_ARGUMENTS = {"tomesd": {"ratio": float}, "deepcache-package": {"interval": int, "branch": int}}


@dataclass(frozen=True)
class ExternalMethod:
    name: str
    arguments: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, spec: str) -> "ExternalMethod":
        name, _, rest = spec.partition(":")
        if name not in KNOWN_ARGUMENTS:
            raise ConfigError(f"external={spec!r} is not allowed: expected one of {', '.join(KNOWN_ARGUMENTS)}, e.g. tomesd:ratio=0.5")
        allowed = KNOWN_ARGUMENTS[name]
        arguments = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in allowed:
                raise ConfigError(f"external={spec!r}: {key!r} is not allowed for {name}; expected {', '.join(allowed)}")
            try:
                arguments[key] = allowed[key](value)
            except ValueError:
                raise ConfigError(f"external={spec!r}: {key}={value!r} is not a {allowed[key].__name__}") from None
        missing = set(allowed) - set(arguments) - ({"branch"} if name == "deepcache-package" else set())
        if missing:
            raise ConfigError(f"external={spec!r}: missing {', '.join(sorted(missing))}")
        return cls(name, tuple(sorted(arguments.items())))

    @property
    def spec(self) -> str:
        return f"{self.name}:" + ",".join(f"{key}={value}" for key, value in self.arguments)

    @contextlib.contextmanager
    def applied(self, pipe):
        """The method patched onto `pipe` for the duration; yields a callable to run before each seeded call."""
        arguments = dict(self.arguments)
        if self.name == "tomesd":
            import tomesd

            tomesd.apply_patch(pipe, ratio=arguments["ratio"], max_downsample=first_attention_downsample(pipe.unet))
            try:
                yield lambda seed: _reseed_tomesd(pipe.unet, seed)
            finally:
                tomesd.remove_patch(pipe)
            return
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=arguments["interval"], cache_branch_id=arguments.get("branch", 0))
        helper.enable()
        try:
            yield lambda seed: None
        finally:
            helper.disable()


def first_attention_downsample(unet) -> int:
    """tomesd's `max_downsample` that reaches the highest-resolution level with attention blocks."""
    level = next(i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None))
    return 2**level


def _reseed_tomesd(unet, seed: int) -> None:
    unet._tome_info["args"]["generator"] = torch.Generator(device=unet.device).manual_seed(seed)


def measured_denoiser_macs(pipe, **call_arguments) -> float:
    """Denoiser MACs of one real call (attention score/value products excluded, as in the "macs" convention)."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    processors = denoiser.attn_processors
    denoiser.set_attn_processor(AttnProcessor())  # products the counter can see and separate
    try:
        return count_call(lambda: pipe(**call_arguments), scope=type(denoiser).__name__)[0]
    finally:
        denoiser.set_attn_processor(processors)
