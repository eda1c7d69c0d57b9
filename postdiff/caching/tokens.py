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


def resample_tokens(output: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """`output` (n, tokens, channels) of one level of a `source_hw` latent, bilinearly resampled to the same
    level of a `target_hw` latent."""
    level = level_halvings(source_hw, output.shape[1])
    grid = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], *halved(source_hw, level))
    grid = F.interpolate(grid, size=halved(target_hw, level), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)
