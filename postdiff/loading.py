"""Loading a pipeline by name: the embedded testbed model (the default, or a folder saved by its training),
or any diffusers pipeline (a local folder or a hub id) through `DiffusionPipeline.from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

TESTBED_GUIDANCE = 3.0  # chosen on the evaluator (README, "Embedded model")
DIFFUSERS_GUIDANCE = 7.5  # the usual default of SD-style pipelines


def is_testbed_folder(model: str) -> bool:
    index = Path(model) / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name") == "TestbedPipeline"


def is_testbed(model: str | None) -> bool:
    """None names the shipped embedded model."""
    return model is None or is_testbed_folder(model)


def load_pipeline(model: str | None = None):
    """(pipeline, its default guidance scale)."""
    if is_testbed(model):
        from .testbed.model import load_pipeline as load_testbed

        return load_testbed(model), TESTBED_GUIDANCE
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model), DIFFUSERS_GUIDANCE
