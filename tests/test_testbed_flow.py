"""The embedded flow transformer: builds and round-trips offline, samples at every PostDiff resolution, trains
and resumes exactly. Tiny transformers (the text encoders are the real, small ones), so each test takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from postdiff.testbed.data import DATA_DIR
from postdiff.testbed.flow_model import TestbedFlowPipeline, build_flow_pipeline

needs_data = pytest.mark.skipif(not (DATA_DIR / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipeline = build_flow_pipeline(tmp_path_factory.mktemp("tokenizer"), seed=0, **TINY)
    for parameter in pipeline.transformer.parameters():  # adaLN-Zero starts at a zero output: make it depend on the input
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipe, seed=0, **overrides):
    arguments = dict(prompt="a photo of a bag", num_inference_steps=3, guidance_scale=3.0, num_images_per_prompt=2,
                     output_type="np", generator=torch.Generator().manual_seed(seed))
    return pipe(**{**arguments, **overrides}).images


def test_saves_and_loads_offline_with_from_pretrained(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TestbedFlowPipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    loaded = TestbedFlowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(sample(loaded), sample(pipe))


@pytest.mark.parametrize("size", [32, 24, 16])
def test_samples_at_full_and_low_resolution(pipe, size):
    images = sample(pipe, height=size, width=size)
    assert images.shape == (2, size, size, 1)
    assert np.isfinite(images).all()


def test_default_size_is_32px_and_text_has_no_t5_padding(pipe):
    assert sample(pipe).shape == (2, 32, 32, 1)
    text, _, pooled, _ = pipe.encode_prompt("a bag", None, None, do_classifier_free_guidance=False, max_sequence_length=256)
    assert text.shape == (1, pipe.tokenizer.model_max_length, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)


def test_latent_output_is_the_pixels_and_pil_is_them_postprocessed(pipe):
    pixels = sample(pipe, output_type="latent")
    assert pixels.shape == (2, 1, 32, 32)
    expected = pipe.image_processor.postprocess(pixels, output_type="pil")
    images = sample(pipe, output_type="pil")
    assert [image.size for image in images] == [(32, 32)] * 2
    assert all(np.array_equal(np.array(image), np.array(other)) for image, other in zip(images, expected))
    assert np.array_equal(sample(pipe, output_type="np"), pipe.image_processor.postprocess(pixels, output_type="np"))


def test_same_seed_same_image(pipe):
    first = sample(pipe, seed=3)
    assert np.array_equal(first, sample(pipe, seed=3))
    assert not np.array_equal(first, sample(pipe, seed=4))


def test_velocity_objective_reduces_the_loss(tmp_path):
    from postdiff.testbed.train import config_for, velocity_loss

    torch.manual_seed(0)
    pipe = build_flow_pipeline(tmp_path, seed=0, **TINY)
    images = -torch.ones(8, 1, 32, 32)  # a black background with a white square: something to learn
    images[..., 8:24, 8:24] = 1.0
    captions = ["a photo of a bag", "a sneaker", "", "a dress"] * 2
    params = [p for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(15):  # the same noise and sigmas every step: the batch is fitted
        loss = velocity_loss(pipe, images, captions, torch.Generator().manual_seed(0), config_for("flow"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


class Killed(Exception):
    pass


def kill_at(trainer, step: int) -> None:
    """The trainer dies (as on SIGKILL) when it starts step `step + 1`."""
    train_step = trainer.train_step

    def step_or_die():
        if trainer.step == step:
            raise Killed
        return train_step()

    trainer.train_step = step_or_die


@needs_data
def test_flow_training_resumes_after_a_kill_with_the_same_losses(tmp_path, monkeypatch):
    from postdiff.testbed import flow_model
    from postdiff.testbed.train import Trainer, config_for

    for key, value in TINY.items():  # the trainer builds the configured model: make it tiny
        monkeypatch.setitem(flow_model.TRANSFORMER_CONFIG, key, value)
    config = config_for("flow", steps=4, batch_size=4, warmup_steps=1, threads=1)
    straight = Trainer(config, tmp_path / "straight")
    straight.run(checkpoint_every=2)
    killed = Trainer(config, tmp_path / "resumed")
    kill_at(killed, 3)  # step 3 is logged, its checkpoint is not written: the resumed run redoes it
    with pytest.raises(Killed):
        killed.run(checkpoint_every=2)
    resumed = Trainer(config, tmp_path / "resumed")
    assert resumed.load_checkpoint() and resumed.step == 2
    resumed.run(checkpoint_every=2)
    for a, b in zip(straight.params, resumed.params):
        assert torch.equal(a, b)

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]

    assert losses("resumed") == losses("straight") and len(losses("straight")) == 4


def test_the_flow_model_is_selectable_by_name_and_by_folder(tmp_path):
    """`--model testbed-flow` (or a folder saved by its training) loads it and scores it as an embedded model."""
    from postdiff.evaluation.workloads import FashionClasses, open_workload
    from postdiff.loading import embedded_name, is_testbed, load_pipeline
    from postdiff.testbed.flow_model import build_flow_pipeline

    folder = tmp_path / "flow"
    build_flow_pipeline(tmp_path / "tokenizer", num_layers=1).save_pretrained(folder)
    assert embedded_name(str(folder)) == "testbed-flow" and embedded_name("testbed-flow") == "testbed-flow"
    assert embedded_name(None) == "testbed" and not is_testbed(str(tmp_path))
    pipe, guidance = load_pipeline(str(folder))
    assert type(pipe).__name__ == "TestbedFlowPipeline" and guidance == 3.0
    _, workload = open_workload(str(folder), None, None, "unused")
    assert isinstance(workload, FashionClasses)


def test_postdiff_drives_the_flow_model_off_exactly_and_with_every_technique(tmp_path):
    import numpy as np

    import postdiff
    from postdiff import PostDiffConfig
    from postdiff.models import spec_from_pipeline
    from postdiff.testbed.flow_model import build_flow_pipeline

    pipe = build_flow_pipeline(tmp_path / "tokenizer", num_layers=5)
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a photo of a bag", negative_prompt="", num_inference_steps=6, guidance_scale=3.0,
                     num_images_per_prompt=2, output_type="np")
    baseline = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    postdiff.apply(pipe, PostDiffConfig())
    assert np.array_equal(pipe(**arguments, generator=torch.Generator().manual_seed(0)).images, baseline)
    config = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, cfg_stop=4, switch_noise="block")
    plan = postdiff.plan_call(postdiff.apply(pipe, config), **arguments)
    assert [step.latent_hw for step in plan.steps] == [(16, 16)] * 3 + [(32, 32)] * 3
    assert plan.facts.text_length == 16  # the CLIP tokens only: no T5 part
    images = pipe(**arguments, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == baseline.shape and not np.array_equal(images, baseline)
    assert spec_from_pipeline(pipe).denoiser.kind == "sd3"


def test_the_shipped_flow_model_is_small_loads_offline_by_name_and_draws_the_prompted_class():
    """The trained weights: under 20 MB in diffusers' layout, `testbed-flow` loads them, the same seed gives the
    same images, and the shipped evaluator reads most of a class's images as that class (20 steps, guidance 3)."""
    from postdiff.loading import load_pipeline
    from postdiff.testbed.evaluator import load_evaluator
    from postdiff.testbed.flow_model import FLOW_WEIGHTS_DIR
    from postdiff.testbed.text import canonical_prompt

    files = [path for path in FLOW_WEIGHTS_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 20 * 2**20
    assert {"model_index.json", "diffusion_pytorch_model.safetensors", "model.safetensors", "training_record.json"} <= {p.name for p in files}
    pipe, guidance = load_pipeline("testbed-flow")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, TestbedFlowPipeline) and guidance == 3.0
    trouser, bag = 1, 8
    images = {label: pipe(canonical_prompt(label), negative_prompt="", num_inference_steps=20, guidance_scale=guidance,
                          num_images_per_prompt=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
              for label in (trouser, bag)}
    again = pipe(canonical_prompt(bag), negative_prompt="", num_inference_steps=20, guidance_scale=guidance,
                 num_images_per_prompt=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(again, images[bag])
    evaluator = load_evaluator()
    for label, drawn in images.items():
        assert evaluator.alignment(drawn, np.full(len(drawn), label)) >= 0.75, label
