"""Config + step count + model facts -> StepPlan: plain data, computed before any compute (no torch).

The engine executes a plan, the accounting sums per-step costs over the same plan, the sweeps enumerate
plans. Printing a plan shows exactly what a config does.

Rounding: phase boundaries are cumulative fractions of the scheduler's timesteps, rounded half up
(`floor(fraction * steps + 0.5)`); every phase must get at least one step, else the config is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .config import ConfigError, PostDiffConfig


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about the denoiser and the scheduler, nothing else."""

    latent_hw: tuple[int, int]  # full-resolution latent size
    size_multiple: int = 1  # latent sides must be multiples of this (2 ** down-samplers, or the patch size)
    max_cache_branch: int | None = None  # deepest valid cache branch; None = nothing to cache
    restart_repeats: int = 0  # extra evaluations a restarted scheduler needs (PNDM's warm-up repeats one)
    denoiser: str = "denoiser"  # how messages name the model: "U-Net", "transformer (28 blocks)"
    text_length: int | None = None  # text tokens the denoiser sees in this call, where the call decides it (T5)
    latent_frames: int | None = None  # a video call's latent frames at full size (None: an image model)
    denoiser_changes: tuple[int, ...] = ()  # steps before which another denoiser takes over (Wan 2.2's experts)
    condition_hw: tuple[int, int] | None = None  # latent size of a condition image the denoiser sees every step (an edit's)


@dataclass(frozen=True)
class Phase:
    """A run of steps at one resolution, with a fresh scheduler state (timesteps[start:end] plus repeats)."""

    scale: float
    latent_hw: tuple[int, int]
    timestep_start: int
    timestep_end: int
    first_step: int
    num_steps: int
    latent_frames: int | None = None  # a video's latent frames in this phase (None: an image model)


DeepMode = Literal["full", "cached"]
CrossAttentionMode = Literal["computed", "cached"]
Event = Literal["switch", "cfg_stop", "denoiser_change"]


@dataclass(frozen=True)
class Step:
    index: int
    phase: int
    latent_hw: tuple[int, int]
    cfg: bool  # classifier-free guidance: batch of 2 x images
    deep: DeepMode  # the deep U-Net branch / cached transformer blocks: "full" (computed and stored) or "cached" (reused)
    cross_attention: CrossAttentionMode  # "computed" or "cached"
    capture_cross_attention: bool  # store this step's cross-attention outputs for later reuse
    events: tuple[Event, ...] = ()  # what happens before this step
    latent_frames: int | None = None  # a video's latent frames (None: an image model)

    @property
    def kind(self) -> tuple:
        """What decides the work of the step: the latent size, the batch and what the caches do. Steps of one kind
        run the same modules on tensors of the same shapes (a compiled denoiser needs one graph a kind)."""
        return (self.latent_hw, self.cfg, self.deep, self.cross_attention, self.capture_cross_attention, self.latent_frames)


@dataclass(frozen=True)
class StepPlan:
    config: PostDiffConfig
    phases: tuple[Phase, ...]
    steps: tuple[Step, ...]
    facts: ModelFacts = field(repr=False)

    def __len__(self) -> int:
        return len(self.steps)

    def step_kinds(self) -> list[tuple]:
        """The distinct `Step.kind`s, in order of first use."""
        return list(dict.fromkeys(step.kind for step in self.steps))

    def describe(self) -> str:
        lines = [f"PostDiff plan: {len(self.steps)} steps, config: {self.config.describe()}"]
        lines.append(f"{'step':>4}  {'latent':>9}  {'cfg':>3}  {'deep':>6}  {'cross-attn':>10}  events")
        for step in self.steps:
            size = f"{step.latent_hw[0]}x{step.latent_hw[1]}"
            size = size if step.latent_frames is None else f"{step.latent_frames}x{size}"
            events = ", ".join(_EVENT_TEXT[e] for e in step.events)
            cfg = "on" if step.cfg else "off"
            lines.append(f"{step.index:>4}  {size:>9}  {cfg:>3}  {step.deep:>6}  {step.cross_attention:>10}  {events}")
        return "\n".join(lines)


_EVENT_TEXT = {
    "switch": "switch: x0 -> bilinear upsample -> re-noise, scheduler restarted, deep cache reset",
    "cfg_stop": "CFG stops: one conditional batch, cached deep features keep their conditional half",
    "denoiser_change": "another denoiser takes over (Wan 2.2's low-noise expert): block cache reset",
}


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def make_plan(config: PostDiffConfig, num_timesteps: int, facts: ModelFacts, do_cfg: bool = True) -> StepPlan:
    if num_timesteps < 1:
        raise ConfigError(f"num_inference_steps gives {num_timesteps} timesteps: expected at least 1")
    check_cache_branch(config, facts.max_cache_branch, facts.denoiser)
    phases = _phases(config, num_timesteps, facts)
    _check_switch_noise(config, phases)
    total = sum(phase.num_steps for phase in phases)
    _check_cfg_stop(config, total)
    steps = tuple(_step(config, phases, phase_index, index, do_cfg, facts) for phase_index, phase in enumerate(phases)
                  for index in range(phase.first_step, phase.first_step + phase.num_steps))
    return StepPlan(config=config, phases=phases, steps=steps, facts=facts)


def _stage_scales(config: PostDiffConfig) -> list[tuple[float, float]]:
    """(scale, fraction of steps) for every stage before full resolution."""
    if not config.mixed_resolution:
        return []
    return [(config.beta, config.switch), *config.progressive]


def _phases(config: PostDiffConfig, num_timesteps: int, facts: ModelFacts) -> tuple[Phase, ...]:
    stages = _stage_scales(config)
    boundaries, cumulative = [0], 0.0
    for scale, fraction in stages:
        cumulative += fraction
        boundaries.append(round_half_up(cumulative * num_timesteps))
    boundaries.append(num_timesteps)
    scales = [scale for scale, _ in stages] + [1.0]
    phases, first_step = [], 0
    for index, scale in enumerate(scales):
        start, end = boundaries[index], boundaries[index + 1]
        if end <= start:
            raise ConfigError(
                f"switch={config.switch} progressive={config.progressive} with {num_timesteps} timesteps leaves "
                f"{max(0, end - start)} steps at scale {scale}: every resolution needs at least one step "
                f"(boundaries are cumulative fractions x steps, rounded half up: {boundaries})"
            )
        # A restarted multistep scheduler may redo its warm-up (PNDM repeats its second timestep).
        repeats = facts.restart_repeats if index > 0 and end - start >= 2 else 0
        num_steps = end - start + repeats
        frames = facts.latent_frames if index == len(scales) - 1 else low_frames(config, facts)  # beta 1: time only
        phases.append(Phase(scale, latent_size(scale, facts), start, end, first_step, num_steps, frames))
        first_step += num_steps
    return tuple(phases)


def low_frames(config: PostDiffConfig, facts: ModelFacts) -> int | None:
    """The latent frames of the lower-resolution phases: F' - 1 = temporal_beta * (F - 1), a whole number (then the
    segment's `num_frames`, (F' - 1) x the VAE's temporal factor + 1, is one the pipeline takes); refused for images."""
    frames = facts.latent_frames
    if config.temporal_beta == 1:
        return frames
    if frames is None:
        raise ConfigError(f"temporal_beta={config.temporal_beta} is for video pipelines: this {facts.denoiser} "
                          "denoises images (no frames to shorten); use temporal_beta=1")
    low = config.temporal_beta * (frames - 1)
    if abs(low - round(low)) > 1e-9 or round(low) < 1:
        valid = ", ".join(f"{k / (frames - 1):g}" for k in range(1, frames - 1)) or "none"
        raise ConfigError(f"temporal_beta={config.temporal_beta} gives {low + 1:g} latent frames for the call's {frames}: "
                          f"(F' - 1) = temporal_beta x (F - 1) must be a whole number >= 1; values that work here: {valid}")
    return round(low) + 1


def _check_switch_noise(config: PostDiffConfig, phases: tuple[Phase, ...]) -> None:
    """Block noise needs every resolution jump to be a whole factor per side (2 for beta 1/2), in space only."""
    if config.switch_noise != "block":
        return
    if any(low.latent_frames != high.latent_frames for low, high in zip(phases, phases[1:])):
        raise ConfigError(f"switch_noise='block' keeps the low-resolution noise in its spatial block means, frame by "
                          f"frame; temporal_beta={config.temporal_beta} changes the frame count: use switch_noise='iid'")
    for low, high in zip(phases, phases[1:]):
        if any(h % l for l, h in zip(low.latent_hw, high.latent_hw)) or high.latent_hw[0] // low.latent_hw[0] != high.latent_hw[1] // low.latent_hw[1]:
            raise ConfigError(f"switch_noise='block' needs whole upsampling factors; {low.latent_hw} -> {high.latent_hw} "
                              f"is not one (beta 1/2 gives 2; use switch_noise='iid' for beta={config.beta})")


def latent_size(scale: float, facts: ModelFacts) -> tuple[int, int]:
    """The latent size at `scale`: each side `scale` x the full side, rounded to the nearest multiple the denoiser
    takes (its patch, or 2 ** its down-samplers; a tie to the smaller), as pipelines round a requested size to their
    multiple (Wan's 480x832 at 3/4: 45x78 latents -> 44x78). Refuses a side that rounds to nothing and a size that is
    not smaller than the full one."""
    if scale == 1.0:
        return facts.latent_hw
    low = _rounded_size(scale, facts)
    if _takes(low, facts):
        return low
    height, width = facts.latent_hw
    raise ConfigError(
        f"beta={scale} gives a {scale * height:g}x{scale * width:g} latent for the {height}x{width} latent, which at "
        f"the denoiser's multiple of {facts.size_multiple} per side is {low[0]}x{low[1]}: "
        f"{'a side of 0' if min(low) == 0 else 'not smaller than the full size'}; scales that work here: "
        f"{_working_scales(facts)}"
    )


def _rounded_size(scale: float, facts: ModelFacts) -> tuple[int, int]:
    """Each side `scale` x the full side, rounded to the nearest multiple of `facts.size_multiple` (a tie down)."""
    multiple = facts.size_multiple
    rounded = []
    for side in facts.latent_hw:
        below = int(scale * side // multiple) * multiple
        rounded.append(below + multiple if scale * side - below > below + multiple - scale * side + 1e-9 else below)
    return tuple(rounded)


def _takes(low: tuple[int, int], facts: ModelFacts) -> bool:
    """A lower-resolution size the plan can run: positive sides, none above the full size's, and not the full size."""
    return min(low) > 0 and all(l <= h for l, h in zip(low, facts.latent_hw)) and low != tuple(facts.latent_hw)


def _working_scales(facts: ModelFacts) -> str:
    """The range of beta (in hundredths) that gives a size the plan can run, e.g. "0.25 to 0.9"."""
    works = [k / 100 for k in range(1, 100) if _takes(_rounded_size(k / 100, facts), facts)]
    return f"{works[0]:g} to {works[-1]:g}" if works else "none"


def check_cache_branch(config: PostDiffConfig, max_branch: int | None, denoiser: str) -> None:
    """The one check of `cache_branch` (plans, `apply` and the accounting all come here)."""
    if not config.deepcache:
        return
    if max_branch is None:
        raise ConfigError(f"cache_interval={config.cache_interval} needs a denoiser with cacheable blocks; this {denoiser} has none")
    if config.cache_branch > max_branch:
        raise ConfigError(f"cache_branch={config.cache_branch} is not allowed: this {denoiser} has branches 0..{max_branch}")


def _check_cfg_stop(config: PostDiffConfig, total_steps: int) -> None:
    if config.cfg_stop is not None and not 1 <= config.cfg_stop <= total_steps - 1:
        raise ConfigError(
            f"cfg_stop={config.cfg_stop} is out of range for {total_steps} steps: expected an index in 1..{total_steps - 1} "
            "(the first step that runs without CFG), or None"
        )


def _step(config: PostDiffConfig, phases, phase_index: int, index: int, do_cfg: bool, facts: ModelFacts) -> Step:
    phase = phases[phase_index]
    before_stop = config.cfg_stop is None or index < config.cfg_stop
    events = []
    if phase_index > 0 and index == phase.first_step:
        events.append("switch")
    if do_cfg and config.cfg_stop == index:
        events.append("cfg_stop")
    if index in facts.denoiser_changes:
        events.append("denoiser_change")
    # The block cache restarts at a switch and where another denoiser takes over (its residual is the old one's).
    restart = max([phase.first_step] + [change for change in facts.denoiser_changes if change <= index])
    reuse_deep = config.deepcache and (index - restart) % config.cache_interval != 0
    ca_cached = config.cross_attention_cache and not before_stop
    return Step(
        index=index,
        phase=phase_index,
        latent_hw=phase.latent_hw,
        cfg=do_cfg and before_stop,
        deep="cached" if reuse_deep else "full",
        cross_attention="cached" if ca_cached else "computed",
        capture_cross_attention=config.cross_attention_cache and before_stop,
        events=tuple(events),
        latent_frames=phase.latent_frames,
    )
