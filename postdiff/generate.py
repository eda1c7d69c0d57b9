"""The main job: PostDiff against the baseline on one prompt, images saved, savings printed."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
from PIL import Image
from rich.markup import escape
from rich.table import Table

from . import api
from .config import PostDiffConfig, build_config
from .loading import call_defaults, is_testbed, load_pipeline
from .models import plan_macs_per_image
from .quantization import denoiser_name, quantize_denoiser, torchao_config, weight_bytes
from .testbed.data import CLASS_NAMES
from .testbed.text import classes_named


def embedded_model_warning(prompt: str, model: str | None) -> str | None:
    """Why the embedded model will not draw `prompt`, when it names none of its classes (it draws one of them
    anyway, so without this a user sees a shirt for "a cat" and no reason)."""
    if not is_testbed(model) or classes_named(prompt):
        return None
    return (f"the embedded model knows only its 10 Fashion-MNIST classes ({', '.join(CLASS_NAMES)}); "
            f"{prompt!r} names none of them, so expect one of those (e.g. \"a photo of a sneaker\")")


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def timed_run(pipe, config: PostDiffConfig, arguments: dict, seed: int):
    """(images, or clips as lists of frames; wall seconds; denoiser MACs per image or clip)."""
    with api.applied(pipe, config):
        plan = api.plan_call(pipe, **arguments)
        started = time.perf_counter()
        output = pipe(**arguments, generator=torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - started
        macs = plan_macs_per_image(pipe, plan)
    return (output.frames if hasattr(output, "frames") else output.images), seconds, macs


def save(images: list, folder: Path, stem: str) -> None:
    """PNGs and a grid of images; for clips (lists of frames) a GIF each and a grid, a clip a row."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(images[0], list):
        for index, frames in enumerate(images):
            frames[0].save(folder / f"{stem}_{index:03d}.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
        image_grid([frame for frames in images for frame in frames], columns=len(images[0])).save(folder / f"{stem}_grid.png")
        return
    for index, image in enumerate(images):
        image.save(folder / f"{stem}_{index:03d}.png")
    image_grid(images).save(folder / f"{stem}_grid.png")


def batch_argument(pipe) -> str:
    """The name a pipeline gives its images per prompt (video pipelines: `num_videos_per_prompt`)."""
    return "num_videos_per_prompt" if "num_videos_per_prompt" in inspect.signature(api.reference_call(pipe)).parameters \
        else "num_images_per_prompt"


def run_generate(prompt, config_flags, num_images, seed, out: Path, steps, model, guidance_scale, negative_prompt, console,
                 quantize: str = ""):
    """`quantize`: a name of postdiff.quantization for the denoiser of both runs ("" keeps it float), so the saving
    printed is PostDiff's on top of the quantized model."""
    warning = embedded_model_warning(prompt, model)
    if warning:
        console.print("[yellow]warning:[/yellow] " + escape(warning))  # a prompt may hold [markup]
    if quantize:
        torchao_config(quantize)  # an unknown name, or torchao missing: refused before the model loads
    pipe, default_guidance = load_pipeline(model)
    config = build_config(api.preset_family(pipe), **config_flags) if any(v is not None for v in config_flags.values()) \
        else PostDiffConfig.preset("paper", family=api.preset_family(pipe))
    arguments = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                     guidance_scale=guidance_scale or default_guidance, **{batch_argument(pipe): num_images}, **call_defaults(pipe))
    if batch_argument(pipe) == "num_videos_per_prompt":
        arguments["output_type"] = "pil"  # clips as lists of PIL frames
    with api.applied(pipe, config):
        api.plan_call(pipe, **arguments)  # refuses a bad config before anything runs
    if quantize:
        quantize_denoiser(pipe, quantize)
    # One short untimed call first: the first call of a process pays one-off costs (allocator, kernels) that
    # would otherwise be charged to the baseline, which runs first.
    pipe(**{**arguments, "num_inference_steps": 2, batch_argument(pipe): 1, "output_type": "latent"})
    runs = {"baseline": PostDiffConfig(), "postdiff": config}
    results = {}
    for label, run_config in runs.items():
        images, seconds, macs = timed_run(pipe, run_config, arguments, seed)
        save(images, out, "postdiff" if run_config is config else "baseline")
        results[label] = (seconds, macs)
    denoiser = getattr(pipe, denoiser_name(pipe))
    precision = f"; denoiser {quantize}, {weight_bytes(denoiser) / 2**20:.2f} MB of weights" if quantize else ""
    console.print(f"postdiff config: {config.describe()}; {steps} steps, guidance {arguments['guidance_scale']}{precision}")
    _print_summary(console, results, out, num_images)


def _print_summary(console, results: dict, out: Path, num_images: int) -> None:
    (base_seconds, base_macs) = next(iter(results.values()))
    table = Table(title=f"{num_images} images, saved in {out}/")
    for column in ("run", "wall s", "MACs/image (10^9)", "MACs vs baseline", "time vs baseline"):
        table.add_column(column, justify="right")
    for label, (seconds, macs) in results.items():
        table.add_row(label, f"{seconds:.2f}", f"{macs / 1e9:.2f}", f"{macs / base_macs:.1%}", f"{seconds / base_seconds:.1%}")
    console.print(table)
    (seconds, macs) = list(results.values())[-1]
    console.print(f"PostDiff saved {1 - macs / base_macs:.1%} of the denoiser MACs and {1 - seconds / base_seconds:.1%} of the wall time.")
