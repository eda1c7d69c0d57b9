"""The one denoising loop: it executes a StepPlan on any supported family, for every config ("off" too).

Mixed resolution is img2img in disguise: at the end of a low-resolution phase the x0 prediction of its
last step (the scheduler's own where it gives one, else computed from the pre-step noise level: see
schedulers.py) is upsampled bilinearly, re-noised to the next timestep with the scheduler's own
`add_noise`, and denoising continues from that index with a fresh copy of the scheduler (multistep
history of the old shape is dropped, as img2img starts afresh). With `low_res_shift="own"` (rectified
flow) a lower-resolution phase steps along the schedule of its own size on a scheduler of its own, and the
next phase re-enters at the call's schedule as always.

Interrupting (`pipe._interrupt`, set from `callback_on_step_end`) stops the loop as the pipeline's does
and decodes what there is; a call stopped in a low-resolution phase has its latents upsampled to the
requested size first, so the output always has the size asked for.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .caching.state import RunState
from .compiling import check_recompile_limit
from .config import ConfigError, PostDiffConfig
from .families.base import Family
from .plan import Phase, StepPlan, make_plan
from .schedulers import check_scheduler

def phase_timesteps(timesteps: torch.Tensor, phase: Phase) -> torch.Tensor:
    """The timesteps a phase executes: a restarted scheduler with warm-up repeats (planned as extra steps
    of the phase: PNDM) evaluates its second timestep again."""
    tail = timesteps[phase.timestep_start : phase.timestep_end]
    repeats = phase.num_steps - len(tail)
    return torch.cat([tail[:2], tail[1:2].repeat(repeats - 1), tail[1:]]) if repeats > 0 else tail


def block_noise(fresh: torch.Tensor, low_noise: torch.Tensor) -> torch.Tensor:
    """i.i.d. N(0, 1) noise whose r x r block means are the low-resolution noise (divided by r, the std of a mean
    of r^2 unit normals); the fresh noise supplies the rest, with its own block means removed."""
    factor = fresh.shape[-1] // low_noise.shape[-1]
    block_means = F.avg_pool2d(fresh, factor)
    return fresh + F.interpolate(low_noise / factor - block_means, scale_factor=factor, mode="nearest")


def resize(latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(latents.shape[-2:]) == tuple(latent_hw):
        return latents
    return F.interpolate(latents, size=latent_hw, mode="bilinear", align_corners=False)


class Sampler:
    """Executes one pipeline call: validation and plan first, then the loop, then decoding."""

    def __init__(self, family: Family, config: PostDiffConfig, state: RunState, trajectory: list | None = None):
        self.family = family
        family.state = state
        self.pipe = family.pipe
        self.config = config
        self.state = state
        self.trajectory = trajectory  # when a list: the x0 prediction of every step is appended to it
        self.low_noise = None  # block switch noise: the noise the last low-resolution state holds

    def prepare(self) -> StepPlan:
        """Everything that can refuse the call, before any model runs."""
        self.family.check()
        # x0 is needed at a switch, and on every step when traced.
        self.traits = check_scheduler(self.pipe.scheduler, self.config.mixed_resolution or self.trajectory is not None)
        self.timesteps = self.family.timesteps()
        facts = self.family.facts(self.family.latent_hw)
        plan = make_plan(self.config, len(self.timesteps), facts, do_cfg=self.family.do_cfg)
        self.family.check_plan(plan)
        self.schedules = self.phase_schedules(plan)
        check_recompile_limit(getattr(self.pipe, self.family.denoiser_attribute), plan, self.family.cfg_passes)
        return plan

    def phase_schedules(self, plan: StepPlan) -> list[tuple[object, torch.Tensor]]:
        """A (scheduler, timesteps) per phase: the call's own, or with `low_res_shift="own"` a fresh scheduler on
        the schedule of each lower-resolution phase's size (refused, before any compute, where the family's
        schedule does not depend on the size)."""
        shared = [(None, self.timesteps)] * len(plan.phases)
        if self.config.low_res_shift != "own" or len(plan.phases) == 1:
            return shared
        schedules = []
        for phase in plan.phases[:-1]:
            own = self.family.own_schedule(phase.latent_hw)
            if own is None:
                raise ConfigError(f"low_res_shift='own' needs a sigma schedule that depends on the image size (a "
                                  f"flow-matching scheduler with a time shift); {type(self.pipe).__name__} with "
                                  f"{type(self.pipe.scheduler).__name__} has none: use low_res_shift='full'")
            schedules.append(own)
        return schedules + shared[-1:]

    def __call__(self):
        plan = self.prepare()
        family, state = self.family, self.state
        family.encode()
        state.begin(family.num_images, float(family.guidance_scale))
        try:
            latents = family.initial_latents(plan.phases[0].latent_hw)
            self.extra_step_kwargs = family.extra_step_kwargs()
            with self.pipe.progress_bar(total=len(plan)) as progress:
                latents = self.run_phases(plan, latents, progress)
            # An interrupted call may have stopped at low resolution: decode at the size asked for.
            return family.decode(resize(family.final_sample(latents), plan.phases[-1].latent_hw))
        finally:
            state.reset()

    def renoise(self, scheduler, x0: torch.Tensor, phase: Phase, timesteps: torch.Tensor) -> torch.Tensor:
        """Upsample x0 to the phase's size and diffuse it forward to the phase's first timestep, with fresh noise
        from the call's generator (block noise: around the low-resolution state's own), by the scheduler's own
        forward process."""
        upsampled = resize(x0, phase.latent_hw)
        generator = self.family.args["generator"]
        noise = randn_tensor(upsampled.shape, generator=generator, device=upsampled.device, dtype=upsampled.dtype)
        if self.config.switch_noise == "block":
            noise = block_noise(noise, self.low_noise)
        if hasattr(scheduler, "set_begin_index"):  # an index into the scheduler's own timesteps
            scheduler.set_begin_index(self.family.begin_offset + phase.timestep_start)
        t = timesteps[phase.timestep_start : phase.timestep_start + 1]
        self.family.begin_phase(phase.latent_hw, noise)
        return self.traits.forward_diffuse(scheduler, upsampled, noise, t)

    def interrupted(self) -> bool:
        return bool(getattr(self.pipe, "_interrupt", False))

    def run_phases(self, plan: StepPlan, latents: torch.Tensor, progress) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        pristine = copy.deepcopy(scheduler) if len(plan.phases) > 1 else None
        x0 = None
        for phase_index, phase in enumerate(plan.phases):
            own_scheduler, schedule = self.schedules[phase_index]
            if own_scheduler is not None:
                scheduler = own_scheduler
            elif phase_index > 0:
                scheduler = copy.deepcopy(pristine)
            if phase_index > 0:
                latents = self.renoise(scheduler, x0, phase, schedule)
            steps = plan.steps[phase.first_step : phase.first_step + phase.num_steps]
            last_phase = phase_index == len(plan.phases) - 1
            timesteps = phase_timesteps(schedule, phase)
            following = [*timesteps[1:], None if last_phase else self.next_phase_timestep(plan, phase_index)]
            for step, t, next_t in zip(steps, timesteps, following):
                if self.interrupted():
                    return latents
                keep_x0 = not last_phase and step is steps[-1]
                latents, x0 = self.run_step(scheduler, step, t, latents, phase.scale, keep_x0, next_t)
                progress.update()
        return latents

    def next_phase_timestep(self, plan: StepPlan, phase_index: int):
        _, schedule = self.schedules[phase_index + 1]
        return schedule[plan.phases[phase_index + 1].timestep_start]

    def run_step(self, scheduler, step, t, latents, scale: float, keep_x0: bool, next_t=None):
        state, family = self.state, self.family
        state.enter(step)
        noise_pred = family.predict(scheduler, latents, t, step.cfg, scale)
        state.step = None
        output = scheduler.step(noise_pred, t, latents, **self.extra_step_kwargs, return_dict=False)
        # Consistency models decode (and switch with) the scheduler's `denoised`.
        family.denoised = output[1] if self.traits is not None and self.traits.x0_source == "denoised" else None
        x0 = None
        if keep_x0 or self.trajectory is not None:
            x0 = self.traits.x0(scheduler, latents, noise_pred, t, output)
        if keep_x0 and self.config.switch_noise == "block":
            self.low_noise = self.traits.implied_noise(scheduler, latents, x0, t)
        if self.trajectory is not None:
            self.trajectory.append(x0)
        latents = family.after_step(scheduler, family.step_latents(output), next_t)
        latents = self.step_callback(step.index, t, latents)
        return latents, x0

    def step_callback(self, index: int, t, latents: torch.Tensor) -> torch.Tensor:
        a = self.family.args
        callback = a.get("callback_on_step_end")
        if callback is None:
            return latents
        available = self.family.callback_tensors(latents)
        outputs = callback(self.pipe, index, t, {k: available[k] for k in a["callback_on_step_end_tensor_inputs"]})
        self.family.take_callback_outputs(outputs)
        return self.family.callback_latents(outputs, latents)
