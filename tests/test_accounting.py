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
    """FLOPs of every U-Net forward of a real run (the classic attention processor makes attention countable)."""

    def __init__(self, unet):
        self.flops: list[int] = []
        self.handles = [unet.register_forward_pre_hook(self._start), unet.register_forward_hook(self._stop)]

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
        ("--cache-interval", "2"): 17.787 / 30.420,
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
    result = CliRunner().invoke(app, ["plan", "--steps", "10", "--preset", "paper", "--cfg-stop", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "10 steps" in lines[0] and len(lines) == 12
    assert "32x32" in lines[2] and "64x64" in lines[-1] and "switch" in lines[7] and "CFG stops" in lines[5]


def test_flops_cli_reproduces_the_papers_absolute_numbers_at_sd21_768():
    """The paper's "SD v1.5" FLOPs are SD 2.1's U-Net at 768 px (README, Compute accounting)."""
    rows = {
        ("--steps", "20"): 30.420,
        ("--steps", "8"): 12.168,
        ("--steps", "20", "--beta", "0.5", "--switch", "0.5"): 19.035,
        ("--steps", "20", "--cache-interval", "2"): 17.787,
        ("--steps", "20", "--preset", "paper"): 11.129,
    }
    for flags, paper in rows.items():
        assert _flops_json("--model", "sd21-768", *flags)["total"] == pytest.approx(paper, rel=5e-4), flags
