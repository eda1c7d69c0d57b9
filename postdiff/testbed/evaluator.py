"""The evaluator of the embedded Fashion-MNIST model: a small CNN that stands in for Inception and CLIP.

Inception (for FID) and CLIP (for the CLIP score) cannot be downloaded here, so the testbed measures its
samples with a classifier trained on Fashion-MNIST instead:
- its penultimate features play Inception's pool3 role: the Fréchet distance (FD) of generated images
  against the statistics of the 10k test images, to compare with the real-data floor shipped alongside;
- its predictions play CLIP's role: "alignment" is the share of images classified as the prompted class.

Train and ship it with `python -m postdiff.testbed.evaluator --out-dir DIR`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from safetensors.torch import load_file, save_file
from torch import nn

from ..metrics import feature_statistics, frechet_distance, images_to_unit

from .data import load_split, to_model_range

WEIGHTS_DIR = Path(__file__).parent / "weights" / "evaluator"
IMAGE_SIZE = 32
FLOOR_SEED = 1234  # fixed choice of the train images behind the shipped FD floors
FLOOR_SIZES = (1000, 10000)


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.3
    num_classes: int = 10


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class FashionClassifier(nn.Module):
    """conv stages (conv-BN-ReLU, max-pool) -> flatten -> linear-BN-ReLU features -> dropout -> logits.

    Input: (N, 1, 32, 32) in [-1, 1]. Flattening (rather than global pooling) keeps where things are,
    which matters on centred Fashion-MNIST silhouettes.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c = (1, *self.config.channels)
        stages = (nn.Sequential(_conv_block(c[i], c[i + 1]), nn.MaxPool2d(2)) for i in range(len(c) - 1))
        self.body = nn.Sequential(*stages)
        side = IMAGE_SIZE // 2 ** len(self.config.channels)
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c[-1] * side * side, self.config.feature_dim, bias=False),
            nn.BatchNorm1d(self.config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Dropout(self.config.dropout), nn.Linear(self.config.feature_dim, self.config.num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim): the space the Fréchet distance is measured in."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any supported image batch (see postdiff.metrics) -> (N, 1, 32, 32) float in [-1, 1].

    Raw 28x28 dataset images are padded with background, as `data.to_model_range` does.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point() and images.numel() and images.min() >= 0:
        # Fashion-MNIST in [-1, 1] always has -1 background; an all-non-negative tensor is likely [0, 1].
        warnings.warn("float tensors are read as [-1, 1] images, but these are all >= 0: were they [0, 1]?",
                      stacklevel=4)  # the caller of Evaluator.features / predict
    x = images_to_unit(images)
    if x.shape[1] != 1:
        raise ValueError(f"the evaluator takes one-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] == (28, 28):
        x = nn.functional.pad(x, (2, 2, 2, 2), value=0.0)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the evaluator takes 32x32 (or 28x28) images, got {tuple(x.shape[-2:])}")
    return x * 2.0 - 1.0


class Evaluator:
    """The trained classifier plus the reference statistics of the test split; everything on no-grad eval."""

    def __init__(self, model: FashionClassifier, mu=None, sigma=None, info: dict | None = None, batch_size: int = 500):
        self.model = model.eval()
        self.mu, self.sigma, self.info, self.batch_size = mu, sigma, info or {}, batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batched(self, images, fn) -> torch.Tensor:
        x = to_model_input(images)
        batches = (x[i : i + self.batch_size].to(self.device) for i in range(0, len(x), self.batch_size))
        with torch.no_grad():
            return torch.cat([fn(batch).cpu() for batch in batches])

    def features(self, images) -> torch.Tensor:
        """(N, D) float32 penultimate features."""
        return self._batched(images, self.model.features)

    def predict(self, images) -> torch.Tensor:
        """(N,) int64 predicted class ids."""
        return self._batched(images, self.model).argmax(dim=1)

    def frechet_distance(self, images_or_features) -> float:
        """FD against the test split's statistics; a 2-D input is read as features (N, D), otherwise images."""
        is_features = images_or_features.ndim == 2
        features = images_or_features if is_features else self.features(images_or_features)
        mu, sigma = feature_statistics(features)
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def alignment(self, images, labels) -> float:
        """Share of images classified as their prompted class (the CLIP-score stand-in)."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        predicted = self.predict(images)
        if len(labels) != len(predicted):
            raise ValueError(f"{len(predicted)} images but {len(labels)} labels")
        return float((predicted == labels).double().mean())


def load_evaluator(folder: Path | str | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """The shipped evaluator (or one saved by `train_classifier` in `folder`)."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    info = json.loads((folder / "classifier.json").read_text())
    config = ClassifierConfig(**{**info["architecture"], "channels": tuple(info["architecture"]["channels"])})
    model = FashionClassifier(config)
    model.load_state_dict(load_file(folder / "classifier.safetensors"))
    stats = load_file(folder / "reference_stats.safetensors")
    return Evaluator(model.to(device), stats["mu"].numpy(), stats["sigma"].numpy(), info)


def _augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts of up to `max_shift` pixels.

    A cyclic roll equals a shift with background fill here because the 32x32 frame has a 2-pixel border of -1.
    """
    n = len(x)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator)
    grid = torch.arange(IMAGE_SIZE)
    rows = (grid[None, :] - dy[:, None]) % IMAGE_SIZE
    cols = (grid[None, :] - dx[:, None]) % IMAGE_SIZE
    return x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def _accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    predicted = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return float((predicted == y).double().mean())


def train_classifier(
    out_dir: Path | str = WEIGHTS_DIR,
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    config: ClassifierConfig | None = None,
) -> dict:
    """Train on the train split, then save weights, reference statistics and FD floors into `out_dir`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation: reproducible per seed
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    x_train, y_train = to_model_range(train_images), torch.from_numpy(train_labels)
    x_test, y_test = to_model_range(test_images), torch.from_numpy(test_labels)

    model = FashionClassifier(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(x_train) // batch_size  # drop the last partial batch (BatchNorm dislikes tiny ones)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order, start, total = torch.randperm(len(x_train), generator=generator), time.time(), 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(_augment(x_train[index], generator)), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        accuracy = _accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}, test accuracy {accuracy:.4f}, "
              f"{time.time() - start:.0f} s", flush=True)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "classifier.safetensors")
    evaluator = Evaluator(model)
    evaluator.mu, evaluator.sigma = feature_statistics(evaluator.features(x_test))
    reference = {"mu": torch.from_numpy(evaluator.mu), "sigma": torch.from_numpy(evaluator.sigma)}
    save_file(reference, out_dir / "reference_stats.safetensors")
    # The floor: FD of real (train) images against the test statistics, i.e. what a perfect generator scores.
    floor_order = np.random.default_rng(FLOOR_SEED).permutation(len(x_train))
    floors = {f"fd_floor_n{n}": evaluator.frechet_distance(x_train[floor_order[:n]]) for n in FLOOR_SIZES}
    info = {
        "architecture": asdict(model.config),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augmentation": "random horizontal flip, random shift up to 2 px",
        "test_accuracy": accuracy,
        "reference": "features of the 10000 test images (mu, sigma float64)",
        "floor_seed": FLOOR_SEED,
        **floors,
    }
    (out_dir / "classifier.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(
    out_dir: Path = typer.Option(WEIGHTS_DIR, help="where classifier.safetensors/.json and reference_stats go"),
    epochs: int = typer.Option(10, min=1),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    torch.set_num_threads(threads)
    info = train_classifier(out_dir, epochs=epochs, seed=seed)
    print(json.dumps({k: info[k] for k in ("test_accuracy", "fd_floor_n1000", "fd_floor_n10000")}), flush=True)


if __name__ == "__main__":
    typer.run(main)
