"""The one denoising loop: it executes a StepPlan on any supported family, for every config ("off" too).

Mixed resolution is img2img in disguise: at the end of a low-resolution phase the x0 prediction of its
last step is computed from the model output and the prediction type, upsampled bilinearly, re-noised to
the next timestep with the scheduler's own `add_noise`, and denoising continues from that index with a
fresh copy of the scheduler (multistep history of the old shape is dropped, as img2img starts afresh).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from .caching.state import RunState
from .config import ConfigError, PostDiffConfig
from .families.base import Family
from .plan import Phase, StepPlan, make_plan

# Schedulers whose switch (x0 -> re-noise -> restart) is supported, and which of them keep samples in
# sigma space (x = x0 + sigma * eps) rather than DDPM space (x = sqrt(a) x0 + sqrt(1 - a) eps).
SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
DDPM_SPACE = ("DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler", "LCMScheduler")
SWITCH_SCHEDULERS = SIGMA_SPACE + DDPM_SPACE


def check_scheduler(scheduler, config: PostDiffConfig) -> None:
    name = type(scheduler).__name__
    if config.mixed_resolution and name not in SWITCH_SCHEDULERS:
        raise ConfigError(
            f"scheduler {name} is not supported with mixed resolution (switch={config.switch}); "
            f"supported: {', '.join(SWITCH_SCHEDULERS)}"
        )
    if config.mixed_resolution and name == "PNDMScheduler" and not scheduler.config.skip_prk_steps:
        raise ConfigError("PNDMScheduler with skip_prk_steps=False is not supported with mixed resolution; use skip_prk_steps=True (SD's default)")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ConfigError(f"prediction_type={scheduler.config.prediction_type!r} is not supported: epsilon, v_prediction, sample")


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from the model output and the prediction type, in the scheduler's sample space."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    sample32, output32 = sample.float(), model_output.float()
    if type(scheduler).__name__ in SIGMA_SPACE:
        sigma = scheduler.sigmas[scheduler.step_index].to(sample.device, torch.float32)
        if kind == "epsilon":
            x0 = sample32 - sigma * output32
        else:
            x0 = output32 * (-sigma / (sigma**2 + 1) ** 0.5) + sample32 / (sigma**2 + 1)
    else:
        alpha = scheduler.alphas_cumprod[int(t)].to(sample.device, torch.float32)
        if kind == "epsilon":
            x0 = (sample32 - (1 - alpha) ** 0.5 * output32) / alpha**0.5
        else:
            x0 = alpha**0.5 * sample32 - (1 - alpha) ** 0.5 * output32
    return x0.to(sample.dtype)


def phase_timesteps(timesteps: torch.Tensor, phase: Phase, restarted: bool) -> torch.Tensor:
    """The timesteps a phase executes; a restarted PNDM-like scheduler repeats the second one (its warm-up)."""
    tail = timesteps[phase.timestep_start : phase.timestep_end]
    if restarted and phase.num_steps > len(tail):
        tail = torch.cat([tail[:2], tail[1:]])
    return tail


def renoise(scheduler, x0: torch.Tensor, phase: Phase, timesteps: torch.Tensor, generator) -> torch.Tensor:
    """Upsample x0 to the phase's size and diffuse it forward to the phase's first timestep."""
    upsampled = F.interpolate(x0, size=phase.latent_hw, mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=generator, device=upsampled.device, dtype=upsampled.dtype)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(phase.timestep_start)
    return scheduler.add_noise(upsampled, noise, timesteps[phase.timestep_start : phase.timestep_start + 1])


class Sampler:
    """Executes one pipeline call: validation and plan first, then the loop, then decoding."""

    def __init__(self, family: Family, config: PostDiffConfig, state: RunState, trajectory: list | None = None):
        self.family = family
        self.pipe = family.pipe
        self.config = config
        self.state = state
        self.trajectory = trajectory  # when a list: the x0 prediction of every step is appended to it

    def prepare(self) -> StepPlan:
        """Everything that can refuse the call, before any model runs."""
        self.family.check()
        check_scheduler(self.pipe.scheduler, self.config)
        self.timesteps = self.family.timesteps()
        facts = self.family.facts(self.family.latent_hw)
        return make_plan(self.config, len(self.timesteps), facts, do_cfg=self.family.do_cfg)

    def __call__(self):
        plan = self.prepare()
        family, state = self.family, self.state
        family.encode()
        state.begin(family.num_images, float(self.family.args["guidance_scale"]))
        try:
            latents = family.initial_latents(plan.phases[0].latent_hw)
            self.extra_step_kwargs = self.pipe.prepare_extra_step_kwargs(family.args["generator"], family.eta)
            with self.pipe.progress_bar(total=len(plan)) as progress:
                latents = self.run_phases(plan, latents, progress)
            return family.decode(family.final_sample(latents))
        finally:
            state.reset()

    def run_phases(self, plan: StepPlan, latents: torch.Tensor, progress) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        pristine = copy.deepcopy(scheduler) if len(plan.phases) > 1 else None
        x0 = None
        for phase_index, phase in enumerate(plan.phases):
            if phase_index > 0:
                scheduler = copy.deepcopy(pristine)
                latents = renoise(scheduler, x0, phase, self.timesteps, self.family.args["generator"])
            steps = plan.steps[phase.first_step : phase.first_step + phase.num_steps]
            timesteps = phase_timesteps(self.timesteps, phase, restarted=phase_index > 0)
            last_phase = phase_index == len(plan.phases) - 1
            for step, t in zip(steps, timesteps):
                keep_x0 = not last_phase and step is steps[-1]
                latents, x0 = self.run_step(scheduler, step, t, latents, phase.scale, keep_x0)
                progress.update()
        return latents

    def run_step(self, scheduler, step, t, latents, scale: float, keep_x0: bool):
        state, family, pipe = self.state, self.family, self.pipe
        if getattr(pipe, "_interrupt", False):
            return latents, None
        state.enter(step)
        model_input = torch.cat([latents] * 2) if step.cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = family.denoise(model_input, t, step.cfg, scale)
        state.step = None
        if step.cfg:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + family.guidance_scale * (noise_text - noise_uncond)
            if family.guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=family.guidance_rescale)
        sample = latents
        output = scheduler.step(noise_pred, t, latents, **self.extra_step_kwargs, return_dict=False)
        latents = family.step_latents(output)
        # Consistency models: x0 is the scheduler's `denoised`, not a function of the model output alone.
        family.denoised = output[1] if type(scheduler).__name__ == "LCMScheduler" else None
        x0 = None
        if keep_x0 or self.trajectory is not None:
            x0 = family.denoised if family.denoised is not None else predict_x0(scheduler, sample, noise_pred, t)
        if self.trajectory is not None:
            self.trajectory.append(x0)
        latents = self.step_callback(step.index, t, latents)
        return latents, x0

    def step_callback(self, index: int, t, latents: torch.Tensor) -> torch.Tensor:
        a = self.family.args
        callback = a.get("callback_on_step_end")
        if callback is None:
            return latents
        available = self.family.callback_tensors(latents)
        outputs = callback(self.pipe, index, t, {k: available[k] for k in a["callback_on_step_end_tensor_inputs"]})
        return outputs.pop("latents", latents)
