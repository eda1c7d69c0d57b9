"""The family interface and the registry that maps a pipeline to its family."""

from __future__ import annotations

import inspect

import torch

from ..config import ConfigError
from ..plan import ModelFacts

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
    pipeline_names: tuple[str, ...] = ()
    unsupported_arguments: tuple[str, ...] = ()  # arguments PostDiff refuses when they are not None
    denoiser_attribute = "unet"  # the pipeline component that denoises
    denoiser_kind = "unet"  # accounting.DENOISER_KINDS key
    max_text_length = 77  # prompt tokens the denoiser sees (CLIP: 77; T5-based families: more)

    @classmethod
    def install_caches(cls, denoiser, config, state) -> None:
        """Install the hooks the config needs on the denoiser (called by `postdiff.apply`)."""
        from ..caching import install_unet_caches

        install_unet_caches(denoiser, config, state)

    def __init__(self, pipe, arguments: dict):
        self.pipe = pipe
        self.args = arguments
        self.device = pipe._execution_device
        self.denoised = None  # the scheduler's x0 of the last step, where it gives one (LCM)

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

    def facts(self, latent_hw: tuple[int, int]) -> ModelFacts:
        raise NotImplementedError

    @property
    def latent_hw(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def do_cfg(self) -> bool:
        return bool(self.pipe.do_classifier_free_guidance)

    @property
    def num_images(self) -> int:
        raise NotImplementedError

    @property
    def guidance_scale(self) -> float:
        return self.pipe.guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self.pipe.guidance_rescale

    def step_latents(self, output) -> torch.Tensor:
        """The latents the loop goes on with, from `scheduler.step(..., return_dict=False)`: its first entry."""
        return output[0]

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


def call_with(function, arguments: dict, **overrides):
    """Call `function` with the entries of `arguments` that it accepts by name, plus `overrides`."""
    accepted = inspect.signature(function).parameters
    values = {name: arguments[name] for name in accepted if name in arguments}
    values.update(overrides)
    return function(**values)
