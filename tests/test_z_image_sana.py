"""Z-Image (text-to-image and image-to-image) and SANA against diffusers: tiny random models of the real classes,
built here (Qwen3 and Gemma-2 text encoders, ZImageTransformer2DModel, SanaTransformer2DModel, AutoencoderKL,
AutoencoderDC). Z-Image's list CFG batch and its refiners outside the cached span; SANA's cross-attention cache,
resolution binning and f32 latents; block spans, costs, refusals, the shipped configs."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from test_accounting import PerCallFlops
from test_qwen_image import qwen_tokenizer, test_image
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer, Qwen3Config, Qwen3Model
from typer.testing import CliRunner

import postdiff
from postdiff import ConfigError, PostDiffConfig
from postdiff.accounting import plan_costs
from postdiff.cli import app
from postdiff.denoisers import meta_denoiser
from postdiff.models import load_model_spec, spec_from_pipeline

NUM_BLOCKS = 5  # branches 0..1
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def z_image_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # the pipeline wraps every prompt in a chat turn
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                          max_position_embeddings=512)).eval()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=NUM_BLOCKS, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)
    # Z-Image-Turbo's scheduler (accounting_configs/z-image-turbo-1024.json): a static shift
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, transformer=transformer)


def z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    pipe = ZImagePipeline(**z_image_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image_img2img_pipeline(seed: int = 0) -> ZImageImg2ImgPipeline:
    pipe = ZImageImg2ImgPipeline(**z_image_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's tokenizer class over printable ASCII, one token a character ("\u2581" for spaces)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    vocab.update({chr(code): 6 + index for index, code in enumerate(range(33, 127))})
    return GemmaTokenizer(vocab=vocab, merges=[])


def sana_pipeline(seed: int = 0) -> SanaPipeline:
    """sample_size 16: the 512 px bins of `use_resolution_binning`; a DC-AE of six stages: SANA's factor 32."""
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
                                            bos_token_id=2)).eval()
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=NUM_BLOCKS, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=16, sample_size=16, patch_size=1)
    stages = 6
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(4,) * stages,
                        decoder_block_out_channels=(4,) * stages, encoder_layers_per_block=(1,) * stages,
                        decoder_layers_per_block=(1,) * stages, encoder_qkv_multiscales=((),) * stages,
                        decoder_qkv_multiscales=((),) * stages, upsample_block_type="interpolate",
                        downsample_block_type="Conv", scaling_factor=0.41407)
    # SANA 1600M's scheduler (accounting_configs/sana-1600m-1024.json)
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"z-image": z_image_pipeline, "z-image-img2img": z_image_img2img_pipeline, "sana": sana_pipeline}
PIPELINES = list(BUILDERS)


def arguments(name: str, seed: int = 0, **overrides) -> dict:
    # Prompts of one length: Z-Image's captions keep their own token counts (see the cost test).
    call = dict(prompt="a photo of a sneaker", negative_prompt="a drawing of a shoe!", guidance_scale=4.0, num_inference_steps=8,
                output_type="latent", generator=torch.Generator().manual_seed(seed))
    if name == "sana":
        call.update(height=256, width=256, max_sequence_length=16, use_resolution_binning=False)
    else:
        call.update(height=32, width=32, max_sequence_length=64)
    if name == "z-image-img2img":
        call.update(image=test_image(), strength=0.75)
    call.update(overrides)
    return call


def run(pipe, name: str, seed: int = 0, **overrides):
    # Fresh prompt lists: ZImagePipeline._encode_prompt writes its chat template into a list prompt in place.
    overrides = {key: list(value) if isinstance(value, list) else value for key, value in overrides.items()}
    return pipe(**arguments(name, seed, **overrides)).images


@functools.cache
def plain_latents(name: str) -> torch.Tensor:
    """A plain diffusers call's latents (a fresh pipeline of the same seed is the same model)."""
    return run(BUILDERS[name](), name)


def as_tensor(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images))


def steps_of(name: str) -> int:
    return 6 if name == "z-image-img2img" else 8  # strength 0.75 of 8 steps


OFF_CASES = [(name, output) for name in PIPELINES for output in ("latent", "np")] + [
    ("z-image", dict(guidance_scale=0.0, negative_prompt=None, num_inference_steps=4)),  # Turbo's call: no CFG
    ("z-image", dict(num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"])),
    ("sana", dict(use_resolution_binning=True, output_type="np", height=256, width=256))]


@pytest.mark.parametrize("name, case", OFF_CASES)
def test_off_is_bit_identical_to_diffusers(name, case):
    overrides = case if isinstance(case, dict) else dict(output_type=case)
    pipe = BUILDERS[name]()
    baseline = run(pipe, name, **overrides)
    postdiff.apply(pipe, "off")
    assert torch.equal(as_tensor(run(pipe, name, **overrides)), as_tensor(baseline))


TECHNIQUES = {
    "paper": "paper",
    "blocks": PostDiffConfig(cache_interval=2, cache_branch=0),
    "mixed-full": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="full"),
    "mixed-own": PostDiffConfig(beta=0.5, switch=0.5, low_res_shift="own"),
    "cfg-stop-none": PostDiffConfig(cfg_stop=3, ca_mode="none"),
    **{f"cfg-stop-{mode}": PostDiffConfig(cfg_stop=3, ca_mode=mode) for mode in ("cond", "ave", "cfg")},
}
# Z-Image has no cross-attention nor a text stream: its CFG stop runs without a cache (the other modes are refused).
CASES = [(name, technique) for name in PIPELINES for technique in TECHNIQUES
         if technique != "cfg-stop-none" or name != "sana"
         if not (name.startswith("z-image") and technique in ("cfg-stop-cond", "cfg-stop-ave", "cfg-stop-cfg"))]


@pytest.mark.parametrize("name, technique", CASES)
def test_each_technique_changes_the_output_repeats_and_is_removed_without_a_trace(name, technique):
    pipe, baseline = BUILDERS[name](), plain_latents(name)
    postdiff.apply(pipe, TECHNIQUES[technique])
    first, second = run(pipe, name), run(pipe, name)
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert not torch.equal(first, baseline)
    assert torch.equal(first, second)  # same seed, same latents
    postdiff.remove(pipe)
    assert torch.equal(run(pipe, name), baseline)


def test_sanas_cross_attention_modes_differ_from_each_other():
    pipe = sana_pipeline()
    outputs = {mode: run(postdiff.apply(pipe, PostDiffConfig(cfg_stop=3, ca_mode=mode)), "sana")
               for mode in ("cond", "ave", "cfg", "none")}
    assert len({tuple(output.flatten().tolist()) for output in outputs.values()}) == 4


def _inputs_seen(pipe) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Every transformer call's inputs by name (the pipelines pass the first ones by position)."""
    names = ("hidden_states",) if isinstance(pipe, SanaPipeline) else ("x", "t", "cap_feats")
    seen = []

    def record(module, args, kwargs):
        seen.append({**dict(zip(names, args)), **kwargs})

    return seen, pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)


def _latent_side(name: str, inputs: dict) -> int:
    return inputs["hidden_states"].shape[-1] if name == "sana" else inputs["x"][0].shape[-1]


@pytest.mark.parametrize("name", PIPELINES)
def test_the_paper_preset_runs_three_quarter_size_first(name):
    pipe = postdiff.apply(BUILDERS[name](), "paper")
    family = "sana" if name == "sana" else "z-image"
    assert postdiff.api.preset_family(pipe) == family
    assert postdiff.config_of(pipe) == PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cache_branch=0,
                                                      low_res_shift="own")
    seen, handle = _inputs_seen(pipe)
    run(pipe, name)
    handle.remove()
    full, steps = (8 if name == "sana" else 16), steps_of(name)
    assert [_latent_side(name, k) for k in seen] == [full * 3 // 4] * (steps // 2) + [full] * (steps // 2)


@pytest.mark.parametrize("name", PIPELINES)
def test_mixed_resolution_runs_the_low_resolution_segment_first(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    run(pipe, name)
    handle.remove()
    full, steps = (8 if name == "sana" else 16), steps_of(name)
    assert [_latent_side(name, k) for k in seen] == [full // 2] * (steps // 2) + [full] * (steps // 2)
    batch = [len(k["x"]) if "x" in k else k["hidden_states"].shape[0] for k in seen]
    assert batch == [2] * steps  # the CFG batch at both sizes


def test_z_image_switch_renoises_the_traced_x0_at_the_next_sigma():
    pipe = postdiff.apply(z_image_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    seen, handle = _inputs_seen(pipe)
    _, traced = postdiff.trace_x0(pipe, **{**arguments("z-image"), "generator": torch.Generator().manual_seed(2)})
    handle.remove()
    replay = torch.Generator().manual_seed(2)
    torch.randn((1, 4, 8, 8), generator=replay)  # the low-resolution start
    noise = torch.randn((1, 4, 16, 16), generator=replay)
    upsampled = F.interpolate(traced[3], size=(16, 16), mode="bilinear", align_corners=False)
    sigma = pipe.scheduler.sigmas[4]
    expected = (1 - sigma) * upsampled + sigma * noise
    torch.testing.assert_close(seen[4]["x"][0][:, 0], expected[0], rtol=1e-5, atol=1e-5)  # the conditional image


@pytest.mark.parametrize("name", PIPELINES)
def test_callback_on_step_end_sees_the_calls_global_steps(name):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2))
    seen = []

    def callback(pipeline, index, timestep, tensors):
        seen.append((index, pipeline.num_timesteps, tensors["latents"].shape[-1]))
        return {}

    run(pipe, name, callback_on_step_end=callback)
    full, steps = (8 if name == "sana" else 16), steps_of(name)
    assert seen == [(i, steps, full // 2 if i < steps // 2 else full) for i in range(steps)]


def _timesteps(scheduler_class, config: dict, steps: int = 8, **kwargs) -> torch.Tensor:
    scheduler = scheduler_class(**config)
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler.timesteps


@pytest.mark.parametrize("shift", ["full", "own"])
def test_low_res_shift_own_scales_the_static_shift_and_full_keeps_the_requested_schedule(shift):
    """Z-Image-Turbo's static shift 3 and SANA's flow_shift 3: at beta 1/2 "own" runs the low phase on shift 1.5."""
    for name in ("z-image", "sana"):
        pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(beta=0.5, switch=0.5, low_res_shift=shift))
        seen, handle = _inputs_seen(pipe)
        run(pipe, name)
        handle.remove()
        low = 1.5 if shift == "own" else 3.0
        if name == "sana":
            config = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
            expected = [_timesteps(DPMSolverMultistepScheduler, {**config, "flow_shift": s}) for s in (low, 3.0)]
            timesteps = [float(k["timestep"][0]) for k in seen]
        else:
            sigmas = np.linspace(1.0, 1 / 8, 8).tolist()  # the pipeline's default sigmas
            expected = [_timesteps(FlowMatchEulerDiscreteScheduler, {"shift": s}, None, sigmas=sigmas) for s in (low, 3.0)]
            timesteps = [1000 - 1000 * float(k["t"][0]) for k in seen]  # the pipeline feeds (1000 - t) / 1000
        assert (shift == "own") != torch.equal(expected[0], expected[1])
        torch.testing.assert_close(torch.tensor(timesteps), torch.cat([expected[0][:4], expected[1][4:]]).float(),
                                   rtol=1e-5, atol=1e-3)


def _block_recorder(pipe, name: str):
    blocks = pipe.transformer.transformer_blocks if name == "sana" else pipe.transformer.layers
    calls, handles = [], [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append([]))]
    for index, block in enumerate(blocks):
        # A skipped block's hook wrapper still runs; its attention projections do not.
        attention = block.attn1 if name == "sana" else block.attention
        handles.append(attention.to_q.register_forward_pre_hook(lambda m, a, index=index: calls[-1].append(index)))
    return calls, handles


@pytest.mark.parametrize("name, branch", [("z-image", 0), ("z-image", 1), ("z-image-img2img", 0), ("sana", 0),
                                          ("sana", 1)])
def test_block_caching_skips_exactly_the_planned_span(name, branch):
    pipe = postdiff.apply(BUILDERS[name](), PostDiffConfig(cache_interval=3, cache_branch=branch))
    plan = postdiff.plan_call(pipe, **arguments(name))
    calls, handles = _block_recorder(pipe, name)
    refined = []
    if name != "sana":  # the refiners run on every step
        handles += [pipe.transformer.noise_refiner[0].register_forward_pre_hook(lambda m, a: refined.append("x")),
                    pipe.transformer.context_refiner[0].register_forward_pre_hook(lambda m, a: refined.append("cap"))]
    run(pipe, name)
    for handle in handles:
        handle.remove()
    assert len(calls) == len(plan)
    span = set(range(branch + 1, NUM_BLOCKS - branch - 1))
    for step, ran in zip(plan.steps, calls):
        assert ran == [i for i in range(NUM_BLOCKS) if step.deep == "full" or i not in span], step
    assert refined == ([] if name == "sana" else ["x", "cap"] * len(plan))


def test_z_image_cfg_stop_runs_the_conditional_half_and_caches_across_the_shorter_batch():
    """After the stop the transformer sees the conditional captions only; a cached step after the stop reuses the
    CFG batch's span residual cut to the shorter conditional batch (the negative prompt here pads to 96 tokens,
    the prompt to 64)."""
    pipe = postdiff.apply(z_image_pipeline(), PostDiffConfig(cfg_stop=3, ca_mode="none", cache_interval=2))
    seen = []
    handle = pipe.transformer.layers[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:2])))
    long_negative = "a black and white photo of a small coat and a bag"
    output = run(pipe, "z-image", negative_prompt=long_negative, max_sequence_length=128)
    handle.remove()
    # 64 image tokens, then the captions: the prompt's 39 tokens padded to 64, the negative prompt's 68 to 96.
    assert seen == [(2, 64 + 96)] * 3 + [(1, 64 + 64)] * 5  # step 3 (cached) reused step 2's residual, cut
    assert output.shape == (1, 4, 16, 16) and torch.isfinite(output).all()


def test_z_image_refiners_stay_outside_the_span_and_guidance_zero_has_no_cfg_to_stop():
    pipe = postdiff.apply(z_image_pipeline(), PostDiffConfig(cfg_stop=2, ca_mode="none"))
    turbo = dict(guidance_scale=0.0, negative_prompt=None)
    plan = postdiff.plan_call(pipe, **arguments("z-image", **turbo))
    assert not any(step.cfg for step in plan.steps)
    postdiff.remove(pipe)
    plain = run(pipe, "z-image", **turbo)
    assert torch.equal(run(postdiff.apply(pipe, PostDiffConfig(cfg_stop=2, ca_mode="none")), "z-image", **turbo), plain)


def test_z_image_img2img_encodes_the_area_downscaled_image_at_low_resolution():
    pipe = postdiff.apply(z_image_img2img_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    encoded = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: encoded.append(a[0].clone()))
    run(pipe, "z-image-img2img")
    handle.remove()
    full = pipe.image_processor.preprocess(test_image())
    assert len(encoded) == 1  # once, by the low-resolution segment; the second starts from latents=
    torch.testing.assert_close(encoded[0], F.interpolate(full, size=(16, 16), mode="area"))


def test_sana_bins_the_full_size_and_runs_the_low_segment_at_the_binned_size_times_beta():
    pipe = postdiff.apply(sana_pipeline(), PostDiffConfig(beta=0.5, switch=0.5))
    plan = postdiff.plan_call(pipe, **arguments("sana", use_resolution_binning=True, height=256, width=256))
    assert [phase.latent_hw for phase in plan.phases] == [(8, 8), (16, 16)]  # the 512 px bins' 512 x 512 for 256 x 256
    seen, handle = _inputs_seen(pipe)
    image = run(pipe, "sana", use_resolution_binning=True, height=256, width=256, output_type="np")
    handle.remove()
    assert image.shape == (1, 256, 256, 3)  # resized back to the request, as a plain call
    assert [tuple(k["hidden_states"].shape[-2:]) for k in seen] == [(8, 8)] * 4 + [(16, 16)] * 4


REFUSED = [
    ("sana", PostDiffConfig(cache_interval=2, cache_branch=2), {},
     "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    ("z-image", PostDiffConfig(cache_interval=2, cache_branch=2), {},
     "cache_branch=2 is not allowed: this transformer \\(5 blocks\\) has branches 0..1"),
    ("z-image", PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.8x0.8 latent .* a side of 0"),
    ("z-image", PostDiffConfig(cfg_stop=3, ca_mode="cond"), {}, "ca_mode='cond' needs a cross-attention or a text stream"),
    ("z-image-img2img", PostDiffConfig(beta=0.5, switch=0.5), dict(latents=torch.zeros(1, 4, 16, 16)),
     "latents= cannot be given"),
    ("z-image", PostDiffConfig(cache_interval=2), dict(cfg_truncation=0.5), "cfg_truncation=0.5 makes the pipeline drop CFG"),
    ("sana", PostDiffConfig(beta=0.05, switch=0.5), {}, "beta=0.05 gives a 0.4x0.4 latent .* a side of 0"),
    ("sana", PostDiffConfig(beta=0.5, switch=0.5), dict(latents=torch.zeros(1, 4, 8, 8)), "latents= cannot be given"),
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


def test_sana_low_resolution_sizes_must_be_whole_multiples_of_32_pixels():
    """With a VAE of factor 4 (three stages) a latent side is 4 pixels: the phase's must be a multiple of 8."""
    pipe = sana_pipeline()
    small = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types="ResBlock",
                          decoder_block_types="ResBlock", encoder_block_out_channels=(4,) * 3,
                          decoder_block_out_channels=(4,) * 3, encoder_layers_per_block=(1,) * 3,
                          decoder_layers_per_block=(1,) * 3, encoder_qkv_multiscales=((),) * 3,
                          decoder_qkv_multiscales=((),) * 3, upsample_block_type="interpolate", downsample_block_type="Conv")
    pipe = SanaPipeline(**{**pipe.components, "vae": small})
    assert pipe.vae_scale_factor == 4
    postdiff.apply(pipe, PostDiffConfig(beta=0.75, switch=0.5))  # 12 latents round to 8 (a tie: the smaller)
    assert postdiff.plan_call(pipe, **arguments("sana", height=64, width=64)).phases[0].latent_hw == (8, 8)
    postdiff.apply(pipe, PostDiffConfig(beta=0.2, switch=0.5))
    with pytest.raises(ConfigError, match="beta=0.2 gives a 3.2x3.2 latent for the 16x16 latent, which at the denoiser's "
                                          "multiple of 8 per side is 0x0: a side of 0"):
        postdiff.plan_call(pipe, **arguments("sana", height=64, width=64))


COST_CASES = [(name, technique) for name in ("z-image", "sana") for technique in ("off", "mixed-full", "blocks", "paper")]
COST_CASES += [("z-image", "cfg-stop-none"), ("sana", "cfg-stop-ave"), ("z-image-img2img", "paper")]


@pytest.mark.parametrize("name, technique", COST_CASES)
def test_real_run_costs_exactly_what_the_plan_predicts(name, technique):
    """Z-Image's plan counts every caption at the call's longest (the CFG batch is padded to it); its caption embedding
    runs on each caption's own length (in 32s), so prompts of one padded length here."""
    pipe = postdiff.apply(BUILDERS[name](), TECHNIQUES.get(technique, "off"))
    plan = postdiff.plan_call(pipe, **arguments(name, num_images_per_prompt=2))
    counted = PerCallFlops(pipe.transformer)
    with sdpa_kernel(SDPBackend.MATH):  # attention as matrix products the counter sees, as on the meta device
        run(pipe, name, num_images_per_prompt=2)
    counted.remove()
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=2)]
    assert counted.flops == predicted


# -- the shipped full-size configs

def _z_image_parameters(config: dict) -> int:
    """Per block: q, k, v, out (no biases), the SwiGLU feed-forward (hidden 8/3 dim) and the adaLN modulation (4 dim
    from a 256-wide timestep embedding; not in the context refiner); embeddings and the final layer around them."""
    d, hidden, adaln = config["dim"], int(config["dim"] / 3 * 8), min(config["dim"], 256)
    patch = config["all_patch_size"][0] ** 2 * config["in_channels"]
    block = 4 * d * d + 3 * d * hidden
    modulation = adaln * 4 * d + 4 * d
    blocks = (config["n_layers"] + config["n_refiner_layers"]) * (block + modulation) + config["n_refiner_layers"] * block
    embed = (patch * d + d) + (config["cap_feat_dim"] * d + d) + (256 * 1024 + 1024 + 1024 * adaln + adaln)
    final = (d * patch + patch) + (adaln * d + d)
    return blocks + embed + final


def _sana_parameters(config: dict) -> int:
    """Per block: the linear self-attention (q, k, v without biases, out with), the cross-attention (biased), the
    GLU Mix-FFN (1x1 up to 2 x hidden, depthwise 3x3, 1x1 down) and 6 modulation vectors; caption projection, timestep
    embedding and output layer."""
    d, text = config["num_attention_heads"] * config["attention_head_dim"], config["caption_channels"]
    cross = config["num_cross_attention_heads"] * config["cross_attention_head_dim"]
    hidden = int(config["mlp_ratio"] * d)
    self_attention = 3 * d * d + d * d + d
    cross_attention = (d * cross + cross) + 2 * (config["cross_attention_dim"] * cross + cross) + (cross * d + d)
    feed_forward = (d * 2 * hidden + 2 * hidden) + (2 * hidden * 9 + 2 * hidden) + hidden * d
    block = self_attention + cross_attention + feed_forward + 6 * d
    embed = config["in_channels"] * d + d + (text * d + d) + (d * d + d) + d + (256 * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    return config["num_layers"] * block + embed + 2 * d + d * config["out_channels"] + config["out_channels"]


@pytest.mark.parametrize("model, counter, billions", [("z-image-turbo-1024", _z_image_parameters, (6.0, 6.3)),
                                                      ("sana-1600m-1024", _sana_parameters, (1.55, 1.65))])
def test_the_shipped_configs_build_their_models_and_their_flops_run(model, counter, billions):
    spec = load_model_spec(model)
    counted = sum(p.numel() for p in meta_denoiser(spec.denoiser).parameters())
    assert abs(counted - counter(spec.denoiser.config)) / counted < 0.02
    assert billions[0] * 1e9 < counted < billions[1] * 1e9  # "6B" (Z-Image), "1600M" (SANA)
    result = CliRunner().invoke(app, ["flops", "--model", model, "--steps", "4", "--preset", "paper", "--json"])
    assert result.exit_code == 0, result.output
    per_step = json.loads(result.output)["per_step"]
    assert len(per_step) == 4 and per_step[0] < per_step[2]  # the low-resolution steps first
