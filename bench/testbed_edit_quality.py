"""Image-to-image and inpainting on the embedded model: "off" against the paper and DeepCache presets and
against fewer steps at the paper preset's MACs, measured.

Real Fashion-MNIST test images (the first `--per-class` of each class), each prompted with its own class
("a photo of a NAME"): image-to-image at strengths 0.5 and 0.75, and inpainting of the right half (the mask
covers it; strength 1). Scored by the shipped evaluator: FD against the test split and prompt alignment;
for inpainting also the largest change of the known (left) half, which must be 0. MACs per image from the
plan, wall time of the whole set on this machine.

    python bench/testbed_edit_quality.py [--per-class 20] [--steps 20] [--out docs/testbed_edit_quality]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

import postdiff
from postdiff import PostDiffConfig
from postdiff.accounting import plan_costs, total
from postdiff.models import spec_from_pipeline
from postdiff.testbed.data import load_split, to_model_range
from postdiff.testbed.editing import img2img_pipeline, inpaint_pipeline
from postdiff.testbed.evaluator import load_evaluator
from postdiff.testbed.text import canonical_prompt

GUIDANCE = 3.0
CONFIGS = {"off": PostDiffConfig(), "paper": PostDiffConfig.preset("paper", family="testbed"),
           "deepcache": PostDiffConfig.preset("deepcache", family="testbed")}
TASKS = {"img2img strength 0.5": dict(strength=0.5), "img2img strength 0.75": dict(strength=0.75), "inpaint right half": {}}


def test_images(per_class: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first `per_class` test images of every class, in [0, 1] (what the image processor expects)."""
    images, labels = load_split("test")
    chosen = np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in range(10)])
    return (to_model_range(images[chosen]) + 1) / 2, labels[chosen]


def right_half_mask(count: int) -> torch.Tensor:
    mask = torch.zeros(count, 1, 32, 32)
    mask[..., 16:] = 1.0
    return mask


def run(pipe, images, labels, steps: int, task: dict, inpaint: bool) -> torch.Tensor:
    outputs = []
    for label in range(10):
        rows = np.flatnonzero(labels == label)
        batch = images[rows]
        extra = dict(mask_image=right_half_mask(len(rows))) if inpaint else task
        outputs.append(pipe([canonical_prompt(label)] * len(rows), image=batch, negative_prompt=[""] * len(rows),
                            num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="latent",
                            generator=torch.Generator().manual_seed(label), **extra).images)
    return torch.cat(outputs)


def macs_per_image(pipe, image, steps: int, task: dict, inpaint: bool) -> float:
    extra = dict(mask_image=right_half_mask(1)) if inpaint else task
    plan = postdiff.plan_call(pipe, "a photo of a bag", image=image[:1], num_inference_steps=steps, guidance_scale=GUIDANCE, **extra)
    return total(plan_costs(spec_from_pipeline(pipe).denoiser, plan)) / 1e9


def main(per_class: int = 20, steps: int = 20, threads: int = 2, out: Path = Path("docs/testbed_edit_quality")):
    torch.set_num_threads(threads)
    evaluator = load_evaluator()
    images, labels = test_images(per_class)
    rows = []
    for task_name, task in TASKS.items():
        pipe = inpaint_pipeline() if task_name.startswith("inpaint") else img2img_pipeline()
        task_rows = [score(pipe, config_name, config, steps, task_name, task, images, labels, evaluator)
                     for config_name, config in CONFIGS.items()]
        # The other answer to "cheaper": fewer steps, as many as the paper preset's MACs buy.
        ratio = task_rows[1]["gmacs"] / task_rows[0]["gmacs"]
        task_rows.append(score(pipe, "off, fewer steps", CONFIGS["off"], round(steps * ratio), task_name, task, images, labels, evaluator))
        rows += task_rows
    write(rows, out, dict(images=len(labels), steps=steps, guidance_scale=GUIDANCE, scheduler="DDIM", threads=threads,
                          reference_fd_of_test_images=evaluator.frechet_distance((images * 2 - 1)[: len(labels)])))


def score(pipe, config_name, config, steps, task_name, task, images, labels, evaluator) -> dict:
    inpaint = task_name.startswith("inpaint")
    postdiff.apply(pipe, config)
    start = time.perf_counter()
    pixels = run(pipe, images, labels, steps, task, inpaint)
    seconds = time.perf_counter() - start
    row = dict(task=task_name, config=config_name, steps=steps, fd=evaluator.frechet_distance(pixels),
               alignment=evaluator.alignment(pixels, labels), gmacs=macs_per_image(pipe, images, steps, task, inpaint),
               seconds=seconds)
    if inpaint:
        row["known_half_max_change"] = float((pixels[..., :16] - (images * 2 - 1)[..., :16]).abs().max())
    print(row, flush=True)
    return row


def write(rows: list[dict], out: Path, setup: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = [f"Setup: {json.dumps(setup)}", "", "| task | config | steps | FD | alignment | GMACs / image | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['config']} | {r['steps']} | {r['fd']:.2f} | {r['alignment']:.3f} | {r['gmacs']:.2f} | {r['seconds']:.1f} |"
              for r in rows]
    known = [r["known_half_max_change"] for r in rows if "known_half_max_change" in r]
    lines += ["", f"Inpainting: largest change of the known half over all images: {max(known):.2e}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
