"""Token grids of a U-Net's attention levels, and resampling a cached attention output to another latent size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def level_halvings(latent_hw: tuple[int, int], tokens: int) -> int:
    """How many times the latent size is halved (rounding up) to reach the level that has `tokens` cells."""
    height, width = latent_hw
    halvings = 0
    while height * width > tokens:
        height, width = (height + 1) // 2, (width + 1) // 2
        halvings += 1
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens do not form a level of a {latent_hw} latent")
    return halvings


def halved(latent_hw: tuple[int, int], times: int) -> tuple[int, int]:
    height, width = latent_hw
    for _ in range(times):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


def resample_tokens(output: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int],
                    source_frames: int | None = None, target_frames: int | None = None) -> torch.Tensor:
    """`output` (n, tokens, channels) of one level of a `source_hw` latent, bilinearly resampled to the same
    level of a `target_hw` latent; a video's tokens (frame by frame: frames x grid) frame by frame, then linearly
    in time to `target_frames`."""
    if source_frames is not None:
        return _resample_video_tokens(output, source_hw, target_hw, source_frames, target_frames or source_frames)
    level = level_halvings(source_hw, output.shape[1])
    grid = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], *halved(source_hw, level))
    grid = F.interpolate(grid, size=halved(target_hw, level), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def _resample_video_tokens(output: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int], source_frames: int,
                           target_frames: int) -> torch.Tensor:
    n, tokens, channels = output.shape
    per_frame = resample_tokens(output.reshape(n * source_frames, tokens // source_frames, channels), source_hw, target_hw)
    per_frame = per_frame.reshape(n, source_frames, -1, channels)
    return resample_frames(per_frame, target_frames, dim=1).reshape(n, -1, channels)


def resample_frames(tensor: torch.Tensor, frames: int, dim: int) -> torch.Tensor:
    """`tensor` resampled linearly to `frames` along `dim`, its first and last frames kept in place (a clip's
    start and end stay where they are when it is shortened or lengthened)."""
    if tensor.shape[dim] == frames:
        return tensor
    moved = tensor.movedim(dim, -1)
    flat = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=frames, mode="linear", align_corners=True)
    return flat.reshape(*moved.shape[:-1], frames).movedim(-1, dim)
