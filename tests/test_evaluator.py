"""The Fashion-MNIST loader, the shipped evaluator (FD and alignment) and the standard FID / CLIP-score paths."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import numpy as np
import pytest
import torch

from postdiff.metrics import feature_statistics, frechet_distance, standard_clip_score, standard_fid
from postdiff.testbed.data import load_split, require_dataset, to_model_range
from postdiff.testbed.evaluator import load_evaluator

SAMPLE_SEED = 0  # fixed choice of the test images used below


@pytest.fixture(scope="module")
def test_split():
    try:
        require_dataset()
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST files missing: {error}")
    return load_split("test")


@pytest.fixture(scope="module")
def real_sample(test_split):
    """1,000 test images (model range) and their labels, always the same ones."""
    images, labels = test_split
    index = np.random.default_rng(SAMPLE_SEED).choice(len(images), 1000, replace=False)
    return to_model_range(images[index]), labels[index]


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.mark.parametrize("split, count", [("train", 60000), ("test", 10000)])
def test_loader_counts_shapes_labels(split, count):
    try:
        images, labels = load_split(split)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST files missing: {error}")
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))
    x = to_model_range(images[:4])
    assert x.shape == (4, 1, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_shipped_evaluator_loads(evaluator):
    info = evaluator.info
    dim = evaluator.mu.shape[0]
    assert 64 <= dim <= 128 and evaluator.sigma.shape == (dim, dim)
    assert evaluator.mu.dtype == np.float64 and np.allclose(evaluator.sigma, evaluator.sigma.T)
    assert info["test_accuracy"] >= 0.91
    assert 0 < info["fd_floor_n10000"] < info["fd_floor_n1000"]


def test_frechet_distance_matches_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5.0 + 2.0, abs=1e-9)


def test_fd_of_features_against_own_statistics_is_zero(evaluator, real_sample):
    mu, sigma = feature_statistics(evaluator.features(real_sample[0]))
    assert mu.dtype == sigma.dtype == np.float64
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3 * np.trace(sigma)
    # Fewer samples than dimensions: singular covariance, still a finite, warning-free distance.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(evaluator.frechet_distance(real_sample[0][:20]))


def test_alignment_of_real_images(evaluator, real_sample):
    assert evaluator.alignment(*real_sample) >= 0.9


def test_fd_real_near_floor_and_noise_far_above(evaluator, real_sample):
    floor = evaluator.info["fd_floor_n1000"]
    assert evaluator.frechet_distance(real_sample[0]) < 2 * floor
    noise = torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluator.frechet_distance(noise) > 10 * floor


def test_numpy_input_matches_tensor_input(evaluator, real_sample, test_split):
    images = real_sample[0][:200]
    pipeline_like = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()  # diffusers output_type="np": (N, H, W, 1) in [0, 1]
    expected = evaluator.features(images)
    for variant in (pipeline_like, pipeline_like[..., 0]):
        torch.testing.assert_close(evaluator.features(variant), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(evaluator.predict(pipeline_like), evaluator.predict(images))
    # Raw uint8 28x28 dataset images are padded like `to_model_range`.
    raw = test_split[0][:50]
    torch.testing.assert_close(evaluator.features(raw), evaluator.features(to_model_range(raw)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        evaluator.features(images.numpy())  # numpy floats must be [0, 1]: [-1, 1] ones are refused


class RandomFeatures(torch.nn.Module):
    """A random-weight stand-in for Inception: uint8 (B, 3, H, W) in, (B, 16) out."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean(dim=(2, 3))


def test_standard_fid_with_local_network():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(64, 1, 32, 32, generator=generator) * 2 - 1
    fake = torch.rand(64, 1, 32, 32, generator=generator) * 0.5 - 1  # darker: a different distribution
    network = RandomFeatures()
    assert abs(standard_fid(real, real, network)) < 1e-3
    assert np.isfinite(standard_fid(real, fake, network)) and standard_fid(real, fake, network) > 1e-3


def tiny_clip(folder):
    """A random CLIPModel (32 px images) and the project's own CLIP tokenizer files."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from postdiff.testbed.text import write_tokenizer_files

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(folder))
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(4)  # a random model whose mean cosine on these pairs is positive (so not floored to 0)
    vision = {**tiny, "image_size": 32, "patch_size": 8}
    return CLIPModel(CLIPConfig(text_config={**tiny, **text}, vision_config=vision, projection_dim=16)), tokenizer


def test_standard_clip_score_with_local_model(tmp_path):
    model, tokenizer = tiny_clip(tmp_path)
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a photo of a bag", "a photo of a coat"] * 4
    score = standard_clip_score(images, prompts, model, tokenizer)
    assert np.isfinite(score) and 0 < score <= 100
    as_numpy = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert standard_clip_score(as_numpy, prompts, model, tokenizer) == pytest.approx(score, abs=1e-4)
