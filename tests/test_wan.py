"""Wan 2.1 / 2.2 video pipelines on the engine (tiny random models of the real diffusers/transformers classes,
built here): "off" is diffusers bit for bit, every technique runs on (B, C, F, H, W) latents, the two experts of
Wan 2.2 each get their caches, the temporal option, the image-to-video condition at the segment's size, costs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from tiny import t5_tokenizer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs, total
from postdiff.cli import app
from postdiff.models import load_model_spec, spec_from_pipeline

NUM_BLOCKS = 5  # branches 0..1
WIDTH = 24  # 2 heads x 12 (Wan's RoPE splits a head's 12 channels 4 / 4 / 4 over frames, height, width)
STEPS = 8
UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
# UniPC's 8 timesteps at flow_shift 3: 999 954 900 833 750 643 500 301: Wan 2.2's boundary 0.875 x 1000 gives the
# high-noise expert steps 0-2 and the low-noise one steps 3-7.
EXPERT_CHANGE = 3


def tiny_transformer(seed: int, in_channels: int = 4, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=NUM_BLOCKS, rope_max_seq_len=32)
    return WanTransformer3DModel(**{**config, **overrides})


def tiny_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def tiny_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0)).eval()


def wan_pipeline(seed: int = 0, experts: bool = False, scheduler: str = "unipc") -> WanPipeline:
    """Wan 2.1 (one transformer), or Wan 2.2's layout: two experts split at boundary_ratio 0.875."""
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    sched = UniPCMultistepScheduler(**UNIPC) if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=tiny_text_encoder(len(tok)), vae=tiny_vae(),
                       transformer=tiny_transformer(seed + 1), scheduler=sched,
                       transformer_2=tiny_transformer(seed + 2) if experts else None,
                       boundary_ratio=0.875 if experts else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V's layout: latents, a 4-channel frame mask and the image's latents as channels (4 + 4 + 4), CLIP
    image tokens in the cross-attention (a 32 px CLIP with 2 px patches gives Wan's 257 tokens)."""
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              image_size=32, patch_size=2, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = tiny_transformer(seed + 1, in_channels=12, image_dim=16, added_kv_proj_dim=WIDTH)
    pipe = WanImageToVideoPipeline(tokenizer=tok, text_encoder=tiny_text_encoder(len(tok)), vae=tiny_vae(),
                                   scheduler=UniPCMultistepScheduler(**UNIPC), image_processor=processor,
                                   image_encoder=vision, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image() -> PIL.Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


BUILDERS = {"wan21": wan_pipeline, "wan22": lambda seed=0: wan_pipeline(seed, experts=True), "wan21-i2v": wan_i2v_pipeline}


def arguments(name: str, seed: int = 0, **overrides) -> dict:
    # Wan's I2V attention splits the image tokens off at 512 text tokens: its prompts keep max_sequence_length 512.
    values = dict(prompt="a photo of a sneaker", negative_prompt="", height=64, width=64, num_frames=9, num_inference_steps=STEPS,
                  guidance_scale=5.0, max_sequence_length=512 if name == "wan21-i2v" else 16, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
    if name == "wan21-i2v":
        # diffusers 0.42.1's I2V prompt cleaning calls ftfy unguarded (T2V checks is_ftfy_available), and ftfy is no
        # dependency here: its prompts come as (zero-padded) embeddings, as a caller with its own encoder gives them.
        embeds = torch.randn(2, 512, 16, generator=torch.Generator().manual_seed(7))
        values.update(image=image(), prompt=None, negative_prompt=None, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:])
    return {**values, **overrides}


def call(pipe, name: str, seed: int = 0, **overrides):
    return pipe(**arguments(name, seed, **overrides)).frames


def transformers_of(pipe) -> list:
    return [pipe.transformer] + ([pipe.transformer_2] if getattr(pipe, "transformer_2", None) is not None else [])


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_off_is_bit_identical_to_diffusers(name, output_type):
    pipe = BUILDERS[name]()
    baseline = call(pipe, name, output_type=output_type)
    postdiff.apply(pipe, "off")
    assert np.array_equal(np.asarray(call(pipe, name, output_type=output_type)), np.asarray(baseline))


TECHNIQUES = {
    "paper": "paper",
    "blocks": PostDiffConfig(cache_interval=2, cache_branch=0),
    "mixed-full": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"),
    "mixed-own": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"),
    "cfg-stop-cond": PostDiffConfig(cfg_stop=5, ca_mode="cond"),
    "cfg-stop-ave": PostDiffConfig(cfg_stop=5, ca_mode="ave"),
    "cfg-stop-cfg": PostDiffConfig(cfg_stop=5, ca_mode="cfg"),
    "temporal": PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5),
    "temporal-only": PostDiffConfig(switch=0.5, temporal_beta=0.5),
    "all": PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5, cache_interval=2, cfg_stop=5, ca_mode="ave"),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_output_keeps_its_shape_repeats_and_is_removed(name, technique):
    pipe = BUILDERS[name]()
    baseline = call(pipe, name)
    postdiff.apply(pipe, TECHNIQUES[technique])
    first, second = call(pipe, name, seed=0), call(pipe, name, seed=0)
    assert first.shape == baseline.shape == (1, 4, 3, 8, 8)
    assert torch.equal(first, second) and not torch.equal(first, baseline)
    postdiff.remove(pipe)
    assert torch.equal(call(pipe, name), baseline)


def _block_recorder(pipe):
    """Per transformer call: (which transformer, the blocks whose self-attention really ran)."""
    calls, handles = [], []
    for index, model in enumerate(transformers_of(pipe)):
        handles.append(model.register_forward_pre_hook(lambda m, a, index=index: calls.append((index, []))))
        for block_index, block in enumerate(model.blocks):
            handles.append(block.attn1.to_q.register_forward_pre_hook(lambda m, a, i=block_index: calls[-1][1].append(i)))
    return calls, handles


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("name", ["wan21", "wan22"])
@pytest.mark.parametrize("branch", [0, 1])
def test_block_caching_skips_exactly_the_planned_span(name, branch):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cache_interval=3, cache_branch=branch))
    plan = postdiff.plan_call(pipe, **arguments(name))
    calls, handles = _block_recorder(pipe)
    call(pipe, name)
    _remove(handles)
    assert len(calls) == 2 * len(plan)  # a conditional and an unconditional pass a step, each with its own residual
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for index, (model, ran) in enumerate(calls):
        step = plan.steps[index // 2]
        assert ran == [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span], (index, step)
        assert model == (name == "wan22" and step.index >= EXPERT_CHANGE)


def test_mixed_resolution_runs_low_resolution_clips_first_with_global_callbacks_and_keeps_the_frames():
    pipe = postdiff.apply(wan_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    shapes, seen = [], []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["hidden_states"].shape)),
                                                        with_kwargs=True)

    def callback(pipeline, index, t, tensors):
        seen.append((index, pipeline.num_timesteps, tuple(tensors["latents"].shape)))
        return {}

    video = call(pipe, "wan21", output_type="np", callback_on_step_end=callback)
    handle.remove()
    assert shapes == [(1, 4, 3, 4, 4)] * 8 + [(1, 4, 3, 8, 8)] * 8  # (B, C, F, h, w), two passes a step
    assert seen == [(i, STEPS, (1, 4, 3, 4, 4) if i < 4 else (1, 4, 3, 8, 8)) for i in range(STEPS)]
    assert video.shape == (1, 9, 64, 64, 3)  # 9 frames, as requested


@pytest.mark.parametrize("beta, low_hw", [(0.5, (4, 4)), (1.0, (8, 8))])
def test_temporal_beta_runs_a_shorter_clip_and_the_switch_resizes_its_x0_in_time_and_space(beta, low_hw):
    """temporal_beta 1/2 on 3 latent frames (9 frames): the low phase runs 2 latent frames (5 frames), at half size
    or (beta 1: mixed resolution in time only) at full size; the first full-size step starts from its last x0,
    resized linearly in time (ends in place) and bilinearly in space, re-noised at the full schedule's next sigma
    with the call's generator."""
    pipe = postdiff.apply(wan_pipeline(), PostDiffConfig(beta=beta, switch=0.5, temporal_beta=0.5))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].clone()), with_kwargs=True)
    generator = torch.Generator().manual_seed(3)
    video, traced = postdiff.trace_x0(pipe, **{**arguments("wan21"), "generator": generator, "output_type": "np"})
    handle.remove()
    assert [tuple(s.shape) for s in seen[::2]] == [(1, 4, 2, *low_hw)] * 4 + [(1, 4, 3, 8, 8)] * 4
    assert video.frames.shape == (1, 9, 64, 64, 3)
    replay = torch.Generator().manual_seed(3)
    randn_tensor((1, 4, 2, *low_hw), generator=replay)  # the low-resolution clip's initial noise
    low = traced[3]
    middle = (low[:, :, :1] + low[:, :, 1:]) / 2  # frame 1 of 3 from 2 frames, ends aligned: halfway
    in_time = torch.cat([low[:, :, :1], middle, low[:, :, 1:]], dim=2)
    in_space = F.interpolate(in_time.transpose(1, 2).flatten(0, 1), size=(8, 8), mode="bilinear", align_corners=False)
    upsampled = in_space.unflatten(0, (1, 3)).transpose(1, 2)
    noise = randn_tensor(upsampled.shape, generator=replay)
    scheduler = UniPCMultistepScheduler(**UNIPC)
    scheduler.set_timesteps(STEPS)
    sigma = scheduler.sigmas[4]
    torch.testing.assert_close(seen[8], (1 - sigma) * upsampled + sigma * noise, rtol=1e-5, atol=1e-5)


def test_wan_own_low_resolution_shift_steps_along_half_the_flow_shift():
    pipe = postdiff.apply(wan_pipeline(), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"))
    timesteps = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: timesteps.append(float(k["timestep"][0])), with_kwargs=True)
    call(pipe, "wan21")
    handle.remove()
    low, full = UniPCMultistepScheduler(**{**UNIPC, "flow_shift": 1.5}), UniPCMultistepScheduler(**UNIPC)
    low.set_timesteps(STEPS)
    full.set_timesteps(STEPS)
    assert timesteps[::2] == [float(t) for t in [*low.timesteps[:4], *full.timesteps[4:]]]
    assert not torch.equal(low.timesteps[:4], full.timesteps[:4])


def test_wan22_experts_each_run_their_steps_and_the_block_cache_restarts_where_the_expert_changes():
    """Block caching k=2 over 8 steps with a switch at 4: the low-noise expert's first step (3) computes every
    block (the high-noise expert's residual is not its own), then k counts from there."""
    pipe = postdiff.apply(wan_pipeline(experts=True), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    plan = postdiff.plan_call(pipe, **arguments("wan22"))
    assert [step.deep for step in plan.steps] == ["full", "cached", "full", "full", "full", "cached", "full", "cached"]
    assert plan.steps[EXPERT_CHANGE].events == ("denoiser_change",) and plan.steps[4].events == ("switch",)
    calls, handles = _block_recorder(pipe)
    call(pipe, "wan22")
    _remove(handles)
    assert [model for model, _ in calls] == [0] * 6 + [1] * 10
    assert [len(ran) for _, ran in calls[6:8]] == [NUM_BLOCKS] * 2  # the new expert's first step: every block
    without_reset = postdiff.make_plan(plan.config, STEPS, replace(plan.facts, denoiser_changes=()))
    assert without_reset.steps[EXPERT_CHANGE].deep == "cached"  # what the plan would do without the change


def test_wan22_cross_attention_records_are_kept_per_expert_and_one_that_never_recorded_is_refused():
    pipe = postdiff.apply(wan_pipeline(experts=True), PostDiffConfig(cfg_stop=5))
    outputs = {0: [], 1: []}
    handles = [model.blocks[2].attn2.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out.clone()))
               for i, model in enumerate(transformers_of(pipe))]
    call(pipe, "wan22")
    _remove(handles)
    # The high-noise expert runs steps 0-2 (both passes); the low-noise one records at steps 3-4 and reads after.
    assert len(outputs[0]) == 6 and len(outputs[1]) == 2 * 2 + 3
    assert all(torch.equal(cached, outputs[1][2]) for cached in outputs[1][4:])  # step 4's conditional pass
    calls = []
    for stop in (2, 3):
        refused = postdiff.apply(wan_pipeline(experts=True), PostDiffConfig(cfg_stop=stop))
        refused.transformer.register_forward_pre_hook(lambda m, a: calls.append(m))
        with pytest.raises(ConfigError, match=f"cfg_stop={stop} with ca_mode='cond': transformer_2 first runs at step 3, "
                                              "after the CFG stop, so it has no cross-attention output recorded"):
            call(refused, "wan22")
    assert calls == []
    call(postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode="none")), "wan22")  # no cache to read: runs


def test_i2v_condition_is_the_pipelines_own_at_the_segments_size():
    """The low-resolution steps see the mask and image latents a plain call at that size makes."""
    pipe = wan_i2v_pipeline()
    inputs = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: inputs.append(k["hidden_states"].clone()), with_kwargs=True)
    call(pipe, "wan21-i2v", height=32, width=32, num_inference_steps=1)
    call(pipe, "wan21-i2v", num_inference_steps=1)
    plain_low, plain_full = inputs[0][:, 4:], inputs[2][:, 4:]
    inputs.clear()
    postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5))
    call(pipe, "wan21-i2v")
    handle.remove()
    assert all(torch.equal(x[:, 4:], plain_low) for x in inputs[:8]) and all(torch.equal(x[:, 4:], plain_full) for x in inputs[8:])
    assert plain_low.shape == (1, 8, 3, 4, 4) and plain_low.abs().sum() > 0


def _no_compute(pipe) -> list:
    calls = []
    for module in (*transformers_of(pipe), pipe.text_encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    return calls


REFUSED = [
    (PostDiffConfig(cache_interval=2, cache_branch=2), {}, "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    (PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.4x0.4 latent .* multiple of 2 per side is 0x0: a side of 0; scales that work here: 0.13 to 0.87"),
    (PostDiffConfig(beta=0.5, switch=0.5), {"latents": torch.zeros(1, 4, 3, 8, 8)}, "latents= cannot be given with mixed resolution"),
    (PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.4), {}, "temporal_beta=0.4 gives 1.8 latent frames for the call's 3: .* "
                                                                  "values that work here: 0.5"),
    (PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5, switch_noise="block"), {}, "switch_noise='block' keeps .* temporal_beta=0.5"),
]


@pytest.mark.parametrize("config, overrides, message", REFUSED)
def test_bad_settings_are_refused_before_any_compute(config, overrides, message):
    pipe = wan_pipeline()
    calls = _no_compute(pipe)
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
        call(pipe, "wan21", **overrides)
    assert calls == []


def test_temporal_beta_is_validated_and_refused_for_image_pipelines_and_new_keys_leave_stored_rows_alone(model_dir):
    from tiny import sd_pipeline

    with pytest.raises(ConfigError, match="temporal_beta=1.5 is not allowed: expected a number in \\(0, 1\\]"):
        PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=1.5)
    with pytest.raises(ConfigError, match="temporal_beta=0.5 is not allowed: expected 1 unless switch > 0"):
        PostDiffConfig(temporal_beta=0.5)
    with pytest.raises(ConfigError, match="so beta \\(or, on video, temporal_beta\\) must be below 1 \\(got beta=1\\)"):
        PostDiffConfig(switch=0.5)
    assert PostDiffConfig(switch=0.5, temporal_beta=3 / 7).describe() == "switch=0.5 temporal_beta=3/7"
    assert "temporal_beta" not in PostDiffConfig(beta=0.5, switch=0.5).to_dict()
    assert PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5).to_dict()["temporal_beta"] == 0.5
    image_pipe = sd_pipeline(model_dir)
    with pytest.raises(ConfigError, match="temporal_beta=0.5 is for video pipelines: this U-Net denoises images"):
        postdiff.apply(image_pipe, PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5))
    with pytest.raises(ConfigError, match="temporal_beta=0.5 is for video pipelines"):
        load_model_spec("sd15-512").plan(PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5), 20)
    with pytest.raises(ConfigError, match="temporal_beta=0.5 is for video pipelines: this U-Net denoises images"):
        postdiff.apply(image_pipe, PostDiffConfig(switch=0.5, temporal_beta=0.5))  # in time only: nothing left to do


def test_temporal_beta_is_read_as_a_fraction_on_the_command_line():
    result = CliRunner().invoke(app, ["plan", "--model", "wan21-t2v-1.3b-480p", "--steps", "4", "--switch", "0.5",
                                      "--temporal-beta", "1/2"])
    assert result.exit_code == 0, result.output
    assert "config: switch=0.5 temporal_beta=1/2" in result.output
    assert "11x60x104" in result.output and "21x60x104" in result.output  # 41 frames at full size, then 81
    result = CliRunner().invoke(app, ["plan", "--model", "wan21-t2v-1.3b-480p", "--switch", "0.5", "--temporal-beta", "a/2"])
    assert result.exit_code == 2 and "temporal_beta: 'a/2' is not a number or a fraction such as 3/7" in result.output


class PerCallFlops:
    """FLOPs of every transformer forward of a real run, over all the pipeline's transformers, in call order."""

    def __init__(self, models):
        self.flops: list[int] = []
        self.handles = [h for m in models for h in (m.register_forward_pre_hook(self._start), m.register_forward_hook(self._stop))]

    def _start(self, module, args):
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def _stop(self, module, args, output):
        self.counter.__exit__(None, None, None)
        self.flops.append(self.counter.get_total_flops())


def per_step(flops: list[int], plan) -> list[int]:
    """Two passes a CFG step (planned as one batch of 2); after the CFG stop the unconditional pass never runs."""
    steps, index = [], 0
    for step in plan.steps:
        passes = 2 if step.cfg else 1
        steps.append(sum(flops[index : index + passes]))
        index += passes
    assert index == len(flops)
    return steps


COSTED = {"off": PostDiffConfig(), **{k: v for k, v in TECHNIQUES.items() if k in ("paper", "blocks", "cfg-stop-cond", "all")}}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("config", list(COSTED))
def test_real_run_costs_exactly_what_the_plan_predicts(name, config):
    pipe = postdiff.apply(BUILDERS[name](), COSTED[config])
    plan = postdiff.plan_call(pipe, **arguments(name))
    counted = PerCallFlops(transformers_of(pipe))
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        call(pipe, name)
    _remove(counted.handles)
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=1)]
    assert per_step(counted.flops, plan) == predicted


def wan_parameters(config: dict) -> int:
    """WanTransformer3DModel's parameters by hand: patch embedding, time / text embedders, per block two attentions
    (q, k, v, out with bias; q / k RMS norms over the width), the cross-attention norm, the feed-forward and a 6 x
    width modulation table; the output projection and its 2 x width table."""
    width, ffn, patch = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], 4
    embed = config["in_channels"] * patch * width + width
    time = 256 * width + width + width * width + width + width * 6 * width + 6 * width
    text = config["text_dim"] * width + width + width * width + width
    attention = 4 * (width * width + width) + 2 * width
    block = 2 * attention + 2 * width + (width * ffn + ffn + ffn * width + width) + 6 * width
    out = width * config["out_channels"] * patch + config["out_channels"] * patch + 2 * width
    return embed + time + text + config["num_layers"] * block + out


SHIPPED = {"wan21-t2v-1.3b-480p": ((60, 104), 21), "wan21-t2v-14b-720p": ((90, 160), 21), "wan22-t2v-a14b-720p": ((90, 160), 21)}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_configs_build_at_their_size_with_the_parameters_counted_by_hand_and_flops_runs(name):
    from postdiff.denoisers import meta_denoiser

    spec = load_model_spec(name)
    assert (spec.latent_hw, spec.denoiser.latent_frames) == SHIPPED[name]
    parameters = sum(p.numel() for p in meta_denoiser(spec.denoiser).parameters())
    assert parameters == pytest.approx(wan_parameters(spec.denoiser.config), rel=0.02)
    result = CliRunner().invoke(app, ["flops", "--json", "--model", name, "--steps", "4"])
    assert result.exit_code == 0, result.output
    per_step = json.loads(result.output)["per_step"]
    config = spec.denoiser.config
    width, tokens = config["num_attention_heads"] * config["attention_head_dim"], 21 * (spec.latent_hw[0] // 2) * (spec.latent_hw[1] // 2)
    # Per block: self-attention's 4 projections, cross-attention's query and output on the video tokens, its key and
    # value on the 512 text tokens, the feed-forward; CFG: a batch of 2.
    block = tokens * (6 * width * width + 2 * width * config["ffn_dim"]) + 512 * 2 * width * width
    assert per_step[0] * 1e12 == pytest.approx(2 * config["num_layers"] * block, rel=0.02)


def test_temporal_beta_saves_the_low_phases_frames_on_the_shipped_wan():
    spec = load_model_spec("wan21-t2v-1.3b-480p")
    costs = {}
    for label, config in {"off": PostDiffConfig(), "spatial": PostDiffConfig(beta=0.5, switch=0.5),
                          "temporal": PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5),
                          "temporal-only": PostDiffConfig(switch=0.5, temporal_beta=0.5)}.items():
        plan = spec.plan(config, 20)
        costs[label] = total(plan_costs(spec.denoiser, plan), "macs")
        if label.startswith("temporal"):
            assert [phase.latent_frames for phase in plan.phases] == [11, 21]  # 41 frames, then 81
    low_spatial = costs["spatial"] - costs["off"] / 2  # the 10 low-resolution steps
    low_temporal = costs["temporal"] - costs["off"] / 2
    assert low_temporal / low_spatial == pytest.approx(11 / 21, rel=0.02)
    low_in_time_only = costs["temporal-only"] - costs["off"] / 2
    assert low_in_time_only / (costs["off"] / 2) == pytest.approx(11 / 21, rel=0.03)  # the text's K/V stay per step


def test_resampling_a_video_cross_attention_record_is_the_frame_grid_resized_and_images_are_unchanged():
    from postdiff.caching.tokens import resample_tokens
    from postdiff.engine import resize

    grid = torch.randn(2, 5, 2, 4, 6)  # (n, channels, frames, h, w) of a 2x2-patch level of an (8, 12) latent
    tokens = grid.flatten(2).transpose(1, 2)  # frames x grid, as Wan orders its tokens
    expected = resize(grid, (8, 12), frames=3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(resample_tokens(tokens, (8, 12), (16, 24), 2, 3), expected)
    image = grid[:, :, 0]
    image_tokens = image.flatten(2).transpose(1, 2)
    assert torch.equal(resample_tokens(image_tokens, (8, 12), (16, 24)),
                       F.interpolate(image, size=(8, 12), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))


def test_the_embedded_video_model_is_driven_by_the_wan_adapter_with_its_text_length(model_dir):
    from postdiff.families import family_for
    from postdiff.testbed.video_model import DEFAULT_CALL, build_video_pipeline

    pipe = build_video_pipeline(model_dir / "video-tokenizer")
    pipe.set_progress_bar_config(disable=True)
    family = family_for(pipe)
    assert family.__name__ == "TestbedVideoFamily"
    run = dict(prompt="a photo of a sneaker", negative_prompt="", num_inference_steps=4, output_type="latent", **DEFAULT_CALL)
    baseline = pipe(**run, generator=torch.Generator().manual_seed(0)).frames
    postdiff.apply(pipe, "off")
    assert torch.equal(pipe(**run, generator=torch.Generator().manual_seed(0)).frames, baseline)
    postdiff.apply(pipe, PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=3 / 7))
    plan = postdiff.plan_call(pipe, **run)
    assert [(p.latent_hw, p.latent_frames) for p in plan.phases] == [((16, 16), 4), ((32, 32), 8)]
    assert plan.facts.text_length == pipe.tokenizer.model_max_length
    assert pipe(**run, generator=torch.Generator().manual_seed(0)).frames.shape == baseline.shape
    postdiff.apply(pipe, "paper")  # beta 3/4: 24 px frames, whole 4-pixel patches (Wan's 16-pixel rule at this scale)
    assert postdiff.plan_call(pipe, **run).phases[0].latent_hw == (24, 24)
    assert pipe(**run, generator=torch.Generator().manual_seed(0)).frames.shape == baseline.shape
    postdiff.remove(pipe)
    with pytest.raises(ValueError, match="divisible by 4 but are 30 and 32"):
        pipe(**{**run, "height": 30})
