"""Qwen-Image: text-to-image, image-to-image and edit against diffusers (tiny random models of the real classes,
built here: Qwen2.5-VL text encoder and processor, QwenImageTransformer2DModel, AutoencoderKLQwenImage), the
packed latent layout at the switch, true CFG's two passes, block spans, costs, refusals, the shipped config."""

from __future__ import annotations

import functools
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageImg2ImgPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from test_accounting import PerCallFlops
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs
from postdiff.cli import app
from postdiff.denoisers import DENOISER_KINDS, meta_denoiser
from postdiff.models import load_model_spec, spec_from_pipeline

NUM_BLOCKS = 5  # branches 0..1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]
# Qwen-Image's scheduler config (accounting_configs/qwen-image-1328.json)
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                 shift_terminal=0.02, time_shift_type="exponential")


def byte_level_symbols() -> list[str]:
    """The 256 symbols of byte-level BPE (GPT-2's byte-to-unicode table): one token per byte without merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def qwen_tokenizer() -> Qwen2Tokenizer:
    vocab = {symbol: index for index, symbol in enumerate(byte_level_symbols())}
    vocab.update({token: len(vocab) + index for index, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def qwen_text_encoder(tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=ids("<|im_start|>"),
                eos_token_id=ids("<|im_end|>"), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                  "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


class ImageOnlyProcessor(Qwen2VLProcessor):
    """The real Qwen2-VL processor, built without its video processor: transformers 5 cannot construct that one
    without torchvision (not installed here), and the edit pipeline gives the processor images only."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def qwen_vae(downsamplings: int) -> AutoencoderKLQwenImage:
    """The pipelines' VAE factor is 2 ** downsamplings: 2 for text-to-image and image-to-image at 32 px, 32 for the
    edit, whose condition image the pipeline sizes to about 1024 x 1024 pixels whatever the output size."""
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * (downsamplings + 1), num_res_blocks=0,
                                  temperal_downsample=[False] * downsamplings, latents_mean=[0.1, -0.2, 0.0, 0.3],
                                  latents_std=[1.5, 0.8, 1.0, 2.0])


def components(seed: int, downsamplings: int) -> dict:
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=NUM_BLOCKS,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(2, 2, 4))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=qwen_vae(downsamplings),
                text_encoder=qwen_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)


def text_to_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    pipe = QwenImagePipeline(**components(seed, 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline(seed: int = 0) -> QwenImageImg2ImgPipeline:
    pipe = QwenImageImg2ImgPipeline(**components(seed, 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    parts = components(seed, 5)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    pipe = QwenImageEditPipeline(**parts, processor=ImageOnlyProcessor(image_processor=image_processor,
                                                                        tokenizer=parts["tokenizer"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image(side: int = 32, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


test_image.__test__ = False  # a fixture maker, not a test
BUILDERS = {"t2i": text_to_image_pipeline, "img2img": img2img_pipeline, "edit": edit_pipeline}
# The edit's output is 256 px (an 8 x 8 latent with its VAE factor 32), its condition image 1024 px (32 x 32).
SIZES = {"t2i": 32, "img2img": 32, "edit": 256}


def arguments(name: str, seed: int = 0, **overrides) -> dict:
    side = SIZES[name]
    call = dict(prompt="a photo of a sneaker", negative_prompt="a drawing of a shoe!", true_cfg_scale=3.0, num_inference_steps=8,
                height=side, width=side, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed))
    if name == "img2img":
        call.update(image=test_image(), strength=0.75)
    if name == "edit":
        call.update(image=test_image(48, seed=1))
    call.update(overrides)
    return call


def run(pipe, name: str, seed: int = 0, **overrides):
    return pipe(**arguments(name, seed, **overrides)).images


@functools.cache
def plain_latents(name: str) -> torch.Tensor:
    """A plain diffusers call's latents (a fresh pipeline of the same seed is the same model)."""
    return run(BUILDERS[name](), name)


def as_tensor(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images))


OFF_CASES = [(name, output) for name in BUILDERS for output in ("latent", "np")] + [
    ("t2i", "pil"), ("t2i", dict(true_cfg_scale=1.0, negative_prompt=None, seed=3)),
    ("t2i", dict(num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"]))]


@pytest.mark.parametrize("name, case", OFF_CASES)
def test_off_is_bit_identical_to_diffusers(name, case):
    overrides = case if isinstance(case, dict) else dict(output_type=case)
    pipe = BUILDERS[name]()
    baseline = run(pipe, name, **overrides)
    postdiff.apply(pipe, "off")
    output = run(pipe, name, **overrides)
    if overrides.get("output_type") == "pil":
        baseline, output = [np.asarray(image) for image in baseline], [np.asarray(image) for image in output]
    assert torch.equal(as_tensor(output), as_tensor(baseline))


TECHNIQUES = {
    "paper": "paper",
    "blocks": PostDiffConfig(cache_interval=2, cache_branch=0),
    "mixed-full": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"),
    "mixed-own": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"),
    **{f"cfg-stop-{mode}": PostDiffConfig(cfg_stop=3, ca_mode=mode) for mode in ("cond", "ave", "cfg")},
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_changes_the_output_repeats_and_is_removed_without_a_trace(name, technique):
    pipe, baseline = BUILDERS[name](), plain_latents(name)
    postdiff.apply(pipe, TECHNIQUES[technique])
    first, second = run(pipe, name), run(pipe, name)
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert not torch.equal(first, baseline)
    assert torch.equal(first, second)  # same seed, same latents
    postdiff.remove(pipe)
    assert torch.equal(run(pipe, name), baseline)


def test_the_paper_preset_is_the_flow_models_and_runs_three_quarter_size_first():
    pipe = text_to_image_pipeline()
    assert postdiff.api.preset_family(img2img_pipeline()) == postdiff.api.preset_family(edit_pipeline()) == "qwen-image"
    postdiff.apply(pipe, "paper")
    assert postdiff.config_of(pipe) == PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cache_branch=0,
                                                      low_res_shift="own")
    seen, handle = _inputs_seen(pipe)
    run(pipe, "t2i")
    handle.remove()
    assert [k["hidden_states"].shape[1] for k in seen] == [36] * 8 + [64] * 8  # 12x12 then 16x16 latents, 2x2 tokens


def _inputs_seen(pipe) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("name", list(BUILDERS))
def test_mixed_resolution_runs_the_low_resolution_segment_first_on_its_own_rope_grid(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    run(pipe, name)
    handle.remove()
    low, full = {"t2i": (4, 8), "img2img": (4, 8), "edit": (2, 4)}[name]  # token grid sides
    condition = [(1, 16, 16)] if name == "edit" else []  # the edit's 1024 px condition image, at every resolution
    steps = 6 if name == "img2img" else 8  # strength 0.75 of 8 steps
    grids = [k["img_shapes"][0] for k in seen]
    assert grids == [[(1, low, low), *condition]] * steps + [[(1, full, full), *condition]] * steps  # two passes a step
    tokens = [k["hidden_states"].shape[1] for k in seen]
    extra = 256 if name == "edit" else 0
    assert tokens == [low * low + extra] * steps + [full * full + extra] * steps


def test_the_switch_renoises_the_traced_x0_at_the_next_sigma_in_the_packed_layout():
    pipe = postdiff.apply(text_to_image_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    generator = torch.Generator().manual_seed(2)
    _, traced = postdiff.trace_x0(pipe, **{**arguments("t2i"), "generator": generator})
    handle.remove()
    replay = torch.Generator().manual_seed(2)
    randn_tensor((1, 1, 4, 8, 8), generator=replay)  # the low-resolution start (the pipeline's 5-D noise)
    upsampled = torch.nn.functional.interpolate(traced[3], size=(16, 16), mode="bilinear", align_corners=False)
    noise = randn_tensor(upsampled.shape, generator=replay)
    sigma = pipe.scheduler.sigmas[4]  # the call left the pipeline's scheduler set for its 8 steps
    expected = pipe._pack_latents((1 - sigma) * upsampled + sigma * noise, 1, 4, 16, 16)
    assert traced[3].shape == (1, 4, 8, 8)
    torch.testing.assert_close(seen[8]["hidden_states"], expected, rtol=1e-5, atol=1e-5)


def _flow_timesteps(tokens: int, steps: int = 8) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.timesteps / 1000  # the pipeline feeds timestep / 1000


@pytest.mark.parametrize("shift", ["full", "own"])
def test_low_res_shift_takes_mu_from_the_requested_or_the_segments_token_count(shift):
    pipe = postdiff.apply(text_to_image_pipeline(), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift=shift))
    seen, handle = _inputs_seen(pipe)
    run(pipe, "t2i")
    handle.remove()
    low, full = _flow_timesteps(16 if shift == "own" else 64), _flow_timesteps(64)
    assert not torch.equal(_flow_timesteps(16), full)
    timesteps = torch.cat([k["timestep"] for k in seen[::2]])  # the conditional pass of every step
    torch.testing.assert_close(timesteps, torch.cat([low[:4], full[4:]]))


@pytest.mark.parametrize("name, branch", [("t2i", 0), ("t2i", 1), ("img2img", 0), ("edit", 1)])
def test_block_caching_skips_exactly_the_planned_span(name, branch):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cache_interval=3, cache_branch=branch))
    plan = postdiff.plan_call(pipe, **arguments(name))
    calls, handles = [], [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append([]))]
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        # A skipped block's hook wrapper still runs; its attention projections do not.
        handles.append(block.attn.to_q.register_forward_pre_hook(lambda m, a, index=index: calls[-1].append(index)))
    run(pipe, name)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * len(plan)  # true CFG: a conditional and an unconditional pass, each with its own cache
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for index, ran in enumerate(calls):
        step = plan.steps[index // 2]
        assert ran == [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span], (index, step)


def test_the_text_stream_cache_skips_the_text_only_work_after_the_cfg_stop():
    pipe = postdiff.apply(text_to_image_pipeline(), PostDiffConfig(cfg_stop=5))
    block = pipe.transformer.transformer_blocks[1]
    mlp, text_out = [], []
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: mlp.append(0)),
               block.txt_mlp.net[0].proj.register_forward_pre_hook(lambda m, a: mlp.__setitem__(-1, 1)),
               block.register_forward_hook(lambda m, a, output: text_out.append(output[0].clone()))]
    run(pipe, "t2i")
    for handle in handles:
        handle.remove()
    # Before the stop both passes run the text MLP; after it only the conditional pass runs, reading the record.
    assert mlp == [1] * 10 + [0] * 3
    torch.testing.assert_close(text_out[10], text_out[8])  # the conditional pass's last record
    assert all(torch.equal(text_out[10], later) for later in text_out[11:])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_callback_on_step_end_sees_the_calls_global_steps(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append((index, pipeline.num_timesteps, tuple(tensors["latents"].shape)))
        return {}

    run(pipe, name, callback_on_step_end=callback)
    steps = 6 if name == "img2img" else 8
    low, full = {"t2i": (16, 64), "img2img": (16, 64), "edit": (4, 16)}[name]
    assert seen == [(i, steps, (1, low if i < steps // 2 else full, 16)) for i in range(steps)]


def test_img2img_encodes_the_area_downscaled_image_at_low_resolution():
    pipe = postdiff.apply(img2img_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    encoded = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(a[0].clone()))
    run(pipe, "img2img")
    handle.remove()
    full = pipe.image_processor.preprocess(test_image(), height=32, width=32)
    expected = torch.nn.functional.interpolate(full, size=(16, 16), mode="area").unsqueeze(2)
    assert len(encoded) == 1  # once, by the first (low-resolution) segment; the second starts from latents=
    torch.testing.assert_close(encoded[0], expected)


def test_edit_encodes_its_condition_once_at_full_size_and_reuses_it_after_the_switch():
    pipe = postdiff.apply(edit_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    encoded, condition = [], []
    handles = [pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(tuple(a[0].shape))),
               pipe.transformer.register_forward_pre_hook(lambda m, a, k: condition.append(k["hidden_states"][:, -256:]),
                                                          with_kwargs=True)]
    run(pipe, "edit")
    for handle in handles:
        handle.remove()
    assert encoded == [(1, 3, 1, 1024, 1024)] * 2  # the probe's and the first segment's (the probe runs to the schedule)
    assert all(torch.equal(condition[0], later) for later in condition)  # the same condition tokens at both sizes


REFUSED = [
    ("t2i", PostDiffConfig(cache_interval=2, cache_branch=2), {},
     "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    ("t2i", PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.8x0.8 latent .* multiple of 2 per side is 0x0: a side of 0"),
    ("edit", PostDiffConfig(beta=0.97, switch=0.5), {}, "beta=0.97 gives a .* latent .* not smaller than the full size"),
    ("t2i", PostDiffConfig(beta=0.5, switch=0.5), dict(latents=torch.zeros(1, 64, 16)), "latents= cannot be given"),
    ("img2img", PostDiffConfig(cfg_stop=9), {}, "cfg_stop=9 is out of range for 6 steps"),
]


@pytest.mark.parametrize("name, config, overrides, message", REFUSED)
def test_bad_settings_are_refused_before_any_compute(name, config, overrides, message):
    pipe = BUILDERS[name]()
    calls = []
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae.encoder, pipe.vae.decoder):
        module.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=message):
        postdiff.apply(pipe, config)
        run(pipe, name, **overrides)
    assert calls == []


@pytest.mark.parametrize("mode", ["ave", "cfg"])
def test_combined_text_streams_of_prompts_of_different_lengths_are_refused_before_denoising(mode):
    pipe = postdiff.apply(text_to_image_pipeline(), PostDiffConfig(cfg_stop=3, ca_mode=mode))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(m))
    with pytest.raises(ConfigError, match=f"ca_mode='{mode}' combines the text streams .* prompt has \\d+ text tokens "
                                          "and its negative prompt \\d+"):
        run(pipe, "t2i", negative_prompt="a bag", max_sequence_length=512)  # the prompts' own token counts differ
    assert calls == []  # only the probe's text encoding ran
    postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode="cond"))
    assert run(pipe, "t2i", negative_prompt="a bag", max_sequence_length=512).shape == (1, 64, 16)


COST_CASES = [("t2i", technique) for technique in ("off", "mixed-full", "blocks", "cfg-stop-cond", "paper")] + [
    ("img2img", "paper"), ("img2img", "cfg-stop-ave"), ("edit", "mixed-full"), ("edit", "cfg-stop-cond")]


@pytest.mark.parametrize("name, technique", COST_CASES)
def test_real_run_costs_exactly_what_the_plan_predicts(name, technique):
    pipe = postdiff.apply(BUILDERS[name](), TECHNIQUES.get(technique, "off"))
    plan = postdiff.plan_call(pipe, **arguments(name, num_images_per_prompt=2))
    counted = PerCallFlops(pipe.transformer)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        run(pipe, name, num_images_per_prompt=2)
    counted.remove()
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=2)]
    # Two passes of batch 2 a CFG step, planned as one batch of 4; after the stop one pass (the gate answers the other).
    passes = [2 if step.cfg else 1 for step in plan.steps]
    bounds = np.cumsum([0, *passes])
    assert bounds[-1] == len(counted.flops)
    assert [sum(counted.flops[a:b]) for a, b in zip(bounds, bounds[1:])] == predicted


# -- the shipped full-size config

def _hand_counted_parameters(config: dict) -> int:
    """Qwen-Image's transformer from its config: per block two 6d modulations, the joint attention (q, k, v and out
    projections of both streams, biased) and two 4x MLPs; the embeddings and the output layer around them."""
    d, text = config["num_attention_heads"] * config["attention_head_dim"], config["joint_attention_dim"]
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    block = 2 * linear(d, 6 * d) + 8 * linear(d, d) + 2 * (linear(d, 4 * d) + linear(4 * d, d))
    embeddings = linear(config["in_channels"], d) + text + linear(text, d) + linear(256, d) + linear(d, d)
    out = linear(d, 2 * d) + linear(d, config["patch_size"] ** 2 * config["out_channels"])
    return config["num_layers"] * block + embeddings + out


def test_the_shipped_config_builds_qwen_image_and_its_flops_run():
    spec = load_model_spec("qwen-image-1328")
    model = meta_denoiser(spec.denoiser)
    assert type(model).__name__ == "QwenImageTransformer2DModel" and spec.latent_hw == (166, 166)
    counted = sum(p.numel() for p in model.parameters())
    assert abs(counted - _hand_counted_parameters(spec.denoiser.config)) / counted < 0.02
    assert 20.3e9 < counted < 20.5e9  # "20B" (the model card)
    result = CliRunner().invoke(app, ["flops", "--model", "qwen-image-1328", "--steps", "4", "--json"])
    assert result.exit_code == 0, result.output
    per_step = json.loads(result.output)["per_step"]
    assert len(per_step) == 4 and len(set(per_step)) == 1 and per_step[0] > 0
    # 1328 px is 83 x 83 tokens, 83 prime: beta 3/4's 124.5 latents round to 124 (62 x 62 whole 2x2 patches).
    result = CliRunner().invoke(app, ["plan", "--model", "qwen-image-1328", "--preset", "paper", "--steps", "4"])
    assert result.exit_code == 0 and "124x124" in result.output, result.output
    assert DENOISER_KINDS["qwen-image"].size_multiple(model) == 2
