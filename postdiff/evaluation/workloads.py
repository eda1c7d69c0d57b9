"""What a sweep generates and how it scores it: a prompt list, one seeded call per prompt (`seed + index`),
and two numbers per configuration, "fd" (lower is better) and "alignment" (higher is better).

- `FashionClasses`: the embedded model's 10 class prompts, scored by the shipped evaluator (FD against
  the Fashion-MNIST test split; alignment = share of images classified as the prompted class).
- `MovingFashion`: the embedded video model's class x motion prompts, scored by the clip evaluator.
- `PromptFile`: any supported pipeline, prompts from a text file (one per line), scored with the standard
  metrics: "fd" is FID (torchmetrics, Inception-v3 pool3) against a folder of reference images, "alignment"
  is the CLIP score (openai/clip-vit-large-patch14 by default). Both need their weights present (downloaded
  once, or in the Hugging Face cache); a local feature network and CLIP model can be passed instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..loading import embedded_name, is_testbed, load_pipeline
from ..testbed.data import CLASS_NAMES
from ..testbed.text import canonical_prompt
from ..testbed.video_data import video_prompt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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


class Workload:
    name: str  # identifies the prompt set in a row's key
    prompts: list[str]
    call_arguments: dict = {}

    def generate(self, pipe, indices, per_prompt: int, steps: int, guidance_scale: float, seed: int, before_call=None):
        prompts = {index: self.prompts[index] for index in indices}
        return generate_images(pipe, prompts, per_prompt, steps, guidance_scale, seed, before_call, **self.call_arguments)

    def score(self, images: np.ndarray, prompt_indices: np.ndarray) -> dict:
        raise NotImplementedError


class FashionClasses(Workload):
    name = "fashion-mnist-classes"
    call_arguments = {"negative_prompt": ""}

    def __init__(self, evaluator=None):
        self._evaluator = evaluator  # loaded when first scored: drawing samples needs only the prompts
        self.prompts = [canonical_prompt(label) for label in range(10)]

    @property
    def evaluator(self):
        if self._evaluator is None:
            from ..testbed.evaluator import load_evaluator

            self._evaluator = load_evaluator()
        return self._evaluator

    def score(self, images, prompt_indices) -> dict:
        return {"fd": self.evaluator.frechet_distance(images), "alignment": self.evaluator.alignment(images, prompt_indices)}


class MovingFashion(Workload):
    """The embedded video model's prompts: each class with each motion ("a photo of a bag zooming in"), clips of
    the model's size, scored by the clip evaluator (testbed/video_evaluator.py): "fd" the frame FD, "alignment"
    the frames' class accuracy, and "motion" (motion accuracy) and "temporal" (the consecutive-frame feature
    distance over real clips') beside them."""

    name = "moving-fashion-mnist"

    def __init__(self, evaluator=None):
        from ..testbed.video_data import MOTIONS
        from ..testbed.video_model import DEFAULT_CALL

        self._evaluator = evaluator
        self.pairs = [(label, motion) for label in range(len(CLASS_NAMES)) for motion in range(len(MOTIONS))]
        self.prompts = [video_prompt(label, motion) for label, motion in self.pairs]
        self.call_arguments = {"negative_prompt": "", **DEFAULT_CALL}

    @property
    def evaluator(self):
        if self._evaluator is None:
            from ..testbed.video_evaluator import VideoEvaluator

            self._evaluator = VideoEvaluator()
        return self._evaluator

    def generate(self, pipe, indices, per_prompt: int, steps: int, guidance_scale: float, seed: int, before_call=None):
        """Clips (N, 1, F, H, W) in [-1, 1], one seeded call per prompt (`seed + index`), and their prompt indices."""
        clips, prompt_indices = [], []
        for index in indices:
            if before_call is not None:
                before_call(seed + index)
            frames = pipe(self.prompts[index], num_videos_per_prompt=per_prompt, num_inference_steps=steps,
                          guidance_scale=guidance_scale, output_type="latent",
                          generator=torch.Generator().manual_seed(seed + index), **self.call_arguments).frames
            clips.append(frames.clamp(-1, 1))
            prompt_indices.extend([index] * per_prompt)
        return torch.cat(clips), np.asarray(prompt_indices)

    def score(self, clips, prompt_indices) -> dict:
        labels = [self.pairs[index][0] for index in prompt_indices]
        motions = [self.pairs[index][1] for index in prompt_indices]
        scores = self.evaluator.score(torch.as_tensor(clips), labels, motions)
        return {"fd": scores.frame_fd, "alignment": scores.class_accuracy, "motion": scores.motion_accuracy,
                "temporal": scores.temporal_ratio}


class PromptFile(Workload):
    def __init__(self, prompts_path: Path, reference_dir: Path, fid_features=None, clip_model=None, clip_processor=None):
        """`fid_features`: None for Inception-v3, or a module (see `metrics.standard_fid`); `clip_model` and
        `clip_processor` (or a tokenizer): None for openai/clip-vit-large-patch14, a hub id or folder, or a model."""
        if not Path(prompts_path).is_file():
            raise ValueError(f"prompts={str(prompts_path)!r} is not a file (a text file, one prompt per line, expected)")
        text = Path(prompts_path).read_text()
        self.prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not self.prompts:
            raise ValueError(f"prompts={str(prompts_path)!r} holds no prompt (one per line expected)")
        self.reference_paths = sorted(p for p in Path(reference_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if Path(reference_dir).is_dir() else []
        if len(self.reference_paths) < 2:
            raise ValueError(f"reference={str(reference_dir)!r} must be a folder with at least 2 images ({', '.join(IMAGE_SUFFIXES)})")
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        self.name = f"{Path(prompts_path).name}#{digest}"
        self.fid_features = fid_features
        self.clip_model, self.clip_processor = clip_model, clip_processor

    def reference_images(self, side: int) -> np.ndarray:
        """The reference folder as uint8 (N, side, side, 3): one size, so they batch like the generated images."""
        from PIL import Image

        return np.stack([np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BICUBIC)) for p in self.reference_paths])

    def score(self, images, prompt_indices) -> dict:
        from ..metrics import standard_clip_score, standard_fid

        model, processor = self.clip_model, self.clip_processor
        if isinstance(model, (str, Path)):
            from transformers import CLIPModel, CLIPProcessor

            model, processor = CLIPModel.from_pretrained(str(model)), CLIPProcessor.from_pretrained(str(model))
        prompts = [self.prompts[index] for index in prompt_indices]
        return {
            "fd": standard_fid(self.reference_images(images.shape[1]), images, self.fid_features),
            "alignment": standard_clip_score(images, prompts, model, processor),
        }


def open_workload(model: str | None, prompts: Path | None, reference: Path | None, clip_model: str):
    """(pipeline, workload): the embedded model's classes, or a prompt file scored by FID and CLIP score.
    Arguments are checked before any model is loaded."""
    testbed = is_testbed(model)
    if testbed and (prompts or reference):
        raise ValueError("--prompts and --reference are for pipelines other than the embedded model (give --model)")
    if not testbed and not (prompts and reference):
        raise ValueError(f"model={model!r} is not the embedded model: give --prompts FILE and --reference DIR to score it")
    if testbed:
        workload = MovingFashion() if embedded_name(model) == "testbed-video" else FashionClasses()
    else:
        workload = PromptFile(prompts, reference, clip_model=clip_model)
    pipe, _ = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, workload
