"""The compute table of docs/accounting.md: denoiser MACs of the shipped models for the
paper's configurations, beside the paper's numbers, plus the checks behind "Why the numbers differ".

    python bench/accounting_table.py [--out PATH]

Everything is counted with postdiff's own accounting (meta device, convention "macs", units of 10^12),
from the same plans the sampler runs (`ModelSpec.plan`, as the CLI).
Runs on one CPU thread in about a minute; no weights, no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from postdiff.accounting import plan_costs, total  # noqa: E402
from postdiff.config import DIT_FAMILIES, PostDiffConfig  # noqa: E402
from postdiff.models import ModelSpec, load_model_spec  # noqa: E402
from postdiff.plan import StepPlan  # noqa: E402

MODELS = ["sd15-512", "sd21-768", "sdxl-1024", "pixart-alpha-1024"]
STEPS = 20
CA_STOPS = (5, 10, 15)

# PAPER.md (20 steps unless noted, T = 10^12). The SD v1.5 ablation gives one number for cond / ave / cfg.
PAPER = {
    "sd": {"base20": 30.420, "base8": 12.168, "mixed": 19.035, "deepcache": 17.787, "ca5": 11.610,
           "ca10": 15.061, "ca15": 16.360, "paper": 11.129},
    "sdxl": {"base20": 119.641, "base8": 47.856, "paper": 52.682},
    "pixart": {"base20": 85.640, "base8": 34.256, "paper": 54.718},
}
PAPER_ROWS_OF = {"sd": "SD v1.5", "sdxl": "SDXL", "pixart": "PixArt-a"}


def deepcache(family: str = "sd", **changes) -> PostDiffConfig:
    """k = 2 with the branch of the published rows, named rather than left to the default: on U-Nets
    DeepCache's branch 1 (skips s_0 and s_1 live), the setting behind the paper's DeepCache FLOPs; DiT block
    caching counts its own way, branch 0 (the first and last block always run)."""
    return PostDiffConfig(cache_interval=2, cache_branch=0 if family in DIT_FAMILIES else 1, **changes)


def rows(family: str) -> list[tuple[str, str, PostDiffConfig, int]]:
    """(key, label, config, steps) of every table row."""
    paper = PostDiffConfig.preset("paper", family=family)
    cached = deepcache(family)
    return [
        ("base20", "baseline, 20 steps", PostDiffConfig(), STEPS),
        ("base8", "baseline, 8 steps", PostDiffConfig(), 8),
        ("mixed", f"mixed resolution (beta {paper.beta:g}, s 1/2)", PostDiffConfig(beta=paper.beta, switch=0.5), STEPS),
        ("deepcache", "DeepCache (k 2)", cached, STEPS),
        *[(f"ca{m}", f"DC + CA m={m} cond", cached.with_changes(cfg_stop=m, ca_mode="cond"), STEPS) for m in CA_STOPS],
        ("paper", "paper preset (mixed + DeepCache)", paper, STEPS),
        ("paper+cfg5", "paper preset + cfg_stop 5 (cond)", paper.with_changes(cfg_stop=5), STEPS),
    ]


def plan_for(spec: ModelSpec, config: PostDiffConfig, steps: int = STEPS) -> StepPlan:
    return spec.plan(config, steps)


def tmacs(spec: ModelSpec, plan: StepPlan) -> float:
    return total(plan_costs(spec.denoiser, plan), "macs") / 1e12


def family_key(spec: ModelSpec) -> str:
    return spec.family if spec.family in PAPER else "sd"


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def diff_pct(ours: float, paper: float | None) -> str:
    return "-" if paper is None else f"{100 * (ours / paper - 1):+.2f}"


def main_table(specs: list[ModelSpec]) -> tuple[list[str], dict]:
    lines = [
        "| model | row | ours (T MACs) | paper (T) | diff % | ours / our baseline | paper / paper baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for spec in specs:
        paper = PAPER[family_key(spec)]
        ours = {key: tmacs(spec, plan_for(spec, config, steps)) for key, _, config, steps in rows(spec.family)}
        results[spec.name] = ours
        for key, label, _, _ in rows(spec.family):
            theirs = paper.get(key)
            paper_ratio = None if theirs is None else theirs / paper["base20"]
            lines.append(f"| {spec.name} | {label} | {ours[key]:.3f} | {fmt(theirs)} | {diff_pct(ours[key], theirs)} "
                         f"| {ours[key] / ours['base20']:.4f} | {fmt(paper_ratio, 4)} |")
    return lines, results


def sd15_at(side: int) -> ModelSpec:
    """SD 1.5's U-Net at another latent size (ad hoc, not shipped): is the paper's "SD v1.5" SD 1.5 at 768 px?"""
    sd15 = load_model_spec("sd15-512")
    denoiser = dataclasses.replace(sd15.denoiser, config={**sd15.denoiser.config, "sample_size": side})
    return ModelSpec(f"sd15-{side * 8} (ad hoc)", sd15.family, denoiser, (side, side), sd15.scheduler)


def resolution_check(results: dict) -> list[str]:
    spec = sd15_at(96)
    keys = ["base20", "base8", "mixed", "deepcache", "paper"]
    configs = {key: (config, steps) for key, _, config, steps in rows("sd")}
    ours768 = {key: tmacs(spec, plan_for(spec, *configs[key])) for key in keys}
    lines = ["| SD v1.5 paper row | paper | sd15-512 | sd15 at 768 px (ad hoc) | sd21-768 |", "|---|---:|---:|---:|---:|"]
    for key in keys:
        paper = PAPER["sd"][key]
        cells = [f"{value:.3f} ({diff_pct(value, paper)}%)" for value in
                 (results["sd15-512"][key], ours768[key], results["sd21-768"][key])]
        lines.append(f"| {key} | {paper:.3f} | " + " | ".join(cells) + " |")
    return lines


def _with_steps(plan: StepPlan, change) -> StepPlan:
    return dataclasses.replace(plan, steps=tuple(change(step) for step in plan.steps))


def ca_hypotheses(spec: ModelSpec) -> list[str]:
    """Accountings the paper's DC + CA rows could have used, each counted from a (possibly hand-edited) plan."""
    dc = deepcache()

    def stop_at(m: int, mode: str = "cond") -> StepPlan:
        return plan_for(spec, dc.with_changes(cfg_stop=m, ca_mode=mode))

    def restart(m: int) -> StepPlan:  # the deep cache is dropped at the stop: step m is full, the k-cycle restarts
        return _with_steps(stop_at(m), lambda s: s if s.index < m else
                           dataclasses.replace(s, deep="full" if (s.index - m) % 2 == 0 else "cached"))

    def deepcache_off_after(m: int) -> StepPlan:  # every step after the stop runs the whole U-Net
        return _with_steps(stop_at(m), lambda s: s if s.index < m else dataclasses.replace(s, deep="full"))

    def ca_only(m: int) -> StepPlan:  # cross-attention read from the cache after m, CFG batch kept
        return _with_steps(stop_at(m), lambda s: s if s.index < m else dataclasses.replace(s, cfg=True, events=()))

    hypotheses = [
        ("ours: CFG off from step m, CA cached (cond), k-cycle goes on", lambda m: stop_at(m)),
        ("CFG through step m (cfg_stop = m+1), CA cached", lambda m: stop_at(m + 1)),
        ("CFG truncation only, CA still computed (ca_mode none)", lambda m: stop_at(m, "none")),
        ("CFG truncation only, cfg_stop = m+1", lambda m: stop_at(m + 1, "none")),
        ("CA cached, DeepCache cycle restarts at the stop (step m full)", restart),
        ("CA cached, DeepCache off after the stop", deepcache_off_after),
        ("CA cached but CFG kept (no truncation)", ca_only),
    ]
    paper = PAPER["sd"]
    lines = ["| hypothesis | m=5 (paper 11.610) | m=10 (paper 15.061) | m=15 (paper 16.360) | worst |",
             "|---|---:|---:|---:|---:|"]
    for label, plan_of in hypotheses:
        values = {m: tmacs(spec, plan_of(m)) for m in CA_STOPS}
        errors = {m: 100 * (values[m] / paper[f"ca{m}"] - 1) for m in CA_STOPS}
        cells = [f"{values[m]:.3f} ({errors[m]:+.1f}%)" for m in CA_STOPS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(abs(e) for e in errors.values()):.1f}% |")
    return lines


def consistency_note(spec: ModelSpec) -> list[str]:
    """With the k=2 cycle going on, m=10 and m=15 fix the cost of a no-CFG full step a and shallow step b."""
    dc = tmacs(spec, plan_for(spec, deepcache()))
    costs = plan_costs(spec.denoiser, plan_for(spec, deepcache()))
    full, shallow = costs[0].macs / 1e12, costs[1].macs / 1e12
    paper = PAPER["sd"]
    scale = paper["deepcache"] / dc  # the paper's own per-step scale
    pair = (paper["ca10"] - 5 * (full + shallow) * scale) / 5  # steps 10..19: 5 full + 5 shallow without CFG
    b = (paper["ca15"] - (8 * full + 7 * shallow) * scale) - 2 * pair  # steps 15..19: 2 full + 3 shallow
    return [f"Consistency: with the DeepCache cycle going on, the paper's m=10 row gives a (full + shallow) no-CFG pair "
            f"of {pair:.3f} T and its m=15 row then gives a shallow no-CFG step of {b:.3f} T (ours: "
            f"{costs[1].macs / 2e12:.3f}); no fixed per-step costs fit the three rows."]


def sdxl_alternatives(spec: ModelSpec, base: float) -> list[str]:
    paper = PAPER["sdxl"]
    lines = ["| SDXL mix + cache variant | ours (T) | vs paper 52.682, ratios to baselines |", "|---|---:|---:|"]
    variants = [(f"beta 3/4, s 1/2, k 2, cache_branch {b}", PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2, cache_branch=b))
                for b in (1, 2, 3)]
    variants += [(f"beta 3/4, s {s}, k 2, cache_branch 1", deepcache(beta=0.75, switch=switch)) for s, switch in (("2/5", 0.4), ("1/5", 0.2))]
    for label, config in variants:
        value = tmacs(spec, plan_for(spec, config))
        diff = 100 * (value / base / (paper["paper"] / paper["base20"]) - 1)
        lines.append(f"| {label} | {value:.3f} | {diff:+.2f}% |")
    return lines


FLOW_MODELS = {"sd3-medium-1024": 28, "sd35-large-1024": 28, "flux1-dev-1024": 28, "flux1-schnell-1024": 4}
FLOW_ROWS = [
    ("off", PostDiffConfig()),
    ("mixed (beta 1/2, s 1/2)", PostDiffConfig(beta=0.5, switch=0.5)),
    ("mixed (beta 3/4, s 1/2)", PostDiffConfig(beta=0.75, switch=0.5)),
    ("block caching (k 2, branch 0)", PostDiffConfig(cache_interval=2)),
    ("mixed 3/4 + block caching", PostDiffConfig(beta=0.75, switch=0.5, cache_interval=2)),
    ("paper preset (the same, low phase on its own schedule)", "preset"),
    ("CFG stop at steps // 3 (text stream computed)", "cfg_stop=none"),
    ("CFG stop at steps // 3 + text-stream cache", "cfg_stop=cond"),
]


def flow_table() -> list[str]:
    """Rectified-flow MM-DiTs at their usual call (SD3: CFG batch; FLUX: none), denoiser and whole call."""
    lines = ["| model (steps) | configuration | denoiser (T) | ratio | + text encoders + VAE (T) | ratio, whole call |",
             "|---|---|---:|---:|---:|---:|"]
    for name, steps in FLOW_MODELS.items():
        spec = load_model_spec(name)
        once = sum(macs for macs, _ in spec.component_costs(True, True, do_cfg=spec.runs_cfg()).values()) / 1e12
        base = None
        for label, config in FLOW_ROWS:
            if config == "preset":
                config = PostDiffConfig.preset("paper", family=spec.family)
            elif isinstance(config, str):  # the stop scales with the model's step count
                config = PostDiffConfig(cfg_stop=steps // 3, ca_mode=config.split("=")[1])
            value = total(plan_costs(spec.denoiser, spec.plan(config, steps, do_cfg=spec.runs_cfg()))) / 1e12
            base = base or value
            lines.append(f"| {name} ({steps}) | {label} | {value:.3f} | {value / base:.4f} | {value + once:.3f} | "
                         f"{(value + once) / (base + once):.4f} |")
    return lines


def build() -> str:
    torch.set_num_threads(1)
    specs = [load_model_spec(name) for name in MODELS]
    table, results = main_table(specs)
    sd21 = specs[MODELS.index("sd21-768")]
    sections = [
        "## Denoiser MACs (convention macs, T = 10^12, batch 1 image, CFG batch 2)", "",
        "Paper column: SD v1.5 rows of PAPER.md for the SD models, SDXL rows for sdxl-1024.", "", *table, "",
        "## Which model and resolution the paper's \"SD v1.5\" rows were counted at", "", *resolution_check(results), "",
        "## Cross-attention ablation: accountings tried (sd21-768, DeepCache k 2)", "", *ca_hypotheses(sd21), "",
        *consistency_note(sd21), "",
        "## SDXL mix + cache: variants tried", "", *sdxl_alternatives(specs[MODELS.index("sdxl-1024")], results["sdxl-1024"]["base20"]), "",
        "## Rectified-flow MM-DiTs (1 image, their usual call)", "", *flow_table(),
    ]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    text = build()
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
