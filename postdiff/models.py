"""Named models for planning and accounting: full-size architectures from their public configs (shipped
as JSON, counted on the meta device, no weights), the embedded testbed, or any local diffusers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .accounting import ComponentSpec, DenoiserSpec, meta_denoiser
from .caching.deepcache import max_branch
from .families.pixart import transformer_facts
from .families.sd import restart_repeats, unet_size_multiple
from .plan import ModelFacts

CONFIG_DIR = Path(__file__).parent / "accounting_configs"
FACTS_OF_KIND: dict = {"pixart": transformer_facts}  # denoiser kind -> (meta model, latent_hw, restart_repeats) -> ModelFacts


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

    def component_costs(self, with_vae: bool, with_text: bool, do_cfg: bool = True,
                        latent_hw: tuple[int, int] | None = None) -> dict[str, tuple[float, float]]:
        """(MACs, attention MACs) of one 1-image call's text encoding and VAE decode, by component name
        (the decode at `latent_hw`, by default the model's native latent size)."""
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
        return costs

    def facts(self) -> ModelFacts:
        model = meta_denoiser(self.denoiser)
        repeats = restart_repeats(self.scheduler)
        if self.denoiser.kind != "unet":
            return FACTS_OF_KIND[self.denoiser.kind](model, self.latent_hw, repeats)
        return ModelFacts(self.latent_hw, unet_size_multiple(model), max_branch(model), repeats)


def named_models() -> list[str]:
    return ["testbed"] + sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_model_spec(name: str) -> ModelSpec:
    """`name` is a shipped config ("sd15-512", ...), "testbed", or a local diffusers pipeline folder."""
    if name == "testbed":
        from .testbed.model import WEIGHTS_DIR

        return _spec_from_folder(WEIGHTS_DIR, "testbed", family="testbed")
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.exists():
        data = json.loads(shipped.read_text())
        side = data["resolution"] // data["vae_scale_factor"]
        denoiser = DenoiserSpec(data["denoiser"], data["text_length"], data.get("kind", "unet"))
        texts = tuple(ComponentSpec(text["class"], text["config"]) for text in data.get("text_encoders", ()))
        vae = ComponentSpec("AutoencoderKL", data["vae"]) if "vae" in data else None
        return ModelSpec(name, data["family"], denoiser, (side, side), data["scheduler"], vae, texts,
                         data.get("negative_prompt_encoded", True))
    if any(Path(name, folder, "config.json").exists() for folder in ("unet", "transformer")):
        return _spec_from_folder(Path(name), name)
    raise ValueError(f"model={name!r} is not a shipped model ({', '.join(named_models())}) nor a local diffusers folder "
                     "with unet/config.json or transformer/config.json")


def _spec_from_folder(folder: Path, name: str, family: str | None = None) -> ModelSpec:
    """A local pipeline folder: U-Net pipelines (SD 1.x/2.x, SDXL, the testbed) or PixArt-alpha/Sigma."""
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class = index.get("_class_name", "")
    if (folder / "transformer" / "config.json").exists():
        config = _read_config(folder / "transformer")
        # PixArt's pipelines pad prompts to max_sequence_length: 120 tokens for alpha, 300 for Sigma.
        denoiser = DenoiserSpec(config, 300 if "Sigma" in pipeline_class else 120, "pixart")
        family = family or "pixart"
    else:
        config = _read_config(folder / "unet")
        tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
        text_length = json.loads(tokenizer_config.read_text()).get("model_max_length", 77) if tokenizer_config.exists() else 77
        denoiser = DenoiserSpec(config, min(text_length, 77))
        family = family or ("sdxl" if "XL" in pipeline_class else "sd")
    sample = config["sample_size"]  # the denoiser's native latent size
    side = sample if isinstance(sample, int) else sample[0]
    scheduler = index.get("scheduler", [None, "DDIMScheduler"])[1]
    texts = tuple(_component(folder / part) for part in ("text_encoder", "text_encoder_2") if (folder / part / "config.json").exists())
    vae = _component(folder / "vae") if (folder / "vae" / "config.json").exists() else None
    negative_encoded = not (family == "sdxl" and index.get("force_zeros_for_empty_prompt", True))
    return ModelSpec(name, family, denoiser, (side, side), scheduler, vae, texts, negative_encoded)


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
    sample = denoiser.config.sample_size
    side = sample if isinstance(sample, int) else sample[0]
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
