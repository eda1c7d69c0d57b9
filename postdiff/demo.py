"""`postdiff demo`: a Gradio page that runs the baseline and PostDiff on one prompt with the same seed and shows
both images, the wall time and denoiser MACs of each (the accounting of the plan each call executes, as
`postdiff generate` reports them), what PostDiff saved, and PostDiff's step plan as a picture.

Needs the `demo` extra (`pip install 'postdiff[demo]'`, gradio 6)."""

from __future__ import annotations

import inspect
import math
import os
import re
import time
from dataclasses import dataclass

# Gradio otherwise calls home (analytics, version check) from every launch; a user's own setting wins.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import torch
from matplotlib.figure import Figure
from PIL import Image

from . import api
from .config import PRESETS, PostDiffConfig, build_config
from .generate import embedded_model_warning
from .loading import load_pipeline
from .models import plan_macs_per_image
from .plan import StepPlan

SHOWN_SIDE = 256  # images smaller than this (the embedded models' 32x32) are enlarged, pixel for pixel
COMPUTED, REUSED = "#264653", "#e9c46a"  # the plan picture: work done / work cached or skipped


@dataclass(frozen=True)
class Request:
    """One validated page submission: the pipeline's call arguments, the seed and PostDiff's config."""

    arguments: dict
    seed: int
    config: PostDiffConfig


@dataclass(frozen=True)
class Run:
    image: Image.Image
    seconds: float
    macs: float
    plan: StepPlan


def whole_number(name: str, value, minimum: int) -> int:
    """A page's number field as an int, or a ValueError naming the field (gr.Number gives floats or None)."""
    if value is None or not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: expected a whole number >= {minimum}")
    return int(value)


def knob_value(name: str, text) -> float | None:
    """A knob's text field: blank (or "none") is None, the preset's value; anything else must be a number."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not allowed: expected a number, or blank for the preset's value") from None


def read_request(family: str, default_guidance: float, prompt, seed, steps, guidance, preset, beta, switch,
                 cache_interval, cfg_stop) -> Request:
    """The page's fields as a Request; knobs left blank keep the preset's value (as the command line's flags)."""
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"guidance={guidance!r} is not allowed: expected a finite number")
    knobs = {name: knob_value(name, text) for name, text in
             dict(beta=beta, switch=switch, cache_interval=cache_interval, cfg_stop=cfg_stop).items()}
    knobs.update({name: whole_number(name, knobs[name], 0) for name in ("cache_interval", "cfg_stop") if knobs[name] is not None})
    config = build_config(family, preset, **knobs)
    arguments = dict(prompt=prompt or "", num_inference_steps=whole_number("steps", steps, 1),
                     guidance_scale=default_guidance if guidance is None else float(guidance))
    return Request(arguments, whole_number("seed", seed, 0), config)


def takes_step_callback(pipe) -> bool:
    """Whether the pipeline's call (somewhere in its class chain: the embedded models wrap it) has
    `callback_on_step_end`, which drives the page's progress bar."""
    calls = [cls.__dict__["__call__"] for cls in type(pipe).__mro__ if "__call__" in cls.__dict__]
    return any("callback_on_step_end" in inspect.signature(call).parameters for call in calls)


def timed_run(pipe, config: PostDiffConfig, request: Request, on_step) -> Run:
    """One image under `config`: planned first (a bad config is refused here, before compute), then timed."""
    with api.applied(pipe, config):
        plan = api.plan_call(pipe, **request.arguments)
        callback = {"callback_on_step_end": on_step} if on_step is not None else {}
        started = time.perf_counter()
        image = pipe(**request.arguments, **callback, generator=torch.Generator().manual_seed(request.seed)).images[0]
        seconds = time.perf_counter() - started
    return Run(image, seconds, plan_macs_per_image(pipe, plan), plan)


def step_reporter(progress, label: str, steps: int):
    """A `callback_on_step_end` that moves the page's progress bar (the engine reports global step indices)."""
    def on_step(pipe, step, timestep, callback_kwargs):
        progress((step + 1, steps), desc=label)
        return callback_kwargs

    return on_step


def shown(image: Image.Image) -> Image.Image:
    """The image as the page shows it: small ones enlarged by whole pixels (nearest), so they are visible."""
    factor = max(1, SHOWN_SIDE // max(image.size))
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)


def plan_rows(plan: StepPlan) -> list[tuple[str, list[tuple[bool, str]]]]:
    """The plan picture's rows: per step (full work?, cell text)."""
    full_side = max(side for step in plan.steps for side in step.latent_hw)
    return [
        ("latent", [(max(s.latent_hw) == full_side, f"{s.latent_hw[0]}") for s in plan.steps]),
        ("deep blocks", [(s.deep == "full", "run" if s.deep == "full" else "cache") for s in plan.steps]),
        ("CFG", [(s.cfg, "on" if s.cfg else "off") for s in plan.steps]),
        ("cross-attn", [(s.cross_attention == "computed", "run" if s.cross_attention == "computed" else "cache")
                        for s in plan.steps]),
    ]


def plan_figure(plan: StepPlan) -> Figure:
    """PostDiff's step plan as a grid: a column per step, dark where the work runs (full resolution, deep
    blocks computed, CFG batch, cross-attention computed), yellow where it is cheaper; dashed lines at switches."""
    rows, count = plan_rows(plan), len(plan.steps)
    figure = Figure(figsize=(min(12.0, max(6.0, 0.36 * count + 1.6)), 2.5), layout="constrained")
    axes = figure.add_subplot()
    for row, (_, cells) in enumerate(rows):
        for index, (full, text) in enumerate(cells):
            axes.add_patch(_cell(index, row, full, outlined=count <= 60))
            if count <= 30:  # past that the cells are too narrow for text; the colours still tell
                axes.text(index + 0.5, row + 0.5, text, ha="center", va="center", fontsize=7,
                          color="white" if full else "black")
    for step in plan.steps:
        if "switch" in step.events:
            axes.axvline(step.index, color="#e76f51", linestyle="--", linewidth=2)
    axes.set(xlim=(0, count), ylim=(len(rows), 0), yticks=[row + 0.5 for row in range(len(rows))],
             yticklabels=[name for name, _ in rows], xlabel="step")
    every = max(1, count // 30)  # at most ~30 step labels
    axes.set_xticks([index + 0.5 for index in range(0, count, every)], [str(i) for i in range(0, count, every)], fontsize=7)
    axes.set_title(f"PostDiff plan: {plan.config.describe()}\ndark: computed, yellow: cached, skipped or smaller; "
                   "dashed: resolution switch", fontsize=8)
    return figure


def _cell(index: int, row: int, full: bool, outlined: bool):
    from matplotlib.patches import Rectangle

    colour = COMPUTED if full else REUSED  # many steps: no outlines, which would cover the cells
    return Rectangle((index, row), 1, 1, facecolor=colour, edgecolor="white" if outlined else colour)


def format_macs(macs: float) -> str:
    return f"{macs / 1e12:.3f} T" if macs >= 1e12 else f"{macs / 1e9:.3f} G"


def summary(request: Request, baseline: Run, postdiff: Run, note: str | None) -> str:
    """The page's numbers as Markdown: a table of both runs and what PostDiff saved."""
    arguments = request.arguments
    lines = [f"PostDiff config `{request.config.describe()}`; {arguments['num_inference_steps']} steps, "
             f"guidance {arguments['guidance_scale']}, seed {request.seed}", "",
             "| run | wall time | denoiser MACs / image | MACs vs baseline |", "|---|---:|---:|---:|"]
    for label, run in (("baseline (off)", baseline), ("PostDiff", postdiff)):
        lines.append(f"| {label} | {run.seconds:.3f} s | {format_macs(run.macs)} | {run.macs / baseline.macs:.1%} |")
    lines += ["", f"PostDiff saved **{1 - postdiff.macs / baseline.macs:.1%}** of the denoiser MACs and "
              f"{1 - postdiff.seconds / baseline.seconds:.1%} of the wall time."]
    if note:
        lines += ["", f"Note: {escaped(note)}"]
    return "\n".join(lines)


def escaped(text: str) -> str:
    """Plain text for a Markdown field: a prompt or a message may hold Markdown or HTML characters."""
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~])", r"\\\1", text)


def refusal(error: Exception) -> str:
    return f"**Refused:** {escaped(str(error))}"


def demo_function(pipe, default_guidance: float, model: str | None):
    """The page's Generate: baseline, then PostDiff, same seed; bad input becomes a message, not a traceback."""
    family = api.preset_family(pipe)
    with_progress = takes_step_callback(pipe)

    def generate(prompt, seed, steps, guidance, preset, beta, switch, cache_interval, cfg_stop, progress=gr.Progress()):
        try:
            request = read_request(family, default_guidance, prompt, seed, steps, guidance, preset, beta, switch,
                                   cache_interval, cfg_stop)
            with api.applied(pipe, request.config):
                api.plan_call(pipe, **request.arguments)  # refuses a config the model cannot run before the baseline
            runs = {}
            for label, config in (("baseline", PostDiffConfig()), ("PostDiff", request.config)):
                reporter = step_reporter(progress, label, request.arguments["num_inference_steps"]) if with_progress else None
                runs[label] = timed_run(pipe, config, request, reporter)
        except ValueError as error:  # ConfigError and the pipeline's own input checks
            return None, None, refusal(error), None
        baseline, postdiff = runs["baseline"], runs["PostDiff"]
        note = embedded_model_warning(request.arguments["prompt"], model)
        return shown(baseline.image), shown(postdiff.image), summary(request, baseline, postdiff, note), plan_figure(postdiff.plan)

    return generate


def warmed_up(model: str | None):
    """The pipeline, its default guidance, after one short untimed call: the first call of a process pays
    one-off costs (allocator, kernels) that would otherwise be charged to the first baseline."""
    pipe, default_guidance = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)  # the page has its own progress bar
    pipe(prompt="", num_inference_steps=2, output_type="latent")
    return pipe, default_guidance


def build_app(model: str | None = None) -> gr.Blocks:
    """The demo page on `model` (an embedded model's name, a folder or a hub id; None: the embedded testbed)."""
    pipe, default_guidance = warmed_up(model)
    with gr.Blocks(title="PostDiff demo", analytics_enabled=False) as app:
        name = (model or "testbed").replace("`", "'")  # in a code span, where escapes would show
        gr.Markdown(f"## PostDiff demo: baseline vs PostDiff, same seed\nmodel: `{name}`")
        with gr.Row():
            with gr.Column(scale=2):
                inputs = input_fields(default_guidance)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                with gr.Row():
                    baseline = gr.Image(label="baseline (off)", type="pil", format="png", elem_id="baseline")
                    postdiff = gr.Image(label="PostDiff", type="pil", format="png", elem_id="postdiff")
                numbers = gr.Markdown("Type a prompt and press Generate.", elem_id="summary")
                plan = gr.Plot(label="PostDiff step plan", format="png", elem_id="plan")
        # One generation at a time: the pipeline and its PostDiff patch are shared by every browser tab.
        button.click(demo_function(pipe, default_guidance, model), inputs, [baseline, postdiff, numbers, plan],
                     concurrency_limit=1)
    return app.queue(default_concurrency_limit=1)


def input_fields(default_guidance: float) -> list:
    prompt = gr.Textbox(label="prompt", value="a photo of a sneaker", elem_id="prompt")
    with gr.Row():
        seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
        steps = gr.Number(label="steps", value=20, precision=0, elem_id="steps")
        guidance = gr.Number(label="guidance", value=default_guidance, elem_id="guidance")
    preset = gr.Radio(list(PRESETS), value="paper", label="preset", elem_id="preset")
    gr.Markdown("Knobs override the preset; blank keeps the preset's value.")
    # Text fields, not gr.Number: a Number field cannot be blank (it shows and sends 0).
    with gr.Row():
        beta = knob_field("beta (low-res scale)", "beta")
        switch = knob_field("switch (low-res fraction)", "switch")
    with gr.Row():
        cache_interval = knob_field("cache interval", "cache_interval")
        cfg_stop = knob_field("CFG stop (first step without CFG)", "cfg_stop")
    return [prompt, seed, steps, guidance, preset, beta, switch, cache_interval, cfg_stop]


def knob_field(label: str, elem_id: str) -> gr.Textbox:
    return gr.Textbox(label=label, value="", placeholder="preset's value", max_lines=1, elem_id=elem_id)


def launch(model: str | None, host: str, port: int, share: bool, block: bool = True):
    """Serve the page; `block=False` returns once the server runs (tests), with the app to `close()`."""
    app = build_app(model)
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, prevent_thread_lock=not block,
               quiet=not block)
    return app
