"""Image-quality metrics: the Fréchet distance itself, and the standard FID / CLIP score paths.

Image conventions shared by every function here (and by the testbed evaluator):
- torch float tensors are model-range images, (N, C, H, W) or (N, H, W), values in [-1, 1];
- numpy float arrays are pipeline outputs (`output_type="np"`), (N, H, W, C) or (N, H, W), values in [0, 1];
- uint8 arrays or tensors (same layouts as above) are 0..255 pixels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

# The diagonal offset the reference FID code adds when sqrtm of a (near-)singular product fails.
SQRTM_EPS = 1e-6
# Imaginary parts above this (on the diagonal of sqrtm) mean the product was not close to PSD: a real bug.
MAX_IMAG = 1e-3


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_of_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """sqrtm(sigma1 @ sigma2), retried with a tiny ridge on both when the product is singular.

    Singular covariances are common (fewer samples than dimensions, dead ReLU features of degenerate images)
    and make sqrtm warn or return non-finite values; the ridge shifts the FD by only ~D * SQRTM_EPS.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if np.isfinite(covmean).all():
                return covmean
        except scipy.linalg.LinAlgWarning:
            pass
    offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # checked below through the imaginary part
        return scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    covmean = _sqrtm_of_product(sigma1, sigma2)
    if np.iscomplexobj(covmean):
        # Rounding gives small imaginary parts to the square root of a PSD product; large ones are an error.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=MAX_IMAG):
            raise ValueError(f"sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def images_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any supported image batch (see the module docstring) -> float32 tensor (N, C, H, W) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"image tensors must be (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
        # uint8 tensors are plain pixels; float tensors are model range [-1, 1] (clamped: samples overshoot).
        return x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"image arrays must be (N, H, W, C) or (N, H, W), got {array.shape}")
    x = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # a copy: dataset arrays are read-only
    if array.dtype == np.uint8:
        return x.float() / 255.0
    # A negative value means someone passed model-range [-1, 1] data as numpy: refuse rather than mis-scale.
    if array.size and array.min() < -1e-3:
        raise ValueError("float image arrays must be in [0, 1] (diffusers output_type='np'); got negative values")
    return x.float().clamp(0.0, 1.0)


def images_to_uint8_rgb(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any supported image batch -> uint8 tensor (N, 3, H, W): the input format of Inception FID and CLIP."""
    x = (images_to_unit(images) * 255.0).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition, as PIL's convert("RGB") does
    elif x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


def standard_fid(
    real_images: np.ndarray | torch.Tensor,
    fake_images: np.ndarray | torch.Tensor,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 64,
) -> float:
    """FID with torchmetrics' `FrechetInceptionDistance`.

    Without `feature_extractor` this is the standard Inception-v3 pool3 (2048-d) FID, which needs
    torch-fidelity and its downloadable weights. A custom extractor receives uint8 (B, 3, H, W) batches,
    exactly as Inception does, and should return (B, D) features (a `num_features` attribute avoids a probe).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048 if feature_extractor is None else feature_extractor)
    with torch.no_grad():
        for images, real in ((real_images, True), (fake_images, False)):
            pixels = images_to_uint8_rgb(images)
            for start in range(0, len(pixels), batch_size):
                metric.update(pixels[start : start + batch_size], real=real)
        return float(metric.compute())


def clip_processor_for(model, tokenizer):
    """A `CLIPProcessor` for `model` from a tokenizer, resizing images to the model's own input size."""
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = model.config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default


def standard_clip_score(
    images: np.ndarray | torch.Tensor,
    prompts: Sequence[str],
    model=None,
    processor=None,
    batch_size: int = 64,
) -> float:
    """CLIP score as torchmetrics' `CLIPScore` defines it: mean over pairs of 100 * cos(image, text), floored at 0.

    Computed here with the transformers `CLIPModel` directly, because torchmetrics 1.9's CLIPScore breaks on
    transformers 5 (`get_image_features` now returns a model output, not a tensor: torchmetrics issue #3407).
    Without `model` this is the standard openai/clip-vit-large-patch14 score (needs the downloaded weights).
    With `model`, pass its `processor` (a `CLIPProcessor`) or just a tokenizer, wrapped by `clip_processor_for`.
    """
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, PreTrainedTokenizerBase

    if model is None:
        model, processor = CLIPModel.from_pretrained(DEFAULT_CLIP), CLIPProcessor.from_pretrained(DEFAULT_CLIP)
    elif processor is None:
        raise ValueError("a custom CLIP model needs its processor (or its tokenizer)")
    elif isinstance(processor, PreTrainedTokenizerBase):
        processor = clip_processor_for(model, processor)
    pixels, prompts = images_to_uint8_rgb(images), list(prompts)
    if len(prompts) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
    model = model.eval()
    device, max_tokens = model.device, model.config.text_config.max_position_embeddings
    total = 0.0
    for start in range(0, len(pixels), batch_size):
        # PIL images: the input every CLIP image processor accepts, whatever its backend.
        batch = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels[start : start + batch_size]]
        inputs = processor(
            text=prompts[start : start + batch_size], images=batch, return_tensors="pt",
            padding=True, truncation=True, max_length=max_tokens,
        )
        with torch.no_grad():
            output = model(**{k: v.to(device) for k, v in inputs.items()})
        # CLIPModel returns L2-normalised image_embeds and text_embeds: their dot product is the cosine.
        total += float((100.0 * (output.image_embeds * output.text_embeds).sum(dim=-1)).sum())
    return max(total / len(pixels), 0.0)
