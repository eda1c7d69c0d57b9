"""The embedded model: shipped weights load offline, sample deterministically, and run through PostDiff."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import postdiff
from postdiff import PostDiffConfig
from postdiff.testbed.data import CLASS_NAMES, DATA_DIR
from postdiff.testbed.model import load_pipeline
from postdiff.testbed.text import CLASS_SYNONYMS, canonical_prompt

needs_data = pytest.mark.skipif(not (DATA_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def pipe():
    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipe, seed=0, **overrides):
    arguments = dict(prompt="a photo of a bag", num_inference_steps=6, guidance_scale=3.0, num_images_per_prompt=2,
                     output_type="np", generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides}).images


def test_shipped_model_is_small_and_in_diffusers_layout():
    from postdiff.testbed.model import WEIGHTS_DIR

    files = [path for path in WEIGHTS_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 20 * 2**20
    assert {"model_index.json", "diffusion_pytorch_model.safetensors", "model.safetensors", "training_record.json"} <= {p.name for p in files}


def test_loads_offline_and_samples_deterministically_at_32px(pipe):
    first = sample(pipe, seed=4)
    assert first.shape == (2, 32, 32, 1)
    assert np.array_equal(first, sample(pipe, seed=4))
    assert not np.array_equal(first, sample(pipe, seed=5))


def test_mixed_resolution_through_the_engine_is_deterministic_and_different(pipe):
    baseline = sample(pipe)
    postdiff.apply(pipe, PostDiffConfig.preset("paper", family="testbed"))
    try:
        assert postdiff.api.family_name(pipe) == "testbed"
        plan = postdiff.plan_call(pipe, "a bag", num_inference_steps=6)
        assert [step.latent_hw for step in plan.steps] == [(16, 16)] * 3 + [(32, 32)] * 3
        mixed = sample(pipe)
        assert np.array_equal(mixed, sample(pipe))
        assert np.abs(mixed - baseline).max() > 1e-3
    finally:
        postdiff.remove(pipe)
    assert np.array_equal(sample(pipe), baseline)


def test_off_is_bit_identical_to_the_testbed_pipeline(pipe):
    baseline = sample(pipe)
    postdiff.apply(pipe, PostDiffConfig())
    try:
        assert np.array_equal(sample(pipe), baseline)
    finally:
        postdiff.remove(pipe)


def test_every_class_prompt_tokenizes_within_the_vocabulary(pipe):
    vocabulary = pipe.tokenizer.get_vocab()
    for label, synonyms in CLASS_SYNONYMS.items():
        for text in (canonical_prompt(label), *(f"a photo of a {name}" for name in synonyms)):
            tokens = pipe.tokenizer.tokenize(text)
            assert tokens and all(token in vocabulary for token in tokens), (text, tokens)
            assert pipe.tokenizer.unk_token not in tokens
    assert len(CLASS_NAMES) == 10


@needs_data
def test_training_is_reproducible_and_resumes_exactly(tmp_path):
    from postdiff.testbed.train import Trainer, TrainConfig

    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, threads=1)
    straight = Trainer(config, tmp_path / "straight")
    straight.run(checkpoint_every=1)
    interrupted = Trainer(TrainConfig(**{**config.__dict__, "steps": 1}), tmp_path / "resumed")
    interrupted.run(checkpoint_every=1)
    resumed = Trainer(config, tmp_path / "resumed")
    assert resumed.load_checkpoint() and resumed.step == 1
    resumed.run(checkpoint_every=1)
    for a, b in zip(straight.pipe.unet.parameters(), resumed.pipe.unet.parameters()):
        assert torch.equal(a, b)
    losses = (tmp_path / "resumed" / "loss.jsonl").read_text().splitlines()
    assert len(losses) == 2
