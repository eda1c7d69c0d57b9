"""The engine: a PostDiff call runs the pipeline's OWN `__call__`, once per resolution segment of the plan.

1. A probe: the pipeline's call runs until it sets its timesteps (its input checks, prompt encoding: kept for
   the segments, which replay them by call order), then stops; the generator states are put back, so noise
   drawn before the schedule (FLUX) is drawn again by the first segment as in a plain call. The probe's
   timesteps and the model's facts give the plan.
2. Segments: each phase of the plan is one call of the pipeline's `__call__` at the phase's size, with a
   scheduler stand-in (`SegmentScheduler`) in `pipe.scheduler` that shows the pipeline only the phase's
   timesteps while the real scheduler keeps its full tables. Every phase but the last returns latents
   (`output_type="latent"`); at each switch the x0 of the phase's last step is upsampled (bilinear),
   re-noised to the next phase's first timestep by a fresh copy of the scheduler (set to begin there), and
   given to the next segment as `latents=`. The last segment decodes as the pipeline does.
3. Caches are hooks on the denoiser keyed by the global step index (RunState), entered by the stand-in's
   `step`; the CFG stop is a hook too (caching/cfg_stop.py), so nothing of the pipeline's loop is copied.

The user sees one call: one progress bar of the plan's steps, `callback_on_step_end` with global step
indices, an interrupt anywhere (a call stopped at low resolution is decoded at the requested size).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor, unwrap_module

from .caching.guidance import SeparatePassGate
from .caching.hooks import reclaim_forward
from .caching.state import PASS_NAMES, RunState
from .caching.tokens import resample_frames
from .compiling import check_recompile_limit
from .config import ConfigError, PostDiffConfig
from .plan import Phase, StepPlan, check_cache_branch, latent_size, low_frames
from .schedulers import check_scheduler

# Pipeline methods whose results a call computes once: the segments replay them by call order.
MEMOIZED = ("encode_prompt", "prepare_ip_adapter_image_embeds")
PROGRESS = "_postdiff_progress"  # the call's shared progress bar, on the pipeline while the engine runs


class _Probed(Exception):
    """Raised by the probe's `set_timesteps`: the schedule is known, the probe stops there."""


def phase_timesteps(timesteps: torch.Tensor, phase: Phase) -> torch.Tensor:
    """The timesteps a phase executes: a restarted scheduler with warm-up repeats (planned as extra steps
    of the phase: PNDM) evaluates its second timestep again."""
    tail = timesteps[phase.timestep_start : phase.timestep_end]
    repeats = phase.num_steps - len(tail)
    return torch.cat([tail[:2], tail[1:2].repeat(repeats - 1), tail[1:]]) if repeats > 0 else tail


def block_noise(fresh: torch.Tensor, low_noise: torch.Tensor) -> torch.Tensor:
    """i.i.d. N(0, 1) noise whose r x r block means are the low-resolution noise (divided by r, the std of a mean
    of r^2 unit normals); the fresh noise supplies the rest, with its own block means removed. A video's frame by
    frame (the plan keeps its frame count at a block-noise switch)."""
    if fresh.ndim == 5:
        return block_noise(fresh.flatten(1, 2), low_noise.flatten(1, 2)).view_as(fresh)
    factor = fresh.shape[-1] // low_noise.shape[-1]
    block_means = F.avg_pool2d(fresh, factor)
    return fresh + F.interpolate(low_noise / factor - block_means, scale_factor=factor, mode="nearest")


def resize(latents: torch.Tensor, latent_hw: tuple[int, int], frames: int | None = None) -> torch.Tensor:
    """Bilinear resize of (..., H, W) latents; a video's (B, C, F, H, W) frame by frame, and to `frames` latent frames
    where given (linear in time, the clip's first and last frames in place: `temporal_beta`)."""
    if frames is not None and latents.ndim == 5:
        latents = resample_frames(latents, frames, dim=2)
    if tuple(latents.shape[-2:]) == tuple(latent_hw):
        return latents
    if latents.ndim == 5:
        batch, channels, frames = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, *latents.shape[-2:])
        out = F.interpolate(flat, size=latent_hw, mode="bilinear", align_corners=False)
        return out.reshape(batch, frames, channels, *latent_hw).permute(0, 2, 1, 3, 4)
    return F.interpolate(latents, size=latent_hw, mode="bilinear", align_corners=False)


# -- the scheduler stand-in

@dataclass
class Segment:
    """What the stand-in shows the pipeline for one call of its `__call__`."""

    real: object  # the real scheduler of this segment (full tables)
    engine: "Engine"
    phase: Phase | None  # None: the probe
    begin: int | None = None  # the real scheduler's begin index for the segment (None: the pipeline's own)
    replay: tuple | None = None  # (args, kwargs) of `set_timesteps` to use instead of the pipeline's
    noise_sigma: float | None = None  # `init_noise_sigma` shown (1: the given latents are at their noise level)
    empty: bool = False  # a segment that only decodes (an interrupted call's end)
    identity: bool = False  # one step that passes the latents through (a decode for pipelines that need a step)
    offset: int = 0  # timesteps before the call's first, which the pipeline skips itself (img2img's strength)
    x0: torch.Tensor | None = None  # the x0 of the segment's last step
    low_noise: torch.Tensor | None = None  # the noise the last step's state holds (block switch noise)

    def set_timesteps(self, *args, **kwargs):
        if self.phase is None:
            self.engine.schedule_call = (args, kwargs)
        if self.replay is not None:
            args, kwargs = self.replay
        self.real.set_timesteps(*args, **kwargs)
        if self.begin is not None and hasattr(self.real, "set_begin_index"):
            self.real.set_begin_index(self.begin)
        if self.phase is None:
            raise _Probed

    @property
    def timesteps(self) -> torch.Tensor:
        timesteps = self.real.timesteps
        if self.phase is None or timesteps is None:
            return timesteps
        skipped, planned = timesteps[: self.offset], timesteps[self.offset :]
        shown = planned[:0] if self.empty else phase_timesteps(planned, self.phase)[: 1 if self.identity else None]
        return torch.cat([skipped, shown]) if self.offset else shown

    def set_begin_index(self, begin_index: int = 0):
        self.real.set_begin_index(begin_index + (self.phase.timestep_start if self.phase is not None else 0))

    def step(self, *args, **kwargs):
        if self.identity:
            sample = inspect.signature(self.real.step).bind(*args, **kwargs).arguments["sample"]
            return (sample, sample)
        output = self.real.step(*args, **kwargs)
        self.engine.after_step(self, inspect.signature(self.real.step).bind(*args, **kwargs).arguments, output)
        return output


class PassThrough:
    """The denoiser as an identity-decoding segment sees it: every attribute the denoiser's, its output zeros of
    the sample's shape (the segment's scheduler step ignores it)."""

    def __init__(self, denoiser):
        object.__setattr__(self, "_denoiser", denoiser)

    def __call__(self, *args, **kwargs):
        sample = args[0] if args else next(value for value in kwargs.values() if isinstance(value, torch.Tensor))
        return (torch.zeros_like(sample),)

    def __getattr__(self, name: str):
        return getattr(self._denoiser, name)


def _stand_in_getattribute(self, name: str):
    segment = object.__getattribute__(self, "_segment")
    if name == "_segment":
        return segment
    if name in ("set_timesteps", "step"):
        return _with_signature_of(getattr(segment.real, name), getattr(segment, name))
    if name == "timesteps" or (name == "set_begin_index" and hasattr(segment.real, name)):
        return getattr(segment, name)
    if name == "init_noise_sigma" and segment.noise_sigma is not None:
        return segment.noise_sigma
    return getattr(segment.real, name)


def _with_signature_of(real_method, method):
    """`method` under the real method's name and signature: pipelines inspect `step` and `set_timesteps`."""

    @functools.wraps(real_method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)

    return wrapper


def _stand_in_setattr(self, name: str, value) -> None:
    setattr(object.__getattribute__(self, "_segment").real, name, value)


@functools.cache
def _stand_in_class(cls: type) -> type:
    """A subclass of the real scheduler's class (so the pipeline's `isinstance` checks hold) whose every
    attribute is the real scheduler's, but for what `Segment` shows."""
    return type(cls.__name__, (cls,), {"__getattribute__": _stand_in_getattribute, "__setattr__": _stand_in_setattr,
                                       "__module__": cls.__module__})


def stand_in(segment: Segment):
    scheduler = object.__new__(_stand_in_class(type(segment.real)))
    object.__setattr__(scheduler, "_segment", segment)
    return scheduler


# -- one call

def _generators(generator) -> list:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, (list, tuple)) else [generator]


@contextlib.contextmanager
def _generator_states_kept(generator):
    """Whatever the block draws from the call's generators (or the global RNG) is drawn again after it."""
    generators = _generators(generator)
    states = [g.get_state() for g in generators]
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class Engine:
    """One PostDiff call of a pipeline through its own `__call__` (created per call: nothing survives it)."""

    pipe: object
    family: object  # the pipeline's adapter (families/base.py), made for this call's arguments
    config: PostDiffConfig
    state: RunState
    call: object  # the pipeline class's own `__call__`
    arguments: dict  # the call's arguments, bound to that signature with its defaults
    trajectory: list | None = None  # when a list: the x0 of every step is appended
    schedule_call: tuple | None = None  # (args, kwargs) of the pipeline's `set_timesteps`, seen by the probe
    memo: dict = field(default_factory=dict)  # method name -> results, in call order
    memo_calls: dict = field(default_factory=dict)  # method name -> calls so far in the current segment
    step_index: int = 0  # the global index of the step that runs next
    plan: StepPlan | None = None  # the call's plan, once made (the probe runs before)

    # -- before the segments
    def precheck(self) -> None:
        """What the config can refuse from the call's arguments alone, before the probe encodes anything: the
        model's sizes, and the plan of the schedule the step arguments give (the probe's is the one that runs)."""
        self.family.check_arguments()
        facts = self.family.facts(self.family.latent_hw)
        check_cache_branch(self.config, facts.max_cache_branch, facts.denoiser)
        for scale in (self.config.beta if self.config.mixed_resolution else 1.0, *(s for s, _ in self.config.progressive)):
            latent_size(scale, facts)
        low_frames(self.config, facts)
        timesteps = self.estimated_timesteps()
        if timesteps is not None and len(timesteps) > 0:  # none left: the pipeline's own checks say why
            self.family.check_plan(self.family.plan_for(self.config, timesteps, facts, self.scheduler))
        if self.config.mixed_resolution and self.arguments.get("latents") is not None:
            raise ConfigError("latents= cannot be given with mixed resolution (switch > 0): the low-resolution phase draws "
                              "noise of its own size; pass a generator instead, or switch=0")
        self.traits = check_scheduler(self.scheduler, self.config.mixed_resolution or self.trajectory is not None)

    def estimated_timesteps(self) -> torch.Tensor | None:
        """The timesteps the call's `num_inference_steps` / `timesteps` / `sigmas` give on a copy of the scheduler
        (diffusers' `retrieve_timesteps`, as the pipelines call it), cut as the adapter plans them; None where the
        pipeline's schedule takes more than these (the probe then finds it)."""
        a = self.arguments
        scheduler = copy.deepcopy(self.scheduler)
        extra = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting", False) else {}  # mu moves no count
        try:
            retrieve_timesteps(scheduler, a.get("num_inference_steps"), "cpu", a.get("timesteps"), a.get("sigmas"), **extra)
        except (TypeError, ValueError):
            return None
        with self.scheduler_installed(Segment(scheduler, self, None)):
            return self.family.planned_timesteps(scheduler.timesteps)

    @contextlib.contextmanager
    def scheduler_installed(self, segment: Segment):
        self.pipe.__dict__["scheduler"] = stand_in(segment)
        try:
            yield
        finally:
            self.pipe.__dict__["scheduler"] = self.scheduler

    def probe(self) -> torch.Tensor:
        """The call's timesteps, from the pipeline's own call stopped at its `set_timesteps`."""
        segment = Segment(self.scheduler, self, None)
        with _generator_states_kept(self.arguments.get("generator")), contextlib.suppress(_Probed):
            self.run_call(segment, dict(self.arguments))
            raise ConfigError(f"{type(self.pipe).__name__}.__call__ never called scheduler.set_timesteps: postdiff cannot "
                              "plan it")
        return self.scheduler.timesteps

    def prepare(self) -> StepPlan:
        """Everything that can refuse the call, then the plan (the probe has run the pipeline's own checks)."""
        self.precheck()
        timesteps = self.probe()
        self.family.encodings = self.memo  # what the probe encoded: facts and checks that depend on the prompt read it
        timesteps = self.family.planned_timesteps(timesteps)
        facts = self.family.facts(self.family.latent_hw)
        plan = self.family.plan_for(self.config, timesteps, facts, self.scheduler, do_cfg=self.family.do_cfg)
        self.family.check_plan(plan)
        check_recompile_limit(self.denoiser, plan, self.family.cfg_passes)
        return plan

    # -- the call
    def __call__(self):
        with self.call_scope():
            self.plan = plan = self.prepare()
            family = self.family
            family.planned_steps = len(plan)
            self.state.begin(family.num_images, float(family.guidance_scale), cfg_call=family.do_cfg,
                             cfg_passes=family.cfg_passes)
            with self.pipe.progress_bar(total=len(plan)) as progress:
                self.pipe.__dict__[PROGRESS] = progress
                return self.run_segments(plan)

    @contextlib.contextmanager
    def call_scope(self):
        """Memoized encodings, and the real scheduler put back however the call ends."""
        pipe = self.pipe
        self.scheduler = pipe.__dict__["scheduler"]
        for name in MEMOIZED:
            if hasattr(pipe, name):
                pipe.__dict__[name] = self._memoized(name, getattr(pipe, name))
        self.denoiser = getattr(pipe, self.family.denoiser_attribute)
        gated = self._gate_separate_passes() if self.family.cfg_passes == 2 else {}
        try:
            yield
        finally:
            for name in (*MEMOIZED, PROGRESS):
                pipe.__dict__.pop(name, None)
            for attribute, denoiser in gated.items():
                unwrap_module(denoiser).__dict__.pop("cache_context", None)
                pipe.__dict__[attribute] = denoiser
            pipe.__dict__["scheduler"] = self.scheduler
            self.state.reset()

    def _gate_separate_passes(self) -> dict:
        """Every denoiser of the pipeline (Wan 2.2's two experts) with its passes named and its unconditional pass
        after the CFG stop answered by the gate; returns attribute -> the denoiser it held."""
        gated = {}
        for attribute in self.family.denoiser_attributes(self.pipe):
            denoiser = getattr(self.pipe, attribute, None)
            module = unwrap_module(denoiser) if denoiser is not None else None
            named = self.family.passes_in_cache_context
            if module is None or (named and not hasattr(module, "cache_context")):
                continue
            if named:
                module.__dict__["cache_context"] = self._named_pass(type(module).cache_context.__get__(module))
            self.pipe.__dict__[attribute] = SeparatePassGate(denoiser, self.state, by_order=not named)
            gated[attribute] = denoiser
        return gated

    def _named_pass(self, cache_context):
        """diffusers' `cache_context(name, **where)`, which pipelines with separate CFG passes enter around each pass
        ("cond" / "uncond"; HunyuanVideo-1.5's guider: "pred_cond" / "pred_uncond"), also naming the pass for
        PostDiff's caches (outside any compiled region)."""
        state = self.state

        @contextlib.contextmanager
        def named(name: str, **where):
            state.pass_name = PASS_NAMES[1] if name.endswith("uncond") else PASS_NAMES[0]
            try:
                with cache_context(name, **where):
                    yield
            finally:
                state.pass_name = PASS_NAMES[0]

        return named

    def _memoized(self, name: str, method):
        results = self.memo.setdefault(name, [])

        @functools.wraps(method)
        def memoized(*args, **kwargs):
            index = self.memo_calls[name]
            self.memo_calls[name] += 1
            if index == len(results):
                results.append(method(*args, **kwargs))
            return results[index]

        return memoized

    def run_call(self, segment: Segment, arguments: dict, methods: dict | None = None):
        """One call of the pipeline's own `__call__` with `segment`'s stand-in as its scheduler and the adapter's
        `methods` in place of the pipeline's own for this call (how latents enter where no `latents=` does)."""
        pipe = self.pipe
        pipe.__dict__["scheduler"] = stand_in(segment)
        self.memo_calls = dict.fromkeys(MEMOIZED, 0)
        methods = dict(methods or {})
        if self.plan is not None and segment.phase is not self.plan.phases[-1]:  # offload hooks are freed once, at the end
            methods["maybe_free_model_hooks"] = lambda: None
        pipe.__dict__.update(methods)
        try:
            return self.call(pipe, **flattened(arguments))
        finally:
            for name in methods:
                pipe.__dict__.pop(name, None)
            for model in self.family.cached_models(pipe):
                reclaim_forward(unwrap_module(model))

    def run_segments(self, plan: StepPlan):
        pristine = copy.deepcopy(self.scheduler) if len(plan.phases) > 1 else None
        latents, previous = None, None
        for index, phase in enumerate(plan.phases):
            last = index == len(plan.phases) - 1
            real = self.phase_scheduler(index, pristine)
            if previous is not None:
                latents = self.switch(previous, phase, real)
            previous = self.segment(index, phase, real, last)
            self.step_index = phase.first_step
            self.enter_step()
            methods = self.family.segment_methods(phase, index == 0, latents)
            output = self.run_call(previous, self.segment_arguments(phase, last, latents), methods)
            if last:
                return output
            if self.interrupted():
                return self.decode_interrupted(output, phase, pristine)
        raise AssertionError("a plan has at least one phase")

    def segment_arguments(self, phase: Phase, last: bool, latents) -> dict:
        guided = self.plan.steps[phase.first_step].cfg
        arguments = self.family.segment_arguments(self.arguments, phase, last, latents, guided)
        arguments.update(self.callbacks(phase))
        return arguments

    def phase_scheduler(self, index: int, pristine):
        """Phase 0 steps on the pipeline's scheduler (as a plain call), the others on fresh copies; a lower-resolution
        phase with `low_res_shift="own"` on a scheduler of its own schedule (the adapter's)."""
        lower = index < len(self.plan.phases) - 1
        if lower and self.config.low_res_shift == "own":
            own = self.family.own_scheduler(self.scheduler, self.plan.phases[index])
            if own is None:
                raise ConfigError(f"low_res_shift='own' needs a sigma schedule that depends on the image size (a "
                                  f"flow-matching scheduler with a time shift); {type(self.pipe).__name__} with "
                                  f"{type(self.scheduler).__name__} has none: use low_res_shift='full'")
            return own
        return self.scheduler if index == 0 else copy.deepcopy(pristine)

    def segment(self, index: int, phase: Phase, real, last: bool) -> Segment:
        """Later segments begin at their first timestep, from latents already at their noise level; a lower
        segment with `low_res_shift="full"` replays the requested size's `set_timesteps` arguments."""
        replay = self.schedule_call if not last and self.config.low_res_shift == "full" else None
        later, offset = index > 0, self.family.begin_offset
        return Segment(real, self, phase, begin=offset + phase.timestep_start if later else None, replay=replay,
                       noise_sigma=1.0 if later else None, offset=offset)

    def interrupted(self) -> bool:
        return bool(getattr(self.pipe, "_interrupt", False))

    def decode_interrupted(self, output, phase: Phase, pristine):
        """A call interrupted at low resolution: its latents upsampled to the requested size and decoded by a
        segment of no steps; where the pipeline decodes a variable of its loop (LCM's `denoised`), a segment of
        one step in which the denoiser and the scheduler's step pass the latents through."""
        final = self.plan.phases[-1]
        latents = resize(self.family.spatial_latents(output[0], phase.latent_hw), final.latent_hw, final.latent_frames)
        offset, identity = self.family.begin_offset, self.family.decodes_from_loop
        segment = Segment(copy.deepcopy(pristine), self, final, begin=offset + final.timestep_start, noise_sigma=1.0,
                          empty=not identity, identity=identity, offset=offset)
        latents = self.family.pipeline_latents(latents)
        arguments = self.family.segment_arguments(self.arguments, final, True, latents, False)
        arguments["callback_on_step_end"] = None
        attribute = self.family.denoiser_attribute
        self.pipe.__dict__[attribute], denoiser = PassThrough(self.denoiser), self.pipe.__dict__[attribute]
        self.pipe.__dict__[PROGRESS] = types.SimpleNamespace(update=lambda *args: None)  # its step is none of the plan's
        try:
            result = self.run_call(segment, arguments, self.family.segment_methods(final, False, latents))
        finally:
            self.pipe.__dict__[attribute] = denoiser
        self.pipe._interrupt = True  # as a plain interrupted call leaves it
        return result

    # -- between steps and segments
    def after_step(self, segment: Segment, arguments: dict, output) -> None:
        """After the scheduler's step of global step `step_index`: the x0 where a switch or a trace needs it, then
        the next step entered."""
        if segment.phase is None:
            return
        step = self.plan.steps[self.step_index]
        last_of_phase = step.index == segment.phase.first_step + segment.phase.num_steps - 1
        lower = segment.phase is not self.plan.phases[-1]
        if (last_of_phase and lower) or self.trajectory is not None:
            sample, model_output, t = arguments["sample"], arguments["model_output"], arguments["timestep"]
            x0 = self.traits.x0(segment.real, sample, model_output, t, output).to(sample.dtype)
            if self.trajectory is not None:
                self.trajectory.append(self.family.spatial_latents(x0, segment.phase.latent_hw))
            if last_of_phase and lower:
                segment.x0 = x0
                if self.config.switch_noise == "block":
                    segment.low_noise = self.traits.implied_noise(segment.real, sample, x0, t)
        self.step_index += 1
        self.enter_step()

    def enter_step(self) -> None:
        if self.step_index >= len(self.plan.steps):
            return
        step = self.plan.steps[self.step_index]
        self.state.enter(step)
        self.family.enter_step(step)
        if not step.cfg and getattr(self.pipe, "_guidance_rescale", 0.0):
            self.pipe._guidance_rescale = 0.0  # after the stop the conditional output is not rescaled, as without CFG

    def switch(self, low: Segment, phase: Phase, scheduler) -> torch.Tensor:
        """The low-resolution x0 upsampled to `phase`'s size and diffused forward to its first timestep, with fresh
        noise from the call's generator (block noise: around the low-resolution state's own), by the scheduler's
        own forward process; in the pipeline's latent layout."""
        x0 = resize(self.family.spatial_latents(low.x0, low.phase.latent_hw), phase.latent_hw, phase.latent_frames)
        noise = randn_tensor(x0.shape, generator=self.arguments.get("generator"), device=x0.device, dtype=x0.dtype)
        if self.config.switch_noise == "block":
            noise = block_noise(noise, self.family.spatial_latents(low.low_noise, low.phase.latent_hw))
        self.family.switch_noise = noise
        begin = self.family.begin_offset + phase.timestep_start  # an index into the scheduler's own timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        t = scheduler.timesteps[begin : begin + 1]
        renoised = self.traits.forward_diffuse(scheduler, x0, noise, t)
        return self.family.pipeline_latents(renoised.to(x0.dtype))

    def callbacks(self, phase: Phase) -> dict:
        """The call's `callback_on_step_end` seen with global step indices and the call's step count."""
        arguments = self.arguments
        callback = arguments.get("callback_on_step_end")
        if callback is None:
            return {}
        tensor_inputs = getattr(callback, "tensor_inputs", None) or arguments.get("callback_on_step_end_tensor_inputs")
        total = len(self.plan.steps)

        def global_callback(pipe, index, t, tensors):
            pipe._num_timesteps = total
            return callback(pipe, phase.first_step + index, t, tensors)

        return {"callback_on_step_end": global_callback, "callback_on_step_end_tensor_inputs": tensor_inputs}


def flattened(arguments: dict) -> dict:
    """Bound arguments as keywords again: a `**kwargs` parameter's entries become keywords of their own."""
    flat = {name: value for name, value in arguments.items() if name != "kwargs"}
    flat.update(arguments.get("kwargs") or {})
    return flat


def shared_progress_bar(pipe, iterable=None, total=None):
    """`progress_bar` of a pipeline under PostDiff: inside an engine call, the call's one bar."""
    shared = pipe.__dict__.get(PROGRESS)
    if shared is None:
        return super(type(pipe), pipe).progress_bar(iterable=iterable, total=total)
    if iterable is not None:
        return _counted(iterable, shared)
    return contextlib.nullcontext(shared)


def _counted(iterable, bar):
    for item in iterable:
        yield item
        bar.update()
