"""The adapter interface (a "family": the pipelines of one model family) and the registry that maps a pipeline
to its adapter. An adapter is data plus a few small functions the engine (postdiff/engine.py) asks: the plan's
facts (latent size, cache branches, CFG), how a segment's call differs from the user's (size, latents entry,
conditioning at the segment's size, remapped loop-index arguments) and the latent layout. It never runs a step:
the pipeline's own `__call__` does."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..caching.guidance import apply_guidance_hook
from ..config import ConfigError
from ..denoisers import DENOISER_KINDS, DenoiserKind
from ..plan import ModelFacts, StepPlan, make_plan
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
    """The adapter of one pipeline call. Created per call, so nothing survives from one call to the next."""

    name = "base"
    preset_family: str | None = None  # whose paper settings the presets give (config.PAPER_BETA); None: `name`
    pipeline_names: tuple[str, ...] = ()
    denoiser_attribute = "unet"  # the pipeline component that denoises
    denoiser_kind = "unet"  # denoisers.DENOISER_KINDS key
    max_text_length = 77  # prompt tokens the denoiser sees (CLIP: 77; T5-based families: more)
    cfg_passes = 1  # denoiser passes of a CFG step: 1 where CFG is one batch, 2 where it runs as separate passes
    # Separate passes: the pipeline names them in the denoiser's `cache_context("cond")` / `("uncond")`; False where
    # it calls the denoiser twice without (Chroma, FLUX.1-Kontext), conditional first (caching/guidance.py)
    passes_in_cache_context = True
    decodes_from_loop = False  # the pipeline decodes a value only its loop makes (LCM's `denoised`)

    @classmethod
    def kind(cls) -> DenoiserKind:
        return DENOISER_KINDS[cls.denoiser_kind]

    @classmethod
    def denoiser_attributes(cls, pipe) -> tuple[str, ...]:
        """The pipeline components that denoise in this call's steps (Wan 2.2: two experts, by noise level)."""
        return (cls.denoiser_attribute,)

    @classmethod
    def cached_models(cls, pipe) -> list[torch.nn.Module]:
        """The models PostDiff's caches are installed on: the denoiser (and ControlNets, where a pipeline has them)."""
        return [getattr(pipe, cls.denoiser_attribute)]

    @classmethod
    def install_caches(cls, pipe, config, state) -> None:
        """Validate `config` against the pipeline's models, then install the caches it needs on them, and the
        guidance hook outermost (the CFG stop, extra guidance passes: caching/guidance.py)."""
        denoiser = getattr(pipe, cls.denoiser_attribute)
        cls.kind().install_caches(denoiser, config, state)
        if not config.is_off:
            apply_guidance_hook(denoiser, state)

    def __init__(self, pipe, arguments: dict):
        self.pipe = pipe
        self.args = arguments
        self.device = pipe._execution_device
        self.state = None  # the call's RunState (set by api.py)
        self.begin_offset = 0  # scheduler timesteps before the call's first (img2img's strength skips them)
        self.planned_steps = None  # steps of the call's plan (set by the engine before its segments)
        self.switch_noise = None  # the fresh noise of the last switch's re-noising (set by the engine)
        self.encodings = {}  # the probe's results of the memoized methods (engine.MEMOIZED), in call order (set by the engine)
        self.computed = {}  # pipeline method -> its result in the first segment (`computed_once`)

    # -- before any compute
    def check_arguments(self) -> None:
        """Refuse, before anything runs, what the pipeline itself would refuse only after encoding."""

    def check_plan(self, plan) -> None:
        """Refuse, before any compute, what this call's inputs cannot do under `plan` (a StepPlan)."""

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        traits = traits_of(self.pipe.scheduler)
        repeats = traits.restart_repeats if traits is not None else 0
        facts = self.kind().facts(getattr(self.pipe, self.denoiser_attribute), latent_hw, repeats)
        return replace(facts, text_length=self.text_length())

    def plan_for(self, config, timesteps: torch.Tensor, facts: ModelFacts, scheduler, do_cfg: bool = True) -> StepPlan:
        """The plan of the call's `timesteps` (those its loop iterates, `planned_timesteps`) on `scheduler` (the
        call's real one); an adapter whose denoiser changes with the timestep (Wan 2.2) adds `denoiser_changes`."""
        return make_plan(config, len(timesteps), facts, do_cfg=do_cfg)

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
        return self.pipe.guidance_scale  # set by the pipeline's own call (the engine's probe)

    # -- how a segment's call differs from the user's
    def enter_step(self, step) -> None:
        """The engine enters `step` (a plan Step): per-step values the hooks read from the RunState."""

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps the pipeline's loop iterates, of those its `set_timesteps` made."""
        return timesteps

    def segment_arguments(self, arguments: dict, phase, last: bool, latents, guided: bool) -> dict:
        """The arguments of one segment's call: the phase's size, the latents it starts from, latents out for all
        but the last segment; a guidance rescale only while CFG runs (`guided`: the segment's first step guides;
        after the CFG stop the output is the conditional one, as without CFG)."""
        segment = dict(arguments)
        if not last:  # every phase before the last is smaller: in space, or (temporal_beta with beta 1) in time only
            segment.update(self.segment_size(phase))
        if latents is not None and "latents" in self.args:  # else `segment_methods` brings them in
            segment["latents"] = latents
        if not last:
            segment.update(output_type="latent", return_dict=False)
        if "guidance_rescale" in segment and not guided:
            segment["guidance_rescale"] = 0.0
        return segment

    def computed_once(self, names: tuple[str, ...], first: bool) -> dict:
        """Pipeline methods (name -> function) that the first segment runs and the later ones answer with its result:
        what does not change with the segment's size (an edit's condition latents, encoded at full size)."""
        def recorded(name: str):
            method = getattr(self.pipe, name)

            def run(*args, **kwargs):
                self.computed[name] = method(*args, **kwargs)
                return self.computed[name]

            return run

        return {name: recorded(name) if first else (lambda *args, name=name, **kwargs: self.computed[name]) for name in names}

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


def packed_latent_hw(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Even latent sides: pipelines that pack 2x2 latent patches into tokens (FLUX, Qwen-Image, FLUX.2, Z-Image)
    round the requested size down to whole patches."""
    factor = vae_scale_factor * 2
    return (2 * (int(height) // factor), 2 * (int(width) // factor))
