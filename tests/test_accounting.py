"""Accounting counts the plan on the meta device; the sampler's real run must cost exactly that."""

from __future__ import annotations

import json

import pytest
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode
from tiny import call, sd_pipeline, sdxl_pipeline
from typer.testing import CliRunner

import postdiff
from postdiff import PostDiffConfig
from postdiff.accounting import plan_costs, total
from postdiff.cli import app
from postdiff.models import spec_from_pipeline


class PerCallFlops:
    """FLOPs of every denoiser forward of a real run (the classic attention processor makes attention countable);
    with `first` (a ControlNet, which runs before the U-Net in a step), from `first`'s start to the U-Net's end."""

    def __init__(self, unet, first=None):
        self.flops: list[int] = []
        self.handles = [(first or unet).register_forward_pre_hook(self._start), unet.register_forward_hook(self._stop)]

    def _start(self, module, args):
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def _stop(self, module, args, output):
        self.counter.__exit__(None, None, None)
        self.flops.append(self.counter.get_total_flops())

    def remove(self):
        for handle in self.handles:
            handle.remove()


CONFIGS = {
    "off": PostDiffConfig(),
    "mixed": PostDiffConfig(beta=0.5, switch=0.5),
    "deepcache-b1": PostDiffConfig(cache_interval=3, cache_branch=1),
    "cfg-stop-cond": PostDiffConfig(cfg_stop=3),
    "cfg-stop-none": PostDiffConfig(cfg_stop=3, ca_mode="none"),
    "paper+ca-at-low-res": PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=2, ca_mode="ave"),
    "progressive": PostDiffConfig(beta=0.5, switch=0.25, progressive=((0.75, 0.25),), cache_interval=2),
}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_real_run_costs_exactly_what_the_plan_predicts(model_dir, family, name):
    pipe = (sd_pipeline if family == "sd" else sdxl_pipeline)(model_dir)
    pipe.unet.set_attn_processor(AttnProcessor())
    postdiff.apply(pipe, CONFIGS[name])
    arguments = dict(prompt="a photo of a sneaker", num_inference_steps=8, height=64, width=64, num_images_per_prompt=2)
    plan = postdiff.plan_call(pipe, **arguments)
    counted = PerCallFlops(pipe.unet)
    call(pipe, **arguments)
    counted.remove()
    predicted = [cost.value("flops") for cost in plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=2)]
    assert counted.flops == predicted
    off_plan = postdiff.make_plan(PostDiffConfig(), len(plan.steps), plan.facts)
    off_total = total(plan_costs(spec_from_pipeline(pipe).denoiser, off_plan, num_images=2), "flops")
    assert (sum(predicted) < off_total) == (name != "off")


def test_macs_exclude_attention_products_and_flops_include_them(model_dir):
    spec = spec_from_pipeline(sd_pipeline(model_dir))
    plan = postdiff.make_plan(PostDiffConfig(), 4, postdiff.ModelFacts((16, 16), 4, 4))
    costs = plan_costs(spec.denoiser, plan)
    assert all(cost.attention_macs > 0 for cost in costs)
    assert total(costs, "flops") == 2 * sum(cost.macs + cost.attention_macs for cost in costs)


def _flops_json(*arguments) -> dict:
    result = CliRunner().invoke(app, ["flops", "--json", *arguments])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_flops_cli_reproduces_the_papers_sd15_ratios():
    """PAPER.md: mixed resolution 19.035/30.420, DeepCache 17.787/30.420, both 11.129/30.420."""
    base = _flops_json("--model", "sd15-512", "--steps", "20")["total"]
    assert base == pytest.approx(20 * 2 * 0.3387, rel=2e-3)  # the well-known 338.7 GMACs per SD 1.5 forward
    ratios = {
        ("--beta", "0.5", "--switch", "0.5"): 19.035 / 30.420,
        ("--cache-interval", "2", "--cache-branch", "1"): 17.787 / 30.420,  # the paper's DeepCache branch
        ("--preset", "deepcache"): 17.787 / 30.420,
        ("--preset", "paper"): 11.129 / 30.420,
    }
    for flags, paper_ratio in ratios.items():
        ours = _flops_json("--model", "sd15-512", "--steps", "20", *flags)["total"] / base
        assert ours == pytest.approx(paper_ratio, rel=0.01), flags


def test_flops_cli_refuses_bad_input_with_one_clear_error():
    result = CliRunner().invoke(app, ["flops", "--model", "sd15-512", "--convention", "watts"])
    assert result.exit_code == 2 and "convention='watts' is not allowed" in result.output
    result = CliRunner().invoke(app, ["flops", "--model", "nope"])
    assert result.exit_code == 2 and "model='nope' is not a shipped model" in result.output


def test_plan_cli_prints_the_plan():
    result = CliRunner().invoke(app, ["plan", "--model", "sd15-512", "--steps", "10", "--preset", "paper", "--cfg-stop", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "model: sd15-512" and "10 steps" in lines[1] and len(lines) == 13
    assert "32x32" in lines[3] and "64x64" in lines[-1] and "switch" in lines[8] and "CFG stops" in lines[6]
    testbed = CliRunner().invoke(app, ["plan", "--steps", "10", "--preset", "paper"]).output.splitlines()
    assert testbed[0] == "model: testbed" and "16x16" in testbed[3]  # generate's default model


def test_flops_cli_reproduces_the_papers_absolute_numbers_at_sd21_768():
    """The paper's "SD v1.5" FLOPs are SD 2.1's U-Net at 768 px (docs/accounting.md)."""
    rows = {
        ("--steps", "20"): 30.420,
        ("--steps", "8"): 12.168,
        ("--steps", "20", "--beta", "0.5", "--switch", "0.5"): 19.035,
        ("--steps", "20", "--cache-interval", "2", "--cache-branch", "1"): 17.787,
        ("--steps", "20", "--preset", "paper"): 11.129,
    }
    for flags, paper in rows.items():
        assert _flops_json("--model", "sd21-768", *flags)["total"] == pytest.approx(paper, rel=5e-4), flags


def _real_macs(run) -> float:
    from postdiff.accounting import count_call

    return count_call(run)[0]


@pytest.mark.parametrize("builder", ["sd", "sdxl"])
def test_text_encoders_and_vae_of_a_local_folder_cost_what_the_real_components_cost(model_dir, tmp_path, builder):
    import torch

    from postdiff.models import load_model_spec

    pipe = sd_pipeline(model_dir) if builder == "sd" else sdxl_pipeline(model_dir)
    if builder == "sdxl":
        pipe.register_to_config(force_zeros_for_empty_prompt=True)  # SDXL's default: the empty negative is zeros
    pipe.save_pretrained(tmp_path / "pipe")
    spec = load_model_spec(str(tmp_path / "pipe"))
    costs = spec.component_costs(with_vae=True, with_text=True)
    pipe.vae.set_attn_processor(AttnProcessor())
    latent = torch.zeros(1, pipe.vae.config.latent_channels, *spec.latent_hw)
    assert costs["vae decoder"][0] == _real_macs(lambda: pipe.vae.decode(latent))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if builder == "sdxl" else [])
    prompts = 2 if builder == "sd" else 1  # SDXL's empty negative prompt is not encoded
    ids = torch.zeros(prompts, spec.denoiser.text_length, dtype=torch.int64)
    text_costs = [value[0] for name, value in costs.items() if name.startswith("text_encoder")]
    assert text_costs == [_real_macs(lambda e=encoder: e(input_ids=ids)) for encoder in encoders]
    assert spec_from_pipeline(pipe).component_costs(with_vae=True, with_text=True) == costs  # a loaded pipeline counts the same


def test_flops_cli_adds_text_and_vae_once_per_call_and_refuses_them_where_a_model_has_none():
    plain = _flops_json("--model", "sd15-512", "--steps", "8")
    full = _flops_json("--model", "sd15-512", "--steps", "8", "--with-vae", "--with-text")
    big = _flops_json("--model", "sd21-768", "--steps", "20", "--preset", "paper", "--with-vae", "--with-text")
    assert full["denoiser"] == plain["total"] and full["total"] == pytest.approx(full["denoiser"] + sum(full["components"].values()))
    vae_512, vae_768 = full["components"]["vae decoder"], big["components"]["vae decoder"]
    assert vae_768 == pytest.approx(vae_512 * (768 / 512) ** 2, rel=1e-9)  # convolutions and projections scale with pixels
    assert vae_512 == pytest.approx(1.24, rel=0.01)  # the SD VAE decoder's well-known ~1.24 TMACs at 512 px
    xl = _flops_json("--model", "sdxl-1024", "--with-text")
    assert [name.split(" ")[0] for name in xl["components"]] == ["text_encoder", "text_encoder_2"]
    result = CliRunner().invoke(app, ["flops", "--model", "testbed", "--with-vae"])
    assert result.exit_code == 2 and "has no VAE" in result.output


def test_a_local_pixart_folder_is_counted_like_the_pipeline_it_holds(tmp_path):
    from test_pixart import pixart_pipeline

    from postdiff.models import load_model_spec

    pipe = pixart_pipeline("sigma")
    pipe.save_pretrained(tmp_path / "pixart")
    spec = load_model_spec(str(tmp_path / "pixart"))
    assert spec.family == "pixart" and spec.denoiser.kind == "pixart" and spec.denoiser.text_length == 300
    config = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2)
    planned = postdiff.apply(pipe, config)
    plan = postdiff.plan_call(planned, "a cat", num_inference_steps=6, height=64, width=64)
    from_folder = total(plan_costs(spec.denoiser, plan))
    from_pipeline = total(plan_costs(spec_from_pipeline(pipe).denoiser, plan))
    assert from_folder == from_pipeline > 0
    assert "T5EncoderModel" in next(iter(spec.component_costs(with_vae=False, with_text=True)))
