"""Train the embedded model: `python -m postdiff.testbed.train --work-dir DIR [--steps N]`.

Reproducible (seeded; seed, config and dataset checksum recorded next to the weights) and resumable: a
checkpoint is written every `--checkpoint-every` steps and picked up by the next run with the same
work dir. `--export-only` writes the EMA weights of the latest checkpoint as a diffusers pipeline.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from diffusers.training_utils import EMAModel, compute_snr

from .data import dataset_checksum, load_split, to_model_range
from .model import SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS_DIR, build_pipeline
from .text import EMPTY_CAPTION_SHARE, caption_for


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    low_res_share: float = 0.25  # share of batches at 16x16, so the low-resolution phase is in distribution
    low_res_size: int = 16
    ema_decay: float = 0.9995
    min_snr_gamma: float = 5.0
    seed: int = 0
    threads: int = 2


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, config: TrainConfig, work_dir: Path):
        self.config = config
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        self.pipe = build_pipeline(work_dir / "tokenizer", seed=config.seed)
        self.params = list(self.pipe.unet.parameters()) + list(self.pipe.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        self.ema = EMAModel(self.params, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.caption_rng = random.Random(config.seed)
        images, self.labels = load_split("train")
        self.images = to_model_range(images)

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "unet": self.pipe.unet.state_dict(),
            "text_encoder": self.pipe.text_encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "generator": self.generator.get_state(),
            "caption_rng": self.caption_rng.getstate(),
            "config": asdict(self.config),
        }
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.checkpoint_path)  # atomic: a kill mid-write leaves the previous checkpoint

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.pipe.unet.load_state_dict(state["unet"])
        self.pipe.text_encoder.load_state_dict(state["text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.caption_rng.setstate(state["caption_rng"])
        self.step = state["step"]
        return True

    def sample_batch(self) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(0, len(self.images), (self.config.batch_size,), generator=self.generator)
        images = self.images[index]
        if torch.rand((), generator=self.generator).item() < self.config.low_res_share:
            images = F.interpolate(images, size=self.config.low_res_size, mode="area")
        captions = [caption_for(int(self.labels[i]), self.caption_rng) for i in index]
        return images, captions

    def train_step(self) -> float:
        images, captions = self.sample_batch()
        scheduler = self.pipe.scheduler
        noise = torch.randn(images.shape, generator=self.generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=self.generator)
        noisy = scheduler.add_noise(images, noise, timesteps)
        tokens = self.pipe.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        text = self.pipe.text_encoder(tokens.input_ids)[0]
        prediction = self.pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=self.config.min_snr_gamma) / snr  # min-SNR weighting, epsilon target
        loss = (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate * _lr_factor(self.step, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.ema.step(self.params)
        self.step += 1
        return loss.item()

    def run(self, checkpoint_every: int) -> None:
        log_path = self.work_dir / "loss.jsonl"
        self._truncate_log(log_path)
        started = time.time()
        first_step = self.step
        while self.step < self.config.steps:
            loss = self.train_step()
            with log_path.open("a") as log:
                log.write(json.dumps({"step": self.step, "loss": loss, "time": time.time()}) + "\n")
            if self.step % checkpoint_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
                rate = (time.time() - started) / (self.step - first_step)
                print(f"step {self.step}/{self.config.steps} loss {loss:.4f} {rate:.2f} s/step", flush=True)

    def _truncate_log(self, log_path: Path) -> None:
        """Drop log lines written after the checkpoint we resumed from, so no step is logged twice."""
        if log_path.exists():
            lines = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log_path.write_text("".join(line + "\n" for line in lines))

    def export(self, out_dir: Path) -> None:
        """Write the EMA weights as a diffusers pipeline, with the training record and the loss curve."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pipe.save_pretrained(out_dir)
        self.ema.restore(self.params)
        record = {
            "config": asdict(self.config),
            "steps_done": self.step,
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), train split",
            "dataset_sha256": dataset_checksum(),
            "empty_caption_share": EMPTY_CAPTION_SHARE,
            "unet_config": UNET_CONFIG,
            "scheduler_config": SCHEDULER_CONFIG,
        }
        (out_dir / "training_record.json").write_text(json.dumps(record, indent=1, default=list))
        plot_loss(self.work_dir / "loss.jsonl", out_dir / "loss_curve.png")


def plot_loss(log_path: Path, png_path: Path, window: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [json.loads(line)["loss"] for line in log_path.read_text().splitlines()]
    smoothed = [sum(losses[max(0, i - window) : i + 1]) / len(losses[max(0, i - window) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smoothed, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("min-SNR weighted MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(
    work_dir: Path = typer.Option(Path("runs/testbed"), help="checkpoints and loss log (resumed when present)"),
    out_dir: Path = typer.Option(WEIGHTS_DIR, help="where the trained pipeline is saved"),
    steps: int = typer.Option(TrainConfig.steps, min=1),
    batch_size: int = typer.Option(TrainConfig.batch_size, min=1),
    seed: int = typer.Option(TrainConfig.seed),
    checkpoint_every: int = typer.Option(50, min=1),
    export_only: bool = typer.Option(False, help="export the latest checkpoint without training"),
) -> None:
    trainer = Trainer(TrainConfig(steps=steps, batch_size=batch_size, seed=seed), work_dir)
    if trainer.load_checkpoint():
        print(f"resumed at step {trainer.step}", flush=True)
    if not export_only:
        trainer.run(checkpoint_every)
    trainer.export(out_dir)
    print(f"saved the pipeline to {out_dir}", flush=True)


if __name__ == "__main__":
    typer.run(main)
