"""Named models for planning and accounting: full-size architectures from their public configs (shipped
as JSON, counted on the meta device, no weights), the embedded testbed, or any local diffusers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .accounting import DenoiserSpec, meta_denoiser
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
        return ModelSpec(name, data["family"], denoiser, (side, side), data["scheduler"])
    if Path(name, "unet", "config.json").exists():
        return _spec_from_folder(Path(name), name)
    raise ValueError(f"model={name!r} is not a shipped model ({', '.join(named_models())}) nor a local diffusers folder with unet/config.json")


def _spec_from_folder(folder: Path, name: str, family: str | None = None) -> ModelSpec:
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    text_length = json.loads(tokenizer_config.read_text()).get("model_max_length", 77) if tokenizer_config.exists() else 77
    sample = unet_config["sample_size"]  # the U-Net's native latent size
    side = sample if isinstance(sample, int) else sample[0]
    family = family or ("sdxl" if "XL" in index.get("_class_name", "") else "sd")
    scheduler = index.get("scheduler", [None, "DDIMScheduler"])[1]
    return ModelSpec(name, family, DenoiserSpec(unet_config, min(text_length, 77)), (side, side), scheduler)


def spec_from_pipeline(pipe, name: str = "pipeline") -> ModelSpec:

    from .families import family_for

    family = family_for(pipe)
    denoiser = getattr(pipe, family.denoiser_attribute)
    sample = denoiser.config.sample_size
    side = sample if isinstance(sample, int) else sample[0]
    text_length = min(getattr(getattr(pipe, "tokenizer", None), "model_max_length", 77), family.max_text_length)
    spec = DenoiserSpec(dict(denoiser.config), text_length, family.denoiser_kind)
    return ModelSpec(name, family.name, spec, (side, side), type(pipe.scheduler).__name__)


def plan_macs_per_image(pipe, plan) -> float:
    """Denoiser MACs per image of a plan that `pipe` would run (the paper's convention)."""
    from .accounting import plan_costs, total

    return total(plan_costs(spec_from_pipeline(pipe).denoiser, plan, num_images=1))
