"""External accelerators run on the same pipeline, prompts and seeds as PostDiff, for side-by-side rows.

A method is named by a short spec, "name:key=value,key=value":
- "tomesd:ratio=0.5" - token merging with the PyPI package `tomesd` (its own `apply_patch`). Merging is
  applied at the highest-resolution U-Net level that has attention: `max_downsample=1` on SD 1.x/2.x (the
  package default), 2 on the embedded model, whose first level has no attention. Its random partition
  generator is re-seeded for every prompt, so results do not depend on the order or sharding of prompts.
- "deepcache-package:interval=2,branch=1" - the PyPI `DeepCache` package's own `DeepCacheSDHelper`
  (`cache_interval`, `cache_branch_id`: the same numbering as postdiff's `cache_branch`; branch 0 when not given).
- "first-block-cache:threshold=0.05", "taylorseer:interval=5,order=1,warmup=3",
  "magcache:threshold=0.06,max_skip=3,retention=0.2" - diffusers' own caches for transformers
  (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`), enabled through diffusers' `CacheMixin`.
  SD3's transformer has their blocks but not the mixin (and its pipeline sets no cache context), so it gets
  the mixin as a subclass and the conditional context for the method's duration. Their state is reset before
  every call. MagCache needs the model's magnitude ratios: FLUX uses diffusers' published ones; any other
  transformer is calibrated with diffusers' own calibration mode on one call of the workload's first prompt
  (seed 0) at the same step count and guidance, made by the caller (`calibration_call`) when the method is
  applied; that call is counted in neither the MACs nor the quality.
- "cache-dit:rdt=0.08,Fn=1,Bn=0,taylorseer=0" - DBCache of the PyPI package `cache-dit` (pinned 1.5.3, the
  `external` extra), attached with its own `enable_cache` and removed with its own `disable_cache`. The keys
  are cache-dit's own short names (its example command line's `--rdt`, `--Fn`, `--Bn`, `--ws`, `--mc`,
  `--mcc`, `--taylorseer`, `-order`): the residual-difference threshold, the first Fn blocks always run (the
  difference is measured after them), the last Bn always run, warmup steps, the most cached steps in all and
  in a row (-1: no limit), its TaylorSeer calibrator (1: on) and its order. Left out, a key takes
  `DBCacheConfig`'s default (Bn 0, ws 8, mc -1, mcc -1; order 1); rdt and Fn have to be given (its default
  Fn, 8, is more blocks than the embedded flow model has). Pipelines cache-dit registers (FLUX, SD3, ...)
  get its own `BlockAdapter`; an unregistered pipeline with SD3's transformer (the embedded flow model) gets
  the adapter cache-dit registers for SD3, built here on the pipeline. cache-dit resets its state at the
  start of every pipeline call (its wrapped `__call__`). TaylorSeer forecasts the image stream only
  (`enable_encoder_calibrator` off, as in cache-dit's own config loader): SD3's last block returns no text
  stream, on which cache-dit 1.5.3's text-stream calibrator fails. `disable_cache` leaves the forward it
  installed (FLUX: its copy of diffusers' forward) and the pipeline class's `__call__` in place; they are
  put back here, so the pipeline is diffusers' own again.

The cost of a method postdiff does not plan is measured: one real 1-image call under torch's FLOP counter,
keeping what it counts while the denoiser runs (same "macs" convention as the plan-based accounting; tested
equal to it on PostDiff's own configurations).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import io
import logging
import re
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

from ..accounting import ATTENTION_PRODUCTS, flop_counter
from ..config import ConfigError
from ..quantization import denoiser_name

KNOWN_ARGUMENTS = {
    "tomesd": {"ratio": float},
    "deepcache-package": {"interval": int, "branch": int},
    "first-block-cache": {"threshold": float},
    "taylorseer": {"interval": int, "order": int, "warmup": int},
    "magcache": {"threshold": float, "max_skip": int, "retention": float},
    "cache-dit": {"rdt": float, "Fn": int, "Bn": int, "ws": int, "mc": int, "mcc": int, "taylorseer": int, "order": int},
}
OPTIONAL_ARGUMENTS = {"deepcache-package": {"branch"}, "taylorseer": {"order", "warmup"}, "magcache": {"max_skip", "retention"},
                      "cache-dit": {"Bn", "ws", "mc", "mcc", "taylorseer", "order"}}


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
        missing = set(allowed) - set(arguments) - OPTIONAL_ARGUMENTS.get(name, set())
        if missing:
            raise ConfigError(f"external={spec!r}: missing {', '.join(sorted(missing))}")
        if name in VALUE_CHECKS:
            VALUE_CHECKS[name](spec, arguments)
        return cls(name, tuple(sorted(arguments.items())))

    @property
    def spec(self) -> str:
        return f"{self.name}:" + ",".join(f"{key}={value}" for key, value in self.arguments)

    @contextlib.contextmanager
    def applied(self, pipe, num_inference_steps: int = 28, calibration_call=None):
        """The method patched onto `pipe` for the duration; yields a callable to run before each seeded call.

        `calibration_call`: a zero-argument callable running `pipe` once at `num_inference_steps`; MagCache
        calls it (before patching) to measure the ratios of a transformer other than FLUX's."""
        arguments = dict(self.arguments)
        if self.name == "magcache":  # the ratios travel with the arguments, so every cache keeps one factory
            arguments["ratios"] = mag_ratios(pipe.transformer, num_inference_steps, calibration_call)
        if self.name == "taylorseer":
            arguments["identifiers"] = taylorseer_identifiers(pipe.transformer)
        if self.name == "cache-dit":
            with cache_dit_cache(pipe, arguments, self.spec):
                yield lambda seed: None  # cache-dit resets its own state at the start of every pipeline call
            return
        if self.name in DIFFUSERS_CACHES:
            with diffusers_cache(pipe.transformer, DIFFUSERS_CACHES[self.name](arguments, num_inference_steps)) as reset:
                yield lambda seed: reset()
            return
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


def _first_block_cache(arguments: dict, steps: int):
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=arguments["threshold"])


def _taylorseer(arguments: dict, steps: int):
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=arguments["interval"], max_order=int(arguments.get("order", 1)),
                                 disable_cache_before_step=int(arguments.get("warmup", 3)), taylor_factors_dtype=torch.float32,
                                 cache_identifiers=arguments.get("identifiers"))


# Wan names its attentions attn1 / attn2, which diffusers' default TaylorSeer patterns ("^blocks.*attn", matched
# whole) miss: with them TaylorSeer hooks nothing on Wan and skips nothing. Its attentions are what it predicts.
WAN_ATTENTION_IDENTIFIERS = [r"^blocks\.\d+\.attn[12]$"]


def taylorseer_identifiers(transformer) -> list[str] | None:
    """The modules TaylorSeer predicts: diffusers' default (None) where it matches some, else Wan's attentions."""
    from diffusers import WanTransformer3DModel
    from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

    names = [name for name, _ in transformer.named_modules()]
    if any(re.fullmatch(pattern, name) for pattern in _TRANSFORMER_BLOCK_IDENTIFIERS for name in names):
        return None
    return WAN_ATTENTION_IDENTIFIERS if isinstance(transformer, WanTransformer3DModel) else None


def _magcache(arguments: dict, steps: int):
    from diffusers.hooks import MagCacheConfig

    return MagCacheConfig(threshold=arguments["threshold"], max_skip_steps=int(arguments.get("max_skip", 3)),
                          retention_ratio=arguments.get("retention", 0.2), num_inference_steps=steps,
                          mag_ratios=arguments["ratios"])


DIFFUSERS_CACHES = {"first-block-cache": _first_block_cache, "taylorseer": _taylorseer, "magcache": _magcache}


def mag_ratios(transformer, steps: int, calibration_call=None) -> torch.Tensor:
    """MagCache's ratios for `transformer`: diffusers' published ones for FLUX (MagCache's own, measured on
    FLUX.1-dev), else measured by `calibration_call`, which must be given (refused before any compute)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    if isinstance(transformer, FluxTransformer2DModel):
        return FLUX_MAG_RATIOS
    if calibration_call is None:
        raise ConfigError(f"magcache on {type(transformer).__name__}: diffusers publishes magnitude ratios for FLUX "
                          "only, so they are calibrated on one call of the pipeline; pass calibration_call (a callable "
                          "running the pipeline once at the method's step count)")
    return calibrated_mag_ratios(transformer, steps, calibration_call)


def calibrated_mag_ratios(transformer, steps: int, calibration_call) -> torch.Tensor:
    """The ratios diffusers' MagCache calibration mode measures on `calibration_call` (nothing skipped). Its
    hooks and state are gone on return, so the real MagCache starts clean."""
    from diffusers.hooks import MagCacheConfig

    config = MagCacheConfig(calibrate=True, num_inference_steps=steps)
    with diffusers_cache(transformer, config), _logged_calibrations() as results, \
            contextlib.redirect_stdout(io.StringIO()):  # diffusers also prints them, for copying by hand
        calibration_call()
    if not results:
        raise RuntimeError(f"MagCache calibration reported no ratios: the calibration call must run the transformer "
                           f"once per step, {steps} steps (the method's step count)")
    # A pipeline running its CFG passes in cache contexts of their own reports once per context: the first is
    # the conditional pass's.
    return torch.tensor(results[0])


CALIBRATION_MESSAGE = "MagCache Calibration Results: "


@contextlib.contextmanager
def _logged_calibrations():
    """The ratio lists diffusers' MagCache calibration logs while open. They are read from its logger (INFO, for
    the duration), not from the hooks' private state; kept off diffusers' own handler, which would print them."""
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    results: list[list[float]] = []
    handler = _CalibrationHandler(results)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield results
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class _CalibrationHandler(logging.Handler):
    def __init__(self, results: list):
        super().__init__(logging.INFO)
        self.results = results

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(CALIBRATION_MESSAGE):  # the list's repr: a Python literal
            self.results.append([float(r) for r in ast.literal_eval(message[len(CALIBRATION_MESSAGE):])])


@contextlib.contextmanager
def diffusers_cache(transformer, config):
    """diffusers' cache `config` enabled on `transformer` for the duration; yields the reset to call before
    each pipeline call. A transformer without `CacheMixin` (SD3's) gets it as a subclass for the duration,
    and the conditional cache context its pipeline never sets."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context
    from diffusers.models.cache_utils import CacheMixin

    original_class = type(transformer)
    own_context = not isinstance(transformer, CacheMixin)
    if own_context:
        transformer.__class__ = _with_cache_mixin(original_class)
    _enable(transformer, config)

    def reset() -> None:
        transformer._reset_stateful_cache()  # drops the context too
        if own_context:
            _set_cache_context(transformer, CacheContext("cond"))

    reset()
    try:
        yield reset
    finally:
        if own_context:
            _set_cache_context(transformer, None)
        transformer.disable_cache()
        transformer.__class__ = original_class


def _enable(transformer, config) -> None:
    """`enable_cache`; but First Block Cache's tail block must return the text stream, which SD3's last block
    (`context_pre_only`) does not: there it caches the blocks before the last one, and the last runs always."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    blocks = getattr(transformer, "transformer_blocks", None)
    if not (isinstance(config, FirstBlockCacheConfig) and blocks and getattr(blocks[-1], "context_pre_only", False)):
        transformer.enable_cache(config)
        return
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleList(list(blocks)[:-1])  # the same block objects
    apply_first_block_cache(holder, config)
    transformer._cache_config = config  # so that `disable_cache` removes the hooks from the blocks


@functools.cache
def _with_cache_mixin(cls: type) -> type:
    from diffusers.models.cache_utils import CacheMixin

    return type(cls.__name__, (cls, CacheMixin), {"__module__": cls.__module__})


CACHE_DIT_VERSION = "1.5.3"  # the version of the `external` extra (pyproject.toml), tested here
CACHE_DIT_FIELDS = {"rdt": "residual_diff_threshold", "Fn": "Fn_compute_blocks", "Bn": "Bn_compute_blocks",
                    "ws": "max_warmup_steps", "mc": "max_cached_steps", "mcc": "max_continuous_cached_steps"}


def _check_cache_dit_arguments(spec: str, arguments: dict) -> None:
    """Values cache-dit would take but that mean nothing or fail mid-call, and a missing package: refused when
    the spec is read, before any pipeline is built or run."""
    problems = []
    if arguments["rdt"] < 0:
        problems.append("rdt (the residual-difference threshold) must be >= 0")
    if arguments["Fn"] < 1:
        problems.append("Fn must be >= 1: the difference is measured on the residual of the first Fn blocks")
    problems += [f"{key} must be >= 0" for key in ("Bn", "ws") if arguments.get(key, 0) < 0]
    problems += [f"{key} must be -1 (no limit) or >= 0" for key in ("mc", "mcc") if arguments.get(key, -1) < -1]
    if arguments.get("taylorseer", 0) not in (0, 1):
        problems.append("taylorseer must be 0 (off) or 1 (on)")
    elif "order" in arguments and not arguments.get("taylorseer"):
        problems.append("order is TaylorSeer's: give it with taylorseer=1")
    if arguments.get("order", 1) < 1:
        problems.append("order must be >= 1")
    if problems:
        raise ConfigError(f"external={spec!r}: " + "; ".join(problems))
    if importlib.util.find_spec("cache_dit") is None:
        raise ConfigError(f"external={spec!r}: the cache-dit package is not installed "
                          f"(pip install cache-dit=={CACHE_DIT_VERSION}: postdiff's `external` extra)")


VALUE_CHECKS = {"cache-dit": _check_cache_dit_arguments}


@contextlib.contextmanager
def cache_dit_cache(pipe, arguments: dict, spec: str = "cache-dit"):
    """cache-dit's DBCache (with its TaylorSeer calibrator when asked) on `pipe` for the duration, attached by
    its own `enable_cache` and removed by its own `disable_cache`; what that leaves behind is put back."""
    import cache_dit

    with _restored_after_cache_dit(pipe):
        adapter = cache_dit_adapter(pipe)  # cache-dit's FLUX adapter already patches the forward: inside the restore
        _check_cacheable_blocks(adapter, arguments, spec)
        cache_config = cache_dit.DBCacheConfig(**{field: arguments[key] for key, field in CACHE_DIT_FIELDS.items()
                                                  if key in arguments})
        calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=arguments.get("order", 1),
                                                           enable_encoder_calibrator=False)
                      if arguments.get("taylorseer") else None)
        try:
            cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
            yield
        finally:
            cache_dit.disable_cache(adapter)


def cache_dit_adapter(pipe):
    """cache-dit's `BlockAdapter` for `pipe`: the one it registers for the pipeline's class, else (a pipeline of
    ours around SD3's or Wan's transformer: the embedded flow and video models) the layout of the one it registers
    for that transformer's pipeline (Wan: blocks that return the image stream only, CFG as a separate pass)."""
    import cache_dit
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel

    adapter = cache_dit.get_adapter(pipe)
    if adapter is not None:
        return adapter
    transformer = getattr(pipe, "transformer", None)
    layouts = {SD3Transformer2DModel: ("transformer_blocks", cache_dit.ForwardPattern.Pattern_1, {}),
               WanTransformer3DModel: ("blocks", cache_dit.ForwardPattern.Pattern_2, {"has_separate_cfg": True})}
    for kind, (blocks, pattern, extra) in layouts.items():
        if isinstance(transformer, kind):
            return cache_dit.BlockAdapter(pipe=pipe, transformer=transformer, blocks=getattr(transformer, blocks),
                                          forward_pattern=pattern, check_forward_pattern=True, **extra)
    denoiser = type(transformer if transformer is not None else getattr(pipe, "unet", None)).__name__
    raise ConfigError(f"cache-dit on {type(pipe).__name__} ({denoiser}): cache-dit caches the blocks of a "
                      "transformer; it registers no adapter for this pipeline, and postdiff builds one only for "
                      "SD3's and Wan's transformers (SD3Transformer2DModel, WanTransformer3DModel)")


def _check_cacheable_blocks(adapter, arguments: dict, spec: str) -> None:
    """Fn first and Bn last blocks always run: together they must leave at least one block of every block list
    the adapter caches (cache-dit checks each alone, and only once the transformer runs)."""
    block_lists = adapter.blocks if isinstance(adapter.blocks, (list, tuple)) else [adapter.blocks]
    always = arguments["Fn"] + arguments.get("Bn", 0)
    for blocks in block_lists:
        if always >= len(blocks):
            raise ConfigError(f"external={spec!r}: Fn + Bn = {always} blocks always run, which leaves none of the "
                              f"{len(blocks)} cached blocks of {type(adapter.transformer).__name__} to skip")


@contextlib.contextmanager
def _restored_after_cache_dit(pipe):
    """The attributes cache-dit sets and `disable_cache` leaves set, put back on exit: the pipeline class's
    `__call__` (reassigned, or added to a class that inherited it) and the instance `forward` (and the
    `_is_patched` mark) of the transformer and its modules (FLUX: cache-dit's own copy of diffusers' forward)."""
    transformer = getattr(pipe, "transformer", None)
    modules = list(transformer.modules()) if transformer is not None else []
    owners = [(type(pipe), "__call__")] + [(module, name) for module in modules for name in ("forward", "_is_patched")]
    missing = object()
    before = [vars(owner).get(name, missing) for owner, name in owners]
    try:
        yield
    finally:
        for (owner, name), value in zip(owners, before):
            if value is missing and name in vars(owner):
                delattr(owner, name)
            elif value is not missing and vars(owner).get(name, missing) is not value:
                setattr(owner, name, value)


@contextlib.contextmanager
def counted_block_calls(transformer):
    """The transformer blocks that actually run, from forward hooks on the blocks themselves: one list per
    transformer call (a step: these pipelines run CFG as one batch) of the indices of the blocks run, counted
    over `transformer_blocks` then `single_transformer_blocks` (FLUX). Independent of any method's own stats."""
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    calls: list[list[int]] = []
    handles = [transformer.register_forward_pre_hook(lambda module, args: calls.append([]))]
    handles += [block.register_forward_hook(lambda module, args, output, index=index: calls[-1].append(index))
                for index, block in enumerate(blocks)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def first_attention_downsample(unet) -> int:
    """tomesd's `max_downsample` that reaches the highest-resolution level with attention blocks."""
    level = next(i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None))
    return 2**level


def _reseed_tomesd(unet, seed: int) -> None:
    unet._tome_info["args"]["generator"] = torch.Generator(device=unet.device).manual_seed(seed)


def measured_denoiser_macs(pipe, **call_arguments) -> float:
    """Denoiser MACs of one real call (attention score/value products excluded, as in the "macs" convention).

    What the counter counts in all ("Global") while the denoiser runs, read at its own forward hooks, not what
    it files under the denoiser's module name: cache-dit's cached blocks hold the transformer as a submodule,
    which renames it in the counter's module tracker mid-call, and the tracker then files all that follows
    (the VAE's decode) under it. Without such a method the two are the same."""
    denoiser = getattr(pipe, denoiser_name(pipe))
    counter = flop_counter()
    starts: list[int] = []
    inside: list[int] = []

    def enter(module, args) -> None:
        starts.append(_flops_without_attention(counter))

    def leave(module, args, output) -> None:
        inside.append(_flops_without_attention(counter) - starts.pop())

    handles = [denoiser.register_forward_pre_hook(enter), denoiser.register_forward_hook(leave)]
    try:
        with countable_attention(denoiser), counter:
            pipe(**call_arguments)
    finally:
        for handle in handles:
            handle.remove()
    return sum(inside) / 2


def _flops_without_attention(counter: FlopCounterMode) -> int:
    """All the flops `counter` has counted so far, less the attention products (`count_call`'s convention)."""
    by_op = {str(op).split(".")[1]: flops for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    return sum(by_op.values()) - sum(by_op.get(name, 0) for name in ATTENTION_PRODUCTS)


@contextlib.contextmanager
def countable_attention(denoiser):
    """Attention as matrix products the counter sees and separates: the classic processor where the model
    takes it (U-Nets, PixArt: diffusers' plain processors), else PyTorch's math kernel for
    `scaled_dot_product_attention` (MM-DiTs and Wan, whose processors are their own)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not all(isinstance(p, (AttnProcessor, AttnProcessor2_0)) for p in denoiser.attn_processors.values()):
        with sdpa_kernel(SDPBackend.MATH):
            yield
        return
    processors = denoiser.attn_processors
    denoiser.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        denoiser.set_attn_processor(processors)
