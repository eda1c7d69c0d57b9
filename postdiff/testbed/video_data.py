"""Moving Fashion-MNIST clips for the embedded video model: a real Fashion-MNIST image moved over the clip's
frames by one of eight motions (translation in four directions, zoom in and out, turning left or right), with
the class and the motion in the caption; and the motion recovered from generated frames, for the evaluator.

Every motion is an affine map per frame (`motion_matrices`), applied with `affine_grid` / `grid_sample`, so the
clips are made in a batch and the evaluator can recover the motion by asking which of the eight maps, applied
to a clip's first frame, reproduces its later frames best.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .text import caption_for

NUM_FRAMES = 8
# Per clip, over its frames: a shift of 1/4 of the image, zoom 1 <-> 0.6, a turn of 45 degrees.
SHIFT, ZOOM, ANGLE = 0.5, 0.6, math.pi / 4  # SHIFT in grid units ([-1, 1] spans the image)
# Turning left is counterclockwise. Words the tokenizer makes one token each (a word holding another one, such as
# "counterclockwise", would be split by the other's merges), so the longest caption fits its 16 tokens.
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "zooming in", "zooming out", "turning left",
           "turning right")
MOTION_WORDS = ("moving", "left", "right", "up", "down", "zooming", "in", "out", "turning")


def motion_matrices(motion: int, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(F, 2, 3) affine maps from output to input coordinates (`affine_grid`'s convention) of `motion` per frame."""
    progress = torch.linspace(0, 1, num_frames)
    matrices = torch.zeros(num_frames, 2, 3)
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1.0
    name = MOTIONS[motion]
    if name.startswith("moving"):
        axis, sign = {"left": (0, 1.0), "right": (0, -1.0), "up": (1, 1.0), "down": (1, -1.0)}[name.split()[1]]
        matrices[:, axis, 2] = sign * SHIFT * progress  # sampling from the right moves the content left
    elif name.startswith("zooming"):
        scale = 1 + (ZOOM - 1) * progress if name.endswith("out") else ZOOM + (1 - ZOOM) * progress
        matrices[:, 0, 0] = matrices[:, 1, 1] = 1 / scale
    else:
        angle = ANGLE * progress * (1.0 if name.endswith("left") else -1.0)
        matrices[:, 0, 0], matrices[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        matrices[:, 1, 0], matrices[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return matrices


def relative_matrices(motion: int, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(F, 2, 3) maps of `motion` from its FIRST frame (zooming in starts from the small image): A_t A_0^-1."""
    full = torch.zeros(num_frames, 3, 3)
    full[:, :2], full[:, 2, 2] = motion_matrices(motion, num_frames), 1.0
    return (full @ torch.linalg.inv(full[0]))[:, :2]


def _warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] warped by per-image, per-frame maps (B, F, 2, 3): (B, C, F, H, W)."""
    batch, channels, height, width = images.shape
    num_frames = matrices.shape[1]
    grid = F.affine_grid(matrices.flatten(0, 1), (batch * num_frames, channels, height, width), align_corners=False)
    frames = images.repeat_interleave(num_frames, dim=0) + 1  # background 0 for grid_sample's zero padding
    moved = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    return moved.reshape(batch, num_frames, channels, height, width).transpose(1, 2)


def move(images: torch.Tensor, motions: torch.Tensor, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Clips (B, 1, F, H, W) in [-1, 1] from images (B, 1, H, W) in [-1, 1] and motion indices (B,); outside the
    image is background (-1)."""
    return _warp(images, torch.stack([motion_matrices(int(m), num_frames) for m in motions]))


def video_caption(label: int, motion: int, rng: random.Random) -> str:
    """The image caption with the motion after it ("a photo of a sneaker moving left"); empty for CFG's share."""
    caption = caption_for(label, rng)
    return f"{caption} {MOTIONS[motion]}" if caption else ""


def video_prompt(label: int, motion: int) -> str:
    from .data import CLASS_NAMES

    return f"a photo of a {CLASS_NAMES[label]} {MOTIONS[motion]}"


def recover_motion(clips: torch.Tensor) -> torch.Tensor:
    """The motion index (B,) whose maps, applied to each clip's first frame, reproduce its frames best (MSE)."""
    first = clips[:, :, 0]
    num_frames = clips.shape[2]
    errors = torch.stack([
        (_warp(first, relative_matrices(m, num_frames).expand(len(first), -1, -1, -1)) - clips).pow(2).mean(dim=(1, 2, 3, 4))
        for m in range(len(MOTIONS))
    ], dim=1)
    return errors.argmin(dim=1)
