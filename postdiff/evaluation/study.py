"""The compute-optimal study on the embedded model: calibration under a MACs budget, Pareto report,
per-step x0 trajectories. Everything reads and writes the same sweep store."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from .. import api
from ..config import PostDiffConfig
from ..testbed.text import canonical_prompt
from ..testbed.video_data import MOTIONS
from .sweep import SweepContext, SweepPoint, SweepStore, grid, point_macs, run_sweep


def default_candidates(max_steps: int = 20, cache_branch: int = 1) -> list[SweepPoint]:
    """Fewer steps, and cheaper steps at the full step count and at 3/4 of it: mixed resolution, block caching
    (`cache_branch`: 1 on U-Nets, the published study's; 0 on transformers, the presets'), CFG stop."""
    fewer = grid(list(range(4, max_steps + 1, 2)))
    cheaper = grid([max_steps, max_steps * 3 // 4], betas=[1.0, 0.5], switches=[0, 0.25, 0.5], cache_intervals=[1, 2, 3],
                   cache_branches=[cache_branch], cfg_stops=[None, max_steps // 4, max_steps // 2])
    return list(dict.fromkeys(fewer + cheaper))


def calibrate(pipe, workload, store: SweepStore, budget_macs: float, candidates: list[SweepPoint],
              calibration: SweepContext, full: SweepContext, progress=None, min_alignment: float = 0.0) -> dict:
    """Best FD under the budget on the small calibration set, among candidates whose calibration alignment
    is at least `min_alignment`, confirmed on the full set (all candidates, for the rank correlation of FD
    between the two sets)."""
    affordable = [p for p in candidates if point_macs(pipe, p, calibration.guidance_scale, workload) <= budget_macs]
    if not affordable:
        raise ValueError(f"budget_macs={budget_macs:.4g} admits none of the {len(candidates)} candidates")
    started = time.perf_counter()
    small = {row["describe"]: row for row in run_sweep(pipe, workload, affordable, store, calibration, progress)}
    calibration_seconds = time.perf_counter() - started
    large = {row["describe"]: row for row in run_sweep(pipe, workload, affordable, store, full, progress)}
    names = sorted(small)
    eligible = [name for name in names if small[name]["alignment"] >= min_alignment]
    if not eligible:
        raise ValueError(f"min_alignment={min_alignment} admits none of the {len(names)} candidates under the budget")
    best = min(eligible, key=lambda name: small[name]["fd"])
    best_full = min((name for name in names if large[name]["alignment"] >= min_alignment), key=lambda name: large[name]["fd"], default=None)
    fds_small, fds_large = [small[n]["fd"] for n in names], [large[n]["fd"] for n in names]
    return {
        "budget_macs": budget_macs, "min_alignment": min_alignment, "candidates": len(affordable), "best": best,
        "best_calibration": small[best], "best_full": large[best], "best_on_full_set": best_full,
        "calibration_images": sum(row["num_images"] for row in small.values()),
        "calibration_seconds_this_run": calibration_seconds,
        "calibration_seconds_generation": sum(row["seconds"] for row in small.values()),
        "spearman_fd": float(spearmanr(fds_small, fds_large).statistic) if len(names) > 2 else float("nan"),
    }


def pareto_front(rows: list[dict], metric: str = "fd", lower_is_better: bool = True) -> list[dict]:
    """Rows no other row beats on both MACs and `metric`."""
    ordered = sorted(rows, key=lambda r: (r["macs"], r[metric] if lower_is_better else -r[metric]))
    front, best = [], None
    for row in ordered:
        value = row[metric] if lower_is_better else -row[metric]
        if best is None or value < best:
            front.append(row)
            best = value
    return front


def is_fewer_steps_only(row: dict) -> bool:
    point = point_of(row)
    return not point.external and not point.quantize and point.config.is_off


def method_of(row: dict) -> str:
    """Which side of the comparison a row is on: "fewer steps" (the float pipeline as it is), "PostDiff", an
    external tool by its name (the spec before ":"), each followed by its quantization where it has one."""
    if row.get("external"):
        name = row["external"].split(":")[0]
    else:
        name = "fewer steps" if point_of(row).config.is_off else "PostDiff"
    return f"{name} + {row['quantize']}" if row.get("quantize") else name


def equal_macs_table(rows: list[dict], fractions=(0.2, 0.3, 0.4, 0.55, 0.7, 1.0)) -> str:
    """At each share of the costliest fewer-steps row's MACs, the best FD of every method within it (any step
    count, any of its settings), and the winner; a method with no row that cheap is blank. Quantized rows are left
    to their own table: they run the MACs of their float twins."""
    rows = [r for r in rows if not r.get("quantize")]
    base = baseline_row(rows)
    methods = sorted({method_of(r) for r in rows}, key=lambda m: (m != "fewer steps", m != "PostDiff", m))
    lines = [f"| MACs at most | {' | '.join(methods)} | best |", "|---|" + "---|" * (len(methods) + 1)]
    for fraction in fractions:
        budget = fraction * base["macs"] * (1 + 1e-9)
        best = {m: min((r for r in rows if method_of(r) == m and r["macs"] <= budget), key=lambda r: r["fd"], default=None)
                for m in methods}
        cells = [f"{row['fd']:.2f} ({row['describe']})" if row else "" for row in best.values()]
        winner = min((m for m in methods if best[m]), key=lambda m: best[m]["fd"], default="")
        lines.append(f"| {fraction:.0%} ({budget / 1e9:.2f} GMACs) | {' | '.join(cells)} | {winner} |")
    return "\n".join(lines)


def quantization_table(rows: list[dict]) -> str:
    """Every quantized row beside the float row of the same point (same steps and method): FD, alignment, MACs
    (the same: int8 changes what a MAC costs, not how many run) and the denoiser's weight bytes."""
    floating = {(r["steps"], r.get("external", ""), json.dumps(r["config"], sort_keys=True)): r for r in rows if not r.get("quantize")}
    lines = ["| point | quantization | FD | alignment | GMACs | denoiser weights MB | float FD | float alignment | float weights MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted((r for r in rows if r.get("quantize")), key=lambda r: (r["describe"], r["quantize"])):
        twin = floating.get((row["steps"], row.get("external", ""), json.dumps(row["config"], sort_keys=True)))
        name = row["describe"][: -len(row["quantize"]) - 2]
        float_cells = f"{twin['fd']:.2f} | {twin['alignment']:.3f}" if twin else " | "
        float_cells += f" | {twin['weight_bytes'] / 2**20:.2f}" if twin and "weight_bytes" in twin else " | -"  # older rows lack it
        lines.append(f"| {name} | {row['quantize']} | {row['fd']:.2f} | {row['alignment']:.3f} | {row['macs'] / 1e9:.2f} | "
                     f"{row['weight_bytes'] / 2**20:.2f} | {float_cells} |")
    return "\n".join(lines)


def baseline_row(rows: list[dict]) -> dict | None:
    """The costliest fewer-steps row (the 20-step-style baseline every share of MACs is taken of); None if none."""
    return max((r for r in rows if is_fewer_steps_only(r)), key=lambda r: r["macs"], default=None)


# Scores a workload adds to "fd" and "alignment" (the video one: motion accuracy), drawn and tabled where rows have them.
EXTRA_METRICS = ("motion",)
AXIS_LABELS = {"fd": "FD (lower is better)", "alignment": "prompt alignment (higher is better)",
               "motion": "motion accuracy (higher is better)"}


def pareto_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fd", True), ("alignment", False)] + [(name, False) for name in EXTRA_METRICS if all(name in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (metric, lower) in zip(axes, panels):
        fewer = sorted((r for r in rows if is_fewer_steps_only(r)), key=lambda r: r["macs"])
        cheaper = pareto_front([r for r in rows if not is_fewer_steps_only(r)], metric, lower)
        ax.scatter([r["macs"] / 1e9 for r in rows], [r[metric] for r in rows], s=10, color="0.75", label="all configurations")
        ax.plot([r["macs"] / 1e9 for r in fewer], [r[metric] for r in fewer], "o-", label="fewer steps (baseline)")
        ax.plot([r["macs"] / 1e9 for r in cheaper], [r[metric] for r in cheaper], "s-", label="cheaper steps (front of all)")
        for tool in sorted({method_of(r) for r in rows if not r.get("quantize")} - {"fewer steps", "PostDiff"}):
            front = pareto_front([r for r in rows if method_of(r) == tool], metric, lower)
            ax.plot([r["macs"] / 1e9 for r in front], [r[metric] for r in front], "x--", lw=0.8, label=f"{tool} (its front)")
        ax.set_xlabel("denoiser GMACs per image")
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ca_ablation_table(rows: list[dict]) -> str:
    """Cache modes side by side: every (steps, config without cfg_stop / ca_mode, m) run with two modes or more,
    one line per m, FD / alignment per mode, with the same config without CFG stop as the reference."""
    def base_of(row):
        config = {k: v for k, v in row["config"].items() if k not in ("cfg_stop", "ca_mode")}
        return row["steps"], json.dumps(config, sort_keys=True)

    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["config"]["cfg_stop"] is not None and not row.get("external"):
            groups.setdefault((*base_of(row), row["config"]["cfg_stop"]), {})[row["config"]["ca_mode"]] = row
    reference = {base_of(r): r for r in rows if r["config"]["cfg_stop"] is None and not r.get("external")}
    lines = ["| configuration | m | cond | ave | cfg | none (CFG stop alone) | GMACs (cond) | without CFG stop |",
             "|---|---|---|---|---|---|---|---|"]
    for (steps, config, m), modes in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])):
        if len(modes) < 2:
            continue
        cells = [f"{modes[mode]['fd']:.2f} / {modes[mode]['alignment']:.3f}" if mode in modes else ""
                 for mode in ("cond", "ave", "cfg", "none")]
        any_row = modes.get("cond", next(iter(modes.values())))
        ref = reference.get((steps, config))
        ref_cell = f"{ref['fd']:.2f} / {ref['alignment']:.3f} ({ref['macs'] / 1e9:.2f} GMACs)" if ref else ""
        without_stop = replace(point_of(any_row).config, cfg_stop=None, ca_mode="cond")
        name = SweepPoint(without_stop, steps).describe()
        lines.append(f"| {name} | {m} | {' | '.join(cells)} | {any_row['macs'] / 1e9:.2f} | {ref_cell} |")
    return "\n".join(lines)


def trajectory(pipe, evaluator, config: PostDiffConfig, steps: int, per_class: int, guidance_scale: float, seed: int = 0) -> list[dict]:
    """FD and alignment of the (upsampled) x0 prediction at every step, as in the paper's per-step CLIP figure."""
    import torch.nn.functional as F

    api.apply(pipe, config)
    per_step: list[list] = []
    labels = []
    try:
        for label in range(10):
            _, x0s = api.trace_x0(pipe, canonical_prompt(label), negative_prompt="", num_images_per_prompt=per_class,
                                  num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                                  generator=torch.Generator().manual_seed(seed + label))
            per_step.append([F.interpolate(x0, size=(32, 32), mode="bilinear").clamp(-1, 1) for x0 in x0s])
            labels += [label] * per_class
    finally:
        api.remove(pipe)
    labels = np.asarray(labels)
    result = []
    for index in range(len(per_step[0])):
        images = torch.cat([shard[index] for shard in per_step])
        result.append({"step": index, "fd": evaluator.frechet_distance(images), "alignment": evaluator.alignment(images, labels)})
    return result


def trajectory_figure(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        axes[0].plot([p["step"] for p in curve], [p["alignment"] for p in curve], label=name)
        axes[1].plot([p["step"] for p in curve], [p["fd"] for p in curve], label=name)
    axes[0].set_ylabel("alignment of the x0 prediction")
    axes[1].set_ylabel("FD of the x0 prediction")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(pipe, point: SweepPoint, guidance_scale: float, per_row: int, path: Path, seed: int = 123) -> None:
    """One row per class, `per_row` images each, 2x nearest upscale (the embedded model's 32 px images)."""
    from PIL import Image

    from .workloads import FashionClasses, generate_per_class

    with point.applied(pipe, FashionClasses(), guidance_scale) as before_call:
        images, _ = generate_per_class(pipe, per_row, point.steps, guidance_scale, seed, before_call=before_call)
    tiles = (images[..., 0] * 255).round().astype(np.uint8).reshape(10, per_row, 32, 32)
    grid = tiles.transpose(0, 2, 1, 3).reshape(10 * 32, per_row * 32)
    Image.fromarray(grid).resize((per_row * 64, 10 * 64), Image.NEAREST).save(path)


def clip_strips(pipe, point: SweepPoint, guidance_scale: float, path: Path, seed: int = 123) -> None:
    """The video model's samples under `point`: one clip per motion (class i moving with motion i), a prompt a row
    with its frames left to right in the PNG at `path`, and the same clips tiled 2 x 4 in a GIF beside it; 2x
    nearest upscale (32 px frames)."""
    from PIL import Image

    from .workloads import MovingFashion

    workload = MovingFashion()
    count = len(MOTIONS)
    indices = [workload.pairs.index((motion, motion)) for motion in range(count)]
    with point.applied(pipe, workload, guidance_scale) as before_call:
        clips, _ = workload.generate(pipe, indices, 1, point.steps, guidance_scale, seed, before_call)
    frames = ((clips[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # (clip, F, H, W)
    _, num_frames, height, width = frames.shape
    strip = frames.transpose(0, 2, 1, 3).reshape(count * height, num_frames * width)
    Image.fromarray(strip).resize((num_frames * width * 2, count * height * 2), Image.NEAREST).save(path)
    tiles = frames.reshape(2, count // 2, num_frames, height, width).transpose(2, 0, 3, 1, 4)
    tiles = tiles.reshape(num_frames, 2 * height, count // 2 * width)
    images = [Image.fromarray(tile).resize((tile.shape[1] * 2, tile.shape[0] * 2), Image.NEAREST) for tile in tiles]
    images[0].save(Path(path).with_suffix(".gif"), save_all=True, append_images=images[1:], duration=125, loop=0)


def chosen_rows(rows: list[dict], budget_fractions=(0.4, 0.65)) -> dict[str, dict]:
    """The 20-step-style baseline (the costliest fewer-steps row) and, under each budget, the best-FD
    fewer-steps row and the best-FD cheaper-steps row: the pairs the sample grids put side by side."""
    fewer = [r for r in rows if is_fewer_steps_only(r)]
    base = max(fewer, key=lambda r: r["macs"])
    chosen = {"baseline": base}
    for fraction in budget_fractions:
        budget = fraction * base["macs"] * (1 + 1e-9)
        for name, group in (("fewer steps", fewer), ("cheaper steps", [r for r in rows if not is_fewer_steps_only(r)])):
            affordable = [r for r in group if r["macs"] <= budget]
            if affordable:
                chosen[f"{name} at {fraction:.0%}"] = min(affordable, key=lambda r: r["fd"])
    return chosen


def point_of(row: dict) -> SweepPoint:
    config = PostDiffConfig(**{**row["config"], "progressive": tuple(map(tuple, row["config"]["progressive"]))})
    return SweepPoint(config, row["steps"], row.get("external", ""), row.get("quantize", ""))


EVALUATORS = {
    "fashion-mnist-classes": "the shipped Fashion-MNIST evaluator (postdiff/testbed/evaluator.py): FD on its classifier's "
                             "features against the test split, alignment = its accuracy on the prompted class",
    "moving-fashion-mnist": "the shipped clip evaluator (postdiff/testbed/video_evaluator.py): frame FD, class and motion accuracy",
}


def context_lines(rows: list[dict], noise_rows: list[dict] | None = None) -> list[str]:
    """What every score depends on, named: evaluator, prompts, images per prompt, seeds, guidance; and the noise
    (the costliest baseline scored on other seeds), so a difference can be read against it."""
    contexts = {json.dumps({k: v for k, v in r["context"].items() if k != "classes"}, sort_keys=True) for r in rows}
    prompts = max(len(r["context"]["classes"]) for r in rows)
    lines = []
    for text in sorted(contexts):
        context = json.loads(text)
        lines.append(f"Scored by {EVALUATORS.get(context['prompt_set'], context['prompt_set'])}; {prompts} prompts x "
                     f"{context['per_class']} images, seed {context['seed']} + prompt index, guidance {context['guidance_scale']}.")
    base = baseline_row(rows)
    for noise in noise_rows or []:
        if base and noise["describe"] == base["describe"]:
            lines.append(f"Noise: {noise['describe']} on seed {noise['context']['seed']}: FD {noise['fd']:.2f}, alignment "
                         f"{noise['alignment']:.3f} (seed {base['context']['seed']}: {base['fd']:.2f}, {base['alignment']:.3f}).")
    return lines


COLUMN_TITLES = {"motion": "motion", "temporal": "frame-to-frame change vs real"}


def seeds_table(rows: list[dict], noise_rows: list[dict]) -> str:
    """Every row scored on another seed too, beside it: each score on both seeds and their mean, so a difference
    between configurations is read against the spread of each (the same prompts and images per prompt). Empty
    unless more than one row is (the baseline alone is the report's noise line)."""
    seeded = {row["describe"]: row for row in rows}
    pairs = [(seeded[noise["describe"]], noise) for noise in noise_rows if noise["describe"] in seeded]
    if len(pairs) < 2:
        return ""
    names = ["fd", "alignment"] + [name for name in EXTRA_METRICS if all(name in r for r in rows + noise_rows)]
    seeds = f"seed {pairs[0][0]['context']['seed']}, {pairs[0][1]['context']['seed']}, mean"
    header = " | ".join(f"{AXIS_LABELS[name].split(' (')[0]} ({seeds})" for name in names)
    lines = [f"| configuration | GMACs | {header} |", "|---|---|" + "---|" * len(names)]
    digits = {name: 2 if name == "fd" else 3 for name in names}
    for row, noise in sorted(pairs, key=lambda pair: pair[0]["macs"]):
        cells = [", ".join(f"{value:.{digits[n]}f}" for value in (row[n], noise[n], (row[n] + noise[n]) / 2)) for n in names]
        lines.append(f"| {row['describe']} | {row['macs'] / 1e9:.2f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path, curves: dict[str, list[dict]] | None = None,
                 grids: dict[str, tuple[dict, str]] | None = None, noise_rows: list[dict] | None = None) -> Path:
    """Figures and report.md; `grids` maps a title to (row, PNG file name) of sample grids already drawn in `out`;
    `noise_rows` the baseline scored on other seeds."""
    out.mkdir(parents=True, exist_ok=True)
    pareto_figure(rows, out / "pareto.png")
    if curves:
        trajectory_figure(curves, out / "trajectory.png")
        (out / "trajectory.json").write_text(json.dumps(curves, indent=1))
    base = baseline_row(rows)
    models = ", ".join(sorted({row["context"]["model"] for row in rows}))
    lines = [f"# PostDiff study on {models}", "", *context_lines(rows, noise_rows), "", "![pareto](pareto.png)", ""]
    if curves:
        lines += ["![trajectory](trajectory.png)", ""]
    extra = [name for name in COLUMN_TITLES if all(name in r for r in rows)]
    lines += [f"| configuration | FD | alignment | {''.join(COLUMN_TITLES[n] + ' | ' for n in extra)}GMACs | MACs vs baseline |",
              "|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for row in sorted(rows, key=lambda r: r["macs"]):
        share = f"{row['macs'] / base['macs']:.0%}" if base else ""
        cells = "".join(f"{row[name]:.3f} | " for name in extra)
        lines.append(f"| {row['describe']} | {row['fd']:.2f} | {row['alignment']:.3f} | {cells}{row['macs'] / 1e9:.2f} | {share} |")
    if base:
        lines += ["", "## At equal MACs, who wins (best FD within the budget, any step count)", "", equal_macs_table(rows)]
    seeds = seeds_table(rows, noise_rows or [])
    if seeds:
        lines += ["", "## On a second seed", "", seeds]
    if any(r.get("quantize") for r in rows):
        lines += ["", "## Quantized denoisers (torchao int8, postdiff/quantization.py)", "", quantization_table(rows)]
    lines += ["", "## Cache modes after the CFG stop: cross-attention, or the text stream on MM-DiTs (FD / alignment)", "",
              ca_ablation_table(rows), ""]
    if grids:
        clips = any((out / file_name).with_suffix(".gif").exists() for _, file_name in grids.values())
        lines += ["## Samples (" + ("one prompt a row, its frames left to right; the GIF plays the same clips"
                                    if clips else "one row per class") + ")", ""]
        for title, (row, file_name) in grids.items():
            gif = Path(file_name).with_suffix(".gif").name
            animated = f" ![{title}, playing]({gif})" if (out / gif).exists() else ""
            lines += [f"**{title}**: {row['describe']} (FD {row['fd']:.2f}, {row['macs'] / 1e9:.2f} GMACs)", "",
                      f"![{title}]({file_name}){animated}", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
