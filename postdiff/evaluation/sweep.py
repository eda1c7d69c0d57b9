"""Resumable sweeps: every (config, steps) point of a grid is scored once and appended to a JSON-lines store.

The store is append-only and keyed by the point and its context (model, prompt set, images per class,
seed, guidance): a sweep killed at any moment and started again skips what is stored, recomputes nothing
and duplicates nothing. A line cut by a kill mid-write is dropped when the store is opened.

Generation is sharded with accelerate: the prompts of the workload (workloads.py: the embedded model's
classes, or a prompt file for any pipeline) are split between processes
(`PartialState.split_between_processes`), each prompt is seeded on its own, and the main process gathers
the images, scores and writes; so 1 process and N processes give the same rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import api
from ..config import PostDiffConfig
from ..models import plan_macs_per_image
from ..quantization import check_quantization, denoiser_name, quantized, weight_bytes
from .baselines import ExternalMethod, measured_denoiser_macs
from .workloads import Workload


@dataclass(frozen=True)
class SweepPoint:
    """A configuration at a step count; `external` names an external method instead (see baselines.py);
    `quantize` a quantization of the denoiser under either (see postdiff/quantization.py), "" for float."""

    config: PostDiffConfig
    steps: int
    external: str = ""
    quantize: str = ""

    def describe(self) -> str:
        quantized = f", {self.quantize}" if self.quantize else ""
        return f"{self.steps} steps, {self.external or self.config.describe()}{quantized}"

    @contextlib.contextmanager
    def applied(self, pipe, workload: Workload | None = None, guidance_scale: float | None = None):
        """PostDiff's config, or the external method, on `pipe`; yields a callable run before each seeded call.
        An external method that calibrates (MagCache off FLUX) needs the `workload` and `guidance_scale` of the
        calls it will make."""
        with quantized(pipe, self.quantize), self._method_applied(pipe, workload, guidance_scale) as before_call:
            yield before_call

    @contextlib.contextmanager
    def _method_applied(self, pipe, workload: Workload | None, guidance_scale: float | None):
        if self.external:
            calibration = calibration_call(pipe, workload, self.steps, guidance_scale) if workload is not None else None
            with ExternalMethod.parse(self.external).applied(pipe, self.steps, calibration) as before_call:
                yield before_call
            return
        with api.applied(pipe, self.config):
            yield lambda seed: None


def calibration_call(pipe, workload: Workload, steps: int, guidance_scale: float):
    """One call as the sweep makes them (the workload's first prompt, seed 0, the point's steps and guidance) but
    of one image and undecoded: only the denoiser's run matters to a calibration."""
    return lambda: pipe(workload.prompts[0], num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                        generator=torch.Generator().manual_seed(0), **workload.call_arguments)


@dataclass(frozen=True)
class SweepContext:
    """What else a score depends on; part of every row's key. `classes` are the indices of the prompts used
    and `per_class` the images per prompt (named after the embedded model's class prompts)."""

    model: str = "testbed"
    prompt_set: str = "fashion-mnist-classes"
    per_class: int = 20
    seed: int = 0
    guidance_scale: float = 3.0
    classes: tuple[int, ...] = tuple(range(10))

    @classmethod
    def for_workload(cls, workload: Workload, model: str | None, **fields) -> "SweepContext":
        """`model` None is the embedded model, named "testbed" in keys."""
        return cls(model=model or "testbed", prompt_set=workload.name, classes=tuple(range(len(workload.prompts))), **fields)


def point_key(point: SweepPoint, context: SweepContext) -> str:
    identity = {"config": point.config.to_dict(), "steps": point.steps, "context": context.__dict__}
    if point.external:
        identity["external"] = point.external
    if point.quantize:  # only when set: the keys of float points stay those stored before quantization existed
        identity["quantize"] = point.quantize
    payload = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def grid(steps, betas=(1.0,), switches=(0.0,), cache_intervals=(1,), cfg_stops=(None,), ca_modes=("cond",),
         presets=(), family: str = "testbed", progressives=((),), externals=(), cache_branches=(1,),
         switch_noises=("iid",), low_res_shifts=("full",), quantizations=("",), temporal_betas=(1.0,)) -> list[SweepPoint]:
    """The cartesian grid, with invalid combinations (switch without beta or temporal_beta < 1, progressive stages
    without a switch or after beta 1, block noise with temporal_beta < 1) left out and duplicates merged; presets
    and external methods are added at every step count.

    `cache_branches` apply to configs with DeepCache on (cache interval > 1); the others keep the config's
    default branch, which does nothing there. The default, branch 1, is the branch the paper's DeepCache FLOPs
    use and the one the published study measured. Likewise `switch_noises`, `low_res_shifts` and `temporal_betas`
    (video: the low phase's frames; with beta 1, in time only) apply to configs with a switch. Every point is made
    once per entry of `quantizations` ("" for the float denoiser)."""
    for name in filter(None, quantizations):
        check_quantization(name)
    for beta in betas:  # a value out of range is refused here, not left out below as an invalid combination
        PostDiffConfig(beta=beta)
    for switch in switches:
        PostDiffConfig(beta=0.5, switch=switch)
    for temporal_beta in temporal_betas:
        PostDiffConfig(beta=0.5, switch=0.5, temporal_beta=temporal_beta)
    points = []
    for n, beta, switch, interval, branch, stop, mode, stages, noise, shift, frames in itertools.product(
            steps, betas, switches, cache_intervals, cache_branches, cfg_stops, ca_modes, progressives, switch_noises,
            low_res_shifts, temporal_betas):
        if (switch > 0) != (beta < 1 or frames < 1) or (stop is None and mode != ca_modes[0]) or (stages and not switch) \
                or (noise == "block" and frames < 1) or (stages and beta == 1):
            continue
        caching = {"cache_interval": interval, "cache_branch": branch} if interval > 1 else {}
        noise = {"switch_noise": noise, "low_res_shift": shift, "temporal_beta": frames} if switch > 0 else {}
        config = PostDiffConfig(beta=beta, switch=switch, cfg_stop=stop, ca_mode=mode, progressive=stages, **caching, **noise)
        points.append(SweepPoint(config, n))
    points += [SweepPoint(PostDiffConfig.preset(name, family=family), n) for name in presets for n in steps]
    points += [SweepPoint(PostDiffConfig(), n, ExternalMethod.parse(spec).spec) for spec in externals for n in steps]
    points = [replace(point, quantize=name) for name in quantizations for point in points]
    return list(dict.fromkeys(points))


class SweepStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a kill mid-write: the last line is incomplete
            self.path.write_bytes(raw[: raw.rfind(b"\n") + 1])

    def rows(self) -> list[dict]:
        """Every stored row once: if two processes sweeping into the same store both scored a point, the
        first row written is the one kept."""
        if not self.path.exists():
            return []
        first: dict[str, dict] = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                first.setdefault(row["key"], row)
        return list(first.values())

    def keys(self) -> set[str]:
        return {row["key"] for row in self.rows()}

    def append(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def score_point(pipe, workload: Workload, point: SweepPoint, context: SweepContext, state) -> dict | None:
    """Generate this process's share of the prompts; on the main process gather, score and return the row."""
    from accelerate.utils import gather_object

    with point.applied(pipe, workload, context.guidance_scale) as before_call:
        macs = applied_point_macs(pipe, point, context.guidance_scale, workload)
        denoiser_bytes = weight_bytes(getattr(pipe, denoiser_name(pipe)))
        started = time.perf_counter()
        with state.split_between_processes(list(context.classes)) as my_prompts:
            images, labels = workload.generate(pipe, my_prompts, context.per_class, point.steps, context.guidance_scale,
                                               context.seed, before_call)
        seconds = time.perf_counter() - started
    shards = gather_object([(images, labels, seconds)])
    if not state.is_main_process:
        return None
    images = np.concatenate([shard[0] for shard in shards])
    labels = np.concatenate([shard[1] for shard in shards])
    return {
        "key": point_key(point, context), "config": point.config.to_dict(), "external": point.external,
        **({"quantize": point.quantize} if point.quantize else {}), "weight_bytes": denoiser_bytes,
        "describe": point.describe(),
        "steps": point.steps, "context": context.__dict__, **workload.score(images, labels), "macs": macs,
        "seconds": sum(shard[2] for shard in shards), "num_images": int(len(images)),
    }


def point_macs(pipe, point: SweepPoint, guidance_scale: float, workload: Workload) -> float:
    with point.applied(pipe, workload, guidance_scale):
        return applied_point_macs(pipe, point, guidance_scale, workload)


def applied_point_macs(pipe, point: SweepPoint, guidance_scale: float, workload: Workload) -> float:
    """Denoiser MACs per image of `point`, with its method already applied to `pipe`: from PostDiff's plan, or
    measured for an external method."""
    arguments = planned_call(point, guidance_scale, workload)
    if point.external:
        return measured_denoiser_macs(pipe, **arguments, output_type="np", generator=torch.Generator().manual_seed(0))
    return plan_macs_per_image(pipe, api.plan_call(pipe, **arguments))


def check_plans(pipe, points: list[SweepPoint], guidance_scale: float, workload: Workload) -> None:
    """Every PostDiff point planned on `pipe` before the first is scored: a setting this model refuses (a cache
    branch beyond its blocks, a beta its size cannot take) stops the sweep before any compute, not midway."""
    for point in points:
        if not point.external:
            with api.applied(pipe, point.config):
                api.plan_call(pipe, **planned_call(point, guidance_scale, workload))


def planned_call(point: SweepPoint, guidance_scale: float, workload: Workload) -> dict:
    """The call a point's MACs are planned (or measured) on: the workload's first prompt at the point's steps."""
    return dict(prompt=workload.prompts[0], num_inference_steps=point.steps, guidance_scale=guidance_scale,
                **workload.call_arguments)


def run_sweep(pipe, workload: Workload, points: list[SweepPoint], store: SweepStore, context: SweepContext, progress=None) -> list[dict]:
    """Score every point not in the store yet; returns the store's rows for `points` (old and new), in the
    order of `points`.

    `progress(total)`, when given, is called once with the number of points to score and returns a
    callable run after each of them (the CLI's progress bar)."""
    from accelerate import PartialState

    state = PartialState()
    done = store.keys()
    todo = [point for point in points if point_key(point, context) not in done]
    check_plans(pipe, todo, context.guidance_scale, workload)
    advance = progress(len(todo)) if progress is not None else (lambda: None)
    for point in todo:
        row = score_point(pipe, workload, point, context, state)
        if row is not None:
            store.append(row)
        advance()
    state.wait_for_everyone()
    stored = {row["key"]: row for row in store.rows()}
    return [stored[key] for key in dict.fromkeys(point_key(point, context) for point in points)]
