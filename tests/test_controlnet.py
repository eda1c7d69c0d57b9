"""ControlNet (SD and SDXL, one net or several): exactness against diffusers, the low-resolution control image,
the three ways a ControlNet meets DeepCache's cached steps, its cross-attention under the CFG stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image
from recorder import UNetRecorder
from test_accounting import PerCallFlops
from tiny import hook_leftovers, sd_pipeline, sdxl_pipeline

import postdiff
from postdiff import ConfigError, PostDiffConfig


def tiny_controlnet(unet, seed: int) -> ControlNetModel:
    """A ControlNet of the U-Net's layout with every weight random: the real ones start with zero convolutions,
    whose residuals would hide any mistake."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.2)
    return net


def controlnet_pipeline(folder, nets: int = 1, xl: bool = False, scheduler: str | None = None):
    base = sdxl_pipeline(folder, scheduler or "euler") if xl else sd_pipeline(folder, scheduler or "ddim")
    controlnets = [tiny_controlnet(base.unet, seed) for seed in range(nets)]
    controlnet = controlnets[0] if nets == 1 else MultiControlNetModel(controlnets)
    pipeline_class = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    extra = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(**components, controlnet=controlnet, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(seed: int = 0, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def call(pipe, seed: int = 0, **overrides):
    nets = len(pipe.controlnet.nets) if hasattr(pipe.controlnet, "nets") else 1
    image = control_image() if nets == 1 else [control_image(index) for index in range(nets)]
    arguments = dict(prompt="a photo of a sneaker", image=image, negative_prompt="", num_inference_steps=6,
                     guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(seed))
    arguments.update(overrides)
    return pipe(**arguments).images


def assert_off_is_exact(pipe, **arguments):
    baseline = call(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig())
    output = call(pipe, **arguments)
    assert torch.equal(torch.as_tensor(np.asarray(output)), torch.as_tensor(np.asarray(baseline)))


SD_CASES = [
    dict(),
    dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7),
    dict(guess_mode=True),
    dict(num_images_per_prompt=2, prompt=["a bag", "a shirt"], negative_prompt=["", ""], output_type="latent"),
    dict(height=24, width=40),  # the processor resizes the control image to the size asked for
]


@pytest.mark.parametrize("arguments", SD_CASES)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_sd_off_is_bit_identical_to_diffusers(model_dir, scheduler, arguments):
    assert_off_is_exact(controlnet_pipeline(model_dir, scheduler=scheduler), **arguments)


@pytest.mark.parametrize("arguments", [dict(), dict(controlnet_conditioning_scale=[0.5, 1.2], control_guidance_end=[0.5, 1.0]),
                                       dict(guess_mode=True, guidance_scale=1.0)])
def test_multi_controlnet_off_is_bit_identical_to_diffusers(model_dir, arguments):
    assert_off_is_exact(controlnet_pipeline(model_dir, nets=2), **arguments)


@pytest.mark.parametrize("arguments", [dict(), dict(guess_mode=True, control_guidance_start=0.3), dict(denoising_end=0.6),
                                       dict(num_images_per_prompt=2, original_size=(64, 64), crops_coords_top_left=(4, 0))])
def test_sdxl_off_is_bit_identical_to_diffusers(model_dir, arguments):
    assert_off_is_exact(controlnet_pipeline(model_dir, xl=True), **arguments)


def test_sdxl_multi_controlnet_off_is_bit_identical_to_diffusers(model_dir):
    assert_off_is_exact(controlnet_pipeline(model_dir, nets=2, xl=True), controlnet_conditioning_scale=[1.0, 0.4])


def test_a_callback_replacing_the_control_image_is_followed_as_by_the_pipeline(model_dir):
    def replace(pipe, i, t, tensors):
        return {"image": tensors["image"] * 0.5} if i == 1 else {}

    assert_off_is_exact(controlnet_pipeline(model_dir), callback_on_step_end=replace, callback_on_step_end_tensor_inputs=["latents", "image"])


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


def record_controlnet_inputs(controlnet) -> tuple[list, object]:
    """The sample and control image each ControlNet call really runs on (seen by its first layers, inside the
    CFG stop's hook, which hands it the conditional half)."""
    seen = []

    def sample(module, args):
        seen.append({"sample": args[0].shape})

    def cond(module, args):
        seen[-1]["cond"] = args[0].clone()

    return seen, _Handles(controlnet.conv_in.register_forward_pre_hook(sample),
                          controlnet.controlnet_cond_embedding.register_forward_pre_hook(cond))


def test_the_low_resolution_phase_gets_the_area_downscaled_control_image(model_dir):
    pipe = postdiff.apply(controlnet_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = record_controlnet_inputs(pipe.controlnet)
    output = call(pipe)
    handle.remove()
    full = pipe.prepare_image(control_image(), 32, 32, 1, 1, "cpu", torch.float32, do_classifier_free_guidance=True)
    assert [s["sample"][2:] for s in seen] == [(8, 8)] * 3 + [(16, 16)] * 3
    torch.testing.assert_close(seen[0]["cond"], F.interpolate(full, size=(16, 16), mode="area"), rtol=0, atol=0)
    torch.testing.assert_close(seen[-1]["cond"], full, rtol=0, atol=0)
    assert output.shape == (1, 32, 32, 3)


def test_after_the_cfg_stop_the_controlnet_runs_on_the_conditional_batch_without_its_cross_attention(model_dir):
    pipe = postdiff.apply(controlnet_pipeline(model_dir), PostDiffConfig(cfg_stop=3))
    seen, handle = record_controlnet_inputs(pipe.controlnet)
    recorder = UNetRecorder(pipe.controlnet, watch=[n for n, _ in pipe.controlnet.named_modules() if n.endswith("attn2.to_q")])
    output = call(pipe)
    handle.remove()
    recorder.remove()
    assert [s["sample"][0] for s in seen] == [2] * 3 + [1] * 3
    full = pipe.prepare_image(control_image(), 32, 32, 1, 1, "cpu", torch.float32, do_classifier_free_guidance=True)
    torch.testing.assert_close(seen[-1]["cond"], full[1:], rtol=0, atol=0)
    attn2_calls = [len(call["ran"]) for call in recorder.calls]
    assert attn2_calls[:3] == [attn2_calls[0]] * 3 and attn2_calls[0] > 0 and attn2_calls[3:] == [0] * 3
    assert np.isfinite(output).all()


def live_residuals_check(pipe, branch: int):
    """On cached steps, the residuals of the live skips s_0..s_branch equal a full ControlNet run's on the same
    inputs; returns how many cached steps were checked."""
    checked = []

    def compare(module, args, kwargs, output):
        step = pipe._postdiff.state.step
        if step is None or step.deep != "cached":
            return
        state = pipe._postdiff.state
        state.step = None  # hooks run the modules unchanged outside a step
        reference = module(*args, **kwargs)
        state.step = step
        for live in range(branch + 1):
            torch.testing.assert_close(output[0][live], reference[0][live], rtol=1e-5, atol=1e-6)
        checked.append(step.index)

    handle = pipe.controlnet.register_forward_hook(compare, with_kwargs=True)
    call(pipe)
    handle.remove()
    return checked


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_shallow_controlnet_cache_gives_fresh_residuals_for_the_live_skips(model_dir, branch):
    pipe = postdiff.apply(controlnet_pipeline(model_dir), PostDiffConfig(cache_interval=3, cache_branch=branch, controlnet_cache="shallow"))
    assert live_residuals_check(pipe, branch) == [1, 2, 4, 5]


def test_controlnet_cache_modes_run_what_they_say(model_dir):
    pipe = controlnet_pipeline(model_dir)
    ran = {}
    for mode in ("full", "shallow", "reuse"):
        postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1, controlnet_cache=mode))
        recorder = UNetRecorder(pipe.controlnet)
        call(pipe)
        recorder.remove()
        ran[mode] = [len(c["ran"]) for c in recorder.calls]
    everything = ran["full"][0]
    assert ran["full"] == [everything] * 6
    assert ran["reuse"][0::2] == [everything] * 3 and ran["reuse"][1::2] == [0] * 3
    assert ran["shallow"][0::2] == [everything] * 3 and all(0 < n < everything for n in ran["shallow"][1::2])


def test_reuse_returns_the_last_full_steps_residuals(model_dir):
    pipe = postdiff.apply(controlnet_pipeline(model_dir), PostDiffConfig(cache_interval=2, cache_branch=1, controlnet_cache="reuse"))
    outputs = []
    handle = pipe.controlnet.register_forward_hook(lambda m, a, o: outputs.append(o))
    call(pipe, control_guidance_end=1.0)
    handle.remove()
    for full, cached in zip(outputs[0::2], outputs[1::2]):
        assert all(torch.equal(a, b) for a, b in zip(full[0], cached[0])) and torch.equal(full[1], cached[1])


@pytest.mark.parametrize("window", [dict(control_guidance_end=0.5), dict(control_guidance_start=0.5)])
def test_reuse_follows_a_control_window_that_changes_on_a_cached_step(model_dir, window):
    """6 steps, k = 2: step 3 is cached. A window closing there gives zero residuals; one opening there runs the
    net (its last full step recorded them at scale 0)."""
    pipe = postdiff.apply(controlnet_pipeline(model_dir), PostDiffConfig(cache_interval=2, cache_branch=1, controlnet_cache="reuse"))
    outputs = []
    handle = pipe.controlnet.register_forward_hook(lambda m, a, o: outputs.append(o))
    recorder = UNetRecorder(pipe.controlnet)
    call(pipe, **window)
    handle.remove()
    recorder.remove()
    step3 = torch.cat([d.flatten() for d in outputs[3][0]] + [outputs[3][1].flatten()])
    if "control_guidance_end" in window:
        assert recorder.calls[3]["ran"] == [] and step3.abs().max() == 0
    else:
        assert recorder.calls[3]["ran"] != [] and step3.abs().max() > 0


def filled(store: dict) -> set[str]:
    return {key for key, slot in store.items() if slot.value is not None}


def test_multi_controlnet_caches_every_net_apart_and_remove_restores_them(model_dir):
    pipe = controlnet_pipeline(model_dir, nets=2)
    postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cache_branch=1, cfg_stop=4))
    state_keys = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: state_keys.append(filled(pipe._postdiff.state.deep)))
    output = call(pipe)
    handle.remove()
    assert {k.split(".")[1] for k in state_keys[0] if k.startswith("controlnet.")} == {"0", "1"}
    assert np.isfinite(output).all() and output.shape == (1, 32, 32, 3)
    postdiff.remove(pipe)
    assert hook_leftovers(pipe.controlnet) == []


def test_sdxl_controlnet_runs_every_postdiff_feature(model_dir):
    pipe = postdiff.apply(controlnet_pipeline(model_dir, xl=True),
                          PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cache_branch=1, cfg_stop=4))
    seen, handle = record_controlnet_inputs(pipe.controlnet)
    output = call(pipe, guess_mode=True)
    handle.remove()
    # Guess mode: the conditional batch only; DeepCache's cached steps (the second of each phase) reuse the
    # ControlNet's residuals, so it runs on the full steps 0, 2 | 3, 5.
    assert [tuple(s["sample"]) for s in seen] == [(1, 4, 8, 8)] * 2 + [(1, 4, 16, 16)] * 2
    assert np.isfinite(output).all() and output.shape == (1, 32, 32, 3)


def test_bad_control_inputs_are_refused_before_any_compute(model_dir):
    pipe = postdiff.apply(controlnet_pipeline(model_dir, nets=2), PostDiffConfig(beta=0.5, switch=0.5))
    recorder = UNetRecorder(pipe.unet)
    with pytest.raises(ValueError, match="image"):
        call(pipe, image=[control_image()])  # one image for two nets
    with pytest.raises(ValueError, match="control_guidance"):
        call(pipe, control_guidance_start=[0.1, 0.2, 0.3])
    assert recorder.calls == []


def test_a_controlnet_of_another_layout_is_refused_at_apply(model_dir):
    pipe = controlnet_pipeline(model_dir)
    torch.manual_seed(0)
    pipe.controlnet = ControlNetModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
                                      conditioning_embedding_out_channels=(4, 8))
    with pytest.raises(ConfigError, match="down layers"):
        postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1))
    assert hook_leftovers(pipe.unet) == []


@pytest.mark.parametrize("xl", [False, True])
@pytest.mark.parametrize("config", [
    PostDiffConfig(),
    PostDiffConfig(beta=0.5, switch=0.5, cache_interval=3, cache_branch=1, cfg_stop=4),
    PostDiffConfig(cache_interval=2, cache_branch=2, controlnet_cache="reuse"),
    PostDiffConfig(cache_interval=2, cache_branch=0, controlnet_cache="full", cfg_stop=3, ca_mode="none"),
])
def test_a_real_controlnet_run_costs_exactly_what_the_plan_predicts(model_dir, xl, config):
    from diffusers.models.attention_processor import AttnProcessor

    from postdiff.accounting import ControlNetSpec, plan_costs
    from postdiff.models import spec_from_pipeline

    pipe = controlnet_pipeline(model_dir, nets=2, xl=xl)
    pipe.unet.set_attn_processor(AttnProcessor())
    for net in pipe.controlnet.nets:
        net.set_attn_processor(AttnProcessor())
    postdiff.apply(pipe, config)
    arguments = dict(image=[control_image(0), control_image(1)], num_inference_steps=8, num_images_per_prompt=2)
    plan = postdiff.plan_call(pipe, prompt="a photo of a sneaker", **arguments)
    counted = PerCallFlops(pipe.unet, first=pipe.controlnet)
    call(pipe, **arguments)
    counted.remove()
    spec = ControlNetSpec(conditioning_embedding_out_channels=(4, 8), count=2)
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=2, controlnet=spec)]
    assert counted.flops == predicted
