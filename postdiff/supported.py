"""The supported-pipelines table (README), generated from the adapter registry: every pipeline class an adapter
names, the preset it gets and where that preset comes from, and the denoiser MACs the "paper" preset saves on
the shipped full-size configs of its family (counted on the meta device from the same plan that runs).

    postdiff pipelines            # prints the Markdown table the README holds (a test keeps them equal)
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass

import diffusers

from .config import FLOW_FAMILIES, PAPER_BETA, UNTESTED_FLOW_FAMILIES, ConfigError, PostDiffConfig
from .families.base import _FAMILIES
from .models import CONFIG_DIR, load_model_spec

# Where each family's "paper" preset comes from.
PRESET_SOURCES = {
    "sd": "paper (beta 1/2), measured on the embedded U-Net",
    "testbed": "paper (beta 1/2), measured on the embedded U-Net",
    "sdxl": "paper (beta 3/4)",
    "pixart": "paper (beta 3/4)",
    **{family: "measured on the embedded flow model" for family in FLOW_FAMILIES},
    **{family: "untested default (the flow model's)" for family in UNTESTED_FLOW_FAMILIES},
    "wan": "the flow model's; measured on the embedded video model, it loses to fewer steps (docs/study-video)",
}


@dataclass(frozen=True)
class PipelineRow:
    pipeline: str
    family: str  # the adapter's name
    preset_family: str
    savings: tuple[str, ...]  # "model: 41% of N steps" per shipped config of the preset family

    def markdown(self) -> str:
        preset = describe_preset(self.preset_family)
        source = PRESET_SOURCES.get(self.preset_family, "")
        saved = "; ".join(self.savings) or "no shipped full-size config"
        return f"| `{self.pipeline}` | {self.family} | {preset} | {source} | {saved} |"


def describe_preset(family: str) -> str:
    config = PostDiffConfig.preset("paper", family=family)
    parts = [f"beta {config.beta:g}", f"s {config.switch:g}", f"k {config.cache_interval}", f"branch {config.cache_branch}"]
    if config.low_res_shift != "full":
        parts.append(f"shift {config.low_res_shift}")
    return ", ".join(parts)


@functools.cache
def shipped_models_of(preset_family: str) -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.json")
                        if json.loads(path.read_text())["family"] == preset_family))


@functools.cache
def paper_saving(model: str, steps: int) -> float:
    """The share of denoiser MACs the "paper" preset saves on `model` at `steps` steps (text-to-image plan)."""
    from .accounting import plan_costs, total

    spec = load_model_spec(model)
    do_cfg = spec.runs_cfg()
    paper_plan = spec.plan(PostDiffConfig.preset("paper", family=spec.family), steps, do_cfg=do_cfg)  # may refuse: first
    off = total(plan_costs(spec.denoiser, spec.plan(PostDiffConfig(), steps, do_cfg=do_cfg)))
    return 1 - total(plan_costs(spec.denoiser, paper_plan)) / off


def saving_text(model: str, steps: int) -> str:
    """"model: 41% at 20 steps", or why the preset cannot run at the model's size (Qwen-Image's 1328 px latent, 166
    = 2 x 83, has no lower size of whole 2x2 patches at beta 3/4)."""
    try:
        return f"{model}: {paper_saving(model, steps):.0%} at {steps} steps"
    except ConfigError:
        return f"{model}: the preset's beta gives no valid latent size"


def default_steps(pipeline: str) -> int | None:
    cls = getattr(diffusers, pipeline, None)
    if cls is None:
        return None
    parameter = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else None


def pipeline_rows() -> list[PipelineRow]:
    """One row per pipeline class, grouped by the family whose preset it gets (in PAPER_BETA's order)."""
    rows = []
    order = list(PAPER_BETA)
    for family in sorted(_FAMILIES, key=lambda f: order.index(f.preset_family or f.name) if (f.preset_family or f.name) in order else len(order)):
        preset_family = family.preset_family or family.name
        for pipeline in family.pipeline_names:
            steps = default_steps(pipeline) or 20
            savings = tuple(saving_text(model, steps) for model in shipped_models_of(preset_family))
            rows.append(PipelineRow(pipeline, family.name, preset_family, savings))
    return rows


def markdown_table() -> str:
    header = ("| pipeline | adapter | `\"paper\"` preset | preset from | denoiser MACs saved by `\"paper\"` (planned) |\n"
              "|---|---|---|---|---|")
    return "\n".join([header, *(row.markdown() for row in pipeline_rows())])
