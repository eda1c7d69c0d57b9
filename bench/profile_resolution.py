"""Where mixed resolution's time goes: the denoiser's forward at full and at low resolution, timed alone.

    python bench/profile_resolution.py --workload testbed --beta 0.5 [--threads 2] [--device cuda]

For each latent size it prints the median forward time (batch = 2 x images, as under CFG), the forward's
MACs (the paper's convention) and the throughput. If the low-resolution forward runs at a lower throughput
than the full one, a mixed-resolution run cannot reach its MACs ratio in wall time: the last line gives the
speedup these forward times predict for the switch fraction, beside the MACs ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmark import build_pipeline
from postdiff.accounting import count_forward
from postdiff.denoisers import DENOISER_KINDS, meta_denoiser
from postdiff.models import spec_from_pipeline


def forward_seconds(denoiser, inputs: dict, repeats: int, device: str) -> float:
    timings = []
    with torch.no_grad():
        for index in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            denoiser(**inputs, return_dict=False)
            if device == "cuda":
                torch.cuda.synchronize()
            if index:  # the first call is a warm-up
                timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def real_inputs(meta_inputs: dict, device: str) -> dict:
    """The meta-device inputs the counter uses, as real tensors of the same shapes on `device`."""
    def materialize(value):
        if isinstance(value, dict):
            return {key: materialize(item) for key, item in value.items()}
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return torch.randn(value.shape, device=device)
            return torch.full(value.shape, 500, dtype=value.dtype, device=device)
        return value

    return materialize(meta_inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="testbed", choices=("testbed", "sd15-256", "sd15-512"))
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--switch", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, arguments = build_pipeline(args.workload, args.device)
    spec = spec_from_pipeline(pipe)
    kind, meta = DENOISER_KINDS[spec.denoiser.kind], meta_denoiser(spec.denoiser)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    full_hw = (arguments["height"] // pipe.vae_scale_factor,) * 2 if "height" in arguments else spec.latent_hw
    low_hw = tuple(round(side * args.beta) for side in full_hw)
    rows = {}
    for hw in (full_hw, low_hw):
        meta_inputs = kind.inputs(spec.denoiser, 2 * args.images, hw)
        macs = count_forward(meta, meta_inputs)[0]
        seconds = forward_seconds(denoiser, real_inputs(meta_inputs, args.device), args.repeats, args.device)
        rows[hw] = (seconds, macs)
        print(f"{hw[0]}x{hw[1]}: {seconds * 1e3:8.1f} ms  {macs / 1e9:8.2f} GMACs  {macs / seconds / 1e9:6.1f} GMAC/s")
    (full_s, full_macs), (low_s, low_macs) = rows[full_hw], rows[low_hw]
    s = args.switch
    print(f"switch {s}: predicted speedup {full_s / (s * low_s + (1 - s) * full_s):.2f}x, "
          f"MACs ratio {full_macs / (s * low_macs + (1 - s) * full_macs):.2f}x, "
          f"low/full time {low_s / full_s:.3f} vs MACs {low_macs / full_macs:.3f}")


if __name__ == "__main__":
    main()
