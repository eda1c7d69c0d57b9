"""The study on the embedded video model (issue 25): its points (mixed resolution in time only, the temporal_beta
axis), the external caches on its Wan transformer with measured MACs, and the report's frame strips and GIFs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import postdiff
from postdiff import PostDiffConfig
from postdiff.cli import app
from postdiff.evaluation.baselines import (
    WAN_ATTENTION_IDENTIFIERS,
    ExternalMethod,
    measured_denoiser_macs,
    taylorseer_identifiers,
)
from postdiff.evaluation.study import clip_strips, write_report
from postdiff.evaluation.sweep import SweepPoint
from postdiff.models import plan_macs_per_image
from postdiff.testbed.video_model import DEFAULT_CALL, build_video_pipeline

CALL = dict(prompt="a photo of a bag zooming in", negative_prompt="", num_inference_steps=6, guidance_scale=4.0,
            output_type="latent", **DEFAULT_CALL)


@pytest.fixture
def video_pipe(model_dir):
    """The embedded video model's pipeline, small (3 blocks) and with weights that make every block matter (its
    output projection starts at zero, which would make every cache's job trivial)."""
    pipe = build_video_pipeline(model_dir / "video-tokenizer", num_layers=3, ffn_dim=64)
    for parameter in pipe.transformer.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(**overrides) -> dict:
    return {**CALL, "generator": torch.Generator().manual_seed(0), **overrides}


@pytest.mark.parametrize("config", [PostDiffConfig(), PostDiffConfig(switch=0.5, temporal_beta=3 / 7),
                                    PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=3 / 7, cache_interval=2)])
def test_measured_macs_of_the_video_model_equal_its_plan(video_pipe, config):
    """Wan's attention processor is its own: the counter measures it through the math kernel, as the MM-DiTs'."""
    postdiff.apply(video_pipe, config)
    assert measured_denoiser_macs(video_pipe, **seeded()) == plan_macs_per_image(video_pipe, postdiff.plan_call(video_pipe, **CALL))


def test_mixed_resolution_in_time_only_runs_fewer_full_size_frames_then_the_clip(video_pipe):
    shapes = []
    handle = video_pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["hidden_states"].shape)),
                                                              with_kwargs=True)
    baseline = video_pipe(**seeded()).frames
    postdiff.apply(video_pipe, PostDiffConfig(switch=0.5, temporal_beta=3 / 7))
    frames = video_pipe(**seeded()).frames
    handle.remove()
    assert shapes[12:] == [(1, 1, 4, 32, 32)] * 6 + [(1, 1, 8, 32, 32)] * 6  # 3 steps of 4 frames, 3 of 8; 2 passes a step
    assert frames.shape == baseline.shape and not torch.equal(frames, baseline)
    assert torch.equal(video_pipe(**seeded()).frames, frames)


@pytest.mark.parametrize("spec", ["first-block-cache:threshold=0.5", "taylorseer:interval=2,warmup=1",
                                  "magcache:threshold=0.5,max_skip=2"])
def test_diffusers_caches_run_on_the_video_model_skip_work_and_repeat(video_pipe, spec):
    from postdiff.evaluation.sweep import calibration_call
    from postdiff.evaluation.workloads import MovingFashion

    off = measured_denoiser_macs(video_pipe, **seeded())
    baseline = video_pipe(**seeded()).frames
    calibration = calibration_call(video_pipe, MovingFashion(), CALL["num_inference_steps"], CALL["guidance_scale"])
    with ExternalMethod.parse(spec).applied(video_pipe, CALL["num_inference_steps"], calibration) as before_call:
        before_call(0)
        cached = measured_denoiser_macs(video_pipe, **seeded())
        before_call(0)
        first = video_pipe(**seeded()).frames
        before_call(0)
        second = video_pipe(**seeded()).frames
    assert cached < off and torch.equal(first, second) and not torch.equal(first, baseline)
    assert torch.equal(video_pipe(**seeded()).frames, baseline)  # removed


def test_taylorseer_predicts_wans_attentions_which_its_default_patterns_miss(video_pipe, model_dir):
    from test_flow import sd3_pipeline

    names = [name for name, _ in video_pipe.transformer.named_modules()]
    assert taylorseer_identifiers(video_pipe.transformer) == WAN_ATTENTION_IDENTIFIERS
    import re

    hooked = [name for name in names if any(re.fullmatch(p, name) for p in WAN_ATTENTION_IDENTIFIERS)]
    assert hooked == [f"blocks.{block}.attn{index}" for block in range(3) for index in (1, 2)]
    assert taylorseer_identifiers(sd3_pipeline(model_dir).transformer) is None  # diffusers' defaults match SD3's


def test_cache_dit_runs_on_the_video_pipeline_with_wans_layout(video_pipe):
    pytest.importorskip("cache_dit", reason="cache-dit is not installed (the `external` extra)")
    from postdiff.evaluation.baselines import cache_dit_adapter

    adapter = cache_dit_adapter(video_pipe)
    assert adapter.blocks is video_pipe.transformer.blocks and adapter.has_separate_cfg
    off = measured_denoiser_macs(video_pipe, **seeded())
    with ExternalMethod.parse("cache-dit:rdt=0.5,Fn=1,ws=2").applied(video_pipe, CALL["num_inference_steps"]):
        cached = measured_denoiser_macs(video_pipe, **seeded())
        first, second = video_pipe(**seeded()).frames, video_pipe(**seeded()).frames
    assert cached < off and torch.equal(first, second)


def test_clip_strips_draw_a_prompt_a_row_and_the_same_clips_as_a_gif(video_pipe, tmp_path):
    clip_strips(video_pipe, SweepPoint(PostDiffConfig(), 2), 4.0, tmp_path / "strip.png")
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape == (8 * 64, 8 * 64)  # 8 prompts (one per motion) x 8 frames, 2x
    gif = Image.open(tmp_path / "strip.gif")
    assert gif.n_frames == 8 and gif.size == (4 * 64, 2 * 64)  # the 8 clips tiled 2 x 4
    for frame in (0, 5):
        gif.seek(frame)
        tiles = np.asarray(gif.convert("L"))
        for clip in (0, 6):  # clip 6: second tile row, third column
            row, column = divmod(clip, 4)
            tile = tiles[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
            assert np.array_equal(tile, strip[clip * 64:(clip + 1) * 64, frame * 64:(frame + 1) * 64])
    assert strip.std() > 0


def video_row(describe: str, config: dict, steps: int, fd: float, macs: float) -> dict:
    return {"key": describe, "config": config, "external": "", "describe": describe, "steps": steps,
            "context": {"model": "testbed-video", "prompt_set": "moving-fashion-mnist", "per_class": 2, "seed": 0,
                        "guidance_scale": 4.0, "classes": list(range(80))},
            "fd": fd, "alignment": 0.4, "motion": 0.6, "temporal": 1.1, "macs": macs, "seconds": 1.0, "num_images": 160}


def study_rows() -> list[dict]:
    off = PostDiffConfig().to_dict()
    in_time = PostDiffConfig(switch=0.5, temporal_beta=3 / 7).to_dict()
    return [video_row("2 steps, off", off, 2, 12.0, 2e9), video_row("1 steps, off", off, 1, 14.0, 1e9),
            video_row("2 steps, switch=0.5 temporal_beta=3/7", in_time, 2, 12.5, 0.75e9)]


def test_the_report_of_video_rows_tables_motion_and_shows_strips_with_their_gifs(tmp_path):
    (tmp_path / "samples_0.png").write_bytes(b"")
    (tmp_path / "samples_0.gif").write_bytes(b"")
    rows = study_rows()
    text = write_report(rows, tmp_path, grids={"baseline": (rows[0], "samples_0.png")}).read_text()
    assert "| configuration | FD | alignment | motion | frame-to-frame change vs real | GMACs | MACs vs baseline |" in text
    assert "| 2 steps, switch=0.5 temporal_beta=3/7 | 12.50 | 0.400 | 0.600 | 1.100 | 0.75 | 38% |" in text
    assert "![baseline](samples_0.png) ![baseline, playing](samples_0.gif)" in text
    assert "moving-fashion-mnist" not in text and "the shipped clip evaluator" in text
    assert Image.open(tmp_path / "pareto.png").size[0] > 1.4 * 11 * 110  # a third panel: motion accuracy
    assert "On a second seed" not in text


def test_rows_scored_on_a_second_seed_are_tabled_beside_their_first(tmp_path):
    rows = study_rows()
    second = [dict(row, context=dict(row["context"], seed=1), fd=row["fd"] + 1, motion=0.5) for row in rows[::2]]
    text = write_report(rows, tmp_path, noise_rows=second).read_text()
    assert "Noise: 2 steps, off on seed 1: FD 13.00, alignment 0.400 (seed 0: 12.00, 0.400)." in text
    assert "| configuration | GMACs | FD (seed 0, 1, mean) | prompt alignment (seed 0, 1, mean) | motion accuracy (seed 0, 1, mean) |" in text
    table = text.split("## On a second seed")[1]
    assert "| 2 steps, switch=0.5 temporal_beta=3/7 | 0.75 | 12.50, 13.50, 13.00 | 0.400, 0.400, 0.400 | 0.600, 0.500, 0.550 |" in table
    assert table.index("temporal_beta=3/7") < table.index("2 steps, off") and "1 steps, off" not in table


def test_report_cli_on_the_video_model_draws_strips_and_gifs_and_skips_trajectories(tmp_path):
    store = tmp_path / "sweep.jsonl"
    store.write_text("".join(json.dumps(row) + "\n" for row in study_rows()))
    result = CliRunner().invoke(app, ["report", "--store", str(store), "--out", str(tmp_path / "out"), "--model",
                                      "testbed-video", "--guidance-scale", "4"])
    assert result.exit_code == 0, result.output
    assert "trajectories are drawn for the image models" in result.output
    drawn = sorted(path.name for path in (tmp_path / "out").glob("samples_*"))
    assert drawn == ["samples_0.gif", "samples_0.png", "samples_1.gif", "samples_1.png", "samples_2.gif", "samples_2.png"]
    assert not (tmp_path / "out" / "trajectory.png").exists()
    assert "samples_2.gif" in (tmp_path / "out" / "report.md").read_text()
