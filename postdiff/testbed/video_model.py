"""The third embedded model: a pixel-space text-to-video rectified-flow transformer on moving Fashion-MNIST clips.

`TestbedVideoPipeline` is diffusers' `WanPipeline` without a VAE (pixel space: `vae_scale_factor_spatial` and
`_temporal` 1), so Wan's own loop is its baseline and PostDiff drives it through the Wan adapter
(families/wan.py) as it drives Wan 2.1; only the decode differs: the "latents" are the frames. The denoiser is
diffusers' `WanTransformer3DModel` (self-attention over all frames' tokens with 3-D RoPE, cross-attention to the
text, adaLN on the timestep); the text encoder a small `CLIPTextModel` on the testbed's tokenizer (with the
motion words), trained jointly with it; the sampler `FlowMatchEulerDiscreteScheduler`.

Choices (ours):
- **Clips**: 8 frames of 32x32 (postdiff/testbed/video_data.py: a Fashion-MNIST image moved by one of eight
  motions, both named in the caption).
- **Patches** (1, 4, 4): 8 x 8 x 8 = 512 tokens a clip, which a 2-core CPU trains at about 2 s a step of 32
  clips; 16 px and 24 px frames (spatial beta 1/2 and 3/4) are 4x4 and 6x6 tokens, and 4-frame clips (temporal
  beta 1/2) are in the training mix, so every low-resolution phase PostDiff can run is in distribution.
- **Schedule**: `shift` 1.0, as the flow testbed (Wan's 5.0 is for 480p video); logit-normal sigmas.
- **Text**: 16 tokens (the tokenizer's length) instead of Wan's 512 zero-padded T5 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan import pipeline_wan
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import logging
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from .flow_model import flow_text_encoder_config
from .text import write_tokenizer_files
from .video_data import MOTION_WORDS, NUM_FRAMES

VIDEO_WEIGHTS_DIR = Path(__file__).parent / "weights" / "video_model"
SIZE = 32
VIDEO_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    text_dim=64,  # the CLIP encoder's width
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
VIDEO_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


class TestbedVideoPipeline(WanPipeline):
    """Wan's text-to-video loop in pixel space (no VAE): frames (B, 1, F, 32, 32) in [-1, 1] are the latents."""

    __test__ = False  # not a pytest class
    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = []

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, boundary_ratio=None, expand_timesteps=False):
        # WanPipeline.__init__ would register a VAE and a second transformer: start one level up.
        DiffusionPipeline.__init__(self)
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
        self.vae = self.transformer_2 = None
        self.vae_scale_factor_temporal = self.vae_scale_factor_spatial = 1
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt=1, max_sequence_length=226, device=None, dtype=None):
        """The CLIP encoder's tokens at the tokenizer's length (Wan pads T5's to `max_sequence_length`)."""
        return super()._get_t5_prompt_embeds(prompt, num_videos_per_prompt, self.tokenizer.model_max_length, device, dtype)

    def check_inputs(self, prompt, negative_prompt, height, width, *args, **kwargs):
        """Wan's checks, with its size rule at this model's scale: Wan asks for multiples of 16 pixels (its VAE's 8 x
        its patch of 2), here a pixel is a latent and a patch is 4 (so 24 px frames, beta 3/4, are valid)."""
        patch = self.transformer.config.patch_size[1]
        if height % patch or width % patch:
            raise ValueError(f"`height` and `width` have to be divisible by {patch} but are {height} and {width}.")
        super().check_inputs(prompt, negative_prompt, 16, 16, *args, **kwargs)  # the size checked above

    def __call__(self, *args, output_type: str = "np", return_dict: bool = True, **kwargs):
        """Wan's call, `num_frames` frames exactly: Wan rounds every count up to the next `k * temporal factor + 1`,
        which for a factor of 1 is always one more, so the count goes in one less (and its warning is muted)."""
        kwargs["num_frames"] = kwargs.get("num_frames", NUM_FRAMES) - 1
        wan_logger = logging.get_logger(pipeline_wan.__name__)
        level = wan_logger.level
        wan_logger.setLevel(logging.ERROR)
        try:
            frames = super().__call__(*args, output_type="latent", return_dict=False, **kwargs)[0]
        finally:
            wan_logger.setLevel(level)
        if output_type != "latent":
            frames = self.video_processor.postprocess_video(frames, output_type=output_type)
        if not return_dict:
            return (frames,)
        return WanPipelineOutput(frames=frames)


def _zero_init_modulation(transformer: WanTransformer3DModel) -> None:
    """The output projection starts at zero (as adaLN-Zero), so the untrained model predicts no velocity."""
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def build_video_pipeline(tokenizer_dir: Path, seed: int = 0, **transformer_overrides) -> TestbedVideoPipeline:
    """A freshly initialised (untrained) video pipeline; `transformer_overrides` change the transformer's config."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tokenizer_dir, extra_words=MOTION_WORDS))
    text_encoder = CLIPTextModel(flow_text_encoder_config(len(tokenizer)))
    transformer = WanTransformer3DModel(**{**VIDEO_TRANSFORMER_CONFIG, **transformer_overrides})
    _zero_init_modulation(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(**VIDEO_SCHEDULER_CONFIG)
    return TestbedVideoPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def load_video_pipeline(path: str | Path | None = None) -> TestbedVideoPipeline:
    """The shipped, trained video model (or another directory saved by the training command), loaded offline."""
    folder = Path(path) if path is not None else VIDEO_WEIGHTS_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no video model at {folder} (model_index.json missing); train one with "
                                "`python -m postdiff.testbed.train --model video`")
    return TestbedVideoPipeline.from_pretrained(folder)


DEFAULT_CALL = dict(height=SIZE, width=SIZE, num_frames=NUM_FRAMES)
