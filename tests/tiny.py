"""Tiny random models of the real diffusers/transformers classes, built locally (no hub)."""

from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

from postdiff.testbed.text import write_tokenizer_files

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
# Stable Diffusion 1.5's scheduler config; each scheduler class takes the keys it knows.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
)


def make_scheduler(name: str, **overrides):
    return SCHEDULERS[name].from_config({**SD_SCHEDULER, **overrides})


def tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder))


def text_encoder(vocab_size: int, projection: bool = False, hidden: int = 16):
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )


def sd_unet(**overrides) -> UNet2DConditionModel:
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def sd_pipeline(folder: Path, scheduler: str = "ddim", prediction_type: str = "epsilon", seed: int = 0):
    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(len(tok)), tokenizer=tok, unet=sd_unet(),
        scheduler=make_scheduler(scheduler, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet(time_ids: int = 6, **overrides) -> UNet2DConditionModel:
    """SDXL's U-Net layout; `time_ids`: 6 (sizes and crop), 5 with an aesthetic score (the refiner's)."""
    return sd_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=time_ids * 8 + 16, use_linear_projection=True,
        **overrides,
    )


def sdxl_pipeline(folder: Path, scheduler: str = "euler", seed: int = 0):
    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    unet = sdxl_unet()
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=text_encoder(len(tok)), text_encoder_2=text_encoder(len(tok), projection=True),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=make_scheduler(scheduler),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hook_leftovers(model: torch.nn.Module) -> list[str]:
    """Modules that carry anything of postdiff's hooks: a hook tuple, a swapped class, a hook registry or an
    instance `forward`."""
    return [name for name, module in model.named_modules()
            if {"_postdiff_hooks", "_diffusers_hook", "forward"} & module.__dict__.keys()
            or hasattr(type(module), "_postdiff_original_class")]


def call(pipe, seed: int = 0, **overrides):
    arguments = dict(prompt="a photo of a sneaker", negative_prompt="", num_inference_steps=8, guidance_scale=5.0,
                     height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(seed))
    arguments.update(overrides)
    return pipe(**arguments).images


def lcm_pipeline(folder: Path, seed: int = 0):
    """A `LatentConsistencyModelPipeline`: guidance-distilled U-Net (time_cond_proj_dim) with LCMScheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    torch.manual_seed(seed)
    tok = tokenizer(folder / "tokenizer")
    pipe = LatentConsistencyModelPipeline(
        vae=vae(), text_encoder=text_encoder(len(tok)), tokenizer=tok, unet=sd_unet(time_cond_proj_dim=32),
        scheduler=LCMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


T5_WORDS = "a an the of photo picture sneaker bag coat black and white small".split()


def t5_tokenizer() -> T5Tokenizer:
    """A real (tokenizers-backed) T5 tokenizer over a small Unigram vocabulary; <pad>=0, </s>=1, <unk>=2."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in T5_WORDS] + [(char, -5.0) for char in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
