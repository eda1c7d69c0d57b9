"""The second embedded model: a pixel-space text-to-image rectified-flow transformer (SD3 layout) on Fashion-MNIST.

`TestbedFlowPipeline` is a `StableDiffusion3Pipeline` without a VAE and without T5 (pixel space,
`vae_scale_factor` 1), so diffusers' own SD3 loop is its baseline; as with `TestbedPipeline`, only the
decode differs: the "latents" are the pixels. The denoiser is diffusers' `SD3Transformer2DModel` (MM-DiT:
joint attention over image and text tokens, adaLN conditioning on the timestep and the pooled text), the
two text encoders are small `CLIPTextModelWithProjection`s sharing the testbed's `CLIPTokenizer`, trained
jointly with it, and the sampler is `FlowMatchEulerDiscreteScheduler`.

Choices (ours):
- **No T5 tokens.** Without `text_encoder_3` diffusers fills the T5 part of the prompt with
  `max_sequence_length` (256 by default) zero tokens. `_get_t5_prompt_embeds` returns zero of them
  whatever `max_sequence_length` says, so the text is the 16 CLIP tokens (both encoders' penultimate
  states side by side, 64 + 64 = `joint_attention_dim`) in training and in every call, whoever calls.
- **Resolutions.** `sample_size` 32 (the pipeline's default size), patch 2, `pos_embed_max_size` 16: a
  32 px image is the whole 16x16 table, 24 px and 16 px ones (PostDiff's beta 3/4 and 1/2) take its
  central 12x12 and 8x8 crops, as SD3 does below its largest size. Training shows the model all three.
- **Schedule.** `shift` 1.0: SD3's 3.0 compensates for the redundancy of 1024 px images; at 32 px
  (and lower) the plain linear path is natural. Training samples sigma from the logit-normal (0, 1) of
  SD3 (`compute_density_for_timestep_sampling`) with uniform loss weight (the SD3 training script's
  "none"): the density already puts the effort at middle noise levels.
- **Initialisation**: adaLN-Zero (DiT): the modulation layers and the output projection start at zero,
  so every block starts as the identity; the architecture is diffusers' own, only the initial weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .model import decode_pixels
from .text import MAX_LENGTH, write_tokenizer_files

FLOW_WEIGHTS_DIR = Path(__file__).parent / "weights" / "flow_model"

TEXT_HIDDEN = 64  # each CLIP encoder's width; the prompt tokens are both side by side
TEXT_PROJECTION = 64  # each encoder's pooled projection; pooled_projections is both concatenated
TRANSFORMER_CONFIG = dict(
    sample_size=32,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=2 * TEXT_HIDDEN,
    caption_projection_dim=128,  # = num_attention_heads * attention_head_dim, as in SD3
    pooled_projection_dim=2 * TEXT_PROJECTION,
    pos_embed_max_size=16,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def flow_text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    # 3 layers: SD3 reads the penultimate hidden state, so the prompt tokens have 2 layers of context.
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


class TestbedFlowPipeline(StableDiffusion3Pipeline):
    """Stable Diffusion 3's text-to-image loop in pixel space (no VAE, no T5, no IP-Adapter)."""

    __test__ = False  # not a pytest class
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer"
    _optional_components = []

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
        # StableDiffusion3Pipeline.__init__ would register a VAE, T5 and an image encoder: start one level up.
        DiffusionPipeline.__init__(self)
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.vae = self.text_encoder_3 = self.tokenizer_3 = self.image_encoder = self.feature_extractor = None
        self.vae_scale_factor = 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        self.tokenizer_max_length = tokenizer.model_max_length
        self.default_sample_size = transformer.config.sample_size
        self.patch_size = transformer.config.patch_size

    def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt=1, max_sequence_length=0, device=None, dtype=None):
        """No T5: its part of the prompt is empty (diffusers would add `max_sequence_length` zero tokens)."""
        batch = 1 if isinstance(prompt, str) else len(prompt)
        dim = self.transformer.config.joint_attention_dim
        return torch.zeros(batch * num_images_per_prompt, 0, dim, device=device or self._execution_device,
                           dtype=dtype or self.text_encoder.dtype)

    def __call__(self, *args, output_type: str = "pil", return_dict: bool = True, **kwargs):
        pixels = super().__call__(*args, output_type="latent", return_dict=False, **kwargs)[0]
        images = decode_pixels(self, pixels, output_type)
        if not return_dict:
            return (images,)
        return StableDiffusion3PipelineOutput(images=images)


def _zero_init_modulation(transformer: SD3Transformer2DModel) -> None:
    """adaLN-Zero: zero modulation (shift, scale, gate) and output projection, so blocks start as the identity."""
    layers = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def build_flow_pipeline(tokenizer_dir: Path, seed: int = 0, **transformer_overrides) -> TestbedFlowPipeline:
    """A freshly initialised (untrained) flow pipeline; `transformer_overrides` change the transformer's config
    (tests build tiny ones)."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tokenizer_dir))
    text_encoder = CLIPTextModelWithProjection(flow_text_encoder_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(flow_text_encoder_config(len(tokenizer)))
    transformer = SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **transformer_overrides})
    _zero_init_modulation(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return TestbedFlowPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                               tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)


def load_flow_pipeline(path: str | Path | None = None) -> TestbedFlowPipeline:
    """The shipped, trained flow model (or another directory saved by the training command), loaded offline."""
    folder = Path(path) if path is not None else FLOW_WEIGHTS_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"no flow model at {folder} (model_index.json missing); train one with "
            "`python -m postdiff.testbed.train --model flow`"
        )
    return TestbedFlowPipeline.from_pretrained(folder)
