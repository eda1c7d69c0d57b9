"""Quality against compute on the embedded model: images per class with a config, scored by the evaluator."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import api
from ..config import PostDiffConfig
from ..models import plan_macs_per_image
from ..testbed.data import CLASS_NAMES
from ..testbed.text import canonical_prompt


@dataclass(frozen=True)
class QualityResult:
    config: str
    steps: int
    per_class: int
    fd: float
    alignment: float
    macs: float  # denoiser MACs per image, units of 1
    seconds: float  # wall time of the generation

    def to_dict(self) -> dict:
        return asdict(self)


def generate_images(pipe, prompts: dict[int, str], per_prompt: int, steps: int, guidance_scale: float, seed: int = 0,
                    before_call=None, **call_arguments) -> tuple[np.ndarray, np.ndarray]:
    """`per_prompt` images of each prompt, one call per prompt seeded `seed + index` (`before_call(seed)` first,
    when given: external methods with random state of their own re-seed there); images (N, H, W, C) in [0, 1]
    and the prompt index of each."""
    images, indices = [], []
    for index, prompt in prompts.items():
        if before_call is not None:
            before_call(seed + index)
        output = pipe(prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                      output_type="np", generator=torch.Generator().manual_seed(seed + index), **call_arguments)
        images.append(output.images)
        indices.extend([index] * per_prompt)
    return np.concatenate(images), np.asarray(indices)


def generate_per_class(pipe, per_class: int, steps: int, guidance_scale: float, seed: int = 0,
                       classes: range | list[int] | None = None, before_call=None) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of "a photo of a NAME" for each class (the embedded model's prompt set)."""
    classes = list(classes if classes is not None else range(len(CLASS_NAMES)))
    prompts = {label: canonical_prompt(label) for label in classes}
    return generate_images(pipe, prompts, per_class, steps, guidance_scale, seed, before_call, negative_prompt="")


def evaluate_config(pipe, evaluator, config: PostDiffConfig, per_class: int = 100, steps: int = 20,
                    guidance_scale: float = 3.0, seed: int = 0) -> QualityResult:
    api.apply(pipe, config)
    try:
        plan = api.plan_call(pipe, canonical_prompt(0), num_inference_steps=steps, guidance_scale=guidance_scale)
        macs = plan_macs_per_image(pipe, plan)
        started = time.perf_counter()
        images, labels = generate_per_class(pipe, per_class, steps, guidance_scale, seed)
        seconds = time.perf_counter() - started
    finally:
        api.remove(pipe)
    return QualityResult(config.describe(), steps, per_class, evaluator.frechet_distance(images),
                         evaluator.alignment(images, labels), macs, seconds)
