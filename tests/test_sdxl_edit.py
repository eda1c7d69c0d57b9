"""SDXL image-to-image and inpainting: exactness against diffusers ("off"), the plan of a strength or a
`denoising_start`, the low-resolution start and per-phase conditioning, time ids with an aesthetic score,
caching, and refusals before any compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor
from recorder import UNetRecorder
from test_img2img import init_image
from test_inpaint import mask_image
from tiny import sdxl_pipeline, sdxl_unet

import postdiff
from postdiff import ConfigError, PostDiffConfig

MIXED = PostDiffConfig(beta=0.5, switch=0.5)


def edit_pipeline(cls, folder, scheduler: str = "euler", channels: int = 4, aesthetic: bool = False):
    """`cls` over the tiny SDXL components; a 9-channel or aesthetic-score U-Net replaces the text-to-image one."""
    components = sdxl_pipeline(folder, scheduler=scheduler).components
    if channels != 4 or aesthetic:
        torch.manual_seed(1)
        components["unet"] = sdxl_unet(time_ids=5 if aesthetic else 6, in_channels=channels)
    pipe = cls(**components, requires_aesthetics_score=aesthetic, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline(folder, scheduler: str = "euler", aesthetic: bool = False) -> StableDiffusionXLImg2ImgPipeline:
    return edit_pipeline(StableDiffusionXLImg2ImgPipeline, folder, scheduler, aesthetic=aesthetic)


def inpaint_pipeline(folder, channels: int = 9, scheduler: str = "euler", aesthetic: bool = False) -> StableDiffusionXLInpaintPipeline:
    return edit_pipeline(StableDiffusionXLInpaintPipeline, folder, scheduler, channels, aesthetic)


def img2img(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", image=init_image(), negative_prompt="", strength=0.75,
                     num_inference_steps=8, guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides})


def inpaint(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", image=init_image(), mask_image=mask_image(), negative_prompt="",
                     height=32, width=32, num_inference_steps=8, guidance_scale=5.0, output_type="np",
                     generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides})


def images(output):
    return output.images if hasattr(output, "images") else output[0]


def same(ours, baseline) -> bool:
    return type(ours) is type(baseline) and torch.equal(torch.as_tensor(np.asarray(images(ours))), torch.as_tensor(np.asarray(images(baseline))))


def latent_image(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


IMG2IMG_OFF = [
    ("ddim", False, dict()),
    ("euler", False, dict(strength=0.5, num_images_per_prompt=2)),
    ("dpmpp_2m", False, dict(output_type="latent")),
    ("euler", False, dict(denoising_start=0.4)),
    ("ddim", False, dict(denoising_start=0.3, denoising_end=0.8, strength=0.2)),
    ("dpmpp_2m", True, dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, num_images_per_prompt=2, denoising_end=0.6)),
    ("euler", True, dict(original_size=(40, 36), crops_coords_top_left=(4, 8), negative_crops_coords_top_left=(2, 2), guidance_rescale=0.7)),
    ("euler", False, dict(original_size=(40, 36), crops_coords_top_left=(4, 8), negative_original_size=(24, 28),
                          negative_target_size=(16, 20), num_images_per_prompt=2)),
    ("ddim", False, dict(guidance_scale=1.0, return_dict=False)),
    ("ddim", False, dict(image=latent_image(), denoising_start=0.5, output_type="latent")),  # a refiner after a base
    ("euler", False, dict(latents=latent_image(3), output_type="latent")),
]


@pytest.mark.parametrize("scheduler, aesthetic, arguments", IMG2IMG_OFF)
def test_img2img_off_is_bit_identical_to_diffusers(model_dir, scheduler, aesthetic, arguments):
    pipe = postdiff.apply(img2img_pipeline(model_dir, scheduler, aesthetic), PostDiffConfig())
    ours = img2img(pipe, **arguments)  # first: nothing the pipeline's own call sets on itself helps
    assert same(ours, img2img(postdiff.remove(pipe), **arguments))


INPAINT_OFF = [
    (9, "ddim", False, dict()),
    (9, "euler", False, dict(strength=0.6, num_images_per_prompt=2)),
    (9, "dpmpp_2m", True, dict(output_type="latent", return_dict=False, aesthetic_score=5.0)),  # latents come in the output class
    (9, "euler", False, dict(denoising_start=0.5, denoising_end=0.9)),
    (4, "ddim", False, dict(strength=1.0)),
    (4, "euler", False, dict(denoising_start=0.5)),
    (4, "dpmpp_2m", False, dict(num_images_per_prompt=2, output_type="latent")),
    (4, "ddim", True, dict(strength=0.6, negative_original_size=(16, 16), return_dict=False)),
]


@pytest.mark.parametrize("channels, scheduler, aesthetic, arguments", INPAINT_OFF)
def test_inpaint_off_is_bit_identical_to_diffusers(model_dir, channels, scheduler, aesthetic, arguments):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, channels, scheduler, aesthetic), PostDiffConfig())
    ours = inpaint(pipe, **arguments)
    assert same(ours, inpaint(postdiff.remove(pipe), **arguments))


def _edit_everything(pipeline, step, t, tensors):
    """A callback that changes every tensor it is given at step 2, as a user's might."""
    if step != 2:
        return tensors
    scales = {"latents": 0.9, "prompt_embeds": 1.1, "add_text_embeds": 0.8, "add_time_ids": 0.5, "mask": 0.5, "masked_image_latents": 0.7}
    return {name: value * scales[name] for name, value in tensors.items()}


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_off_with_a_callback_on_every_tensor_input_and_given_masked_latents_is_bit_identical(model_dir, kind):
    pipe = img2img_pipeline(model_dir) if kind == "img2img" else inpaint_pipeline(model_dir, 9)
    run = img2img if kind == "img2img" else inpaint
    arguments = dict(callback_on_step_end=_edit_everything, callback_on_step_end_tensor_inputs=list(pipe._callback_tensor_inputs))
    if kind == "inpaint":
        arguments["masked_image_latents"] = latent_image(3)
    baseline = run(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    assert same(run(pipe, **arguments), baseline)


def test_img2img_off_watermarks_latent_output_as_the_pipeline_does(model_dir):
    class Shift:
        def apply_watermark(self, images):
            return images + 1.0

    pipe = img2img_pipeline(model_dir, "ddim")
    pipe.watermark = Shift()
    baseline = img2img(pipe, output_type="latent")
    postdiff.apply(pipe, PostDiffConfig())
    assert same(img2img(pipe, output_type="latent"), baseline)


def test_the_families_are_registered():
    from postdiff.families import supported_pipelines

    assert {"StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"} <= set(supported_pipelines())


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("start", [dict(strength=0.5), dict(denoising_start=0.45)])
def test_the_plan_counts_the_steps_that_run_and_the_switch_is_a_fraction_of_them(model_dir, scheduler, start):
    pipe = postdiff.apply(img2img_pipeline(model_dir, scheduler), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    assert postdiff.api.family_name(pipe) == "sdxl-img2img"
    schedule = copy.deepcopy(pipe.scheduler)
    schedule.set_timesteps(8)
    # strength 0.5 runs the last 4 of 8; denoising_start 0.45 the timesteps below its cutoff, 550
    running = schedule.timesteps[-4:] if "strength" in start else schedule.timesteps[schedule.timesteps < 550]
    low = int(len(running) / 2 + 0.5)
    recorder = UNetRecorder(pipe.unet)
    output = images(img2img(pipe, **start))
    recorder.remove()
    assert [c["shape"][2:] for c in recorder.calls] == [(8, 8)] * low + [(16, 16)] * (len(running) - low)
    assert [c["t"] for c in recorder.calls] == [int(t) for t in running]
    assert output.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("start", [dict(), dict(denoising_start=0.5)])
def test_the_low_resolution_start_is_the_pipelines_own_start_on_the_area_downscaled_image(model_dir, start):
    """With `denoising_start` the pipeline encodes the image without noising it: so must the low-resolution start."""
    pipe = postdiff.apply(img2img_pipeline(model_dir, "ddim"), MIXED)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0][:1].clone()))
    img2img(pipe, seed=5, **start)
    handle.remove()
    postdiff.remove(pipe)
    pipe.scheduler.set_timesteps(8)
    timesteps, _ = pipe.get_timesteps(8, 0.75, "cpu", **start)
    image = F.interpolate(pipe.image_processor.preprocess(init_image()), size=(16, 16), mode="area")
    expected = pipe.prepare_latents(image, timesteps[:1], 1, 1, torch.float32, "cpu", torch.Generator().manual_seed(5),
                                    add_noise=not start)
    assert seen[0].shape == (1, 4, 8, 8)
    torch.testing.assert_close(seen[0], expected)


def _time_ids_by_size(pipe, run, **arguments) -> dict:
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault(tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    run(pipe, **arguments)
    handle.remove()
    return seen


@pytest.mark.parametrize("aesthetic", [True, False])
def test_low_resolution_time_ids_scale_the_sizes_and_the_crop_but_not_the_aesthetic_score(model_dir, aesthetic):
    pipe = postdiff.apply(img2img_pipeline(model_dir, "ddim", aesthetic), MIXED)
    seen = _time_ids_by_size(pipe, img2img, original_size=(40, 36), crops_coords_top_left=(4, 8), target_size=(32, 28),
                             negative_original_size=(24, 28), aesthetic_score=7.0, negative_aesthetic_score=2.0)
    if aesthetic:  # (original size, crop, score); the negative crop is its own argument, (0, 0) by default
        negative, positive = [24, 28, 0, 0, 2.0], [40, 36, 4, 8, 7.0]
        low_negative, low_positive = [12, 14, 0, 0, 2.0], [20, 18, 2, 4, 7.0]
    else:  # (original size, crop, target size); the pipeline puts the positive crop in the negative ids
        negative, positive = [24, 28, 4, 8, 32, 28], [40, 36, 4, 8, 32, 28]
        low_negative, low_positive = [12, 14, 2, 4, 16, 14], [20, 18, 2, 4, 16, 14]
    assert torch.equal(seen[(16, 16)], torch.tensor([negative, positive]))
    assert torch.equal(seen[(8, 8)], torch.tensor([low_negative, low_positive]))


def test_inpainting_time_ids_scale_per_phase_too(model_dir):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, 9, "ddim", aesthetic=True), MIXED)
    seen = _time_ids_by_size(pipe, inpaint, aesthetic_score=7.0, strength=1.0)
    assert torch.equal(seen[(16, 16)], torch.tensor([[32, 32, 0, 0, 2.5], [32, 32, 0, 0, 7.0]]))
    assert torch.equal(seen[(8, 8)], torch.tensor([[16, 16, 0, 0, 2.5], [16, 16, 0, 0, 7.0]]))


@pytest.mark.parametrize("channels", [9, 4])
def test_inpainting_conditions_each_phase_at_its_size(model_dir, channels):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, channels, "ddim"), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=6))
    recorder = UNetRecorder(pipe.unet)
    latents = images(inpaint(pipe, strength=1.0, output_type="latent"))
    recorder.remove()
    assert [c["shape"][1:] for c in recorder.calls] == [(channels, 8, 8)] * 4 + [(channels, 16, 16)] * 4
    assert [c["shape"][0] for c in recorder.calls] == [2] * 6 + [1] * 2
    assert latents.shape == (1, 4, 16, 16)


def _known(pipe, size: int, latent_size: int) -> torch.Tensor:
    """Where the mask keeps the image, at a latent size, as the pipeline's `prepare_mask_latents` resizes it."""
    keep = F.interpolate(pipe.mask_processor.preprocess(mask_image(), height=size, width=size), size=(latent_size,) * 2) < 0.5
    return keep.expand(1, 4, latent_size, latent_size)


def test_four_channel_inpainting_keeps_the_known_region_at_each_resolution(model_dir):
    """At the last low-resolution step the known region is the small image's own latents (the pipeline's loop
    leaves them so at a segment's last step; the switch re-noises the step's x0, not these latents); at the end
    it is the full image's own latents."""
    pipe = postdiff.apply(inpaint_pipeline(model_dir, 4, "ddim"), MIXED)
    steps = []
    latents = images(inpaint(pipe, strength=1.0, output_type="latent", callback_on_step_end=lambda p, i, t, k: steps.append(k["latents"]) or k))
    replay = torch.Generator().manual_seed(0)  # the call's draws: its low-resolution start and conditioning,
    small = pipe.image_processor.preprocess(init_image(), height=16, width=16)
    small_latents = pipe._encode_vae_image(small, generator=replay)
    small_noise = randn_tensor((1, 4, 8, 8), generator=replay)
    pipe._encode_vae_image(small * (pipe.mask_processor.preprocess(mask_image(), height=16, width=16) < 0.5), generator=replay)
    randn_tensor((1, 4, 16, 16), generator=replay)  # the switch's noise, then the full-resolution image latents
    full_latents = pipe._encode_vae_image(pipe.image_processor.preprocess(init_image(), height=32, width=32), generator=replay)
    noised = pipe.scheduler.add_noise(small_latents, small_noise, pipe.scheduler.timesteps[3:4])
    keep_small, keep_full = _known(pipe, 16, 8), _known(pipe, 32, 16)
    assert steps[3].shape == (1, 4, 8, 8) and keep_small.any() and not keep_small.all()
    torch.testing.assert_close(steps[2][keep_small], noised[keep_small])  # noised to the next step's timestep
    torch.testing.assert_close(steps[3][keep_small], small_latents[keep_small])
    torch.testing.assert_close(latents[keep_full], full_latents[keep_full])


CACHED = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=4)


@pytest.mark.parametrize("kind", ["img2img", "inpaint9", "inpaint4"])
def test_cfg_stop_and_deepcache_give_finite_images_of_the_requested_size(model_dir, kind):
    if kind == "img2img":
        pipe, run = img2img_pipeline(model_dir, "dpmpp_2m", aesthetic=True), img2img
    else:
        pipe, run = inpaint_pipeline(model_dir, int(kind[-1]), "dpmpp_2m"), inpaint
    postdiff.apply(pipe, CACHED)
    recorder = UNetRecorder(pipe.unet)
    output = images(run(pipe, strength=0.75, num_images_per_prompt=2))  # 6 steps: 3 low, 3 full
    recorder.remove()
    assert output.shape == (2, 32, 32, 3) and np.isfinite(output).all()
    assert [c["shape"][0] for c in recorder.calls] == [4] * 4 + [2] * 2
    ran = [len(c["ran"]) for c in recorder.calls]
    assert ran[1] < ran[0] and ran[4] < ran[3]  # the second step of each phase reuses the deep branch


def _encodes(pipe) -> list:
    calls = []
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae.encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(type(m).__name__))
    return calls


def test_img2img_refusals_come_before_any_compute(model_dir):
    pipe = postdiff.apply(img2img_pipeline(model_dir, "ddim"), MIXED)
    recorder, encodes = UNetRecorder(pipe.unet), _encodes(pipe)
    with pytest.raises(ConfigError, match="with 1 timesteps leaves 0 steps at scale 1.0"):
        img2img(pipe, strength=0.125)
    with pytest.raises(ConfigError, match="with 1 timesteps leaves 0 steps at scale 1.0"):
        img2img(pipe, denoising_start=0.9)  # DDIM's 8 steps: only timestep 1 is below the cutoff 100
    with pytest.raises(ConfigError, match="Given `latents` cannot start a mixed-resolution call"):
        img2img(pipe, latents=latent_image())
    with pytest.raises(ConfigError, match="An image given as latents with `denoising_start` cannot start"):
        img2img(pipe, image=latent_image(), denoising_start=0.5)
    with pytest.raises(ValueError, match="`denoising_start`: 0.6 cannot be larger than or equal to `denoising_end`"):
        img2img(pipe, denoising_start=0.6, denoising_end=0.4)
    assert recorder.calls == [] and encodes == []
    # A strength noises the latents it starts from: an image given as latents is area-downscaled for the low phase.
    assert images(img2img(pipe, image=latent_image(), output_type="latent")).shape == (1, 4, 16, 16)
    assert recorder.calls[0]["shape"] == (2, 4, 8, 8)


def test_inpaint_refusals_come_before_any_compute(model_dir):
    pipe = postdiff.apply(inpaint_pipeline(model_dir, 9, "ddim"), MIXED)
    recorder, encodes = UNetRecorder(pipe.unet), _encodes(pipe)
    with pytest.raises(ConfigError, match="padding_mask_crop is not supported"):
        inpaint(pipe, padding_mask_crop=4)
    with pytest.raises(ConfigError, match="leaves 0 steps at scale 1.0"):
        inpaint(pipe, strength=0.125)
    with pytest.raises(ConfigError, match="mask_image holds 2 masks for 3 images"):
        inpaint(pipe, mask_image=[mask_image()] * 2, num_images_per_prompt=3)
    with pytest.raises(ConfigError, match="masked_image_latents has shape \\(1, 4, 8, 8\\): expected \\(n, C, 16, 16\\)"):
        inpaint(pipe, masked_image_latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="An image given as latents cannot start a mixed-resolution call"):
        inpaint(pipe, image=latent_image(), masked_image_latents=latent_image(2))
    assert recorder.calls == [] and encodes == []


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.5), ("euler", 0.3), ("dpmpp_2m", 0.75)])
def test_accounting_plans_an_sdxl_strength_as_the_pipeline_runs_it(model_dir, scheduler, strength):
    from postdiff.models import spec_from_pipeline

    config = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2)
    for pipe in (img2img_pipeline(model_dir, scheduler), inpaint_pipeline(model_dir, 9, scheduler)):
        postdiff.apply(pipe, config)
        extra = dict(mask_image=mask_image(), height=32, width=32) if "Inpaint" in type(pipe).__name__ else {}
        called = postdiff.plan_call(pipe, prompt="a bag", image=init_image(), strength=strength, num_inference_steps=10, **extra)
        counted = spec_from_pipeline(pipe).plan(config, 10, strength=strength)
        assert counted.steps == called.steps


def test_flops_plans_an_sdxl_strength_and_counts_the_init_image_encode_at_the_first_phase_size():
    import json

    from typer.testing import CliRunner

    from postdiff.cli import app

    def counted(*flags):
        result = CliRunner().invoke(app, ["flops", "--json", "--model", "sdxl-1024", "--with-vae", "--strength", "0.5", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    full, mixed = counted("--steps", "10"), counted("--steps", "10", "--beta", "0.5", "--switch", "0.5")
    assert len(full["per_step"]) == len(mixed["per_step"]) == 5  # the last int(10 x 0.5) steps
    encode = full["components"]["vae encoder (init image, 128x128 latent)"]
    assert mixed["components"]["vae encoder (init image, 64x64 latent)"] == pytest.approx(encode / 4, rel=1e-9)
