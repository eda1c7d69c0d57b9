"""Named models for planning and accounting: full-size architectures from their public configs (shipped
as JSON, counted on the meta device, no weights), the embedded testbed, or any local diffusers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .accounting import ComponentSpec, ControlNetSpec
from .config import PostDiffConfig
from .denoisers import DenoiserSpec, denoiser_kind, meta_denoiser
from .plan import ModelFacts, StepPlan, make_plan
from .schedulers import restart_repeats

CONFIG_DIR = Path(__file__).parent / "accounting_configs"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    denoiser: DenoiserSpec
    latent_hw: tuple[int, int]
    scheduler: str
    vae: ComponentSpec | None = None
    text_encoders: tuple[ComponentSpec, ...] = ()
    negative_prompt_encoded: bool = True  # SDXL zeroes an empty negative prompt instead of encoding it
    classifier_free_guidance: bool = True  # False: a guidance-distilled model run without a CFG batch (FLUX)

    def component_costs(self, with_vae: bool, with_text: bool, do_cfg: bool = True, latent_hw: tuple[int, int] | None = None,
                        encode_hw: tuple[int, int] | None = None) -> dict[str, tuple[float, float]]:
        """(MACs, attention MACs) of one 1-image call's text encoding and VAE decode, by component name
        (the decode at `latent_hw`, by default the model's native latent size), and with `encode_hw` the VAE
        encode of an img2img init image at that latent size (the first phase's: its start is encoded there)."""
        if with_vae and self.vae is None:
            raise ValueError(f"model={self.name!r} has no VAE (it denoises in pixel space): --with-vae does not apply")
        if with_text and not self.text_encoders:
            raise ValueError(f"model={self.name!r} names no text encoder config: --with-text does not apply")
        costs = {}
        prompts = 2 if do_cfg and self.negative_prompt_encoded else 1
        for index, encoder in enumerate(self.text_encoders if with_text else ()):
            name = f"text_encoder{'_' + str(index + 1) if index else ''} ({encoder.class_name}, {prompts} prompt{'s' * (prompts > 1)})"
            costs[name] = encoder.cost(self.latent_hw, self.denoiser.text_length, batch=prompts)
        if with_vae:
            costs["vae decoder"] = self.vae.cost(latent_hw or self.latent_hw, self.denoiser.text_length)
        if with_vae and encode_hw is not None:
            costs[f"vae encoder (init image, {encode_hw[0]}x{encode_hw[1]} latent)"] = self.vae.encode_cost(encode_hw)
        return costs

    def controlnet_spec(self, count: int, guess_mode: bool = False) -> ControlNetSpec | None:
        """`count` ControlNets of the public SD / SDXL layout (None for none): a copy of the U-Net's encoder whose
        condition embedding goes from the image to the latent size (4 stages for a VAE's factor 8; pixel-space
        models: 1)."""
        if count == 0:
            return None
        if self.denoiser.kind != "unet":
            raise ValueError(f"--controlnet applies to U-Net models; model={self.name!r} has a {self.denoiser.kind} transformer")
        channels = (16, 32, 96, 256) if self.vae is not None else (16,)
        return ControlNetSpec(channels, count, guess_mode)

    def runs_cfg(self, requested: bool | None = None) -> bool:
        """Whether a call has a CFG batch: as requested, else the model's usual call."""
        return self.classifier_free_guidance if requested is None else requested

    def facts(self) -> ModelFacts:
        model = meta_denoiser(self.denoiser)
        kind = denoiser_kind(self.denoiser.kind)
        facts = kind.facts(model, self.latent_hw, restart_repeats(self.scheduler))
        return replace(facts, latent_frames=self.denoiser.latent_frames) if kind.video else facts

    def plan(self, config: PostDiffConfig, num_inference_steps: int, do_cfg: bool = True, strength: float = 1.0) -> StepPlan:
        """The plan a call with `num_inference_steps` runs: PLMS's timesteps include its warm-up repeat; an
        img2img `strength` skips the first steps as the pipelines' `get_timesteps` does."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength={strength} is not allowed: expected a number in (0, 1]")
        skipped = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        num_timesteps = num_inference_steps + restart_repeats(self.scheduler) - skipped
        return make_plan(config, num_timesteps, self.facts(), do_cfg=do_cfg)


def named_models() -> list[str]:
    return ["testbed", "testbed-flow"] + sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model_spec(name: str) -> ModelSpec:
    """`name` is a shipped config ("sd15-512", ...), "testbed", "testbed-flow", or a local diffusers pipeline folder."""
    if name == "testbed":
        from .testbed.model import WEIGHTS_DIR

        return _spec_from_folder(WEIGHTS_DIR, "testbed", family="testbed")
    if name == "testbed-flow":
        return _testbed_flow_spec()
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.exists():
        return _shipped_spec(name, json.loads(shipped.read_text()))
    if any(Path(name, folder, "config.json").exists() for folder in ("unet", "transformer")):
        return _spec_from_folder(Path(name), name)
    raise ValueError(f"model={name!r} is not a shipped model ({', '.join(named_models())}) nor a local diffusers folder "
                     "with unet/config.json or transformer/config.json")


def _shipped_spec(name: str, data: dict) -> ModelSpec:
    """A shipped config: `resolution` (square) or `height` and `width` in pixels; a video model's `latent_frames`
    (its frame count through the VAE's temporal compression); `vae_class` where the VAE is not an AutoencoderKL; an
    editing model's `condition_resolution` (the pixels of the condition image whose tokens join every step)."""
    factor = data["vae_scale_factor"]
    latent_hw = (data.get("height", data.get("resolution")) // factor, data.get("width", data.get("resolution")) // factor)
    condition = data.get("condition_resolution")
    condition_hw = None if condition is None else (condition // factor, condition // factor)
    denoiser = DenoiserSpec(data["denoiser"], data["text_length"], data.get("kind", "unet"), data.get("latent_frames", 1),
                            condition_hw)
    texts = tuple(ComponentSpec(text["class"], text["config"], text.get("text_length")) for text in data.get("text_encoders", ()))
    vae = ComponentSpec(data.get("vae_class", "AutoencoderKL"), data["vae"]) if "vae" in data else None
    return ModelSpec(name, data["family"], denoiser, latent_hw, data["scheduler"], vae, texts,
                     data.get("negative_prompt_encoded", True), data.get("classifier_free_guidance", True))


def _testbed_flow_spec() -> ModelSpec:
    """The embedded flow model: its saved folder once trained, else its architecture constants (no weights needed)."""
    from .testbed.flow_model import FLOW_WEIGHTS_DIR, TRANSFORMER_CONFIG
    from .testbed.text import MAX_LENGTH

    if (FLOW_WEIGHTS_DIR / "model_index.json").exists():
        return _spec_from_folder(FLOW_WEIGHTS_DIR, "testbed-flow", family="testbed-flow")
    side = TRANSFORMER_CONFIG["sample_size"]
    return ModelSpec("testbed-flow", "testbed-flow", DenoiserSpec(dict(TRANSFORMER_CONFIG), MAX_LENGTH, "sd3"),
                     (side, side), "FlowMatchEulerDiscreteScheduler")


# transformer class -> (denoiser kind, family, text tokens of the pipeline's default call)
TRANSFORMER_FOLDERS = {
    "PixArtTransformer2DModel": ("pixart", "pixart", None),  # 120 (alpha) or 300 (Sigma): max_sequence_length
    "SD3Transformer2DModel": ("sd3", "sd3", 256),  # CLIP tokens + 256 T5 tokens
    "FluxTransformer2DModel": ("flux", "flux", 512),
}


def _spec_from_folder(folder: Path, name: str, family: str | None = None) -> ModelSpec:
    """A local pipeline folder: U-Net pipelines (SD 1.x/2.x, SDXL, the testbed), PixArt-alpha/Sigma, SD3, FLUX
    and the embedded flow model."""
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class = index.get("_class_name", "")
    if (folder / "transformer" / "config.json").exists():
        config = _read_config(folder / "transformer")
        kind, default_family, text_length = TRANSFORMER_FOLDERS[config.get("_class_name", "PixArtTransformer2DModel")]
        if kind == "pixart":
            text_length = 300 if "Sigma" in pipeline_class else 120
        elif kind == "sd3":  # the CLIP tokens, then T5's (none in the embedded flow model)
            text_length = _tokenizer_length(folder) + (0 if family == "testbed-flow" else text_length)
        denoiser = DenoiserSpec(config, text_length, kind)
        family = family or default_family
    else:
        config = _read_config(folder / "unet")
        denoiser = DenoiserSpec(config, min(_tokenizer_length(folder), 77))
        family = family or ("sdxl" if "XL" in pipeline_class else "sd")
    sample = config.get("sample_size", 128)  # the denoiser's native latent size (FLUX's pipeline: 128)
    side = sample if isinstance(sample, int) else sample[0]
    scheduler = index.get("scheduler", [None, "DDIMScheduler"])[1]
    texts = tuple(_component(folder / part) for part in ("text_encoder", "text_encoder_2") if (folder / part / "config.json").exists())
    vae = _component(folder / "vae") if (folder / "vae" / "config.json").exists() else None
    negative_encoded = not (family == "sdxl" and index.get("force_zeros_for_empty_prompt", True))
    return ModelSpec(name, family, denoiser, (side, side), scheduler, vae, texts, negative_encoded)


def _tokenizer_length(folder: Path) -> int:
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    return json.loads(tokenizer_config.read_text()).get("model_max_length", 77) if tokenizer_config.exists() else 77


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _component(folder: Path) -> ComponentSpec:
    config = _read_config(folder)
    return ComponentSpec(config.get("_class_name") or config["architectures"][0], _public(config))


def _public(config: dict) -> dict:
    """A saved config without its bookkeeping keys (class name, library versions)."""
    return {key: value for key, value in config.items() if not key.startswith("_") and key not in ("architectures", "transformers_version")}


def spec_from_pipeline(pipe, name: str = "pipeline") -> ModelSpec:
    from .families import family_for

    family = family_for(pipe)
    denoiser = getattr(pipe, family.denoiser_attribute)
    sample = denoiser.config.get("sample_size") or getattr(pipe, "default_sample_size", None)  # FLUX's transformer has none
    side = 0 if sample is None else sample if isinstance(sample, int) else sample[0]  # 0: none (video: the call's size)
    text_length = min(getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77), family.max_text_length)
    spec = DenoiserSpec(dict(denoiser.config), text_length, family.denoiser_kind)
    encoders = [getattr(pipe, part, None) for part in ("text_encoder", "text_encoder_2")]
    texts = tuple(ComponentSpec(type(e).__name__, _public(e.config.to_dict())) for e in encoders if e is not None)
    vae = getattr(pipe, "vae", None)
    vae_spec = ComponentSpec("AutoencoderKL", _public(dict(vae.config))) if type(vae).__name__ == "AutoencoderKL" else None
    negative_encoded = not getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    return ModelSpec(name, family.name, spec, (side, side), type(pipe.scheduler).__name__, vae_spec, texts, negative_encoded)


def plan_macs_per_image(pipe, plan) -> float:
    """Denoiser MACs per image of a plan that `pipe` would run (the paper's convention)."""
    from .accounting import plan_costs, total

    return total(plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=1))
