"""What the loop must know about a scheduler, in one table: its sample space, where its x0 comes from, and
what a restarted copy repeats. Matched with `isinstance`, so a subclass of a supported scheduler works.

x0 at the switch. Where `scheduler.step(..., return_dict=False)` returns an x0 as its second entry (DDIM, DDPM,
Euler, Euler ancestral, LMS: `pred_original_sample`; LCM: `denoised`), that is the x0. Otherwise it is
computed from the model output, the prediction type and the noise level of the state the step started
from: x_t = alpha * x0 + sigma * eps. That level is read from the scheduler's own tables at the step's
index (`step_index - 1` after the step has advanced it, so Karras or other custom sigmas are the ones the
step used), or from `alphas_cumprod[t]` for schedulers without a sigma table (PNDM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from .config import ConfigError

SampleSpace = Literal["ddpm", "sigma", "flow"]
X0Source = Literal["pred_original_sample", "denoised", "computed"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SchedulerTraits:
    """sample space: "ddpm" x = sqrt(a) x0 + sqrt(1 - a) eps (sigma tables as sqrt((1 - a) / a)); "sigma"
    x = x0 + sigma eps (Euler-type, inputs scaled by the scheduler); "flow" x = (1 - sigma) x0 + sigma eps.
    x0 source: the step's second output, or "computed" from the pre-step noise level.
    restart_repeats: extra model evaluations a restarted copy runs (PNDM re-does its PLMS warm-up by
    evaluating its second timestep twice)."""

    scheduler_class: type
    space: SampleSpace
    x0_source: X0Source
    restart_repeats: int = 0

    def x0(self, scheduler, sample: torch.Tensor, model_output: torch.Tensor, t, step_output) -> torch.Tensor:
        """The x0 of a step that has just run on `sample` with `model_output` (after CFG)."""
        if self.x0_source != "computed":
            return step_output[1]
        alpha, sigma = self._noise_level(scheduler, t)
        return x0_from_output(sample, model_output, alpha, sigma, prediction_type(scheduler))

    def implied_noise(self, scheduler, sample: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """The noise a step's state holds given its x0: (x_t - alpha x0) / sigma at the pre-step level."""
        alpha, sigma = self._noise_level(scheduler, t)
        return ((sample.float() - alpha * x0.float()) / sigma).to(sample.dtype)

    def forward_diffuse(self, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 diffused to timestep `t` (a 1-element tensor) by the scheduler's own forward process; flow-matching
        schedulers at their `begin_index`: (1 - sigma) x0 + sigma noise."""
        if self.space == "flow":
            return scheduler.scale_noise(x0, t, noise)
        return scheduler.add_noise(x0, noise, t)

    def _noise_level(self, scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) of the state the last step started from."""
        if self.space in ("flow", "sigma"):  # flow: x = (1 - s) x0 + s eps; sigma space: x = x0 + s eps
            sigma = scheduler.sigmas[scheduler.step_index - 1]
            return (1 - sigma if self.space == "flow" else torch.ones_like(sigma)), sigma
        if hasattr(scheduler, "_sigma_to_alpha_sigma_t"):  # DPM-Solver, UniPC: their own sigma table
            return scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
        alpha_cumprod = scheduler.alphas_cumprod[int(t)]
        return alpha_cumprod**0.5, (1 - alpha_cumprod) ** 0.5


# Most specific first: the first entry whose class `scheduler` is an instance of applies.
TRAITS = (
    SchedulerTraits(DDIMScheduler, "ddpm", "pred_original_sample"),
    SchedulerTraits(DDPMScheduler, "ddpm", "pred_original_sample"),
    SchedulerTraits(EulerAncestralDiscreteScheduler, "sigma", "pred_original_sample"),
    SchedulerTraits(EulerDiscreteScheduler, "sigma", "pred_original_sample"),
    SchedulerTraits(LMSDiscreteScheduler, "sigma", "pred_original_sample"),
    SchedulerTraits(DPMSolverMultistepScheduler, "ddpm", "computed"),
    SchedulerTraits(UniPCMultistepScheduler, "ddpm", "computed"),
    SchedulerTraits(DEISMultistepScheduler, "ddpm", "computed"),
    SchedulerTraits(TCDScheduler, "ddpm", "computed"),  # its second output is the noised sample at s, no x0
    SchedulerTraits(PNDMScheduler, "ddpm", "computed", restart_repeats=1),
    SchedulerTraits(LCMScheduler, "ddpm", "denoised"),
    SchedulerTraits(FlowMatchEulerDiscreteScheduler, "flow", "computed"),
)
SUPPORTED = tuple(traits.scheduler_class.__name__ for traits in TRAITS)

# Schedulers that cannot switch resolution, and why (caching alone works with them).
SECOND_ORDER = ("a second-order scheduler: each step is two model evaluations over two timesteps with the state "
                "of the first kept for the second, so a segment boundary would cut a step in two")
REFUSED = (
    (HeunDiscreteScheduler, SECOND_ORDER),
    (KDPM2AncestralDiscreteScheduler, SECOND_ORDER),
    (KDPM2DiscreteScheduler, SECOND_ORDER),
    (DPMSolverSDEScheduler, SECOND_ORDER + ", and its Brownian-tree noise is drawn over the whole schedule's "
                            "sigma range at the first step"),
)


def traits_of(scheduler) -> SchedulerTraits | None:
    return next((traits for traits in TRAITS if isinstance(scheduler, traits.scheduler_class)), None)


def restart_repeats(scheduler_name: str) -> int:
    """Restart repeats of a scheduler named in a saved config (models planned without loading them); PNDM
    (PLMS) also has one more timestep than inference steps, the repeat of its first warm-up."""
    traits = next((traits for traits in TRAITS if traits.scheduler_class.__name__ == scheduler_name), None)
    return traits.restart_repeats if traits is not None else 0


def prediction_type(scheduler) -> str:
    """The model's prediction type; flow-matching schedulers have none in their config: velocity, as multistep
    solvers on flow sigmas name it ("flow_prediction": Wan's UniPC, SANA's DPM-Solver)."""
    if traits_of(scheduler) is not None and traits_of(scheduler).space == "flow":
        return "flow"
    if scheduler.config.get("prediction_type") == "flow_prediction":
        return "flow"
    return scheduler.config.prediction_type


def x0_from_output(sample: torch.Tensor, output: torch.Tensor, alpha, sigma, kind: str) -> torch.Tensor:
    """x0 from x_t = alpha x0 + sigma eps and the model output (computed in float32, returned in the sample's dtype)."""
    if kind == "sample":
        return output
    x, out = sample.float(), output.float()
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if kind == "epsilon":
        x0 = (x - sigma * out) / alpha
    elif kind == "v_prediction":  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
        x0 = alpha * x - sigma * out
    else:  # "flow": v = eps - x0
        x0 = x - sigma * out
    return x0.to(sample.dtype)


def check_scheduler(scheduler, needs_x0: bool) -> SchedulerTraits | None:
    """Refuses, before any compute, a scheduler whose x0 and restart postdiff does not know when the call
    needs them (mixed resolution, x0 tracing); returns its traits (None for others: caching works with any)."""
    traits = traits_of(scheduler)
    name = type(scheduler).__name__
    refused = next((why for cls, why in REFUSED if isinstance(scheduler, cls)), None)
    if needs_x0 and refused is not None:
        raise ConfigError(f"scheduler {name} is not supported with mixed resolution: it is {refused}; use switch=0 "
                          f"(caching only) or one of {', '.join(SUPPORTED)}")
    if needs_x0 and traits is None:
        raise ConfigError(f"scheduler {name} is not supported with mixed resolution or x0 tracing; supported: {', '.join(SUPPORTED)}")
    if needs_x0 and isinstance(scheduler, PNDMScheduler) and not scheduler.config.skip_prk_steps:
        raise ConfigError("PNDMScheduler with skip_prk_steps=False is not supported with mixed resolution; use skip_prk_steps=True (SD's default)")
    kind = prediction_type(scheduler)
    if kind not in PREDICTION_TYPES + ("flow",):
        raise ConfigError(f"prediction_type={kind!r} is not supported: {', '.join(PREDICTION_TYPES)}")
    return traits
