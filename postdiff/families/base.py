"""The family interface and the registry that maps a pipeline to its family."""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ..caching.guidance import apply_guidance_hook
from ..config import ConfigError
from ..denoisers import DENOISER_KINDS, DenoiserKind
from ..plan import ModelFacts
from ..schedulers import traits_of

_FAMILIES: list[type["Family"]] = []


def register(family: type["Family"]) -> type["Family"]:
    _FAMILIES.append(family)
    return family


def supported_pipelines() -> list[str]:
    return [name for family in _FAMILIES for name in family.pipeline_names]


def family_for(pipe) -> type["Family"]:
    """The most specific family whose pipeline class is `pipe`'s class or one of its bases."""
    for cls in type(pipe).__mro__:
        for family in reversed(_FAMILIES):  # later registrations are more specific (testbed after SD)
            if cls.__name__ in family.pipeline_names:
                return family
    raise ConfigError(
        f"pipeline {type(pipe).__name__} is not supported by postdiff; supported: {', '.join(supported_pipelines())}"
    )


class Family:
    """One pipeline call of a model family. Created per call, so nothing survives from one call to the next."""

    name = "base"
    preset_family: str | None = None  # whose paper settings the presets give (config.PAPER_BETA); None: `name`
    pipeline_names: tuple[str, ...] = ()
    unsupported_arguments: tuple[str, ...] = ()  # arguments PostDiff refuses when they are not None
    denoiser_attribute = "unet"  # the pipeline component that denoises
    denoiser_kind = "unet"  # denoisers.DENOISER_KINDS key
    max_text_length = 77  # prompt tokens the denoiser sees (CLIP: 77; T5-based families: more)
    cfg_passes = 1  # denoiser passes of a CFG step: 1 where CFG is one batch, 2 where it runs as separate passes
    # Runs through the engine (postdiff/engine.py: the pipeline's own `__call__` once per resolution segment);
    # False: through this family's mirrored loop (postdiff/sampler.py), for the pipelines not moved yet.
    engine = False

    @classmethod
    def kind(cls) -> DenoiserKind:
        return DENOISER_KINDS[cls.denoiser_kind]

    @classmethod
    def cached_models(cls, pipe) -> list[torch.nn.Module]:
        """The models PostDiff's caches are installed on: the denoiser (and ControlNets, where a pipeline has them)."""
        return [getattr(pipe, cls.denoiser_attribute)]

    @classmethod
    def install_caches(cls, pipe, config, state) -> None:
        """Validate `config` against the pipeline's models, then install the caches it needs on them; under the
        engine the guidance hook outermost (the CFG stop, the passes of separate-pass CFG, extra guidance passes)."""
        denoiser = getattr(pipe, cls.denoiser_attribute)
        cls.kind().install_caches(denoiser, config, state)
        if cls.engine and not config.is_off:
            apply_guidance_hook(denoiser, state)

    def __init__(self, pipe, arguments: dict):
        self.pipe = pipe
        self.args = arguments
        self.device = pipe._execution_device
        self.denoised = None  # the scheduler's x0 of the last step, where it gives one (LCM)
        self.state = None  # the call's RunState (set by the sampler): families with several passes a step name them
        self.begin_offset = 0  # scheduler timesteps before the call's first (img2img's strength skips them)
        self.planned_steps = None  # steps of the call's plan (set by the engine before its segments)

    @property
    def eta(self):
        return self.args.get("eta")

    def final_sample(self, latents: torch.Tensor) -> torch.Tensor:
        """What is decoded after the last step: the latents (LCM pipelines decode `denoised`)."""
        return latents

    # -- before any compute
    def check(self) -> None:
        for name in self.unsupported_arguments:
            if self.args.get(name) is not None:
                raise ConfigError(f"{name} is not supported by postdiff for {type(self.pipe).__name__}; leave it None")

    def timesteps(self) -> torch.Tensor:
        raise NotImplementedError

    def own_schedule(self, latent_hw: tuple[int, int]):
        """(scheduler, timesteps): a fresh scheduler set to the schedule of an image of `latent_hw`, for
        `low_res_shift="own"`; None where the schedule does not depend on the image size."""
        return None

    def check_plan(self, plan) -> None:
        """Refuse, before any compute, what this call's inputs cannot do under `plan` (a StepPlan)."""

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        traits = traits_of(self.pipe.scheduler)
        repeats = traits.restart_repeats if traits is not None else 0
        facts = self.kind().facts(getattr(self.pipe, self.denoiser_attribute), latent_hw, repeats)
        return replace(facts, text_length=self.text_length())

    def text_length(self) -> int | None:
        """Text tokens the denoiser sees in this call, where the call decides it (None: the model's own)."""
        return None

    @property
    def latent_hw(self) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor
        return (int(self.height) // factor, int(self.width) // factor)

    def requested_size(self) -> tuple[int, int]:
        """(height, width) as the pipelines default them: `default_sample_size` latents times the VAE factor."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return self.args["height"] or default, self.args["width"] or default

    @property
    def do_cfg(self) -> bool:
        return bool(self.pipe.do_classifier_free_guidance)

    @property
    def num_images(self) -> int:
        """Prompts times images per prompt, the batch counted as the pipelines count it."""
        prompt = self.args["prompt"]
        if isinstance(prompt, str):
            batch = 1
        else:
            batch = len(prompt) if prompt is not None else self.args["prompt_embeds"].shape[0]
        return batch * self.args["num_images_per_prompt"]

    @property
    def guidance_scale(self) -> float:
        return self.pipe.guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return getattr(self.pipe, "guidance_rescale", 0.0)  # SD and SDXL have one

    def extra_step_kwargs(self) -> dict:
        """Keyword arguments of `scheduler.step` (eta, generator), as the pipeline prepares them."""
        return self.pipe.prepare_extra_step_kwargs(self.args["generator"], self.eta)

    def predict(self, scheduler, latents: torch.Tensor, t, cfg: bool, scale: float) -> torch.Tensor:
        """The guided model output of one step: one denoiser call on the CFG batch [uncond, cond] (or the
        conditional batch alone), scaled input as the scheduler wants it."""
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        output = self.denoise(model_input, t, cfg, scale)
        return self.guide(output) if cfg else output

    def guide(self, output: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of a CFG batch's output, with the pipeline's guidance rescale."""
        uncond, cond = output.chunk(2)
        guided = uncond + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.guidance_rescale)
        return guided

    def begin_phase(self, latent_hw: tuple[int, int], noise: torch.Tensor) -> None:
        """A phase after the switch begins at `latent_hw`; `noise` is the switch's re-noising noise."""

    def after_step(self, scheduler, latents: torch.Tensor, next_t) -> torch.Tensor:
        """The latents after a scheduler step; `next_t` is the next timestep of the call (None after the last)."""
        return latents

    def step_latents(self, output) -> torch.Tensor:
        """The latents the loop goes on with, from `scheduler.step(..., return_dict=False)`: its first entry."""
        return output[0]

    # -- the engine's adapter: how a segment's call differs from the user's
    def check_arguments(self) -> None:
        """Refuse, before anything runs, what the pipeline itself would refuse only after encoding."""

    def after_probe(self) -> None:
        """The pipeline's call has run up to its schedule: fields it set (its guidance scale) can be read."""

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps the pipeline's loop iterates, of those its `set_timesteps` made."""
        return timesteps

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        """The arguments of one segment's call: the phase's size, the latents it starts from, latents out for all
        but the last segment; a guidance rescale only while CFG runs (`guided`: the segment's first step guides;
        after the CFG stop the output is the conditional one, as without CFG)."""
        segment = dict(arguments)
        if phase.scale != 1.0:
            segment.update(self.segment_size(phase))
        if latents is not None and "latents" in self.args:  # else `segment_methods` brings them in
            segment["latents"] = latents
        if not last:
            segment.update(output_type="latent", return_dict=False)
        if "guidance_rescale" in segment and not guided:
            segment["guidance_rescale"] = 0.0
        return segment

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """Pipeline methods replaced for one segment's call (name -> function): how the segment's latents enter a
        pipeline without `latents=` (img2img: its `prepare_latents`), how its conditioning is made at its size."""
        return {}

    def segment_size(self, phase) -> dict:
        """Call arguments that make the pipeline denoise at the phase's latent size."""
        factor = self.pipe.vae_scale_factor
        return {"height": phase.latent_hw[0] * factor, "width": phase.latent_hw[1] * factor}

    def spatial_latents(self, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Latents of the pipeline's layout as (B, C, H, W) (packed-token pipelines unpack)."""
        return latents

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents in the layout the pipeline's `latents=` takes."""
        return latents

    def own_scheduler(self, scheduler, phase):
        """A fresh scheduler like `scheduler` (the call's real one) for a lower-resolution segment with
        `low_res_shift="own"`: the pipeline sets it to the schedule of the segment's size. None where the
        schedule does not depend on the size."""
        return None

    # -- compute
    def encode(self) -> None:
        raise NotImplementedError

    def initial_latents(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, model_input: torch.Tensor, t: torch.Tensor, cfg: bool, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor):
        raise NotImplementedError

    def callback_tensors(self, latents: torch.Tensor) -> dict:
        return {"latents": latents}

    def take_callback_outputs(self, outputs: dict) -> None:
        """Apply what `callback_on_step_end` returned besides the latents, as the pipeline's loop does."""

    def callback_latents(self, outputs: dict, latents: torch.Tensor) -> torch.Tensor:
        """The latents the loop goes on with after a callback (in the loop's layout)."""
        return outputs.get("latents", latents)


def call_with(function, arguments: dict, **overrides):
    """Call `function` with the entries of `arguments` that it accepts by name, plus `overrides`."""
    accepted = inspect.signature(function).parameters
    values = {name: arguments[name] for name in accepted if name in arguments}
    values.update(overrides)
    return function(**values)
