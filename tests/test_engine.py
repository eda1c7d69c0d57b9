"""The engine (postdiff/engine.py): the pipeline's own `__call__` per resolution segment. What the mirrors'
references (test_mirror_references.py) cannot show: one progress bar, presets resolved from the pipeline, half
precision at a switch, and a matrix of diffusers features that must work under PostDiff as in plain diffusers
("off" bit for bit, the paper preset deterministic and different)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from test_pixart import pixart_pipeline
from test_sdxl_edit import img2img_pipeline as sdxl_img2img_pipeline
from tiny import call, hook_leftovers, sd_pipeline

import postdiff
from postdiff import ConfigError, PostDiffConfig, Preset

PAPER_SD = PostDiffConfig.preset("paper", family="sd")


# -- the user's view is one call

def test_one_progress_bar_counts_every_step_of_the_plan(model_dir, monkeypatch):
    bars = []
    original = DiffusionPipeline.progress_bar

    def recording(self, iterable=None, total=None):
        bar = original(self, iterable=iterable, total=total)
        bars.append(bar)
        return bar

    monkeypatch.setattr(DiffusionPipeline, "progress_bar", recording)
    pipe = postdiff.apply(sd_pipeline(model_dir, "pndm"), PAPER_SD)
    pipe.set_progress_bar_config(disable=False, file=io.StringIO())  # a disabled bar counts nothing
    plan = postdiff.plan_call(pipe, prompt="a bag", num_inference_steps=8, height=32, width=32)
    bars.clear()
    call(pipe)
    assert len(plan) == 10  # PNDM: 9 timesteps, and its warm-up repeated after the switch
    assert [(bar.total, bar.n) for bar in bars] == [(10, 10)]


def test_plan_call_leaves_the_pipeline_and_its_scheduler_untouched(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir, "euler"), PAPER_SD)
    before = dict(pipe.scheduler.__dict__)
    plan = postdiff.plan_call(pipe, prompt="a bag", num_inference_steps=6, height=32, width=32)
    assert [step.latent_hw for step in plan.steps] == [(8, 8)] * 3 + [(16, 16)] * 3
    assert pipe.scheduler.__dict__.keys() == before.keys() and pipe.scheduler.timesteps is before["timesteps"]
    assert not {"encode_prompt", "_postdiff_progress"} & pipe.__dict__.keys()


def test_an_error_inside_a_segment_leaves_the_real_scheduler_and_no_wrapper(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PAPER_SD)
    scheduler = pipe.scheduler

    def failing(pipe, index, t, tensors):
        if index == 5:
            raise RuntimeError("stop here")
        return {}

    with pytest.raises(RuntimeError, match="stop here"):
        call(pipe, callback_on_step_end=failing)
    assert pipe.scheduler is scheduler and "encode_prompt" not in pipe.__dict__
    assert pipe._postdiff.state.step is None
    np.testing.assert_array_equal(call(pipe), call(pipe))  # and the next calls are whole


def test_full_size_latents_with_mixed_resolution_are_refused_before_any_compute(model_dir):
    pipe = postdiff.apply(sd_pipeline(model_dir), PAPER_SD)
    encoded = []
    pipe.text_encoder.register_forward_pre_hook(lambda *a: encoded.append(1))
    with pytest.raises(ConfigError, match="latents= cannot be given with mixed resolution"):
        call(pipe, latents=torch.randn(1, 4, 16, 16))
    assert encoded == []


# -- presets from the pipeline

def test_presets_named_without_a_family_are_the_pipelines_own():
    assert PostDiffConfig.preset("paper") == Preset("paper")
    assert PostDiffConfig.preset("off") == PostDiffConfig()
    with pytest.raises(ConfigError, match="preset='fast' is not allowed"):
        Preset("fast")


@pytest.mark.parametrize("given", ["paper", Preset("paper")])
def test_apply_resolves_a_preset_for_the_pipelines_family(model_dir, given):
    pixart = postdiff.apply(pixart_pipeline(), given)
    assert postdiff.config_of(pixart) == PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cache_branch=0)
    xl_edit = postdiff.apply(sdxl_img2img_pipeline(model_dir), given)
    assert postdiff.config_of(xl_edit) == PostDiffConfig.preset("paper", family="sdxl")
    sd = postdiff.apply(sd_pipeline(model_dir), given)
    assert postdiff.config_of(sd) == PAPER_SD
    assert postdiff.api.preset_family(xl_edit) == "sdxl"


def test_apply_refuses_what_is_no_config(model_dir):
    with pytest.raises(ConfigError, match="config=3 is not allowed: expected a PostDiffConfig, a preset name"):
        postdiff.apply(sd_pipeline(model_dir), 3)


# -- half precision

@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_switch_keeps_the_samples_dtype(model_dir, scheduler, dtype):
    """The scheduler's x0 can arrive in float32; x0 and the re-noised latents take the sample's dtype."""
    pipe = postdiff.apply(sd_pipeline(model_dir, scheduler).to(dtype), PAPER_SD)
    seen = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = call(pipe, output_type="latent")
    assert latents.dtype == dtype and torch.isfinite(latents).all()
    assert set(seen) == {dtype} and len(seen) == 8


# -- what works in plain diffusers works under PostDiff

def _ip_adapter_state_dict(unet, embed_dim: int = 8) -> dict:
    """IP-Adapter weights of the original layout for `unet` (random): an image projection to 4 tokens and a key
    and value projection for every cross-attention (numbered 1, 3, 5, ... as the released files are)."""
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, embed_dim) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_k.weight.shape[0]
            ip_adapter[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.2
            ip_adapter[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.2
            key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _with_lora(pipe):
    from peft import LoraConfig

    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="style")
    pipe.set_adapters(["style"], [0.6])
    return pipe, {"cross_attention_kwargs": {"scale": 0.8}}


def _with_ip_adapter(pipe):
    torch.manual_seed(4)
    pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    pipe.set_ip_adapter_scale(0.7)
    embeds = torch.randn(2, 1, 8)  # [negative, image] under CFG, as `ip_adapter_image_embeds` takes them
    return pipe, {"ip_adapter_image_embeds": [embeds]}


def _with_freeu(pipe):
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    return pipe, {}


def _with_fused_qkv(pipe):
    pipe.fuse_qkv_projections()
    return pipe, {}


def _with_classic_attention(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())
    return pipe, {}


def _with_textual_inversion(pipe):
    token = "<sneaker-style>"
    pipe.load_textual_inversion({token: torch.randn(pipe.text_encoder.config.hidden_size) * 0.5}, token=token)
    return pipe, {"prompt": f"a photo of a {token}"}


# Features that compute the same image another way: only rounding can tell them apart (on some CPUs not even that).
SAME_MATH = {"fused-qkv", "attention-processor"}
FEATURES = {"lora": _with_lora, "ip-adapter": _with_ip_adapter, "freeu": _with_freeu, "fused-qkv": _with_fused_qkv,
            "attention-processor": _with_classic_attention, "textual-inversion": _with_textual_inversion}


@pytest.mark.parametrize("config", [PAPER_SD, PAPER_SD.with_changes(cfg_stop=5)], ids=["paper", "paper-cfg-stop"])
@pytest.mark.parametrize("feature", FEATURES)
def test_a_diffusers_feature_works_under_postdiff(model_dir, feature, config):
    pipe, arguments = FEATURES[feature](sd_pipeline(model_dir))
    plain = call(pipe, **arguments)
    without_feature = call(sd_pipeline(model_dir), **{**arguments, "prompt": "a photo of a sneaker",
                                                      "ip_adapter_image_embeds": None, "cross_attention_kwargs": None})
    if feature in SAME_MATH:
        np.testing.assert_allclose(plain, without_feature, atol=1e-5)
    else:
        assert not np.array_equal(plain, without_feature)  # the feature changes the image
    postdiff.apply(pipe, PostDiffConfig())
    np.testing.assert_array_equal(call(pipe, **arguments), plain)
    postdiff.apply(pipe, config)
    first, second = call(pipe, **arguments), call(pipe, **arguments)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all() and np.abs(first - plain).max() > 1e-4
    postdiff.remove(pipe)
    assert hook_leftovers(pipe.unet) == []
    np.testing.assert_array_equal(call(pipe, **arguments), plain)


def test_the_feature_reaches_the_low_resolution_segment(model_dir):
    """IP-Adapter image tokens enter every step's cross-attention, the low-resolution ones too."""
    pipe, arguments = _with_ip_adapter(sd_pipeline(model_dir))
    postdiff.apply(pipe, PAPER_SD)
    seen = []
    processor = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    processor.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]), with_kwargs=True)
    with_adapter = call(pipe, **arguments)
    pipe.set_ip_adapter_scale(0.0)
    assert not np.array_equal(call(pipe, **arguments), with_adapter)
    assert seen[:8] == [64] * 4 + [256] * 4  # 8x8 latent tokens at low resolution, then 16x16


def test_sd3_skip_layer_guidance_runs_under_postdiff_outside_the_caches(model_dir):
    """The extra skip-layer pass (`skip_layers`) runs the plain transformer: the block cache's state is the
    guided passes' only, so the cached steps are those of a call without skip-layer guidance pass for pass."""
    from test_flow import call as flow_call
    from test_flow import sd3_pipeline

    guidance = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.6)
    pipe = sd3_pipeline(model_dir)
    plain = flow_call(pipe, **guidance)
    assert not np.array_equal(plain, flow_call(pipe))
    postdiff.apply(pipe, PostDiffConfig())
    np.testing.assert_array_equal(flow_call(pipe, **guidance), plain)
    postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=6))
    batches = []
    pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    first, second = flow_call(pipe, **guidance), flow_call(pipe, **guidance)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all() and np.abs(first - plain).max() > 1e-4
    # 8 steps, 4 of them at low resolution: CFG (batch 2) until the stop at 6, then 1; the skip-layer pass
    # (batch 1) on the steps 0 < i < 4.8 of the call, in both segments; two calls.
    assert batches == ([2] + [2, 1] * 4 + [2] + [1, 1]) * 2


@pytest.mark.parametrize("name", ["ddpm", "lms", "deis", "tcd"])
def test_more_schedulers_switch_resolution(model_dir, name):
    """DDPM, LMS, DEIS and TCD: mixed resolution runs, is deterministic and changes the image (their x0 at every
    step is checked against an independent computation in test_hardening.py)."""
    from test_hardening import MORE_SCHEDULERS
    from tiny import SD_SCHEDULER

    pipe = sd_pipeline(model_dir)
    pipe.scheduler = MORE_SCHEDULERS[name].from_config(SD_SCHEDULER)
    plain = call(pipe)
    postdiff.apply(pipe, PAPER_SD)
    first, second = call(pipe), call(pipe)
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all() and np.abs(first - plain).max() > 1e-4


# DPMSolverSDEScheduler (refused for the same reason) cannot be built without torchsde, no dependency here.
@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_second_order_schedulers_are_refused_with_mixed_resolution_and_cache_alone(model_dir, name):
    import diffusers
    from tiny import SD_SCHEDULER

    pipe = sd_pipeline(model_dir)
    pipe.scheduler = getattr(diffusers, name).from_config(SD_SCHEDULER)
    with pytest.raises(ConfigError, match=f"scheduler {name} is not supported with mixed resolution: it is a second-order"):
        postdiff.apply(pipe, PAPER_SD)
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1))
    images = call(pipe, num_inference_steps=4)
    assert np.isfinite(images).all()


def test_lcm_interrupted_at_low_resolution_decodes_its_last_denoised_at_the_requested_size(model_dir):
    """The LCM pipeline decodes its loop's last `denoised`: the engine's decoding segment runs one pass-through
    step (denoiser and scheduler step are identities) so there is one, the upsampled low-resolution one."""
    import torch.nn.functional as F
    from tiny import lcm_pipeline

    pipe = postdiff.apply(lcm_pipeline(model_dir), PostDiffConfig(beta=0.5, switch=0.5))
    seen = []

    def interrupt(pipe, index, t, tensors):
        seen.append((index, tensors["denoised"].clone()))
        pipe._interrupt = index == 1
        return {}

    arguments = dict(prompt="a bag", num_inference_steps=4, height=32, width=32, callback_on_step_end=interrupt,
                     callback_on_step_end_tensor_inputs=["latents", "denoised"])
    latents = pipe(**arguments, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert [index for index, _ in seen] == [0, 1] and pipe._interrupt
    expected = F.interpolate(seen[-1][1], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    images = pipe(**arguments, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_model_cpu_offload_gives_the_same_images_under_postdiff(model_dir):
    """accelerate's offload hooks move the models to the execution device around their calls, and the pipeline
    frees (re-adds) them at the end of its call: the segments' calls free them once, at the end, and the hooks'
    `forward` stays inside PostDiff's (here the execution device is the CPU, the only one this machine has;
    sequential offload to the CPU fails in plain diffusers already)."""
    plain = call(sd_pipeline(model_dir))
    expected = call(postdiff.apply(sd_pipeline(model_dir), PAPER_SD.with_changes(cfg_stop=5)))
    pipe = sd_pipeline(model_dir)
    pipe.enable_model_cpu_offload(device="cpu")
    postdiff.apply(pipe, PostDiffConfig())
    np.testing.assert_array_equal(call(pipe), plain)
    postdiff.apply(pipe, PAPER_SD.with_changes(cfg_stop=5))
    np.testing.assert_array_equal(call(pipe), expected)
    postdiff.remove(pipe)
    np.testing.assert_array_equal(call(pipe), plain)
