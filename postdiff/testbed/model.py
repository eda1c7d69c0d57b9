"""The embedded default model: a pixel-space text-to-image U-Net on Fashion-MNIST (32x32, one channel).

`TestbedPipeline` is a `StableDiffusionPipeline` without a VAE (pixel space, `vae_scale_factor` 1), so
diffusers' own Stable Diffusion loop is its baseline and PostDiff drives it through the same SD family
adapter as Stable Diffusion. Only the decode differs: the "latents" are the pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .text import MAX_LENGTH, write_tokenizer_files

WEIGHTS_DIR = Path(__file__).parent / "weights" / "model"

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
# SD's noise schedule (1000 steps, scaled_linear betas); DDIM is the documented default sampler.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


class TestbedPipeline(StableDiffusionPipeline):
    """Stable Diffusion's text-to-image loop in pixel space (no VAE, no safety checker)."""

    __test__ = False  # not a pytest class
    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = []
    _exclude_from_cpu_offload = []

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        # StableDiffusionPipeline.__init__ would register a VAE and a safety checker: start one level up.
        DiffusionPipeline.__init__(self)
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.vae = None
        self.safety_checker = None
        self.feature_extractor = None
        self.image_encoder = None
        self.vae_scale_factor = 1
        self._is_unet_config_sample_size_int = isinstance(unet.config.sample_size, int)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    def __call__(self, *args, output_type: str = "pil", return_dict: bool = True, **kwargs):
        pixels = super().__call__(*args, output_type="latent", return_dict=False, **kwargs)[0]
        images = decode_pixels(self, pixels, output_type)
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def decode_pixels(pipe, pixels: torch.Tensor, output_type: str):
    """Pixel-space "decode": the sample is the image in [-1, 1]."""
    if output_type == "latent":
        return pixels
    return pipe.image_processor.postprocess(pixels, output_type=output_type)


def build_pipeline(tokenizer_dir: Path, seed: int = 0) -> TestbedPipeline:
    """A freshly initialised (untrained) testbed pipeline."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tokenizer_dir))
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer)))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return TestbedPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def load_pipeline(path: str | Path | None = None) -> TestbedPipeline:
    """The shipped, trained model (or another directory saved by the training command), loaded offline."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no testbed model at {folder} (model_index.json missing); train one with `postdiff-train`")
    return TestbedPipeline.from_pretrained(folder)
