"""Sweeps: resumable after SIGKILL, no duplicates, and sharded generation equal to a single process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from postdiff import PostDiffConfig
from postdiff.evaluation.sweep import SweepContext, SweepPoint, SweepStore, grid

SWEEP = ["sweep", "--steps", "2,3", "--beta", "1.0,0.5", "--switch", "0,0.5", "--cache-interval", "1,2", "--per-class", "2"]


def sweep_command(store: Path) -> list[str]:
    return [sys.executable, "-m", "postdiff.cli", *SWEEP, "--store", str(store)]


def environment() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_grid_leaves_out_invalid_and_duplicate_points():
    points = grid([8], betas=[1.0, 0.5], switches=[0, 0.5], cache_intervals=[1, 2], cfg_stops=[None, 3], ca_modes=["cond", "ave"])
    assert len(points) == len(set(points)) == 2 * 2 * 3  # (off | mixed) x k x (no stop | stop cond | stop ave)
    assert SweepPoint(PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cache_branch=1), 8) in points


def test_grid_adds_progressive_schedules_only_after_a_switch_and_externals_at_every_step_count():
    points = grid([8, 10], betas=[1.0, 0.5], switches=[0, 0.25], progressives=[(), ((0.75, 0.25),)], externals=["tomesd:ratio=0.5"])
    progressive = [p for p in points if p.config.progressive]
    assert [p.config for p in progressive] == [PostDiffConfig(beta=0.5, switch=0.25, progressive=((0.75, 0.25),))] * 2
    assert [(p.steps, p.external) for p in points if p.external] == [(8, "tomesd:ratio=0.5"), (10, "tomesd:ratio=0.5")]
    assert len(points) == 2 * 3 + 2


def test_grid_gives_low_resolution_shifts_and_switch_noises_only_to_configs_with_a_switch():
    points = grid([8], betas=[1.0, 0.5], switches=[0, 0.5], switch_noises=["iid", "block"], low_res_shifts=["full", "own"])
    assert [p.config for p in points] == [PostDiffConfig()] + [
        PostDiffConfig(beta=0.5, switch=0.5, switch_noise=noise, low_res_shift=shift)
        for noise in ("iid", "block") for shift in ("full", "own")]


def test_grid_gives_temporal_betas_to_switches_in_time_only_or_with_space_and_never_with_block_noise():
    points = grid([8], betas=[1.0, 0.5], switches=[0, 0.5], temporal_betas=[1.0, 3 / 7], switch_noises=["iid", "block"])
    assert [p.config for p in points] == [
        PostDiffConfig(),
        PostDiffConfig(switch=0.5, temporal_beta=3 / 7),  # beta 1: fewer frames at full size
        PostDiffConfig(beta=0.5, switch=0.5), PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=3 / 7),
        PostDiffConfig(beta=0.5, switch=0.5, switch_noise="block")]
    assert grid([8], betas=[0.5], switches=[0.5])[0].config.to_dict() == PostDiffConfig(beta=0.5, switch=0.5).to_dict()


def test_sweep_cli_reads_temporal_betas_as_fractions_and_refuses_a_bad_one_before_loading_anything(tmp_path):
    from postdiff.cli import _grid_arguments

    assert _grid_arguments({"temporal_beta": "1,3/7,0.5"})["temporal_betas"] == [1.0, 3 / 7, 0.5]
    result = subprocess.run([sys.executable, "-m", "postdiff.cli", "sweep", "--switch", "0.5", "--temporal-beta", "3/2",
                             "--store", str(tmp_path / "s.jsonl")], env=environment(), capture_output=True, text=True)
    assert result.returncode == 2 and "temporal_beta=1.5 is not allowed: expected a number in (0, 1]" in result.stdout
    assert not (tmp_path / "s.jsonl").exists()


def test_a_point_the_model_refuses_stops_the_sweep_before_any_point_is_scored(tmp_path):
    from postdiff.config import ConfigError
    from postdiff.evaluation.sweep import run_sweep
    from postdiff.evaluation.workloads import FashionClasses
    from postdiff.testbed.model import load_pipeline

    pipe = load_pipeline()
    store = SweepStore(tmp_path / "store.jsonl")
    points = grid([2], cache_intervals=[2], cache_branches=[0, 99])  # the testbed U-Net has no branch 99
    with pytest.raises(ConfigError, match="cache_branch=99 is not allowed"):
        run_sweep(pipe, FashionClasses(), points, store, SweepContext(per_class=2))
    assert store.rows() == []


def test_sweep_lists_read_none_as_no_cfg_stop_and_as_the_none_cache_mode():
    from postdiff.cli import _values

    assert _values("none, 5,10", int) == [None, 5, 10]
    assert _values("cond,none", str) == ["cond", "none"]
    assert {p.config.ca_mode for p in grid([20], cfg_stops=_values("5", int), ca_modes=_values("cond,none", str))} == {"cond", "none"}


def test_cache_mode_table_puts_the_modes_of_one_cfg_stop_side_by_side_with_the_config_without_it():
    from postdiff.evaluation.study import ca_ablation_table

    def row(fd, **config):
        config = PostDiffConfig(**config)
        return {"config": config.to_dict(), "steps": 20, "describe": f"20 steps, {config.describe()}", "fd": fd,
                "alignment": 0.9, "macs": 1e9 * fd}

    rows = [row(1.0), row(2.0, cfg_stop=10), row(3.0, cfg_stop=10, ca_mode="none"), row(4.0, cfg_stop=5)]
    table = ca_ablation_table(rows).splitlines()
    assert table[0].split(" | ")[2:6] == ["cond", "ave", "cfg", "none (CFG stop alone)"]
    assert table[2:] == ["| 20 steps, off | 10 | 2.00 / 0.900 |  |  | 3.00 / 0.900 | 2.00 | 1.00 / 0.900 (1.00 GMACs) |"]


def _study_row(fd, steps=20, external="", quantize="", macs=None, **config):
    config = PostDiffConfig(**config)
    point = SweepPoint(config, steps, external, quantize)
    row = {"config": config.to_dict(), "steps": steps, "external": external, "describe": point.describe(), "fd": fd,
           "alignment": 0.9, "macs": macs if macs is not None else 1e9 * steps, "context": SweepContext().__dict__}
    return {**row, "quantize": quantize, "weight_bytes": 2**20} if quantize else row


def test_equal_macs_table_gives_each_method_its_best_fd_within_each_budget_and_names_the_winner():
    from postdiff.evaluation.study import equal_macs_table, method_of

    rows = [_study_row(9.0), _study_row(12.0, steps=10), _study_row(10.0, steps=20, macs=9e9, cache_interval=2),
            _study_row(11.0, steps=10, external="cache-dit:Fn=1,rdt=0.2", macs=5e9),
            _study_row(1.0, steps=20, quantize="int8-weight")]  # quantized: its own table, never a winner here
    assert [method_of(r) for r in rows] == ["fewer steps", "fewer steps", "PostDiff", "cache-dit", "fewer steps + int8-weight"]
    table = equal_macs_table(rows, fractions=(0.2, 0.5, 1.0)).splitlines()
    assert table[0] == "| MACs at most | fewer steps | PostDiff | cache-dit | best |"
    assert table[2] == "| 20% (4.00 GMACs) |  |  |  |  |"
    assert table[3] == "| 50% (10.00 GMACs) | 12.00 (10 steps, off) | 10.00 (20 steps, cache_interval=2) | 11.00 (10 steps, cache-dit:Fn=1,rdt=0.2) | PostDiff |"
    assert table[4].endswith("| 9.00 (20 steps, off) | 10.00 (20 steps, cache_interval=2) | 11.00 (10 steps, cache-dit:Fn=1,rdt=0.2) | fewer steps |")


def test_quantization_table_puts_each_quantized_row_beside_its_float_twin():
    from postdiff.evaluation.study import quantization_table

    rows = [_study_row(9.0), _study_row(9.5, quantize="int8-dynamic"), _study_row(8.0, steps=10, quantize="int8-weight")]
    table = quantization_table(rows).splitlines()
    assert table[2] == "| 10 steps, off | int8-weight | 8.00 | 0.900 | 10.00 | 1.00 |  |  | - |"
    assert table[3] == "| 20 steps, off | int8-dynamic | 9.50 | 0.900 | 20.00 | 1.00 | 9.00 | 0.900 | - |"


def test_grid_gives_deepcache_configs_the_branch_axis_and_leaves_the_others_at_the_default():
    points = grid([8], cache_intervals=[1, 2], cache_branches=[0, 2])
    assert [p.config for p in points] == [PostDiffConfig(), PostDiffConfig(cache_interval=2, cache_branch=0),
                                          PostDiffConfig(cache_interval=2, cache_branch=2)]
    assert grid([8], cache_intervals=[2])[0].config.cache_branch == 1  # the published study's branch


def test_evaluate_scores_a_config_as_the_sweep_does_into_the_same_store_row(tmp_path):
    import json

    from typer.testing import CliRunner

    from postdiff.cli import app

    config = ["--beta", "0.5", "--switch", "0.5", "--cache-interval", "2", "--cache-branch", "1"]
    common = ["--per-class", "2", "--seed", "3"]
    runner = CliRunner()
    evaluated = runner.invoke(app, ["evaluate", *config, *common, "--steps", "2", "--store", str(tmp_path / "a.jsonl"), "--json"])
    swept = runner.invoke(app, ["sweep", *config, *common, "--steps", "2", "--store", str(tmp_path / "b.jsonl")])
    assert evaluated.exit_code == 0 and swept.exit_code == 0, evaluated.output + swept.output
    [row] = SweepStore(tmp_path / "b.jsonl").rows()
    assert json.loads(evaluated.stdout) == SweepStore(tmp_path / "a.jsonl").rows()[0]
    for field in ("key", "config", "describe", "context", "fd", "alignment", "macs", "num_images"):
        assert json.loads(evaluated.stdout)[field] == row[field], field
    again = runner.invoke(app, ["evaluate", *config, *common, "--steps", "2", "--store", str(tmp_path / "b.jsonl")])
    assert "1 points, 1 already in" in again.stdout and len(SweepStore(tmp_path / "b.jsonl").rows()) == 1


@pytest.mark.parametrize("spec, message", [
    ("tome:ratio=0.5", "expected one of tomesd, deepcache-package"),
    ("tomesd:rate=0.5", "'rate' is not allowed for tomesd"),
    ("tomesd:ratio=half", "ratio='half' is not a float"),
    ("deepcache-package:branch=1", "missing interval"),
])
def test_external_specs_are_checked_before_anything_runs(spec, message):
    from postdiff.config import ConfigError
    from postdiff.evaluation.baselines import ExternalMethod

    with pytest.raises(ConfigError, match=message):
        ExternalMethod.parse(spec)


def test_sweep_cli_rejects_a_bad_progressive_schedule_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "postdiff.cli", "sweep", "--progressive", "0.75", "--store", str(tmp_path / "s.jsonl")],
                            env=environment(), capture_output=True, text=True)
    assert result.returncode == 2 and "progressive='0.75' is not allowed" in result.stdout
    assert not (tmp_path / "s.jsonl").exists()


def test_grid_refuses_an_out_of_range_value_rather_than_leaving_it_out_as_a_combination():
    from postdiff.config import ConfigError

    with pytest.raises(ConfigError, match="beta=2 is not allowed"):
        grid([8], betas=[1.0, 2], switches=[0, 0.5])
    with pytest.raises(ConfigError, match="switch=1 is not allowed"):
        grid([8], betas=[1.0], switches=[0, 1])


@pytest.mark.parametrize("arguments, message", [
    (["--grid", "steps=8 bogus=1"], "'bogus=1' is not AXIS=VALUES with AXIS one of steps, beta"),
    (["--grid", "beta=0.5 switch=0.5"], "give the step counts, e.g. steps=8,10,14"),
    (["--grid", "steps=8,x"], "steps='8,x' is not allowed: expected a comma list of int values"),
    (["--grid", "steps=8 beta=2 switch=0.5"], "beta=2.0 is not allowed"),
    (["--no-default-candidates"], "--no-default-candidates leaves no candidates: give at least one --grid"),
])
def test_calibrate_checks_its_candidate_grids_before_loading_anything(tmp_path, arguments, message):
    from typer.testing import CliRunner

    from postdiff.cli import app

    result = CliRunner().invoke(app, ["calibrate", "--budget-fraction", "0.4", "--store", str(tmp_path / "s.jsonl"), *arguments],
                                terminal_width=400)
    assert result.exit_code == 2 and message in " ".join(result.stdout.split())
    assert not (tmp_path / "s.jsonl").exists()


def test_calibrate_scores_the_given_grids_with_the_models_own_cache_branch(tmp_path):
    import json

    from typer.testing import CliRunner

    from postdiff.cli import app

    store = tmp_path / "s.jsonl"
    arguments = ["calibrate", "--budget-fraction", "1", "--max-steps", "3", "--calibration-per-class", "2",
                 "--full-per-class", "2", "--store", str(store), "--no-default-candidates",
                 "--grid", "steps=2,3 cache_interval=1,2", "--grid", "steps=3 beta=0.5 switch=0.5"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    scored = {(row["context"]["prompt_set"], row["describe"]) for row in SweepStore(store).rows()}
    candidates = ["2 steps, off", "2 steps, cache_interval=2 cache_branch=1", "3 steps, off",
                  "3 steps, cache_interval=2 cache_branch=1", "3 steps, beta=0.5 switch=0.5"]
    assert scored == {(prompt_set, name) for prompt_set in ("calibration", "fashion-mnist-classes") for name in candidates}
    outcome = json.loads(result.stdout[result.stdout.index("{"):])
    assert outcome["candidates"] == 5 and outcome["best"] in candidates
    on_calibration = [row for row in SweepStore(store).rows() if row["context"]["prompt_set"] == "calibration"]
    assert outcome["best_calibration"]["fd"] == min(row["fd"] for row in on_calibration)
    budget = CliRunner().invoke(app, [*arguments[:2], "0.01", *arguments[3:]])
    assert budget.exit_code == 2 and "admits none of the 5 candidates" in budget.stdout


def test_measured_macs_equal_the_plan_and_external_methods_are_measured_the_same_way(model_dir):
    from tiny import sd_pipeline

    import postdiff
    from postdiff.evaluation.baselines import ExternalMethod, measured_denoiser_macs
    from postdiff.models import plan_macs_per_image

    pipe = sd_pipeline(model_dir)
    arguments = dict(prompt="a cat", num_inference_steps=6, guidance_scale=5.0, output_type="np")
    for config in (PostDiffConfig(), PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=4)):
        postdiff.apply(pipe, config)
        assert measured_denoiser_macs(pipe, **arguments) == plan_macs_per_image(pipe, postdiff.plan_call(pipe, **arguments))
        postdiff.remove(pipe)
    off = measured_denoiser_macs(pipe, **arguments)
    with ExternalMethod.parse("tomesd:ratio=0.5").applied(pipe):
        merged = measured_denoiser_macs(pipe, **arguments)
    with ExternalMethod.parse("deepcache-package:interval=2,branch=1").applied(pipe):
        deepcache_package = measured_denoiser_macs(pipe, **arguments)
    postdiff.apply(pipe, PostDiffConfig(cache_interval=2, cache_branch=1))
    ours = plan_macs_per_image(pipe, postdiff.plan_call(pipe, **arguments))
    assert merged < off and deepcache_package == ours  # same branch (one numbering), same shallow work


def test_store_drops_a_line_cut_by_a_kill_and_keeps_the_first_of_duplicate_rows(tmp_path):
    path = tmp_path / "store.jsonl"
    path.write_text('{"key": "a", "fd": 1}\n{"key": "b", "fd": 2}\n{"key": "a", "fd": 3}\n{"key": "c", "fd": 1')
    assert [(row["key"], row["fd"]) for row in SweepStore(path).rows()] == [("a", 1), ("b", 2)]


def test_sigkilled_sweep_resumes_without_loss_duplicates_or_recomputation(tmp_path):
    store = tmp_path / "sweep.jsonl"
    process = subprocess.Popen(sweep_command(store), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not store.exists() or len(store.read_text().splitlines()) < 2):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = SweepStore(store).rows()
    assert 2 <= len(before) < 8

    result = subprocess.run(sweep_command(store), env=environment(), capture_output=True, text=True, check=True)
    assert f"8 points, {len(before)} already in" in result.stdout
    after = SweepStore(store).rows()
    assert len(after) == 8 and len({row["key"] for row in after}) == 8
    assert after[: len(before)] == before  # done rows kept as they were, not recomputed


def test_two_processes_give_the_same_rows_as_one(tmp_path):
    pytest.importorskip("accelerate")
    # tomesd draws random partitions of its own: re-seeded per prompt, so sharding must not change it either.
    arguments = ["--steps", "2", "--beta", "0.5", "--switch", "0.5", "--cache-interval", "1", "--per-class", "2",
                 "--external", "tomesd:ratio=0.5"]
    single = tmp_path / "single.jsonl"
    subprocess.run([sys.executable, "-m", "postdiff.cli", "sweep", *arguments, "--store", str(single)], env=environment(), check=True, capture_output=True)
    sharded = tmp_path / "sharded.jsonl"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "postdiff.cli", "sweep", *arguments, "--store", str(sharded)]
    subprocess.run(launch, env=environment(), check=True, capture_output=True)
    one, two = SweepStore(single).rows(), SweepStore(sharded).rows()
    assert len(one) == len(two) == 2
    for row_one, row_two in zip(one, two):
        for key in ("key", "fd", "alignment", "macs", "num_images"):
            assert row_one[key] == row_two[key], key


def test_calibration_and_report_on_a_small_grid(tmp_path):
    from PIL import Image

    from postdiff.evaluation.study import calibrate, chosen_rows, point_of, sample_grid, write_report
    from postdiff.evaluation.sweep import run_sweep
    from postdiff.evaluation.workloads import FashionClasses
    from postdiff.testbed.evaluator import load_evaluator
    from postdiff.testbed.model import load_pipeline

    pipe, workload = load_pipeline(), FashionClasses(load_evaluator())
    pipe.set_progress_bar_config(disable=True)
    store = SweepStore(tmp_path / "store.jsonl")
    candidates = grid([2, 4], betas=[1.0, 0.5], switches=[0, 0.5])
    small, full = SweepContext(prompt_set="calibration", per_class=2, seed=1000), SweepContext(per_class=3)
    result = calibrate(pipe, workload, store, budget_macs=2e9, candidates=candidates, calibration=small, full=full)
    assert result["candidates"] == 3  # the 4-step baseline costs 2.6 GMACs, over the budget
    assert result["calibration_images"] == 3 * 20 and -1 <= result["spearman_fd"] <= 1
    assert result["best_full"]["macs"] <= 2e9
    scored = [r for r in store.rows() if r["context"]["prompt_set"] == "calibration"]
    top = max(r["alignment"] for r in scored)
    strict = calibrate(pipe, workload, store, budget_macs=2e9, candidates=candidates, calibration=small, full=full, min_alignment=top)
    assert strict["best_calibration"]["fd"] == min(r["fd"] for r in scored if r["alignment"] >= top)
    assert len(store.rows()) == 6  # the second calibration scored nothing new
    with pytest.raises(ValueError, match="min_alignment=1.5 admits none"):
        calibrate(pipe, workload, store, budget_macs=2e9, candidates=candidates, calibration=small, full=full, min_alignment=1.5)
    rows = run_sweep(pipe, workload, candidates, store, full)
    chosen = chosen_rows(rows, budget_fractions=(0.5,))
    assert chosen["baseline"]["steps"] == 4 and chosen["baseline"]["config"]["switch"] == 0
    assert chosen["cheaper steps at 50%"]["macs"] <= 0.5 * chosen["baseline"]["macs"]
    sample_grid(pipe, point_of(chosen["cheaper steps at 50%"]), 3.0, 2, tmp_path / "grid.png")
    report = write_report(rows, tmp_path / "report", grids={"cheaper": (chosen["cheaper steps at 50%"], "../grid.png")})
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 1000
    assert Image.open(tmp_path / "grid.png").size == (2 * 64, 10 * 64)
    assert report.read_text().count("\n| ") >= 4 and "](../grid.png)" in report.read_text()


def test_a_sweep_on_any_pipeline_scores_a_prompt_file_with_fid_and_clip_score(model_dir, tmp_path):
    from test_evaluator import RandomFeatures, tiny_clip
    from tiny import sd_pipeline

    from postdiff.evaluation.sweep import run_sweep
    from postdiff.evaluation.workloads import PromptFile

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red bag\n")
    references = tmp_path / "references"
    references.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(references / f"{index}.png")
    clip, tokenizer = tiny_clip(tmp_path / "clip")
    workload = PromptFile(prompts, references, fid_features=RandomFeatures(), clip_model=clip, clip_processor=tokenizer)
    assert workload.prompts == ["a photo of a cat", "a red bag"]
    pipe = sd_pipeline(model_dir)
    points = [SweepPoint(PostDiffConfig(), 3), SweepPoint(PostDiffConfig(beta=0.5, switch=0.5), 3)]
    context = SweepContext.for_workload(workload, "tiny-sd", per_class=2)
    rows = run_sweep(pipe, workload, points, SweepStore(tmp_path / "store.jsonl"), context)
    assert [row["num_images"] for row in rows] == [4, 4] and rows[0]["macs"] > rows[1]["macs"]
    assert all(np.isfinite(row["fd"]) and 0 <= row["alignment"] <= 100 for row in rows)
    assert rows[0]["fd"] != rows[1]["fd"] and rows[0]["context"]["prompt_set"].startswith("prompts.txt#")
    prompts.write_text("a photo of a dog\n")  # another prompt set: other keys, nothing reused
    assert PromptFile(prompts, references).name != workload.name


def test_sweep_cli_checks_the_workload_before_loading_a_model(tmp_path):
    command = [sys.executable, "-m", "postdiff.cli", "sweep", "--store", str(tmp_path / "s.jsonl")]
    result = subprocess.run(command + ["--model", str(tmp_path)], env=environment(), capture_output=True, text=True)
    assert result.returncode == 2 and "give --prompts FILE and --reference DIR" in result.stdout
    result = subprocess.run(command + ["--model", str(tmp_path), "--prompts", str(tmp_path / "none.txt"), "--reference", str(tmp_path)],
                            env=environment(), capture_output=True, text=True)
    assert result.returncode == 2 and "is not a file" in result.stdout and not (tmp_path / "s.jsonl").exists()
