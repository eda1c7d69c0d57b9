"""How a ControlNet should meet DeepCache's cached steps: `controlnet_cache` shallow / reuse / full, measured.

For each mode and cache interval k (branch 1, the paper's U-Net setting): MACs per image (ControlNet
included, from the plan) and the output's distance to "off" (same seeds): PSNR over the images, in the
model's pixel range. Run on the embedded U-Net with a ControlNet built from its encoder
(`ControlNetModel.from_unet`, the U-Net's weights; the zero convolutions and the condition embedding
re-initialised with PyTorch's default init, since no trained ControlNet exists for this model), conditioned
on edge maps of real Fashion-MNIST test images (a one-stage condition embedding: pixel space). Its share
of the MACs (about 40% of the U-Net's) is SD 1.5's ControlNet's (34%, `postdiff flops --controlnet`). What it measures is each mode's approximation of "off"
(how far stale or fresh residuals move the output), not control quality.

    python bench/controlnet_cache.py [--images 32] [--out docs/controlnet_cache]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.image_processor import VaeImageProcessor

import postdiff
from postdiff import PostDiffConfig
from postdiff.accounting import ControlNetSpec, plan_costs, total
from postdiff.models import spec_from_pipeline
from postdiff.testbed.data import load_split, to_model_range
from postdiff.testbed.model import load_pipeline
from postdiff.testbed.text import canonical_prompt

MODES = ("shallow", "reuse", "full")
INTERVALS = (2, 3, 4)
CONDITION_SIZE = 32  # pixel space: the condition has the image's size (a one-stage condition embedding)
CONDITION_CHANNELS = (16,)


def controlnet_pipeline(seed: int = 0) -> StableDiffusionControlNetPipeline:
    testbed = load_pipeline()
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(testbed.unet, conditioning_embedding_out_channels=CONDITION_CHANNELS)
    for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding]:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.reset_parameters()
    pipe = StableDiffusionControlNetPipeline(
        vae=None, text_encoder=testbed.text_encoder, tokenizer=testbed.tokenizer, unet=testbed.unet, controlnet=controlnet,
        scheduler=testbed.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.vae_scale_factor = 1  # pixel space (without a VAE the pipeline assumes 8)
    pipe.control_image_processor = VaeImageProcessor(vae_scale_factor=1, do_convert_rgb=True, do_normalize=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edge_maps(count: int) -> tuple[torch.Tensor, list[str]]:
    """Sobel edge magnitude of real test images, thresholded, at the condition size; and their class prompts."""
    images, labels = load_split("test")
    pixels = to_model_range(images[:count])[:, :1]
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gx = F.conv2d(pixels, sobel.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(pixels, sobel.t().reshape(1, 1, 3, 3), padding=1)
    edges = ((gx ** 2 + gy ** 2).sqrt() > 1.0).float()
    edges = edges.repeat(1, 3, 1, 1)
    return edges, [canonical_prompt(int(label)) for label in labels[:count]]


def generate(pipe, edges, prompts, steps: int, scale: float) -> torch.Tensor:
    outputs = []
    for index, (edge, prompt) in enumerate(zip(edges, prompts)):
        outputs.append(pipe(prompt, image=edge[None], num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                            controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(index)).images)
    return torch.cat(outputs)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """In the model's [-1, 1] pixel range (peak-to-peak 2)."""
    mse = ((images.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4 / mse)).mean())


def macs_per_image(pipe, steps: int) -> float:
    """GMACs of one image under the config applied to `pipe`, U-Net and ControlNet."""
    plan = postdiff.plan_call(pipe, "a photo of a sneaker", image=torch.zeros(1, 3, CONDITION_SIZE, CONDITION_SIZE),
                              num_inference_steps=steps, guidance_scale=3.0)
    spec = ControlNetSpec(conditioning_embedding_out_channels=CONDITION_CHANNELS)
    return total(plan_costs(spec_from_pipeline(pipe).denoiser, plan, controlnet=spec)) / 1e9


def main(images: int = 32, steps: int = 20, scale: float = 0.5, threads: int = 2, out: Path = Path("docs/controlnet_cache")):
    torch.set_num_threads(threads)
    pipe = controlnet_pipeline()
    edges, prompts = edge_maps(images)
    postdiff.apply(pipe, PostDiffConfig())
    reference = generate(pipe, edges, prompts, steps, scale)
    rows = [dict(mode="off", k=1, gmacs=macs_per_image(pipe, steps), psnr=float("inf"))]
    for k in INTERVALS:
        for mode in MODES:
            config = PostDiffConfig(cache_interval=k, cache_branch=1, controlnet_cache=mode)
            postdiff.apply(pipe, config)
            rows.append(dict(mode=mode, k=k, gmacs=macs_per_image(pipe, steps), psnr=psnr(generate(pipe, edges, prompts, steps, scale), reference)))
            print(rows[-1], flush=True)
    write(rows, out, dict(images=images, steps=steps, conditioning_scale=scale, cache_branch=1, guidance_scale=3.0))


def write(rows: list[dict], out: Path, setup: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = [f"Setup: {json.dumps(setup)}", "", "| controlnet_cache | k | GMACs / image | PSNR to off (dB) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['k']} | {r['gmacs']:.2f} | {r['psnr']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
