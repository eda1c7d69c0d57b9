"""Scores of generated clips of the embedded video model, from the project's image evaluator
(postdiff/testbed/evaluator.py) and the clips' known motions (postdiff/testbed/video_data.py):

- **frame FD**: Frechet distance of the evaluator's features of every frame against those of the frames of real
  clips (test-split images moved by the same eight motions; the image evaluator's own reference is of unmoved
  images, which moved frames are not);
- **class accuracy**: the share of frames the evaluator classifies as the prompted class;
- **temporal consistency**: the mean feature distance between consecutive frames, beside real clips' (a clip
  that flickers has a larger one, a frozen one a smaller one): reported as the ratio generated / real;
- **motion accuracy**: the share of clips whose motion, recovered from their frames, is the prompted one.

`real_clip_scores` gives the same scores for real clips: the ceiling each score has on this data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..metrics import feature_statistics, frechet_distance
from .data import load_split, to_model_range
from .evaluator import Evaluator, load_evaluator
from .video_data import MOTIONS, NUM_FRAMES, move, recover_motion

REFERENCE_CLIPS = 2000  # real test clips behind the frame statistics


@dataclass(frozen=True)
class VideoScores:
    frame_fd: float
    class_accuracy: float
    temporal_ratio: float  # consecutive-frame feature distance, generated / real
    motion_accuracy: float
    clips: int

    def to_dict(self) -> dict:
        return asdict(self)


def real_clips(count: int, seed: int = 0, num_frames: int = NUM_FRAMES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clips (N, 1, F, 32, 32) in [-1, 1], labels (N,), motions (N,)) from the test split, seeded."""
    images, labels = load_split("test")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:count]
    motions = torch.randint(0, len(MOTIONS), (count,), generator=generator)
    return move(to_model_range(images[index.numpy()]), motions, num_frames), torch.as_tensor(labels[index.numpy()]), motions


class VideoEvaluator:
    def __init__(self, evaluator: Evaluator | None = None, reference_clips: int = REFERENCE_CLIPS):
        self.evaluator = evaluator or load_evaluator()
        clips, _, _ = real_clips(reference_clips)
        features = self.frame_features(clips)
        self.mu, self.sigma = feature_statistics(features.flatten(0, 1))
        self.real_step = self._step_distance(features)

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """(N, F, D) features of every frame of clips (N, 1, F, H, W) in [-1, 1]."""
        frames = clips.transpose(1, 2).flatten(0, 1)
        return self.evaluator.features(frames).reshape(clips.shape[0], clips.shape[2], -1)

    @staticmethod
    def _step_distance(features: torch.Tensor) -> float:
        return float((features[:, 1:] - features[:, :-1]).norm(dim=-1).mean())

    def score(self, clips: torch.Tensor, labels, motions) -> VideoScores:
        """Scores of clips (N, 1, F, 32, 32) in [-1, 1] prompted with `labels` and `motions` (N each)."""
        labels, motions = torch.as_tensor(labels).reshape(-1), torch.as_tensor(motions).reshape(-1)
        if not (len(clips) == len(labels) == len(motions)):
            raise ValueError(f"{len(clips)} clips but {len(labels)} labels and {len(motions)} motions")
        features = self.frame_features(clips)
        mu, sigma = feature_statistics(features.flatten(0, 1))
        predicted = self.evaluator.predict(clips.transpose(1, 2).flatten(0, 1)).reshape(len(clips), -1)
        return VideoScores(
            frame_fd=frechet_distance(mu, sigma, self.mu, self.sigma),
            class_accuracy=float((predicted == labels[:, None]).double().mean()),
            temporal_ratio=self._step_distance(features) / self.real_step,
            motion_accuracy=float((recover_motion(clips) == motions).double().mean()),
            clips=len(clips),
        )


def real_clip_scores(evaluator: VideoEvaluator, count: int = 400, seed: int = 1) -> VideoScores:
    """The scores of real clips not in the reference (another seed): each score's ceiling on this data."""
    clips, labels, motions = real_clips(count, seed)
    return evaluator.score(clips, labels, motions)
