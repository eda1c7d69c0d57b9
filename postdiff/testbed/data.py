"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (standard idx files), without torchvision."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(os.environ.get("POSTDIFF_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension, images: 3 dimensions


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic})")
    ndim = _IDX_MAGIC[magic]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def require_dataset() -> Path:
    if not all((DATA_DIR / name).exists() for pair in _FILES.values() for name in pair):
        raise FileNotFoundError(
            f"Fashion-MNIST idx files not found in {DATA_DIR}. Install them with "
            "`apt-get install dataset-fashion-mnist` or set POSTDIFF_FASHION_MNIST to their folder."
        )
    return DATA_DIR


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the "train" or "test" split."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = require_dataset()
    images_file, labels_file = _FILES[split]
    images = _read_idx(folder / images_file)
    labels = _read_idx(folder / labels_file).astype(np.int64)
    return images, labels


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], zero-padded by 2 pixels (background is black)."""
    pixels = torch.from_numpy(np.array(images)).float().div(127.5).sub(1.0)
    return torch.nn.functional.pad(pixels[:, None], (2, 2, 2, 2), value=-1.0)


def dataset_checksum() -> str:
    digest = hashlib.sha256()
    for pair in _FILES.values():
        for name in pair:
            digest.update((require_dataset() / name).read_bytes())
    return digest.hexdigest()
