"""PostDiffConfig: what PostDiff turns on. Every default is "off", so a config names only what it enables."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction

CA_MODES = ("cond", "ave", "cfg", "none")
SWITCH_NOISES = ("iid", "block")
LOW_RES_SHIFTS = ("full", "own")
CONTROLNET_CACHES = ("reuse", "shallow", "full")
# Fields added after results were first stored: in `to_dict` (the sweep store's key) only when set, so the
# keys of stored rows stay valid.
KEYED_WHEN_SET = ("switch_noise", "controlnet_cache", "low_res_shift", "temporal_beta")
PRESETS = ("off", "deepcache", "paper")
# The paper's beta per family (PAPER.md): 1/2 for SD 1.x/2.x (and our 32x32 testbed), 3/4 for SDXL and PixArt.
# The rectified-flow families, which the paper does not cover, take theirs from the study on the embedded flow
# model (docs/findings.md, "the embedded flow model"): 3/4, with the low-resolution phase on its own schedule.
FLOW_FAMILIES = ("sd3", "flux", "testbed-flow")
# The newer models (README, "Supported pipelines"; docs/pipelines.md): no trained testbed of theirs, so their presets are the flow
# model's, stated as untested defaults.
UNTESTED_FLOW_FAMILIES = ("flux2", "flux2-klein", "chroma", "qwen-image", "z-image", "sana", "wan", "hunyuan-video15")
PAPER_BETA = {"sd": 0.5, "testbed": 0.5, "sdxl": 0.75, "pixart": 0.75,
              **{family: 0.75 for family in FLOW_FAMILIES + UNTESTED_FLOW_FAMILIES}}
FLOW_PAPER_SETTINGS = {"low_res_shift": "own"}
# The presets' cache branch: U-Nets 1 (the paper's DeepCache FLOPs); DiTs 0 (caching/blocks.py: first and
# last block run, the rest cached), the paper names no DiT setting.
DIT_FAMILIES = ("pixart", *FLOW_FAMILIES, *UNTESTED_FLOW_FAMILIES)


class ConfigError(ValueError):
    """A PostDiff setting that cannot run; raised before any compute, naming the setting, value and allowed range."""


@dataclass(frozen=True)
class PostDiffConfig:
    """PostDiff settings.

    beta: scale of the low-resolution latent (0 < beta <= 1); used while `switch` > 0. Each latent side is beta x the
        side rounded to the nearest multiple the denoiser takes (plan.latent_size; the plan shows the size).
    switch: fraction s of the denoising steps run at low resolution (0 = mixed resolution off).
    cache_interval: DeepCache k; the deep U-Net branch is computed every k steps and reused between (1 = off).
    cache_branch: DeepCache's `cache_branch_id`: branch b keeps the skips s_0..s_b live, so conv_in, the first b
        down layers and the up layers that consume those skips run on every step (0 = conv_in and the last up
        layer only, DeepCache's default; 1 = the paper's DeepCache setting). DiTs: the first and last b + 1
        blocks run on every step (caching/deepcache.py, caching/blocks.py).
    cfg_stop: index m of the first step without classifier-free guidance (None = never stop CFG).
    ca_mode: what the cross-attention cache holds after `cfg_stop`: "cond" (conditional half, the paper's
        default), "ave" (mean of the halves, as T-GATE), "cfg" (guided combination) or "none" (no
        cross-attention cache: CFG stops, cross-attention is still computed on the conditional batch).
    progressive: extra intermediate resolutions, as (scale, fraction) pairs in increasing scale, run after the
        `beta` phase and before full resolution (beyond the paper; () = the paper's two-stage schedule).
    switch_noise: the fresh noise of the re-noising at a switch: "iid" (the paper's forward diffusion) or
        "block" (Pyramid Flow / RALU-style: its r x r block means are the low-resolution state's own noise, r
        the integer upsampling factor, the rest fresh noise with zero block means; still i.i.d. N(0, 1) per
        element, but continuous with the noise the low-resolution phase was denoising).
    low_res_shift: the sigma schedule of the lower-resolution phases of a rectified-flow model (SD3, FLUX, the
        embedded flow model), whose time shift depends on the image size: "full" (the requested size's schedule
        throughout: the low-resolution steps are the baseline's first ones) or "own" (each phase steps along
        the schedule of its own size: FLUX's mu from its token count; a static `shift` times the phase's scale,
        SD3's resolution-dependent shift sqrt(m/n)). Full resolution re-enters at the requested size's next sigma
        either way (an intermediate progressive stage, on its own schedule's).
    controlnet_cache: what a ControlNet does on DeepCache's cached steps (`cache_interval` > 1): "reuse" (its
        last full-step residuals, rescaled to the step's conditioning scale; nothing of it runs), "shallow" (its
        modules that feed only cached U-Net layers reuse their last full-step output, the rest runs: the
        residuals of the live skips are exact, the output is "full"'s) or "full" (it runs every step).
        Measured in docs/controlnet_cache.md ("reuse" is best at equal MACs); no effect without a ControlNet.
    temporal_beta: video pipelines only: the lower-resolution phases also run fewer latent frames, F' - 1 =
        temporal_beta * (F - 1) of the call's F (a whole number: the low segment's `num_frames` is then one the
        pipeline takes, (num_frames - 1) divisible by its VAE's temporal factor); at the switch to full resolution
        the x0 is resampled linearly in time as well as in space (1 = the same frames; needs switch > 0; refused
        before any compute for image pipelines). With beta 1 the low phase is lower in time only: full-size frames,
        fewer of them (temporal mixed resolution).
    """

    beta: float = 1.0
    switch: float = 0.0
    cache_interval: int = 1
    cache_branch: int = 0
    cfg_stop: int | None = None
    ca_mode: str = "cond"
    progressive: tuple[tuple[float, float], ...] = ()
    switch_noise: str = "iid"
    controlnet_cache: str = "reuse"
    low_res_shift: str = "full"
    temporal_beta: float = 1.0

    def __post_init__(self) -> None:
        _check(isinstance(self.beta, (int, float)) and 0 < self.beta <= 1, "beta", self.beta, "a number in (0, 1]")
        _check(isinstance(self.switch, (int, float)) and 0 <= self.switch < 1, "switch", self.switch, "a fraction in [0, 1)")
        _check(_is_int(self.cache_interval) and self.cache_interval >= 1, "cache_interval", self.cache_interval, "an integer >= 1")
        _check(_is_int(self.cache_branch) and self.cache_branch >= 0, "cache_branch", self.cache_branch, "an integer >= 0")
        _check(
            self.cfg_stop is None or (_is_int(self.cfg_stop) and self.cfg_stop >= 0),
            "cfg_stop", self.cfg_stop, "None or an integer step index >= 0",
        )
        _check(self.ca_mode in CA_MODES, "ca_mode", self.ca_mode, f"one of {', '.join(CA_MODES)}")
        self._check_progressive()
        _check(self.switch_noise in SWITCH_NOISES, "switch_noise", self.switch_noise, f"one of {', '.join(SWITCH_NOISES)}")
        _check(self.controlnet_cache in CONTROLNET_CACHES, "controlnet_cache", self.controlnet_cache,
               f"one of {', '.join(CONTROLNET_CACHES)}")
        _check(self.low_res_shift in LOW_RES_SHIFTS, "low_res_shift", self.low_res_shift, f"one of {', '.join(LOW_RES_SHIFTS)}")
        _check(isinstance(self.temporal_beta, (int, float)) and 0 < self.temporal_beta <= 1, "temporal_beta",
               self.temporal_beta, "a number in (0, 1]")
        _check(self.temporal_beta == 1 or self.switch > 0, "temporal_beta", self.temporal_beta,
               "1 unless switch > 0 (it shortens the low-resolution phase's clip)")
        if self.switch > 0 and self.beta == 1 and self.temporal_beta == 1:
            raise ConfigError("switch > 0 runs a lower-resolution phase, so beta (or, on video, temporal_beta) must be "
                              "below 1 (got beta=1)")

    def _check_progressive(self) -> None:
        object.__setattr__(self, "progressive", tuple(tuple(stage) for stage in self.progressive))
        scales = [self.beta] + [stage[0] for stage in self.progressive]
        for stage in self.progressive:
            _check(
                len(stage) == 2 and 0 < stage[0] < 1 and 0 < stage[1] < 1,
                "progressive", self.progressive, "(scale, fraction) pairs with scale and fraction in (0, 1)",
            )
        _check(scales == sorted(set(scales)), "progressive", self.progressive, f"scales increasing from beta={self.beta}")
        total = self.switch + sum(stage[1] for stage in self.progressive)
        _check(not self.progressive or (self.switch > 0 and total < 1), "progressive", self.progressive,
               "stages after a switch > 0 whose fractions plus switch stay below 1")

    @property
    def mixed_resolution(self) -> bool:
        return self.switch > 0

    @property
    def deepcache(self) -> bool:
        return self.cache_interval > 1

    @property
    def cross_attention_cache(self) -> bool:
        return self.cfg_stop is not None and self.ca_mode != "none"

    @property
    def is_off(self) -> bool:
        return not (self.mixed_resolution or self.deepcache or self.cfg_stop is not None)

    @classmethod
    def preset(cls, name: str, family: str | None = None) -> "PostDiffConfig | Preset":
        """"off"; "deepcache" (k=2, branch 1 on U-Nets: the paper's DeepCache row; 0 on DiTs); "paper": the
        paper's beta for the family, s=1/2, and the "deepcache" caching (rectified flow: beta and the low phase's
        schedule from the embedded flow model's study, see PAPER_BETA).

        "paper" is the configuration of the paper's headline PostDiff rows: their FLOPs are exactly mixed
        resolution (s=1/2) times DeepCache (k=2), with CFG kept (19.035 x 17.787 / 30.420 = 11.130; the paper's
        "SD v1.5" numbers are SD 2.1's U-Net at 768 px, see docs/accounting.md).
        Cross-attention caching is opt-in with `cfg_stop`.
        Without `family`, a `Preset` that `postdiff.apply` resolves for the pipeline it is applied to.
        """
        _check(name in PRESETS, "preset", name, f"one of {', '.join(PRESETS)}")
        if name == "off":
            return cls()
        if family is None:
            return Preset(name)
        _check(family in PAPER_BETA, "family", family, f"one of {', '.join(PAPER_BETA)}")
        branch = 0 if family in DIT_FAMILIES else 1
        if name == "deepcache":
            return cls(cache_interval=2, cache_branch=branch)
        flow = FLOW_PAPER_SETTINGS if family in FLOW_FAMILIES + UNTESTED_FLOW_FAMILIES else {}
        return cls(beta=PAPER_BETA[family], switch=0.5, cache_interval=2, cache_branch=branch, **flow)

    def with_changes(self, **changes) -> "PostDiffConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        default = PostDiffConfig()
        return {k: v for k, v in asdict(self).items() if k not in KEYED_WHEN_SET or v != getattr(default, k)}

    def describe(self) -> str:
        """Only the settings that differ from "off", e.g. "beta=0.5 switch=0.5 cache_interval=2"."""
        default = PostDiffConfig()
        parts = [f"{f.name}={_shown(f.name, getattr(self, f.name))}" for f in fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return " ".join(parts) or "off"


def _shown(name: str, value) -> str:
    """A setting as `describe` writes it: temporal_beta as the fraction of frames it is (3/7, not 0.42857142857142855)."""
    if name == "temporal_beta":
        fraction = Fraction(value).limit_denominator(64)
        if abs(float(fraction) - value) < 1e-12:
            return str(fraction)
    return str(value)


@dataclass(frozen=True)
class Preset:
    """A preset named without a family: its settings depend on the pipeline (`postdiff.apply` resolves it)."""

    name: str

    def __post_init__(self) -> None:
        _check(self.name in PRESETS, "preset", self.name, f"one of {', '.join(PRESETS)}")

    def resolve(self, family: str) -> PostDiffConfig:
        return PostDiffConfig.preset(self.name, family=family)

    def describe(self) -> str:
        return f"preset {self.name!r} (settings of the pipeline's family)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def parse_progressive(text: str) -> tuple[tuple[float, float], ...]:
    """"0.75@0.25" -> ((0.75, 0.25),); stages joined by "+"; "none" or "" -> () (the paper's two stages)."""
    if text.strip().lower() in ("", "none"):
        return ()
    stages = []
    for stage in text.split("+"):
        scale, _, fraction = stage.partition("@")
        try:
            stages.append((float(scale), float(fraction)))
        except ValueError:
            raise ConfigError(f"progressive={text!r} is not allowed: expected SCALE@FRACTION stages joined by +, e.g. 0.75@0.25") from None
    return tuple(stages)


def parse_fraction(text: str) -> float:
    """"0.5" or "3/7" -> a float: a temporal_beta is a whole number of frames over F - 1 (3/7 of an 8-frame clip's
    7 is 3, a 4-frame clip), which a decimal can only approximate."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is not a number or a fraction such as 3/7") from None


def build_config(family: str, preset: str | None = None, **flags) -> PostDiffConfig:
    """A preset ("off" when None) with the flags that are not None applied over it; `progressive` and
    `temporal_beta` may be given as text (see `parse_progressive`, `parse_fraction`), as on the command line."""
    base = PostDiffConfig.preset(preset or "off", family=family)
    if isinstance(flags.get("progressive"), str):
        flags["progressive"] = parse_progressive(flags["progressive"])
    if isinstance(flags.get("temporal_beta"), str):
        try:
            flags["temporal_beta"] = parse_fraction(flags["temporal_beta"])
        except ValueError as error:
            raise ConfigError(f"temporal_beta: {error}") from None
    return base.with_changes(**{name: value for name, value in flags.items() if value is not None})
