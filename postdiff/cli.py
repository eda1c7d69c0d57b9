"""The `postdiff` command line. Config flags are the same for every subcommand: `--preset NAME` or the
fields of PostDiffConfig (`--beta`, `--switch`, `--cache-interval`, `--cache-branch`, `--cfg-stop`,
`--ca-mode`); explicit flags override the preset."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import PRESETS, ConfigError, PostDiffConfig, build_config, parse_fraction, parse_progressive

# transformers prints notices (e.g. "`CLIPImageProcessor` requires torchvision") on every command that would
# drown its output; set before anything imports transformers, for the command line only (the library keeps
# them), and a user's own TRANSFORMERS_VERBOSITY wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

CONFIG_FLAGS = {
    "preset": (Optional[str], typer.Option(None, help=f"one of {', '.join(PRESETS)}; flags below override it")),
    "beta": (Optional[float], typer.Option(None, help="low-resolution scale, 0 < beta <= 1")),
    "switch": (Optional[float], typer.Option(None, help="fraction of steps at low resolution (0 = off)")),
    "cache_interval": (Optional[int], typer.Option(None, help="DeepCache k (1 = off)")),
    "cache_branch": (Optional[int], typer.Option(None, help="DeepCache's cache_branch_id: skips s_0..s_b stay live "
                                                  "(0 = conv_in only, DeepCache's default; 1 = the paper's)")),
    "cfg_stop": (Optional[int], typer.Option(None, help="first step without CFG; cross-attention cached from there")),
    "ca_mode": (Optional[str], typer.Option(None, help="cross-attention cache: cond, ave, cfg or none")),
    "switch_noise": (Optional[str], typer.Option(None, help="re-noising at a switch: iid, or block (Pyramid Flow / RALU)")),
    "low_res_shift": (Optional[str], typer.Option(None, help="rectified flow: the low-resolution phase's sigma schedule, "
                                                  "full (the requested size's) or own (its own size's)")),
    "temporal_beta": (Optional[str], typer.Option(None, help="video: the low-resolution phase's latent frames, "
                                                  "F' - 1 = temporal_beta x (F - 1), a number or a fraction such as "
                                                  "3/7 (1 = the same frames; with beta 1, fewer frames at full size)")),
    "progressive": (Optional[str], typer.Option(None, help="intermediate stages after the beta phase, SCALE@FRACTION "
                                                "joined by +, e.g. 0.75@0.25; none = two-stage")),
    "controlnet_cache": (Optional[str], typer.Option(None, help="a ControlNet on DeepCache's cached steps: reuse "
                                                     "(default), shallow or full")),
}


@contextlib.contextmanager
def refused_input():
    """Bad input (a ConfigError or another ValueError): one red line that names it, exit status 2, no traceback."""
    try:
        yield
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2)


def with_config_flags(function):
    """Add the config flags to a command; the command receives `config_flags` (a dict) instead."""
    signature = inspect.signature(function)
    parameters = [p for p in signature.parameters.values() if p.name != "config_flags"]
    for name, (annotation, default) in CONFIG_FLAGS.items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

    @functools.wraps(function)
    def command(**kwargs):
        flags = {name: kwargs.pop(name) for name in CONFIG_FLAGS}
        with refused_input():
            return function(config_flags=flags, **kwargs)

    command.__signature__ = signature.replace(parameters=parameters)
    return command


STRENGTH_HELP = "img2img strength: the call runs the last int(steps x strength) steps (1 = text-to-image)"
CFG_HELP = ("classifier-free guidance batch (--no-cfg: guidance_scale <= 1; --cfg on FLUX: true CFG); "
            "default: the model's usual call (CFG, but none for FLUX)")


@app.command()
@with_config_flags
def plan(
    config_flags: dict,
    steps: int = typer.Option(20, help="num_inference_steps"),
    model: str = typer.Option("testbed", help="a shipped model name, testbed (the default model of generate), or a local diffusers folder"),
    cfg: Optional[bool] = typer.Option(None, "--cfg/--no-cfg", help=CFG_HELP),
    strength: float = typer.Option(1.0, help=STRENGTH_HELP),
):
    """Print the step plan: per step the latent size, CFG, U-Net full or cached, cross-attention, events."""
    from .models import load_model_spec

    spec = load_model_spec(model)
    config = build_config(spec.family, **config_flags)
    print(f"model: {model}")
    print(spec.plan(config, steps, do_cfg=spec.runs_cfg(cfg), strength=strength).describe())


@app.command()
@with_config_flags
def flops(
    config_flags: dict,
    model: str = typer.Option("sd15-512", help="a shipped model name, testbed, or a local diffusers folder"),
    steps: int = typer.Option(20, help="num_inference_steps"),
    convention: str = typer.Option("macs", help="macs (paper, attention products excluded) or flops (everything)"),
    with_vae: bool = typer.Option(False, "--with-vae", help="add the VAE decode of the image (once per call)"),
    with_text: bool = typer.Option(False, "--with-text", help="add the text encoder(s): prompt, and negative prompt under CFG"),
    cfg: Optional[bool] = typer.Option(None, "--cfg/--no-cfg", help=CFG_HELP),
    strength: float = typer.Option(1.0, help=STRENGTH_HELP),
    controlnet: bool = typer.Option(False, "--controlnet", help="a ControlNet beside the U-Net (the public SD / SDXL "
                                    "ControlNet layout: a copy of the U-Net's encoder), counted in every step"),
    num_controlnets: int = typer.Option(1, min=1, help="with --controlnet: how many (MultiControlNet)"),
    guess_mode: bool = typer.Option(False, "--guess-mode", help="ControlNets on the conditional batch only"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object; `total` is in units of 10^12"),
):
    """Per-step compute of one image from the same plan the engine runs (units of 10^12); the denoiser only,
    unless --with-text / --with-vae add the once-per-call components."""
    from .accounting import CONVENTIONS, in_convention, plan_costs
    from .models import load_model_spec

    if convention not in CONVENTIONS:
        raise ConfigError(f"convention={convention!r} is not allowed: expected one of {', '.join(CONVENTIONS)}")
    spec = load_model_spec(model)
    config = build_config(spec.family, **config_flags)
    plan = spec.plan(config, steps, do_cfg=spec.runs_cfg(cfg), strength=strength)
    encode_hw = plan.phases[0].latent_hw if strength < 1 else None  # img2img encodes its init image there
    components = spec.component_costs(with_vae, with_text, do_cfg=spec.runs_cfg(cfg), encode_hw=encode_hw)
    costs = plan_costs(spec.denoiser, plan, controlnet=spec.controlnet_spec(num_controlnets * controlnet, guess_mode))
    per_step = [cost.value(convention) / 1e12 for cost in costs]
    per_component = {name: in_convention(*cost, convention) / 1e12 for name, cost in components.items()}
    grand_total = sum(per_step) + sum(per_component.values())
    if as_json:
        controlnets = sum(in_convention(cost.controlnet_macs, 0.0, convention) for cost in costs) / 1e12
        print(json.dumps({"model": model, "config": config.to_dict(), "steps": steps, "convention": convention,
                          "per_step": per_step, "denoiser": sum(per_step), "controlnets": controlnets,
                          "components": per_component, "total": grand_total}))
        return
    table = Table(title=f"{model}: {config.describe()} ({convention}, 10^12, one image)")
    for column in ("step", "latent", "cfg", "deep", "cross-attn", convention):
        table.add_column(column, justify="right")
    for cost, value in zip(costs, per_step):
        s = cost.step
        table.add_row(str(s.index), f"{s.latent_hw[0]}x{s.latent_hw[1]}", "on" if s.cfg else "off", s.deep, s.cross_attention, f"{value:.4f}")
    table.add_row("denoiser" + " + ControlNet" * controlnet, "", "", "", "", f"{sum(per_step):.3f}")
    if controlnet:
        share = sum(in_convention(cost.controlnet_macs, 0.0, convention) for cost in costs) / 1e12
        table.add_row("of which ControlNet", "", "", "", "", f"{share:.3f}")
    for name, value in per_component.items():
        table.add_row(name, "", "", "", "", f"{value:.4f}")
    table.add_row("total", "", "", "", "", f"{grand_total:.3f}")
    console.print(table)


@app.command()
def pipelines():
    """The supported pipelines (from the adapter registry), the preset each gets and the denoiser MACs the
    "paper" preset saves on the shipped full-size configs of its family: the README's table, as Markdown."""
    from .supported import markdown_table

    print(markdown_table())


@app.command()
@with_config_flags
def generate(
    config_flags: dict,
    prompt: str = typer.Argument(..., help='e.g. "a photo of a sneaker"'),
    num_images: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("out"), help="folder for the PNGs and grids"),
    steps: int = typer.Option(20, help="num_inference_steps"),
    model: Optional[str] = typer.Option(None, help="local folder or hub id; default: the embedded testbed model"),
    guidance_scale: Optional[float] = typer.Option(None, help="default: the model's documented value"),
    negative_prompt: str = typer.Option(""),
    quantize: str = typer.Option("none", help="the denoiser of both runs quantized with torchao: none, int8-weight or "
                                 "int8-dynamic (the quantization extra)"),
):
    """Generate with PostDiff and with the baseline ("off"), same seed; print wall time and MACs of both."""
    from .generate import run_generate

    run_generate(prompt, config_flags, num_images, seed, out, steps, model, guidance_scale, negative_prompt, console,
                 quantization_value(quantize))


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, help="testbed (default), testbed-flow, a local diffusers folder or a hub id"),
    host: str = typer.Option("127.0.0.1", help="address to serve on (0.0.0.0: every interface)"),
    port: int = typer.Option(7860, help="port to serve on"),
    share: bool = typer.Option(False, "--share/--no-share", help="also open a public Gradio share link"),
):
    r"""A web page (Gradio) that runs the baseline and PostDiff on a prompt with the same seed: both images,
    wall time and denoiser MACs of each, the saving, and the step plan. Needs the extra: pip install 'postdiff\[demo]'."""
    try:
        from .demo import launch
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        console.print("[red]error:[/red] `postdiff demo` needs gradio, in the demo extra: pip install 'postdiff\\[demo]'")
        raise typer.Exit(2)
    with refused_input():  # a model that does not load (a ValueError from diffusers) is one line too
        launch(model, host, port, share)


MODEL_HELP = "a testbed folder (default: the shipped model), or any supported pipeline (folder or hub id) with --prompts"
PROMPTS_HELP = "a text file, one prompt per line (pipelines other than the embedded model)"
REFERENCE_HELP = "a folder of reference images for FID (with --prompts)"
CLIP_HELP = "CLIP model for the CLIP score (with --prompts): hub id or folder"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@app.command()
@with_config_flags
def evaluate(
    config_flags: dict,
    per_class: int = typer.Option(100, min=2, help="images per prompt (the embedded model: its 10 class prompts)"),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(3.0),
    seed: int = typer.Option(0),
    store: Path = typer.Option(Path("runs/sweep.jsonl"), help="the sweep store the row is read from, or appended to"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    reference: Optional[Path] = typer.Option(None, help=REFERENCE_HELP),
    clip_model: str = typer.Option(DEFAULT_CLIP, help=CLIP_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the store's row as one JSON object"),
):
    """FD, prompt alignment, MACs and wall time of one configuration, scored as `sweep` scores it: the same
    row, read from the store when already there. The embedded model by default."""
    from .api import preset_family
    from .evaluation.sweep import SweepContext, SweepPoint
    from .evaluation.workloads import open_workload

    pipe, workload = open_workload(model, prompts, reference, clip_model)
    point = SweepPoint(build_config(preset_family(pipe), **config_flags), steps)
    context = SweepContext.for_workload(workload, model, per_class=per_class, seed=seed, guidance_scale=guidance_scale)
    [row] = score_in_store(pipe, workload, [point], store, context, Console(stderr=True) if as_json else console)
    if as_json:
        print(json.dumps(row))
        return
    console.print(f"{row['describe']}: FD {row['fd']:.3f}, alignment {row['alignment']:.3f}, "
                  f"{row['macs'] / 1e9:.3f} GMACs/image, {row['seconds']:.1f} s for {row['num_images']} images")


@contextlib.contextmanager
def progress_bars():
    """Yields `progress(total) -> advance`: one bar per sweep pass, with the time left (on stderr)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bars:
        def start(total: int):
            task = bars.add_task(f"pass {len(bars.tasks) + 1}", total=total)
            return lambda: bars.advance(task)

        yield start


def score_in_store(pipe, workload, points: list, store: Path, context, log: Console) -> list[dict]:
    """The store's rows of `points` in `context`, scoring (with progress bars) those not stored yet."""
    from .evaluation.sweep import SweepStore, point_key, run_sweep

    sweep_store = SweepStore(store)
    done = sweep_store.keys()
    todo = sum(point_key(point, context) not in done for point in points)
    log.print(f"{len(points)} points, {len(points) - todo} already in {store}, {todo} to score")
    with progress_bars() as progress:
        return run_sweep(pipe, workload, points, sweep_store, context, progress=progress)


def quantization_value(item: str) -> str:
    """A --quantize item: "none" is the float denoiser (""), else a name of postdiff.quantization."""
    from .quantization import check_quantization

    if item.lower() == "none":
        return ""
    check_quantization(item)
    return item


def _values(text: str, convert) -> list:
    """A comma list; "none" is None where the value is a number (a CFG stop), and stays a name where it is one
    (the "none" cache mode)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [None if item.lower() == "none" and convert is not str else convert(item) for item in items]


# The grid axes: sweep's options, and calibrate's --grid AXIS=VALUES; each -> (grid()'s argument, value reader).
GRID_AXES = {
    "steps": ("steps", int), "beta": ("betas", float), "switch": ("switches", float),
    "cache_interval": ("cache_intervals", int), "cache_branch": ("cache_branches", int),
    "cfg_stop": ("cfg_stops", int), "ca_mode": ("ca_modes", str), "preset": ("presets", str),
    "switch_noise": ("switch_noises", str), "low_res_shift": ("low_res_shifts", str),
    "progressive": ("progressives", parse_progressive), "quantize": ("quantizations", quantization_value),
    "temporal_beta": ("temporal_betas", parse_fraction),
}


def _grid_arguments(axes: dict[str, str]) -> dict:
    """grid()'s keyword arguments from comma lists keyed by axis name."""
    arguments = {}
    for axis, text in axes.items():
        name, read = GRID_AXES[axis]
        try:  # a progressive schedule's own "none" is the empty schedule, not a missing value
            arguments[name] = [read(item) for item in text.split(",")] if read is parse_progressive else _values(text, read)
        except ConfigError:  # already names the value and what is allowed
            raise
        except ValueError:
            raise ValueError(f"{axis}={text!r} is not allowed: expected a comma list of {read.__name__} values") from None
    return arguments


def _parse_grid(text: str) -> dict[str, str]:
    """calibrate's --grid: "steps=8,10 cache_interval=2,3" -> {"steps": "8,10", "cache_interval": "2,3"}."""
    axes = {}
    for item in text.split():
        axis, equals, values = item.partition("=")
        axis = axis.replace("-", "_")
        if not equals or not values or axis not in GRID_AXES:
            raise ValueError(f"--grid {text!r}: {item!r} is not AXIS=VALUES with AXIS one of {', '.join(GRID_AXES)}")
        axes[axis] = values
    if "steps" not in axes:
        raise ValueError(f"--grid {text!r}: give the step counts, e.g. steps=8,10,14")
    return axes


@app.command()
def sweep(
    store: Path = typer.Option(Path("runs/sweep.jsonl"), help="append-only results (resumed when present)"),
    steps: str = typer.Option("8,20", help="comma list of num_inference_steps"),
    beta: str = typer.Option("1.0,0.5", help="comma list"),
    switch: str = typer.Option("0,0.5", help="comma list"),
    cache_interval: str = typer.Option("1,2", help="comma list"),
    switch_noise: str = typer.Option("iid", help="comma list of switch noises (iid, block), for switches > 0"),
    low_res_shift: str = typer.Option("full", help="comma list of low-resolution schedules (full, own), for switches > 0"),
    temporal_beta: str = typer.Option("1", help="video: comma list of the low phase's frame scales (numbers or fractions "
                                      "such as 3/7), for switches > 0 (with beta 1: fewer frames at full size)"),
    cache_branch: str = typer.Option("1", help="comma list of DeepCache branches, for cache intervals > 1 "
                                     "(1: the paper's DeepCache FLOPs, what the published study measured)"),
    cfg_stop: str = typer.Option("none", help="comma list; none = CFG kept"),
    ca_mode: str = typer.Option("cond", help="comma list of cond, ave, cfg, none"),
    preset: str = typer.Option("", help="comma list of presets added to the grid"),
    progressive: str = typer.Option("none", help="comma list of progressive schedules (SCALE@FRACTION joined by +; none)"),
    external: list[str] = typer.Option([], help="repeatable: an external method at every step count, "
                                       "e.g. tomesd:ratio=0.5 or deepcache-package:interval=2,branch=1"),
    quantize: str = typer.Option("none", help="comma list of the denoiser's quantizations (none, int8-weight, "
                                 "int8-dynamic: torchao), each point swept once per entry"),
    per_class: int = typer.Option(20, min=2, help="images per prompt"),
    seed: int = typer.Option(0),
    guidance_scale: float = typer.Option(3.0),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    reference: Optional[Path] = typer.Option(None, help=REFERENCE_HELP),
    clip_model: str = typer.Option(DEFAULT_CLIP, help=CLIP_HELP),
):
    """Score a grid of configurations (FD, alignment, MACs, wall time); resumable. The embedded model by
    default; any supported pipeline with --model, --prompts and --reference (FID and CLIP score).

    Run it under `accelerate launch --num_processes N` to shard the generation."""
    from .evaluation.sweep import SweepContext, grid
    from .evaluation.workloads import open_workload

    from .api import preset_family

    axes = dict(steps=steps, beta=beta, switch=switch, cache_interval=cache_interval, cache_branch=cache_branch,
                cfg_stop=cfg_stop, ca_mode=ca_mode, preset=preset, switch_noise=switch_noise,
                low_res_shift=low_res_shift, progressive=progressive, quantize=quantize, temporal_beta=temporal_beta)

    def points_for(family: str):
        return grid(**_grid_arguments(axes), family=family, externals=external)

    with refused_input():
        points_for("testbed")  # every setting checked before a model loads
        pipe, workload = open_workload(model, prompts, reference, clip_model)
        points = points_for(preset_family(pipe))  # presets of the model's own family
    context = SweepContext.for_workload(workload, model, per_class=per_class, seed=seed, guidance_scale=guidance_scale)
    rows = score_in_store(pipe, workload, points, store, context, console)
    for row in sorted(rows, key=lambda r: r["macs"]):
        print(f"{row['describe']:<60} FD {row['fd']:7.2f}  align {row['alignment']:.3f}  {row['macs'] / 1e9:6.2f} GMACs")



@app.command()
def calibrate(
    budget_macs: Optional[float] = typer.Option(None, help="MACs per image allowed (units of 1)"),
    budget_fraction: Optional[float] = typer.Option(None, help="or: a fraction of the baseline's MACs (max-steps steps)"),
    min_alignment: float = typer.Option(0.0, help="only candidates at least this aligned on the calibration set"),
    store: Path = typer.Option(Path("runs/sweep.jsonl")),
    max_steps: int = typer.Option(20, help="the baseline's steps (for --budget-fraction) and the default candidates' most"),
    grid_text: list[str] = typer.Option([], "--grid", help="repeatable: candidates from a sweep grid, AXIS=VALUES joined by "
                                        "spaces with the sweep's option names, e.g. \"steps=8,10,14 cache_interval=2,3\" "
                                        "(unnamed axes: off; cache_branch: 0 on transformers, 1 on U-Nets)"),
    with_defaults: bool = typer.Option(True, "--default-candidates/--no-default-candidates",
                                       help="the default candidates: fewer steps, and mixed resolution / block caching / "
                                       "CFG stop at max-steps and 3/4 of it"),
    calibration_per_class: int = typer.Option(10, min=2, help="images per prompt on the calibration set (seeds from 1000)"),
    full_per_class: int = typer.Option(100, min=2, help="images per prompt on the full set (seeds from 0)"),
    guidance_scale: float = typer.Option(3.0),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    prompts: Optional[Path] = typer.Option(None, help=PROMPTS_HELP),
    reference: Optional[Path] = typer.Option(None, help=REFERENCE_HELP),
    clip_model: str = typer.Option(DEFAULT_CLIP, help=CLIP_HELP),
):
    """Best configuration under a MACs budget on a small calibration set, confirmed on the full set."""
    from dataclasses import replace

    from .api import preset_family
    from .evaluation.study import calibrate as run_calibration
    from .evaluation.study import default_candidates
    from .evaluation.sweep import SweepContext, SweepPoint, SweepStore, grid, point_macs
    from .evaluation.workloads import FashionClasses, open_workload

    def candidates_for(family: str, cache_branch: int) -> list:
        points = default_candidates(max_steps, cache_branch=cache_branch) if with_defaults else []
        for axes in grids:
            points += grid(**{"cache_branches": [cache_branch], **_grid_arguments(axes)}, family=family)
        return list(dict.fromkeys(points))

    with refused_input():
        if (budget_macs is None) == (budget_fraction is None):
            raise ValueError("give exactly one of --budget-macs and --budget-fraction")
        grids = [_parse_grid(text) for text in grid_text]
        if not candidates_for("testbed", 1):  # every setting checked before a model loads
            raise ValueError("--no-default-candidates leaves no candidates: give at least one --grid")
        pipe, workload = open_workload(model, prompts, reference, clip_model)
    if budget_fraction is not None:
        budget_macs = budget_fraction * point_macs(pipe, SweepPoint(PostDiffConfig(), max_steps), guidance_scale, workload)
    full = SweepContext.for_workload(workload, model, per_class=full_per_class, seed=0, guidance_scale=guidance_scale)
    calibration_set = "calibration" if isinstance(workload, FashionClasses) else f"{workload.name} (calibration)"
    calibration = replace(full, prompt_set=calibration_set, per_class=calibration_per_class, seed=1000)
    with progress_bars() as progress:
        candidates = candidates_for(preset_family(pipe), cache_branch=0 if hasattr(pipe, "transformer") else 1)
        with refused_input():  # the budget or min_alignment may admit no candidate
            result = run_calibration(pipe, workload, SweepStore(store), budget_macs, candidates,
                                     calibration, full, progress, min_alignment)
    print(json.dumps(result, indent=1, default=str))


@app.command()
def report(
    store: Path = typer.Option(Path("runs/sweep.jsonl")),
    out: Path = typer.Option(Path("report")),
    per_class: Optional[int] = typer.Option(None, help="only rows with this many images per class"),
    trajectories: bool = typer.Option(True, help="also compute per-step x0 trajectories (switch 0, 0.25, 0.5; image "
                                      "models); without, the trajectory.json already in --out is shown, if any"),
    samples: bool = typer.Option(True, help="also draw sample grids of the baseline and the best rows under 40% and 65% "
                                 "of its MACs (the video model: frame strips and GIFs)"),
    steps: int = typer.Option(20),
    guidance_scale: float = typer.Option(3.0),
    model: Optional[str] = typer.Option(None, help="only the rows of this model (as sweeps name it: testbed, "
                                        "testbed-flow, a folder); default: every row"),
    noise: Optional[Path] = typer.Option(None, help="a store of the baseline on other seeds, named in the report as its noise"),
):
    """Pareto figures, trajectories, cross-attention ablation, sample grids and a Markdown summary from a sweep store."""
    from .evaluation.study import chosen_rows, clip_strips, point_of, sample_grid, trajectory, write_report
    from .evaluation.sweep import SweepStore
    from .loading import embedded_name, is_testbed, load_pipeline

    rows = [r for r in SweepStore(store).rows() if (per_class is None or r["context"]["per_class"] == per_class)
            and (model is None or r["context"]["model"] == model)]
    if not rows:
        console.print(f"[red]error:[/red] no rows in {store}" + (f" for model {model!r}" if model else ""))
        raise typer.Exit(2)
    curves, grids = None, None
    models = {r["context"]["model"] for r in rows}
    if (trajectories or samples) and (len(models) > 1 or not is_testbed(next(iter(models)))):
        console.print("trajectories and sample grids are drawn for one embedded model's rows (see --model): skipped")
        trajectories = samples = False
    video = embedded_name(next(iter(models))) == "testbed-video"
    if trajectories and video:
        console.print("trajectories are drawn for the image models (their per-step x0 on the class evaluator): skipped")
        trajectories = False
    if trajectories or samples:
        from .testbed.evaluator import load_evaluator

        pipe, _ = load_pipeline(next(iter(models)))
        pipe.set_progress_bar_config(disable=True)
        out.mkdir(parents=True, exist_ok=True)
    if trajectories:
        evaluator = load_evaluator()
        curves = {f"switch {s}": trajectory(pipe, evaluator, PostDiffConfig(beta=0.5, switch=s) if s else PostDiffConfig(),
                                            steps, 10, guidance_scale) for s in (0, 0.25, 0.5)}
    elif (out / "trajectory.json").exists():  # they depend on the model only, not on the store's rows
        curves = json.loads((out / "trajectory.json").read_text())
    if samples:
        grids, drawn = {}, {}
        for title, row in chosen_rows(rows).items():
            if row["key"] not in drawn:  # one row can be the best under several budgets
                drawn[row["key"]] = f"samples_{len(drawn)}.png"
                if video:
                    clip_strips(pipe, point_of(row), guidance_scale, out / drawn[row["key"]])
                else:
                    sample_grid(pipe, point_of(row), guidance_scale, 8, out / drawn[row["key"]])
            grids[title] = (row, drawn[row["key"]])
    noise_rows = SweepStore(noise).rows() if noise is not None else None
    console.print(f"wrote {write_report(rows, out, curves, grids, noise_rows)}")


if __name__ == "__main__":
    app()
