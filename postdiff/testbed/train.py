"""Train an embedded model: `python -m postdiff.testbed.train [--model unet|flow] [--work-dir DIR] [--steps N]`.

Reproducible (seeded; seed, config and dataset checksum recorded next to the weights) and resumable: a
checkpoint is written every `--checkpoint-every` steps and picked up by the next run with the same
work dir (give it the same options: the learning-rate schedule depends on `--steps`). `--export-only`
writes the EMA weights of the latest checkpoint as a diffusers pipeline.

Both models train through one loop (data, captions with CFG dropout, low-resolution batches, AdamW, EMA,
checkpoints); a `ModelKind` says what differs: how the pipeline is built, which modules train, the
objective (the U-Net's min-SNR epsilon loss, the flow transformer's velocity loss) and its defaults.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import typer
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_snr

from . import flow_model, video_data, video_model
from .data import dataset_checksum, load_split, to_model_range
from .model import SCHEDULER_CONFIG, UNET_CONFIG, WEIGHTS_DIR, build_pipeline
from .text import EMPTY_CAPTION_SHARE, caption_for


@dataclass
class TrainConfig:
    """The defaults are the U-Net's; `ModelKind.defaults` changes some of them for the other kinds."""

    model: str = "unet"
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    # (size, share of batches) downsampled so that PostDiff's low-resolution phases are in distribution
    low_res: tuple[tuple[int, float], ...] = ((16, 0.25),)
    ema_decay: float = 0.9995
    min_snr_gamma: float = 5.0  # the U-Net's objective only
    seed: int = 0
    threads: int = 2
    short_clips: float = 0.0  # the video model's share of batches with every other frame only


def epsilon_loss(pipe, images: torch.Tensor, captions: list[str], generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The U-Net's objective: epsilon prediction on SD's DDPM schedule, min-SNR-gamma weighted."""
    scheduler = pipe.scheduler
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noisy = scheduler.add_noise(images, noise, timesteps)
    tokens = pipe.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    text = pipe.text_encoder(tokens.input_ids)[0]
    prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=config.min_snr_gamma) / snr  # min-SNR weighting, epsilon target
    return (weights * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def velocity_loss(pipe, images: torch.Tensor, captions: list[str], generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The flow transformer's objective (SD3's): x_t = (1 - sigma) x0 + sigma noise, target v = noise - x0,
    sigma logit-normal (0, 1) through the scheduler's shift, uniform weight. The prompt goes through the
    pipeline's own `encode_prompt`, so training and sampling see the same text tokens."""
    noise = torch.randn(images.shape, generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", len(images), logit_mean=0.0, logit_std=1.0, generator=generator)
    shift = pipe.scheduler.config.shift
    sigmas = shift * u / (1 + (shift - 1) * u)
    noisy = (1 - sigmas[:, None, None, None]) * images + sigmas[:, None, None, None] * noise
    text, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps  # the scheduler's timestep convention
    prediction = pipe.transformer(noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps).sample
    return F.mse_loss(prediction, noise - images)


def video_velocity_loss(pipe, clips: torch.Tensor, captions: list[str], generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The video transformer's objective: the flow model's, on clips (B, 1, F, H, W), the text through Wan's
    `encode_prompt` (the pipeline's own, as in sampling)."""
    noise = torch.randn(clips.shape, generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", len(clips), logit_mean=0.0, logit_std=1.0, generator=generator)
    shift = pipe.scheduler.config.shift
    sigmas = (shift * u / (1 + (shift - 1) * u))[:, None, None, None, None]
    noisy = (1 - sigmas) * clips + sigmas * noise
    text, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=clips.device)
    timesteps = sigmas.flatten() * pipe.scheduler.config.num_train_timesteps
    prediction = pipe.transformer(noisy, timestep=timesteps, encoder_hidden_states=text).sample
    return F.mse_loss(prediction, noise - clips)


def video_batch(trainer: "Trainer", images: torch.Tensor, labels: list[int], size: int | None) -> tuple[torch.Tensor, list[str]]:
    """Moving clips of the batch's images (a random motion each), at `size` if given and, for a share of the
    batches (`config.short_clips`), with every other frame only (PostDiff's temporal low-resolution phase)."""
    motions = torch.randint(0, len(video_data.MOTIONS), (len(images),), generator=trainer.generator)
    clips = video_data.move(images, motions)
    if size is not None:
        frames = F.interpolate(clips.transpose(1, 2).flatten(0, 1), size=size, mode="area")
        clips = frames.reshape(len(images), -1, 1, size, size).transpose(1, 2)
    if torch.rand((), generator=trainer.generator).item() < trainer.config.short_clips:
        clips = clips[:, :, ::2]
    captions = [video_data.video_caption(label, int(m), trainer.caption_rng) for label, m in zip(labels, motions)]
    return clips.contiguous(), captions


@dataclass(frozen=True)
class ModelKind:
    """What differs between the embedded models; everything else is the one training loop."""

    build: Callable  # (tokenizer_dir, seed) -> a freshly initialised pipeline
    modules: tuple[str, ...]  # the pipeline components that train, in optimizer and checkpoint order
    loss: Callable  # (pipe, images, captions, generator, config) -> scalar loss
    loss_label: str
    work_dir: Path
    out_dir: Path
    record: dict  # model configs written to training_record.json
    defaults: dict = field(default_factory=dict)  # TrainConfig fields that differ from the U-Net's
    batch: Optional[Callable] = None  # (trainer, images, labels, size) -> (samples, captions); None: the images


KINDS = {
    "unet": ModelKind(build_pipeline, ("unet", "text_encoder"), epsilon_loss, "min-SNR weighted MSE",
                      Path("runs/testbed"), WEIGHTS_DIR, {"unet_config": UNET_CONFIG, "scheduler_config": SCHEDULER_CONFIG}),
    # 15% of the batches at 16x16 (beta 1/2) and 15% at 24x24 (beta 3/4): 30% in all, about the U-Net's 25%.
    "flow": ModelKind(flow_model.build_flow_pipeline, ("transformer", "text_encoder", "text_encoder_2"), velocity_loss,
                      "velocity MSE", Path("runs/testbed-flow"), flow_model.FLOW_WEIGHTS_DIR,
                      {"transformer_config": flow_model.TRANSFORMER_CONFIG, "scheduler_config": flow_model.SCHEDULER_CONFIG},
                      dict(warmup_steps=200, low_res=((16, 0.15), (24, 0.15)))),
    # Clips: 15% of the batches at 16 px, 15% at 24 px, and 20% (of any size) with every other frame only.
    "video": ModelKind(video_model.build_video_pipeline, ("transformer", "text_encoder"), video_velocity_loss,
                       "velocity MSE", Path("runs/testbed-video"), video_model.VIDEO_WEIGHTS_DIR,
                       {"transformer_config": video_model.VIDEO_TRANSFORMER_CONFIG,
                        "scheduler_config": video_model.VIDEO_SCHEDULER_CONFIG, "num_frames": video_data.NUM_FRAMES},
                       dict(warmup_steps=200, batch_size=32, low_res=((16, 0.15), (24, 0.15)), short_clips=0.2),
                       batch=video_batch),
}


def config_for(model: str, **overrides) -> TrainConfig:
    """The kind's defaults, then the overrides that are not None."""
    return TrainConfig(model=model, **{**KINDS[model].defaults, **{k: v for k, v in overrides.items() if v is not None}})


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, config: TrainConfig, work_dir: Path):
        self.config = config
        self.kind = KINDS[config.model]
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        self.pipe = self.kind.build(work_dir / "tokenizer", config.seed)
        self.params = [param for name in self.kind.modules for param in getattr(self.pipe, name).parameters()]
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
            **{name: getattr(self.pipe, name).state_dict() for name in self.kind.modules},
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
        for name in self.kind.modules:
            getattr(self.pipe, name).load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        self.caption_rng.setstate(state["caption_rng"])
        self.step = state["step"]
        return True

    def sample_batch(self) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(0, len(self.images), (self.config.batch_size,), generator=self.generator)
        images = self.images[index]
        size = self._low_res_size(torch.rand((), generator=self.generator).item())
        if self.kind.batch is not None:
            return self.kind.batch(self, images, [int(self.labels[i]) for i in index], size)
        if size is not None:
            images = F.interpolate(images, size=size, mode="area")
        captions = [caption_for(int(self.labels[i]), self.caption_rng) for i in index]
        return images, captions

    def _low_res_size(self, draw: float) -> int | None:
        """The size whose slice of [0, 1) holds `draw` (slices of the configured shares, in order), else None."""
        edge = 0.0
        for size, share in self.config.low_res:
            edge += share
            if draw < edge:
                return size
        return None

    def train_step(self) -> float:
        images, captions = self.sample_batch()
        loss = self.kind.loss(self.pipe, images, captions, self.generator, self.config)
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
            **self.kind.record,
        }
        (out_dir / "training_record.json").write_text(json.dumps(record, indent=1, default=list))
        plot_loss(self.work_dir / "loss.jsonl", out_dir / "loss_curve.png", self.kind.loss_label)


def plot_loss(log_path: Path, png_path: Path, label: str, window: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [json.loads(line)["loss"] for line in log_path.read_text().splitlines()]
    smoothed = [sum(losses[max(0, i - window) : i + 1]) / len(losses[max(0, i - window) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smoothed, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(
    model: str = typer.Option("unet", help=f"which embedded model: {' or '.join(KINDS)}"),
    work_dir: Optional[Path] = typer.Option(None, help="checkpoints and loss log (resumed when present); "
                                            "default runs/testbed (unet), runs/testbed-flow (flow), runs/testbed-video (video)"),
    out_dir: Optional[Path] = typer.Option(None, help="where the trained pipeline is saved; default: the shipped weights"),
    steps: Optional[int] = typer.Option(None, min=1, help="default 2000 (every model)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help=f"default {TrainConfig.batch_size}"),
    seed: int = typer.Option(TrainConfig.seed),
    threads: int = typer.Option(TrainConfig.threads, min=1, help="torch threads"),
    checkpoint_every: int = typer.Option(50, min=1),
    export_only: bool = typer.Option(False, help="export the latest checkpoint without training"),
) -> None:
    if model not in KINDS:
        raise typer.BadParameter(f"--model must be one of {', '.join(KINDS)}")
    kind = KINDS[model]
    work_dir, out_dir = work_dir or kind.work_dir, out_dir or kind.out_dir
    trainer = Trainer(config_for(model, steps=steps, batch_size=batch_size, seed=seed, threads=threads), work_dir)
    if trainer.load_checkpoint():
        print(f"resumed at step {trainer.step}", flush=True)
    if not export_only:
        trainer.run(checkpoint_every)
    trainer.export(out_dir)
    print(f"saved the pipeline to {out_dir}", flush=True)


if __name__ == "__main__":
    typer.run(main)
