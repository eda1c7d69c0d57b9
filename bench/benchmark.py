"""Wall-clock and peak-memory benchmark: plain diffusers against postdiff "off", each technique and the presets.

    python bench/benchmark.py --workload testbed --repeats 3 --out bench/results
    python bench/benchmark.py --workload sd15-256 --repeats 1 --device cuda

Every (workload, configuration) runs in its own process, so peak memory (max RSS on CPU, max allocated on
CUDA) is that configuration's alone. Each process does a warm-up call and `repeats` timed calls. With
`--rounds R` the whole list of configurations is run R times, in alternating order, and the median is taken
over all timed calls of all rounds: slow drift or a burst of other load on the machine then falls on every
configuration alike instead of on one.
Speedups and MACs ratios are against the plain diffusers pipeline measured in the same invocation; the
whole-call MACs ratio adds the text encoder(s) and the VAE decode, which the wall clock also covers.
`--render FILE.json` rewrites the Markdown table of an earlier run.
`--compile` (full, the default, or regional) adds a compiled twin of every configuration (inductor, the
default backend): the denoiser compiled whole after `postdiff.apply`, or its repeated blocks (diffusers'
`compile_repeated_blocks`); its first call, which compiles a graph per kind of step, is reported apart
("first call s", compiled cold: inductor's caches in a fresh folder per process), the timed calls reuse
the graphs. `--quantize int8-weight` (or int8-dynamic; repeatable) adds a twin of every configuration, plain
diffusers included, on the denoiser quantized by torchao before anything else is applied
(postdiff/quantization.py); every row gives the denoiser's weight bytes.
Workloads: the embedded model (32 px, 8 images), and an SD 1.5-size U-Net with random weights (real SD
text encoder and VAE configs, random weights) at 512 px and 256 px; 20 steps with CFG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "diffusers": None,  # the plain pipeline, no postdiff
    "off": dict(),
    "mixed": dict(beta=0.5, switch=0.5),
    "deepcache": dict(cache_interval=2, cache_branch=1),  # the branch of the published rows
    "ca-m5": dict(cfg_stop=5, ca_mode="cond"),
    "paper": "paper",
    "paper+ca-m5": dict(beta=0.5, switch=0.5, cache_interval=2, cache_branch=1, cfg_stop=5),
}
WORKLOADS = ("testbed", "sd15-512", "sd15-256", "testbed-flow")
EXTERNAL = "external:"  # config names "external:SPEC" run an external method (postdiff/evaluation/baselines.py)
COMPILED = {"+compile": "full", "+compile-regional": "regional"}  # config name suffixes: its compiled twin
QUANTIZED = ("+int8-weight", "+int8-dynamic")  # config name suffixes: the twin on a quantized denoiser


def build_pipeline(workload: str, device: str):

    if workload == "testbed":
        from postdiff.testbed.model import load_pipeline

        pipe = load_pipeline()
        arguments = dict(prompt="a photo of a sneaker", num_images_per_prompt=8, guidance_scale=3.0)
    elif workload == "testbed-flow":
        pipe = _flow_testbed()
        arguments = dict(prompt="a photo of a sneaker", negative_prompt="", num_images_per_prompt=8, guidance_scale=3.0)
    else:
        pipe = _random_sd15(Path(os.environ.get("TMPDIR", "/tmp")) / "postdiff-bench-tokenizer")
        size = 512 if workload == "sd15-512" else 256
        arguments = dict(prompt="a photo of an astronaut riding a horse", height=size, width=size, guidance_scale=7.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), dict(arguments, num_inference_steps=20, output_type="np")


def _flow_testbed():
    """The embedded flow model once trained and exported; before that the same architecture, freshly
    initialised (wall clock and MACs do not depend on the weights)."""
    from postdiff.testbed.flow_model import FLOW_WEIGHTS_DIR, build_flow_pipeline, load_flow_pipeline

    if (FLOW_WEIGHTS_DIR / "model_index.json").exists():
        return load_flow_pipeline()
    return build_flow_pipeline(Path(os.environ.get("TMPDIR", "/tmp")) / "postdiff-bench-flow-tokenizer")


def _random_sd15(tokenizer_dir: Path):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from postdiff.models import load_model_spec
    from postdiff.testbed.text import write_tokenizer_files

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tokenizer_dir, max_length=77))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    unet = UNet2DConditionModel(**load_model_spec("sd15-512").denoiser.config)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def worker(workload: str, config_name: str, repeats: int, device: str) -> dict:
    """One configuration in this process: warm-up, timed calls, peak memory, MACs of its plan (measured on one
    call for an external method)."""
    import postdiff
    from postdiff.accounting import plan_costs, total
    from postdiff.evaluation.baselines import measured_denoiser_macs
    from postdiff.models import spec_from_pipeline

    from postdiff.quantization import denoiser_name, quantize_denoiser, weight_bytes

    pipe, arguments = build_pipeline(workload, device)
    family = postdiff.api.preset_family(pipe)
    spec = spec_from_pipeline(pipe)
    config_name, compiled = _compiled_suffix(config_name)
    config_name, quantization = _quantized_suffix(config_name)
    if quantization:  # before PostDiff or an external method is applied, as a loader would have done it
        quantize_denoiser(pipe, quantization)
    config = _config(config_name, family)
    with postdiff.api.applied(pipe, config or postdiff.PostDiffConfig()):
        plan = postdiff.plan_call(pipe, **arguments)
        macs = total(plan_costs(spec.denoiser, plan))
    with contextlib.ExitStack() as applied:
        before_call = _apply(applied, pipe, config_name, config, arguments)
        if config_name.startswith(EXTERNAL):  # not planned by postdiff: its MACs are measured on one call
            macs = measured_denoiser_macs(pipe, **{**arguments, "num_images_per_prompt": 1})
        if compiled:
            eager_images = _images(pipe, arguments, before_call)
            compile_denoiser(pipe, compiled)
        row = _timed(workload, config_name, config, pipe, arguments, repeats, device, before_call,
                     macs, call_macs(spec, plan, macs, arguments))
        row["weight_bytes"] = weight_bytes(getattr(pipe, denoiser_name(pipe)))
        if quantization:
            row.update(config=f"{config_name}+{quantization}", describe=f"{row['describe']}, {quantization}")
        if compiled:
            difference = abs(_images(pipe, arguments, before_call) - eager_images).max()
            row.update(config=row["config"] + next(k for k, v in COMPILED.items() if v == compiled),
                       describe=f"{row['describe']}, torch.compile ({compiled})", max_abs_diff_vs_eager=float(difference))
        return row


def _images(pipe, arguments: dict, before_call):
    """The call's images (numpy, in [0, 1]) from seed 0."""
    import torch

    before_call(0)
    return pipe(**arguments, generator=torch.Generator(device="cpu").manual_seed(0)).images


def _compiled_suffix(config_name: str) -> tuple[str, str | None]:
    for suffix, how in COMPILED.items():
        if config_name.endswith(suffix):
            return config_name[: -len(suffix)], how
    return config_name, None


def _quantized_suffix(config_name: str) -> tuple[str, str]:
    for suffix in QUANTIZED:
        if config_name.endswith(suffix):
            return config_name[: -len(suffix)], suffix[1:]
    return config_name, ""


def compile_denoiser(pipe, how: str) -> None:
    """The pipeline's denoiser compiled whole, or its repeated blocks (after `postdiff.apply`, which hooks
    the modules it traces)."""
    import torch

    attribute = "unet" if hasattr(pipe, "unet") else "transformer"
    model = getattr(pipe, attribute)
    if how == "full":
        setattr(pipe, attribute, torch.compile(model))
    elif getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks()
    else:  # SD3 and PixArt name no repeated blocks in diffusers 0.42: their transformer blocks
        for block in model.transformer_blocks:
            block.compile()


def _apply(stack: contextlib.ExitStack, pipe, config_name: str, config, arguments: dict):
    """PostDiff's config, an external method, or nothing (plain diffusers); returns the per-call reset."""
    import postdiff
    from postdiff.evaluation.baselines import ExternalMethod

    if config_name.startswith(EXTERNAL):
        method = ExternalMethod.parse(config_name[len(EXTERNAL):])
        return stack.enter_context(method.applied(pipe, arguments["num_inference_steps"], lambda: _calibration(pipe, arguments)))
    if config is not None:
        stack.enter_context(postdiff.api.applied(pipe, config))
    return lambda seed: None


def _calibration(pipe, arguments: dict) -> None:
    """The call an external method calibrates on (MagCache off FLUX): the timed call's prompt, steps and guidance
    from seed 0, one image, undecoded."""
    import torch

    pipe(**{**arguments, "num_images_per_prompt": 1, "output_type": "latent"}, generator=torch.Generator(device="cpu").manual_seed(0))


def _timed(workload, config_name, config, pipe, arguments, repeats, device, before_call, macs, whole_call_macs) -> dict:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for index in range(repeats + 1):
        before_call(0)
        _sync(device)
        started = time.perf_counter()
        pipe(**arguments, generator=torch.Generator(device="cpu").manual_seed(0))
        _sync(device)
        seconds.append(time.perf_counter() - started)
    first, seconds = seconds[0], seconds[1:]  # the first call is a warm-up (and compiles, where compiled)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    describe = config.describe() if config else config_name[len(EXTERNAL):] if config_name.startswith(EXTERNAL) else "plain diffusers"
    return {"workload": workload, "config": config_name, "describe": describe,
            "seconds": statistics.median(seconds), "all_seconds": seconds, "first_seconds": first, "peak_bytes": peak,
            "rss_before_calls_bytes": baseline_rss * 1024, "macs": macs, "call_macs": whole_call_macs}


def call_macs(spec, plan, denoiser_macs_per_image: float, arguments: dict) -> float:
    """MACs of the whole timed call: the denoiser for every image, the text encoder(s) once, the VAE decode of
    every image at the plan's final latent size (the wall clock covers all of it)."""
    images = arguments.get("num_images_per_prompt", 1)
    components = spec.component_costs(with_vae=spec.vae is not None, with_text=bool(spec.text_encoders),
                                      latent_hw=plan.steps[-1].latent_hw)
    per_image = components.pop("vae decoder", (0.0, 0.0))[0]
    return images * (denoiser_macs_per_image + per_image) + sum(cost[0] for cost in components.values())


def _config(name: str, family: str):
    from postdiff import PostDiffConfig

    value = CONFIGS.get(name)
    if value is None:
        return None
    return PostDiffConfig.preset(value, family=family) if isinstance(value, str) else PostDiffConfig(**value)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_all(workloads: list[str], configs: list[str], repeats: int, device: str, out: Path, rounds: int = 1) -> list[dict]:
    rows = []
    for workload in workloads:
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for round_index in range(rounds):
            for config_name in configs if round_index % 2 == 0 else configs[::-1]:
                command = [sys.executable, __file__, "--worker", workload, config_name, "--repeats", str(repeats), "--device", device]
                with _worker_environment(config_name) as environment:
                    result = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
                runs[config_name].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"{workload:>9} {config_name:>12} round {round_index}: {runs[config_name][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
        rows += [merge_rounds(runs[name]) for name in configs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
    (out / "benchmark.md").write_text(markdown(rows, device))
    return rows


@contextlib.contextmanager
def _worker_environment(config_name: str):
    """A compiled configuration compiles cold: inductor's on-disk caches in a fresh folder of its own (removed
    afterwards), so its first call does not reuse kernels an earlier row compiled."""
    environment = dict(os.environ)
    if not _compiled_suffix(config_name)[1]:
        yield environment
        return
    with tempfile.TemporaryDirectory(prefix="postdiff-bench-inductor-") as cache:
        yield {**environment, "TORCHINDUCTOR_CACHE_DIR": cache}


def merge_rounds(runs: list[dict]) -> dict:
    """One row per configuration: median over every timed call of every round, the highest peak memory."""
    merged = dict(runs[0])
    merged["all_seconds"] = [seconds for run in runs for seconds in run["all_seconds"]]
    merged["seconds"] = statistics.median(merged["all_seconds"])
    merged["peak_bytes"] = max(run["peak_bytes"] for run in runs)
    merged["rounds"] = len(runs)
    return merged


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"device: {device}", "", "| workload | config | median s | fastest s | first call s | speedup (median) | "
             "speedup (fastest) | MACs ratio, denoiser | MACs ratio, whole call | speedup / whole-call ratio | "
             "peak memory vs diffusers | denoiser weights MB | max abs difference to eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["config"] == "diffusers")
        speedup = base["seconds"] / row["seconds"]
        fastest = min(base["all_seconds"]) / min(row["all_seconds"])
        call_ratio = base["call_macs"] / row["call_macs"]
        first = f"{row['first_seconds']:.2f}" if "first_seconds" in row else "-"
        difference = f"{row['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in row else "-"
        weights = f"{row['weight_bytes'] / 2**20:.2f}" if "weight_bytes" in row else "-"
        lines.append(f"| {row['workload']} | {row['config']} ({row['describe']}) | {row['seconds']:.2f} | "
                     f"{min(row['all_seconds']):.2f} | {first} | {speedup:.2f}x | {fastest:.2f}x | "
                     f"{base['macs'] / row['macs']:.2f}x | {call_ratio:.2f}x | {speedup / call_ratio:.2f} | "
                     f"{row['peak_bytes'] / base['peak_bytes'] - 1:+.1%} | {weights} | {difference} |")
    return "\n".join(lines) + "\n"


def default_configs(workloads: list[str]) -> list[str]:
    """All configurations; presets only where every workload's family has them (none yet for testbed-flow)."""
    has_presets = "testbed-flow" not in workloads
    return [name for name, value in CONFIGS.items() if has_presets or not isinstance(value, str)]


def main() -> None:
    from postdiff.evaluation.baselines import ExternalMethod

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable; default: testbed")
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="repeatable; default: all")
    parser.add_argument("--external", action="append", default=[], help="repeatable: an external method beside "
                        "them, e.g. first-block-cache:threshold=0.05, taylorseer:interval=3, tomesd:ratio=0.5")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="runs of the whole configuration list, alternating order")
    parser.add_argument("--compile", nargs="?", const="full", choices=sorted(set(COMPILED.values())),
                        help="add a compiled twin of every configuration: the denoiser whole (full, the default) or "
                        "its repeated blocks (regional)")
    parser.add_argument("--quantize", action="append", default=[], choices=[s[1:] for s in QUANTIZED],
                        help="repeatable: add a twin of every configuration on the denoiser quantized so (torchao)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown of this benchmark.json (into --out)")
    args = parser.parse_args()
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.md").write_text(markdown(json.loads(args.render.read_text()), args.device))
        print((args.out / "benchmark.md").read_text())
        return
    if args.worker:
        print(json.dumps(worker(*args.worker, args.repeats, args.device)))
        return
    configs = args.config or default_configs(args.workload or ["testbed"])
    configs += [EXTERNAL + ExternalMethod.parse(spec).spec for spec in args.external]  # refused here if malformed
    configs += [f"{name}+{quantization}" for quantization in args.quantize for name in dict.fromkeys(["diffusers", *configs])]
    if args.compile:
        suffix = next(k for k, v in COMPILED.items() if v == args.compile)
        configs = [variant for name in configs for variant in (name, name + suffix)]
    if "diffusers" not in configs:
        configs.insert(0, "diffusers")
    run_all(args.workload or ["testbed"], configs, args.repeats, args.device, args.out, args.rounds)
    print((args.out / "benchmark.md").read_text())


if __name__ == "__main__":
    main()
