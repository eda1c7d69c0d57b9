"""Image-to-image (SD 1.x/2.x): exactness against diffusers, the plan of a strength, the low-resolution start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from recorder import UNetRecorder
from tiny import sd_pipeline

import postdiff
from postdiff import ConfigError, PostDiffConfig


def img2img_pipeline(folder, scheduler: str = "ddim") -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipeline(folder, scheduler=scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(seed: int = 0, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", image=init_image(), negative_prompt="", strength=0.75,
                     num_inference_steps=8, guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(seed))
    arguments.update(overrides)
    return pipe(**arguments).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "pndm"])
@pytest.mark.parametrize("arguments", [dict(), dict(strength=0.5, num_images_per_prompt=2), dict(strength=1.0, output_type="latent")])
def test_off_is_bit_identical_to_diffusers(model_dir, scheduler, arguments):
    pipe = img2img_pipeline(model_dir, scheduler)
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    assert torch.equal(torch.as_tensor(np.asarray(call(pipe, **arguments))), torch.as_tensor(np.asarray(baseline)))


def test_the_plan_counts_the_steps_that_run_and_the_switch_is_a_fraction_of_them(model_dir):
    pipe = postdiff.apply(img2img_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    plan = postdiff.plan_call(pipe, prompt="a bag", image=init_image(), strength=0.5, num_inference_steps=8)
    assert [step.latent_hw for step in plan.steps] == [(8, 8)] * 2 + [(16, 16)] * 2
    recorder = UNetRecorder(pipe.unet)
    output = call(pipe, strength=0.5)
    recorder.remove()
    assert [c["shape"][2:] for c in recorder.calls] == [(8, 8)] * 2 + [(16, 16)] * 2
    assert output.shape == (1, 32, 32, 3)


def test_the_low_resolution_start_is_the_pipelines_own_start_on_the_area_downscaled_image(model_dir):
    pipe = postdiff.apply(img2img_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0][:1].clone()))
    call(pipe, seed=5)
    handle.remove()
    postdiff.remove(pipe)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(8)
    timesteps, _ = pipe.get_timesteps(8, 0.75, "cpu")
    image = F.interpolate(pipe.image_processor.preprocess(init_image()), size=(16, 16), mode="area")
    expected = pipe.prepare_latents(image, timesteps[:1], 1, 1, torch.float32, "cpu", torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[0], expected)


def test_euler_re_enters_at_the_sigma_of_its_place_in_the_full_schedule(model_dir):
    """img2img skips the first timesteps: the switch's re-noising must use the sigma of the timestep it
    re-enters at, counted in the scheduler's whole schedule."""
    pipe = postdiff.apply(img2img_pipeline(model_dir, "euler"), PostDiffConfig(beta=0.5, switch=0.5))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0][1:].clone()))
    generator = torch.Generator().manual_seed(2)
    _, traced = postdiff.trace_x0(pipe, "a photo of a sneaker", image=init_image(), negative_prompt="", strength=0.75,
                                  num_inference_steps=8, guidance_scale=5.0, output_type="latent", generator=generator)
    handle.remove()
    scheduler = pipe.scheduler  # the call set its 8 steps; strength 0.75 skips the first 2
    sigma = scheduler.sigmas[2 + 3]
    upsampled = F.interpolate(traced[2], size=(16, 16), mode="bilinear", align_corners=False)
    replay = torch.Generator().manual_seed(2)
    image = F.interpolate(pipe.image_processor.preprocess(init_image()), size=(16, 16), mode="area")
    pipe.vae.encode(image).latent_dist.sample(replay)  # the generator's draws before the switch: the VAE sample,
    randn_tensor((1, 4, 8, 8), generator=replay)  # then the low-resolution noise
    noise = randn_tensor(upsampled.shape, generator=replay)
    expected = (upsampled + sigma * noise) / (sigma**2 + 1) ** 0.5  # add_noise, then scale_model_input
    torch.testing.assert_close(seen[3], expected, rtol=1e-5, atol=1e-5)


def test_a_strength_that_leaves_no_step_after_the_switch_is_refused_before_any_compute(model_dir):
    pipe = postdiff.apply(img2img_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    recorder = UNetRecorder(pipe.unet)
    with pytest.raises(ConfigError, match="with 1 timesteps leaves 0 steps at scale 1.0"):
        call(pipe, strength=0.125)
    assert recorder.calls == []


@pytest.mark.parametrize("scheduler, strength", [("ddim", 0.5), ("pndm", 0.75), ("euler", 0.3)])
def test_accounting_plans_a_strength_as_the_pipeline_runs_it(model_dir, scheduler, strength):
    from postdiff.models import spec_from_pipeline

    config = PostDiffConfig(beta=0.5, switch=0.5)
    pipe = postdiff.apply(img2img_pipeline(model_dir, scheduler), config)
    called = postdiff.plan_call(pipe, prompt="a bag", image=init_image(), strength=strength, num_inference_steps=10)
    counted = spec_from_pipeline(pipe).plan(config, 10, strength=strength)
    assert counted.steps == called.steps


def test_flops_counts_the_init_image_encode_at_the_first_phase_size():
    import json

    from typer.testing import CliRunner

    from postdiff.cli import app

    def components(*flags):
        result = CliRunner().invoke(app, ["flops", "--json", "--model", "sd15-512", "--with-vae", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["components"]

    assert not any("encoder" in name for name in components())  # text-to-image encodes no image
    full = components("--strength", "0.5")["vae encoder (init image, 64x64 latent)"]
    low = components("--strength", "0.5", "--beta", "0.5", "--switch", "0.5")["vae encoder (init image, 32x32 latent)"]
    assert full > 0.5 and low == pytest.approx(full / 4, rel=1e-9)  # T MACs; a convolutional encoder scales with pixels
