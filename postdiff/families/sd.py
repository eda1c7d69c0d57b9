"""Stable Diffusion 1.x/2.x (epsilon and v-prediction), LCM, the embedded pixel-space testbed model, and SD
image-to-image. The pipelines' own calls run every step; text-to-image needs nothing beyond the base adapter
(a segment is the call at the segment's height and width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Family, register


def refuse_legacy_callback(arguments: dict) -> None:
    """The deprecated `callback(i, t, latents)` would see each segment's own step indices."""
    if (arguments.get("kwargs") or {}).get("callback") is not None:
        raise ValueError("the deprecated `callback` argument is not supported by postdiff; use callback_on_step_end")


@register
class StableDiffusionFamily(Family):
    name = "sd"
    pipeline_names = ("StableDiffusionPipeline",)

    def __init__(self, pipe, arguments: dict):
        super().__init__(pipe, arguments)
        a = self.args
        default = pipe.unet.config.sample_size
        default = default if isinstance(default, int) else default[0]
        self.height = a["height"] or default * pipe.vae_scale_factor
        self.width = a["width"] or default * pipe.vae_scale_factor
        refuse_legacy_callback(a)


@register
class LatentConsistencyFamily(StableDiffusionFamily):
    """`LatentConsistencyModelPipeline`: no CFG (guidance is an embedding); the switch's x0 is the scheduler's
    `denoised` (schedulers.py)."""

    name = "lcm"
    preset_family = "sd"
    pipeline_names = ("LatentConsistencyModelPipeline",)
    decodes_from_loop = True


@register
class TestbedFamily(StableDiffusionFamily):
    """The embedded model: Stable Diffusion's pipeline in pixel space (testbed/model.py)."""

    __test__ = False
    name = "testbed"
    pipeline_names = ("TestbedPipeline",)


@register
class StableDiffusionImg2ImgFamily(StableDiffusionFamily):
    """`StableDiffusionImg2ImgPipeline`: the loop starts from the init image's latents noised to the strength's
    first timestep, and runs only the steps from there; a plan counts those steps, and `switch` is a fraction
    of them.

    Low resolution: the preprocessed image is resized to the phase's size (area averaging, an anti-aliased
    downscale) and encoded by the pipeline's own `prepare_latents`, so the VAE sees an image and the
    low-resolution phase starts from in-distribution latents of the smaller image, with noise of that size
    (an image given as latents is area-resized directly). The pipeline has no `latents=`: later segments
    enter through its `prepare_latents` (`segment_methods`)."""

    name = "sd-img2img"
    preset_family = "sd"
    pipeline_names = ("StableDiffusionImg2ImgPipeline",)

    def __init__(self, pipe, arguments: dict):
        Family.__init__(self, pipe, arguments)
        refuse_legacy_callback(arguments)
        self.image = None if arguments["image"] is None else pipe.image_processor.preprocess(arguments["image"])

    @property
    def latent_hw(self) -> tuple[int, int]:
        height, width = self.image.shape[-2:]
        factor = 1 if self.image.shape[1] == 4 else self.pipe.vae_scale_factor  # an image given as latents
        return (height // factor, width // factor)

    def planned_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The strength's last timesteps; `begin_offset` counts those the pipeline skips."""
        planned = self.start_timesteps(len(timesteps))
        self.begin_offset = len(timesteps) - len(planned)
        return planned

    def segment_size(self, phase) -> dict:
        return {}  # the image (or latents) sets the size

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """`get_timesteps`: the segment's timesteps (the plan has applied the strength, or SDXL's `denoising_start`,
        once: counted again on a segment's timesteps it would cut them). `prepare_latents`: the first segment
        encodes the init image at its size (area-downscaled at low resolution) with the pipeline's own; later
        ones start from the switch's latents."""
        methods = {"get_timesteps": self.segment_timesteps}
        if not first:
            if "latents" not in self.args:
                methods["prepare_latents"] = lambda *args, **kwargs: latents
        elif phase.latent_hw != self.latent_hw:
            prepare = self.pipe.prepare_latents
            methods["prepare_latents"] = lambda image, *args, **kwargs: prepare(
                self.resized_image(image, phase.latent_hw), *args, **kwargs)
        return methods

    def segment_timesteps(self, *args, **kwargs):
        """The pipeline's `get_timesteps` in a segment: the timesteps shown after the skipped ones, the scheduler
        begun there (the stand-in maps the index into the real scheduler's tables)."""
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps[self.begin_offset :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(self.begin_offset)
        return timesteps, len(timesteps)

    def resized_image(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The preprocessed image (or latents) area-resized to `latent_hw` latents: an anti-aliased downscale."""
        factor = 1 if image.shape[1] == 4 else self.pipe.vae_scale_factor
        return F.interpolate(image, size=(latent_hw[0] * factor, latent_hw[1] * factor), mode="area")

    def start_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The pipeline's `get_timesteps` (it also sets the scheduler's begin index): the strength's last steps."""
        return self.pipe.get_timesteps(num_inference_steps, self.args["strength"], self.device)[0]


class CallSizedImg2ImgFamily(StableDiffusionImg2ImgFamily):
    """SD image-to-image's plan (the strength's steps, `begin_offset`) for pipelines whose call's height and width
    set the size (the pipeline resizes the image to it) and whose later segments start from `latents=` (Qwen-Image,
    Chroma): a base for them, before their text-to-image family, not an adapter itself. Low resolution: the image,
    preprocessed at the requested size as the pipeline does, is area-downscaled to the phase's size (an anti-aliased
    downscale; the pipeline's own resize of a tensor image is nearest-neighbour) and encoded by the pipeline's own
    `prepare_latents`."""

    def __init__(self, pipe, arguments: dict):
        # The adapter's text-to-image family's (next after the SD classes in its MRO): it sets the call's size.
        super(StableDiffusionFamily, self).__init__(pipe, arguments)
        image = arguments["image"]
        self.image = None if image is None else pipe.image_processor.preprocess(image, height=self.height, width=self.width)

    segment_size = Family.segment_size  # the call's height and width set the size, as in text-to-image

    def segment_methods(self, phase, first: bool, latents) -> dict:
        """The segment's timesteps (`get_timesteps`, as SD image-to-image); the first segment below full size
        encodes the area-downscaled image (whatever image the pipeline preprocessed at the segment's size)."""
        methods = {"get_timesteps": self.segment_timesteps}
        if first and phase.latent_hw != self.latent_hw:
            prepare, image = self.pipe.prepare_latents, self.resized_image(self.image, phase.latent_hw)
            methods["prepare_latents"] = lambda _, *args, **kwargs: prepare(image, *args, **kwargs)
        return methods
