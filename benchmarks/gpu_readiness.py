"""GPU readiness: training images/s and model FLOPs utilisation (MFU) per GPU of `vitae_s` and
`vitaev2_s` at 224 px in bf16 autocast, without and with `torch.compile`.

    python -m benchmarks.gpu_readiness [--batch-size 128] [--channels-last] [--peak-tflops 989]

Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse

import torch

from benchmarks.model_speed import NUM_CLASSES, measure
from benchmarks.report import print_table

MODELS = ("vitae_s", "vitaev2_s")
TRAINING_FLOPS_PER_FORWARD = 3  # forward + backward (about 2x the forward)
# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets, without sparsity), by a part of
# torch.cuda.get_device_name(); the first match wins, so longer names come before their prefixes.
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU of this name, None if it is not in the table."""
    return next((tflops * 1e12 for part, tflops in PEAK_BF16_TFLOPS if part in device_name), None)


def training_flops_per_image(model_name: str, img_size: int) -> float:
    """3x the forward FLOPs of one image, as `vitae.flops` counts them (2 per multiply-add)."""
    from vitae.flops import model_stats

    forward = model_stats(model_name, img_size=img_size, num_classes=NUM_CLASSES)["gmacs"] * 2e9
    return TRAINING_FLOPS_PER_FORWARD * forward


def measure_mfu(model_name: str, img_size: int, batch_size: int, steps: int, warmup: int, device: str,
                compile: bool, channels_last: bool, peak: float | None) -> dict:
    """Training images/s of `model_name` in bf16 on `device`, the FLOP/s they amount to and, given the
    peak FLOP/s, the MFU."""
    result = measure(model_name, img_size, batch_size, steps, warmup, fused=True, device=device, bf16=True,
                     compile=compile, channels_last=channels_last)
    flops = training_flops_per_image(model_name, img_size)
    achieved = result["images_per_s"] * flops
    return {**result, "train_flops_per_image": flops, "achieved_flops": achieved,
            "mfu": achieved / peak if peak else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_readiness: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure")
        return 0

    name = torch.cuda.get_device_name(args.device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    results = {}
    for model_name in MODELS:
        for compiled in (False, True):
            results[model_name, compiled] = measure_mfu(model_name, args.img_size, args.batch_size, args.steps,
                                                        args.warmup, args.device, compiled, args.channels_last, peak)
            torch.cuda.empty_cache()
    rows = [("model", "torch.compile", "images/s", "step ms", "TFLOP/s", "MFU", "peak MiB")]
    rows += [(model_name, "yes" if compiled else "no", f"{r['images_per_s']:,.0f}", f"{r['step_ms']:.1f}",
              f"{r['achieved_flops'] / 1e12:.1f}", "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
              f"{r['peak_mib']:,.0f}") for (model_name, compiled), r in results.items()]
    best_model, best_compiled = max(results, key=lambda key: results[key]["achieved_flops"])
    best = results[best_model, best_compiled]
    compile_gain = results[best_model, True]["images_per_s"] / results[best_model, False]["images_per_s"]
    peak_text = f"peak {peak / 1e12:g} TFLOP/s dense bf16" if peak else "peak unknown: pass --peak-tflops for MFU"
    print_table(f"{name} ({peak_text}), {args.img_size} px, batch {args.batch_size} per GPU, bf16 autocast"
                f"{', channels_last' if args.channels_last else ''}; {args.steps} timed steps after {args.warmup}; "
                f"training FLOPs = 3x forward", rows,
                f"best MFU per GPU: {best_model} {'with' if best_compiled else 'without'} torch.compile, "
                + ("n/a (unknown peak)" if best["mfu"] is None else f"{best['mfu']:.1%}")
                + f"; torch.compile = {compile_gain:.2f}x eager images/s for {best_model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
