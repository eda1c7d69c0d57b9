"""Loading a pipeline by name: an embedded model ("testbed", the default, "testbed-flow" or "testbed-video"; or a folder saved
by their training), or any diffusers pipeline (a local folder or a hub id) through
`DiffusionPipeline.from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_GUIDANCE = 3.0  # chosen on the evaluator for the U-Net testbed (docs/embedded-models.md)
DIFFUSERS_GUIDANCE = 7.5  # the usual default of SD-style pipelines
EMBEDDED = {"testbed": "TestbedPipeline", "testbed-flow": "TestbedFlowPipeline", "testbed-video": "TestbedVideoPipeline"}


def embedded_name(model: str | None) -> str | None:
    """Which embedded model `model` names ("testbed" for None, a name, or a folder of one), else None."""
    if model is None or model in EMBEDDED:
        return model or "testbed"
    index = Path(model) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name") if index.exists() else None
    return next((name for name, pipeline in EMBEDDED.items() if pipeline == class_name), None)


def is_testbed_folder(model: str) -> bool:
    return model not in EMBEDDED and embedded_name(model) is not None


def is_testbed(model: str | None) -> bool:
    """An embedded model: scored on its Fashion-MNIST classes by the shipped evaluator."""
    return embedded_name(model) is not None


def call_defaults(pipe) -> dict:
    """Call arguments a pipeline needs beyond the prompt: the embedded video model's clip size and frames (Wan's
    own defaults are 480x832, 81 frames)."""
    if type(pipe).__name__ == EMBEDDED["testbed-video"]:
        from .testbed.video_model import DEFAULT_CALL

        return dict(DEFAULT_CALL)
    return {}


def load_pipeline(model: str | None = None):
    """(pipeline, its default guidance scale)."""
    name = embedded_name(model)
    folder = None if model is None or model in EMBEDDED else model
    if name == "testbed":
        from .testbed.model import load_pipeline as load_testbed

        return load_testbed(folder), EMBEDDED_GUIDANCE
    if name == "testbed-flow":
        from .testbed.flow_model import load_flow_pipeline

        return load_flow_pipeline(folder), EMBEDDED_GUIDANCE
    if name == "testbed-video":
        from .testbed.video_model import load_video_pipeline

        return load_video_pipeline(folder), EMBEDDED_GUIDANCE
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model), DIFFUSERS_GUIDANCE
