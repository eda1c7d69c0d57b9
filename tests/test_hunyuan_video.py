"""HunyuanVideo-1.5 text-to-video on the engine (tiny random models of the real diffusers/transformers classes,
built here: the transformer, its VAE, a Qwen2.5-VL text model with a byte-level Qwen2 tokenizer, a ByT5 glyph
encoder, diffusers' CFG guider): "off" is diffusers bit for bit, each technique runs on its (B, C, F, H, W)
latents, the two-stream block layout, the text-stream cache over the guider's passes, costs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from test_wan import PerCallFlops, _remove, per_step
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5Config, T5EncoderModel
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs
from postdiff.caching.blocks import block_layout
from postdiff.cli import app
from postdiff.models import load_model_spec, spec_from_pipeline

NUM_BLOCKS = 5  # branches 0..1
STEPS = 8
TEXT_TOKENS = 24  # the tiny pipeline's Qwen2.5-VL prompt length (the real one: 1000)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A real byte-level Qwen2 tokenizer over the 256 byte symbols (no merges: a token a byte), with a chat template
    that keeps the prompt alone (the real template adds a system prompt the pipeline crops; the tiny call crops 0)."""
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}{% endfor %}"
    return tokenizer


def hunyuan_pipeline(seed: int = 0, **guider) -> HunyuanVideo15Pipeline:
    torch.manual_seed(seed)
    tokenizer, glyph_tokenizer = qwen_tokenizer(), ByT5Tokenizer()
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})).eval()
    glyph_encoder = T5EncoderModel(T5Config(vocab_size=len(glyph_tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                            num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                            decoder_start_token_id=0)).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=NUM_BLOCKS, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=8,
        rope_axes_dim=(2, 2, 4), target_size=32, task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=4)
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=glyph_encoder,
                                  tokenizer_2=glyph_tokenizer, guider=ClassifierFreeGuidance(**{"guidance_scale": 6.0, **guider}))
    pipe.tokenizer_max_length, pipe.prompt_template_encode_start_idx = TEXT_TOKENS, 0  # ByT5 (256) and image (729) as shipped
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", negative_prompt="", height=32, width=32, num_frames=9,
                     num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides}).frames


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_off_is_bit_identical_to_diffusers(output_type):
    pipe = hunyuan_pipeline()
    baseline = call(pipe, output_type=output_type)
    postdiff.apply(pipe, "off")
    assert np.array_equal(np.asarray(call(pipe, output_type=output_type)), np.asarray(baseline))


TECHNIQUES = {
    "paper": "paper",
    "blocks": PostDiffConfig(cache_interval=2, cache_branch=0),
    "mixed-full": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"),
    "mixed-own": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"),
    "cfg-stop-cond": PostDiffConfig(cfg_stop=5, ca_mode="cond"),
    "cfg-stop-ave": PostDiffConfig(cfg_stop=5, ca_mode="ave"),
    "cfg-stop-cfg": PostDiffConfig(cfg_stop=5, ca_mode="cfg"),
    "temporal": PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5),
    "all": PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5, cache_interval=2, cfg_stop=5, ca_mode="ave"),
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_output_keeps_its_shape_repeats_and_is_removed(technique):
    pipe = hunyuan_pipeline()
    baseline = call(pipe)
    postdiff.apply(pipe, TECHNIQUES[technique])
    first, second = call(pipe), call(pipe)
    assert first.shape == baseline.shape == (1, 4, 3, 8, 8)
    assert torch.equal(first, second) and not torch.equal(first, baseline)
    postdiff.remove(pipe)
    assert torch.equal(call(pipe), baseline)


def test_the_two_stream_block_layout_is_the_blocks_own():
    """UNLISTED_LAYOUTS says (image out 0, text out 1) from `hidden_states`, `encoder_hidden_states`: checked on a
    real block with streams of different lengths and contents."""
    pipe = hunyuan_pipeline()
    block = pipe.transformer.transformer_blocks[0]
    layout = block_layout(block)
    assert (layout.hidden_argument, layout.text_argument, layout.hidden_output, layout.text_output) == \
        ("hidden_states", "encoder_hidden_states", 0, 1)
    hidden, text, temb = torch.randn(1, 12, 16), torch.randn(1, 5, 16), torch.randn(1, 16)
    with torch.no_grad():
        output = block(hidden, text, temb, torch.ones(1, 5))
    image_out, text_out = layout.split(output)
    assert image_out.shape == hidden.shape and text_out.shape == text.shape
    assert layout.streams((hidden, text, temb), {}) == (hidden, text)


def _block_recorder(pipe):
    calls, handles = [], [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append([]))]
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        handles.append(block.attn.to_q.register_forward_pre_hook(lambda m, a, i=index: calls[-1].append(i)))
    return calls, handles


@pytest.mark.parametrize("branch", [0, 1])
def test_block_caching_skips_exactly_the_planned_span(branch):
    pipe = postdiff.apply(hunyuan_pipeline(), PostDiffConfig(cache_interval=3, cache_branch=branch))
    plan = postdiff.plan_call(pipe, "a photo of a sneaker", negative_prompt="", height=32, width=32, num_frames=9,
                              num_inference_steps=STEPS)
    calls, handles = _block_recorder(pipe)
    call(pipe)
    _remove(handles)
    assert len(calls) == 2 * len(plan)  # the guider's two passes a step, each with its own residual
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for index, ran in enumerate(calls):
        step = plan.steps[index // 2]
        assert ran == [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span], (index, step)


def test_mixed_resolution_runs_low_resolution_clips_first_and_keeps_the_frames():
    """HunyuanVideo15Pipeline has no step callback: the steps are seen at the transformer."""
    pipe = postdiff.apply(hunyuan_pipeline(), PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.5))
    shapes, timesteps = [], []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["hidden_states"].shape))
        timesteps.append(float(kwargs["timestep"][0]))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    video = call(pipe, output_type="np")
    handle.remove()
    assert shapes == [(1, 9, 2, 4, 4)] * 8 + [(1, 9, 3, 8, 8)] * 8  # latents + condition + mask: 4 + 4 + 1 channels
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1])
    assert timesteps[::2] == [float(t) for t in scheduler.timesteps]  # "full": the call's schedule throughout
    assert video.shape == (1, 9, 32, 32, 3)


def test_text_stream_cache_reads_the_conditional_record_after_the_stop():
    pipe = postdiff.apply(hunyuan_pipeline(), PostDiffConfig(cfg_stop=5))
    text_out, feed_forward = [], []
    block = pipe.transformer.transformer_blocks[2]
    handles = [block.register_forward_hook(lambda m, a, output: text_out.append(output[1].clone())),
               pipe.transformer.register_forward_pre_hook(lambda m, a: feed_forward.append(0)),
               block.ff_context.net[0].proj.register_forward_pre_hook(lambda m, a: feed_forward.__setitem__(-1, 1))]
    call(pipe)
    _remove(handles)
    assert feed_forward == [1] * 10 + [0] * 3  # both passes before the stop, the conditional one after
    assert all(torch.equal(cached, text_out[8]) for cached in text_out[10:])  # step 4's conditional pass


REFUSED = [
    (dict(), PostDiffConfig(cache_interval=2, cache_branch=2), "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    (dict(), PostDiffConfig(beta=0.05, switch=0.5), "beta=0.05 gives a 0.4x0.4 latent .* a side of 0"),
    (dict(), PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=0.25), "temporal_beta=0.25 gives 1.5 latent frames for the call's 3"),
    (dict(start=0.2), PostDiffConfig(cache_interval=2), "a CFG window \\(guider start=0.2, stop=1.0\\) is computed from the step index"),
]


@pytest.mark.parametrize("guider, config, message", REFUSED)
def test_bad_settings_are_refused_before_any_compute(guider, config, message):
    pipe = hunyuan_pipeline(**guider)
    calls = []
    for module in (pipe.transformer, pipe.text_encoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
        call(pipe)
    assert calls == []
    with pytest.raises(ConfigError, match="latents= cannot be given with mixed resolution"):
        call(postdiff.apply(hunyuan_pipeline(), PostDiffConfig(beta=0.5, switch=0.5)), latents=torch.zeros(1, 4, 3, 8, 8))


@pytest.mark.parametrize("config", ["off", "paper", "blocks", "cfg-stop-cond", "all"])
def test_real_run_costs_exactly_what_the_plan_predicts(config):
    pipe = postdiff.apply(hunyuan_pipeline(), TECHNIQUES.get(config, PostDiffConfig()))
    plan = postdiff.plan_call(pipe, "a photo of a sneaker", negative_prompt="", height=32, width=32, num_frames=9,
                              num_inference_steps=STEPS)
    counted = PerCallFlops([pipe.transformer])
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        call(pipe)
    _remove(counted.handles)
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=1)]
    assert per_step(counted.flops, plan) == predicted


def hunyuan_parameters(config: dict) -> int:
    """The 54 two-stream blocks by hand (each stream: an adaLN-Zero 6 x width modulation, q / k / v / out projections
    with bias and per-head q / k RMS norms, a 4x feed-forward), plus the embedders' main projections: the
    Qwen2.5-VL token refiner (input projection, time and pooled-text embedders, 2 refiner blocks with a 2 x width
    adaLN), the ByT5 projection
    (1472 -> 2048 -> width -> width), the image projection, the time embedding and the output projection."""
    width, head = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    ffn = int(width * config["mlp_ratio"])
    linear = lambda i, o: i * o + o  # noqa: E731
    stream = linear(width, 6 * width) + 4 * linear(width, width) + 2 * head + linear(width, ffn) + linear(ffn, width)
    refiner_block = 2 * 2 * width + 4 * linear(width, width) + linear(width, ffn) + linear(ffn, width) + linear(width, 2 * width)
    refiner = 2 * linear(config["text_embed_dim"], width) + linear(256, width) + 2 * linear(width, width) + \
        config["num_refiner_layers"] * refiner_block  # input projection; its time and pooled-text embedders; blocks
    byt5 = 2 * config["text_embed_2_dim"] + linear(config["text_embed_2_dim"], 2048) + linear(2048, width) + linear(width, width)
    image = 2 * config["image_embed_dim"] + linear(config["image_embed_dim"], config["image_embed_dim"]) + \
        linear(config["image_embed_dim"], width) + 2 * width
    time = linear(256, width) + linear(width, width)
    out = linear(width, 2 * width) + linear(width, config["out_channels"]) + linear(config["in_channels"], width)
    return config["num_layers"] * 2 * stream + refiner + byt5 + image + time + out


def test_shipped_config_builds_at_its_size_with_the_parameters_counted_by_hand_and_flops_runs():
    from postdiff.denoisers import meta_denoiser

    spec = load_model_spec("hunyuanvideo15-480p")
    assert (spec.latent_hw, spec.denoiser.latent_frames) == ((30, 53), 31)  # 480x848, 121 frames
    parameters = sum(p.numel() for p in meta_denoiser(spec.denoiser).parameters())
    assert parameters == pytest.approx(hunyuan_parameters(spec.denoiser.config), rel=0.02)
    result = CliRunner().invoke(app, ["flops", "--json", "--model", "hunyuanvideo15-480p", "--steps", "4", "--cfg-stop", "2"])
    assert result.exit_code == 0, result.output
    per_step_macs = json.loads(result.output)["per_step"]
    assert per_step_macs[2] < 0.51 * per_step_macs[0]  # after the stop: one pass, the text-only work skipped
    # 53 latent columns: beta 1/2 rounds them to 26 (patch 1: any side), the rows are 15 exactly.
    plan = CliRunner().invoke(app, ["plan", "--model", "hunyuanvideo15-480p", "--beta", "0.5", "--switch", "0.5", "--steps", "4"])
    assert plan.exit_code == 0 and "31x15x26" in plan.output, plan.output
