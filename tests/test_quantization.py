"""Int8 denoisers under PostDiff (issue 23): torchao's weight-only and dynamic int8 quantization composes with
PostDiff's techniques and the sweep; what cannot be combined is refused before anything changes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("torchao", reason="torchao is not installed (pip install \"postdiff[quantization]\")")

import postdiff  # noqa: E402
from postdiff.config import ConfigError  # noqa: E402
from postdiff.evaluation.baselines import counted_block_calls, measured_denoiser_macs  # noqa: E402
from postdiff.evaluation.sweep import SweepContext, grid, point_key  # noqa: E402
from postdiff.loading import load_pipeline  # noqa: E402
from postdiff.quantization import (QUANTIZATIONS, pipeline_quantization_config, quantization_of,  # noqa: E402
                                   quantize_denoiser, quantized, weight_bytes)

CALL = dict(prompt="a photo of a sneaker", negative_prompt="", num_inference_steps=6, guidance_scale=3.0, output_type="np")
BLOCK_CACHE = postdiff.PostDiffConfig(cache_interval=2, cache_branch=0)


@pytest.fixture(scope="module")
def flow():
    pipe, _ = load_pipeline("testbed-flow")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_an_int8_denoiser_stays_near_the_float_one_and_holds_a_quarter_of_its_linear_bytes(flow, name):
    floating = _images(flow)
    float_bytes = weight_bytes(flow.transformer)
    with quantized(flow, name):
        assert quantization_of(flow.transformer) == name
        images, bytes_ = _images(flow), weight_bytes(flow.transformer)
        assert np.array_equal(_images(flow), images)  # same seed, same image
    assert quantization_of(flow.transformer) == ""  # the float denoiser is back
    assert not np.array_equal(images, floating)
    assert np.abs(images - floating).mean() < 0.02 and np.abs(images - floating).max() < 0.3
    linear = sum(m.weight.numel() for m in flow.transformer.modules() if isinstance(m, torch.nn.Linear))
    # int8 linear weights (a quarter of their float bytes) plus one float scale per output row
    assert float_bytes - bytes_ > 0.7 * 3 * linear
    assert np.array_equal(_images(flow), floating)


@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_postdiff_composes_with_a_quantized_denoiser_in_either_order_and_runs_the_same_blocks(flow, name):
    with postdiff.api.applied(flow, BLOCK_CACHE), counted_block_calls(flow.transformer) as float_calls:
        _images(flow)
    with quantized(flow, name), postdiff.api.applied(flow, BLOCK_CACHE), counted_block_calls(flow.transformer) as calls:
        first, second = _images(flow), _images(flow)
    assert np.array_equal(first, second)  # a second call sees no state from the first
    assert calls == float_calls * 2  # the same blocks at every step of both calls
    original = flow.transformer
    flow.transformer = copy.deepcopy(original)
    try:  # applied first, quantized afterwards: torchao keeps the modules the hooks wrap
        with postdiff.api.applied(flow, BLOCK_CACHE):
            quantize_denoiser(flow, name)
            assert np.array_equal(_images(flow), first)
    finally:
        flow.transformer = original


@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_the_measured_macs_of_a_quantized_denoiser_are_the_float_ones(flow, name):
    """torch's counter has no formula for the int8 matmul: the measurement counts it as the matmul it replaces."""
    arguments = dict(CALL, generator=torch.Generator().manual_seed(0))
    expected = measured_denoiser_macs(flow, **arguments)
    with quantized(flow, name):
        assert measured_denoiser_macs(flow, **dict(CALL, generator=torch.Generator().manual_seed(0))) == expected


def test_what_cannot_be_combined_is_refused_before_anything_changes(flow):
    with pytest.raises(ConfigError, match=r"quantize='int4'.*int8-weight, int8-dynamic"):
        quantize_denoiser(flow, "int4")
    with pytest.raises(ConfigError, match="quantize='int4'"):
        grid([20], quantizations=["int4"])
    original = flow.transformer
    compiled = torch.compile(copy.deepcopy(original))
    flow.transformer = compiled
    try:
        with pytest.raises(ConfigError, match="compiled; quantize it first"):
            quantize_denoiser(flow, "int8-weight")
        assert quantization_of(compiled._orig_mod) == ""
    finally:
        flow.transformer = original
    with quantized(flow, "int8-weight"):
        with pytest.raises(ConfigError, match=r"already quantized \(int8-weight\)"):
            quantize_denoiser(flow, "int8-dynamic")
        assert quantization_of(flow.transformer) == "int8-weight"


def test_diffusers_loader_quantizes_with_the_same_config(flow):
    from postdiff.testbed.flow_model import FLOW_WEIGHTS_DIR

    pipe = type(flow).from_pretrained(FLOW_WEIGHTS_DIR, torch_dtype=torch.float32,
                                      quantization_config=pipeline_quantization_config("int8-weight", "transformer"))
    pipe.set_progress_bar_config(disable=True)
    assert quantization_of(pipe.transformer) == "int8-weight" and quantization_of(pipe.text_encoder) == ""
    with quantized(flow, "int8-weight"):
        np.testing.assert_allclose(_images(pipe), _images(flow), atol=1e-5)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_denoiser(pipe, "int8-weight")


def test_sweep_points_name_their_quantization_and_float_points_keep_their_stored_keys():
    from pathlib import Path

    from postdiff.evaluation.study import point_of
    from postdiff.evaluation.sweep import SweepStore

    points = grid([20], cache_intervals=[2], quantizations=["", "int8-dynamic"])
    assert [point.quantize for point in points] == ["", "int8-dynamic"]
    assert points[1].describe().endswith(", int8-dynamic") and points[1].config == points[0].config
    assert point_key(points[1], SweepContext()) != point_key(points[0], SweepContext())
    stored = SweepStore(Path(__file__).parents[1] / "docs" / "study-flow" / "sweep.jsonl").rows()
    floating = [row for row in stored if not row.get("quantize")]
    assert floating and any(row.get("quantize") for row in stored)
    for row in floating:  # written before points had a quantization: their keys are what the code makes now
        context = SweepContext(**{**row["context"], "classes": tuple(row["context"]["classes"])})
        assert point_key(point_of(row), context) == row["key"]
    for row in stored:
        assert point_of(row).quantize == row.get("quantize", "")


def test_generate_runs_both_calls_on_the_quantized_denoiser_and_refuses_a_bad_name_before_loading(tmp_path):
    from typer.testing import CliRunner

    from postdiff.cli import app

    command = ["generate", "a photo of a bag", "--num-images", "1", "--steps", "4"]
    result = CliRunner().invoke(app, [*command, "--quantize", "int8-weight", "--out", str(tmp_path / "int8")])
    assert result.exit_code == 0, result.output
    pipe, _ = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    float_megabytes = weight_bytes(pipe.unet) / 2**20
    run = dict(prompt="a photo of a bag", negative_prompt="", num_images_per_prompt=1, num_inference_steps=4,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    floating = np.asarray(pipe(**run).images[0])
    quantize_denoiser(pipe, "int8-weight")
    assert f"denoiser int8-weight, {weight_bytes(pipe.unet) / 2**20:.2f} MB of weights" in result.output
    assert weight_bytes(pipe.unet) / 2**20 < float_megabytes
    assert {p.name for p in (tmp_path / "int8").iterdir()} >= {"baseline_000.png", "postdiff_000.png"}
    from PIL import Image

    saved = np.asarray(Image.open(tmp_path / "int8" / "baseline_000.png"))
    run["generator"] = torch.Generator().manual_seed(0)
    assert np.array_equal(saved, np.asarray(pipe(**run).images[0]))  # the baseline ran on the int8 denoiser
    assert not np.array_equal(saved, floating)
    refused = CliRunner().invoke(app, [*command, "--quantize", "int4", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "quantize='int4' is not allowed: expected one of int8-weight, int8-dynamic" in refused.output
    assert not (tmp_path / "bad").exists()
