"""The oracle of the engine: final latents of the hand-mirrored families (postdiff/families/, before the engine
replaced them) for a grid of pipelines x schedulers x configs, stored in tests/data/mirror_references.safetensors.

`python tests/mirror_references.py` recorded them with the mirrors; tests/test_engine.py asserts that what runs
now reproduces every one (bit for bit on a CPU of the recorded capability; within 1e-5 elsewhere, where float
kernels may round differently). Each case also records the step indices and latent sizes its callback saw.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

from postdiff import PostDiffConfig

STORE = Path(__file__).parent / "data" / "mirror_references.safetensors"

OFF = PostDiffConfig()
MIXED = PostDiffConfig(beta=0.5, switch=0.5)
DEEPCACHE = PostDiffConfig(cache_interval=2, cache_branch=1)
PAPER_SD = PostDiffConfig.preset("paper", family="sd")
PROGRESSIVE = PostDiffConfig(beta=0.5, switch=0.25, progressive=((0.75, 0.25),), cache_interval=2, cache_branch=1)
BLOCK_NOISE = PostDiffConfig(beta=0.5, switch=0.5, switch_noise="block")


def cfg_stop(mode: str, base: PostDiffConfig = PAPER_SD) -> PostDiffConfig:
    return base.with_changes(cfg_stop=5, ca_mode=mode)


@dataclass(frozen=True)
class Case:
    name: str  # key in the store
    pipeline: str  # BUILDERS key
    config: PostDiffConfig
    arguments: dict = field(default_factory=dict)
    scale_latents_at: int | None = None  # a callback that returns latents * 0.98 after this step
    interrupt_at: int | None = None  # a callback that interrupts after this step


def _sd(folder, scheduler):
    from tiny import sd_pipeline

    return sd_pipeline(folder, scheduler)


def _testbed(folder):
    from postdiff.loading import load_pipeline

    return load_pipeline("testbed")[0]


def _testbed_flow(folder):
    from postdiff.loading import load_pipeline

    return load_pipeline("testbed-flow")[0]


def _testbed_edit(kind: str):
    from postdiff.testbed import editing

    return getattr(editing, f"{kind}_pipeline")()


def _builders() -> dict:
    from test_controlnet import controlnet_pipeline
    from test_flow import flux_pipeline, sd3_pipeline
    from test_img2img import img2img_pipeline
    from test_inpaint import inpaint_pipeline
    from test_pixart import pixart_pipeline
    from test_sdxl_edit import img2img_pipeline as sdxl_img2img
    from test_sdxl_edit import inpaint_pipeline as sdxl_inpaint
    from tiny import lcm_pipeline, sdxl_pipeline

    builders = {f"sd-{name}": (lambda folder, name=name: _sd(folder, name))
                for name in ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "unipc")}
    builders.update({
        "testbed": _testbed, "testbed-flow": _testbed_flow, "lcm": lcm_pipeline, "sdxl": sdxl_pipeline,
        "pixart": lambda folder: pixart_pipeline("alpha"), "pixart-sigma": lambda folder: pixart_pipeline("sigma", "ddim"),
        "sd3": sd3_pipeline, "flux": flux_pipeline, "flux-schnell": lambda folder: flux_pipeline(folder, guidance_embeds=False),
        "sd-img2img": img2img_pipeline, "sd-inpaint": inpaint_pipeline, "sd-controlnet": controlnet_pipeline,
        "sdxl-img2img": sdxl_img2img, "sdxl-inpaint": sdxl_inpaint,
        "sdxl-controlnet": lambda folder: controlnet_pipeline(folder, xl=True),
        "testbed-img2img": lambda folder: _testbed_edit("img2img"), "testbed-inpaint": lambda folder: _testbed_edit("inpaint"),
    })
    return builders


def _default_arguments(pipeline: str) -> dict:
    from test_img2img import init_image
    from test_inpaint import mask_image
    from test_controlnet import control_image

    common = dict(prompt="a photo of a sneaker", num_inference_steps=8, output_type="latent")
    if pipeline in ("testbed-img2img", "testbed-inpaint"):
        image = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32)
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 16:] = 1
        extra = dict(strength=0.75) if pipeline.endswith("img2img") else dict(mask_image=mask, height=32, width=32)
        return dict(common, negative_prompt="", guidance_scale=3.0, image=image, **extra)
    if pipeline.startswith("testbed"):
        return dict(common, prompt="a photo of a sneaker", guidance_scale=3.0)
    if pipeline in ("sd3", "flux", "flux-schnell"):
        extra = dict(guidance_scale=5.0, negative_prompt="") if pipeline == "sd3" else {}
        return dict(common, height=32, width=32, max_sequence_length=16, **extra)
    if pipeline.startswith("pixart"):
        return dict(common, guidance_scale=4.5, clean_caption=False)
    arguments = dict(common, negative_prompt="", guidance_scale=5.0)
    if pipeline == "lcm":
        return dict(common, num_inference_steps=4, guidance_scale=8.0, height=32, width=32)
    if pipeline.endswith("img2img"):
        return dict(arguments, image=init_image(), strength=0.75)
    if pipeline.endswith("inpaint"):
        return dict(arguments, image=init_image(), mask_image=mask_image(), height=32, width=32)
    if pipeline.endswith("controlnet"):
        return dict(arguments, image=control_image(), num_inference_steps=6)
    return dict(arguments, height=32, width=32)


def cases() -> list[Case]:
    found = []
    for scheduler in ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "unipc"):
        pipeline = f"sd-{scheduler}"
        for label, config in (("off", OFF), ("mixed", MIXED), ("paper", PAPER_SD), ("progressive", PROGRESSIVE)):
            found.append(Case(f"{pipeline}/{label}", pipeline, config))
    found += [
        Case("sd-ddim/deepcache", "sd-ddim", DEEPCACHE),
        Case("sd-ddim/block-noise", "sd-ddim", BLOCK_NOISE),
        *[Case(f"sd-ddim/cfg-stop-{mode}", "sd-ddim", cfg_stop(mode)) for mode in ("cond", "ave", "cfg", "none")],
        Case("sd-euler/cfg-stop-cond", "sd-euler", cfg_stop("cond")),
        Case("sd-ddim/two-images", "sd-ddim", PAPER_SD, dict(num_images_per_prompt=2, prompt=["a bag", "a coat"], negative_prompt=["", "a shoe"])),
        Case("sd-ddim/guidance-rescale", "sd-ddim", MIXED, dict(guidance_rescale=0.7)),
        Case("sd-ddim/eta", "sd-ddim", MIXED, dict(eta=0.5)),
        Case("sd-ddim/callback-latents", "sd-ddim", PAPER_SD, scale_latents_at=2),
        Case("sd-ddim/interrupt-low", "sd-ddim", PAPER_SD, interrupt_at=1),
        Case("sd-ddim/interrupt-full", "sd-ddim", PAPER_SD, interrupt_at=5),
        Case("sd-euler/interrupt-low", "sd-euler", PAPER_SD, interrupt_at=2),
        Case("testbed/off", "testbed", OFF),
        Case("testbed/paper", "testbed", PostDiffConfig.preset("paper", family="testbed")),
        Case("testbed/cfg-stop", "testbed", cfg_stop("cond", PostDiffConfig.preset("paper", family="testbed"))),
        Case("testbed-flow/off", "testbed-flow", OFF),
        Case("testbed-flow/paper", "testbed-flow", PostDiffConfig.preset("paper", family="testbed-flow")),
        Case("testbed-flow/cfg-stop", "testbed-flow", cfg_stop("cond", PostDiffConfig.preset("paper", family="testbed-flow"))),
        Case("lcm/off", "lcm", OFF),
        Case("lcm/mixed", "lcm", MIXED),
        Case("lcm/paper", "lcm", PAPER_SD),
        Case("sdxl/off", "sdxl", OFF),
        Case("sdxl/paper", "sdxl", PostDiffConfig.preset("paper", family="sdxl").with_changes(beta=0.5)),
        Case("sdxl/cfg-stop", "sdxl", cfg_stop("cond", PostDiffConfig.preset("paper", family="sdxl").with_changes(beta=0.5))),
        Case("sdxl/callback-latents", "sdxl", MIXED, scale_latents_at=2),
    ]
    pixart_paper = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2)
    for pipeline in ("pixart", "pixart-sigma"):
        found += [Case(f"{pipeline}/off", pipeline, OFF), Case(f"{pipeline}/mixed", pipeline, MIXED),
                  Case(f"{pipeline}/paper", pipeline, pixart_paper),
                  Case(f"{pipeline}/cfg-stop", pipeline, cfg_stop("cond", pixart_paper))]
    flow_paper = PostDiffConfig(beta=0.5, switch=0.5, cache_interval=2, low_res_shift="own")
    flow_full = flow_paper.with_changes(low_res_shift="full")
    for pipeline in ("sd3", "flux", "flux-schnell"):
        found += [Case(f"{pipeline}/off", pipeline, OFF), Case(f"{pipeline}/paper-own", pipeline, flow_paper),
                  Case(f"{pipeline}/paper-full", pipeline, flow_full),
                  Case(f"{pipeline}/interrupt-low", pipeline, flow_paper, interrupt_at=2)]
    true_cfg = dict(negative_prompt="a bag", true_cfg_scale=3.0)
    found += [
        Case("sd3/cfg-stop", "sd3", cfg_stop("cond", flow_paper)),
        Case("sd3/callback-latents", "sd3", flow_full, scale_latents_at=2),
        Case("flux/true-cfg", "flux", flow_paper, true_cfg),
        Case("flux/true-cfg-stop", "flux", cfg_stop("cond", flow_paper), true_cfg),
        Case("flux/callback-latents", "flux", flow_paper, scale_latents_at=2),
    ]
    for pipeline in ("sd-img2img", "sd-inpaint", "sd-controlnet", "sdxl-img2img", "sdxl-inpaint", "sdxl-controlnet",
                     "testbed-img2img", "testbed-inpaint"):
        found += [Case(f"{pipeline}/off", pipeline, OFF), Case(f"{pipeline}/mixed", pipeline, MIXED),
                  Case(f"{pipeline}/paper", pipeline, PAPER_SD.with_changes(switch=0.4)),
                  Case(f"{pipeline}/cfg-stop", pipeline, cfg_stop("cond", DEEPCACHE).with_changes(cfg_stop=3))]
    return found


class StepWatcher:
    """A `callback_on_step_end` that records (index, latent shape) and may scale the latents or interrupt."""

    def __init__(self, case: Case):
        self.case = case
        self.seen: list[list[int]] = []

    def __call__(self, pipe, index, t, tensors):
        latents = tensors["latents"]
        self.seen.append([index, *latents.shape])
        if index == self.case.interrupt_at:
            pipe._interrupt = True
        if index == self.case.scale_latents_at:
            return {"latents": latents * 0.98}
        return {}


def run_case(case: Case, folder: Path, pipelines: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, the (index, *latent shape) rows the callback saw) of a case, PostDiff applied for it."""
    import postdiff

    if case.pipeline not in pipelines:
        pipelines[case.pipeline] = _builders()[case.pipeline](folder)
    pipe = pipelines[case.pipeline]
    watcher = StepWatcher(case)
    arguments = {**_default_arguments(case.pipeline), **case.arguments}
    arguments["generator"] = torch.Generator().manual_seed(0)
    if any("callback_on_step_end" in inspect.signature(cls.__call__).parameters for cls in type(pipe).__mro__[:-1]):
        arguments["callback_on_step_end"] = watcher
    with postdiff.applied(pipe, case.config):
        output = pipe(**arguments)
    latents = output[0] if isinstance(output, tuple) else output.images
    width = max((len(row) for row in watcher.seen), default=1)
    seen = torch.tensor([row + [0] * (width - len(row)) for row in watcher.seen], dtype=torch.int64).reshape(-1, width)
    return torch.as_tensor(latents).contiguous().clone(), seen


def record() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    tensors, pipelines = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for case in cases():
            latents, seen = run_case(case, Path(folder), pipelines)
            tensors[f"{case.name}:latents"], tensors[f"{case.name}:seen"] = latents, seen
            print(case.name, tuple(latents.shape), len(seen), flush=True)
    STORE.parent.mkdir(exist_ok=True)
    save_file(tensors, STORE, metadata={"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                        "torch": torch.__version__, "recorded_with": "postdiff/families mirrors"})


if __name__ == "__main__":
    record()
