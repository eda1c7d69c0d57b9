"""The README's picture: the embedded model's sample grids of the baseline and of the paper preset (same
seeds, written by bench/testbed_quality.py), side by side with the denoiser MACs of each from the plan.

    python bench/readme_picture.py [--out docs/baseline_vs_postdiff.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from postdiff.accounting import plan_costs, total  # noqa: E402
from postdiff.config import PostDiffConfig  # noqa: E402
from postdiff.models import load_model_spec  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
STEPS = 20


def gmacs(config: PostDiffConfig) -> float:
    spec = load_model_spec("testbed")
    return total(plan_costs(spec.denoiser, spec.plan(config, STEPS))) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DOCS / "baseline_vs_postdiff.png")
    args = parser.parse_args()
    off, paper = gmacs(PostDiffConfig()), gmacs(PostDiffConfig.preset("paper", family="testbed"))
    panels = [("samples_baseline.png", f"baseline, {STEPS} steps: {off:.2f} GMACs"),
              ("samples_paper.png", f"PostDiff \"paper\": {paper:.2f} GMACs ({1 - paper / off:.0%} saved)")]
    figure, axes = plt.subplots(1, 2, figsize=(8, 5.4))
    for axis, (name, title) in zip(axes, panels):
        axis.imshow(Image.open(DOCS / name), cmap="gray")
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    figure.suptitle("The embedded Fashion-MNIST model, same seeds (rows: the ten classes)", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
