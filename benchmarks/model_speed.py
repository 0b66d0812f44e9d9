"""Model benchmark: training-step (forward + backward) images/s and peak memory of one ViTAE model,
with attention through `scaled_dot_product_attention` against the explicit softmax(QK^T)V path of
the same model, in the same run.

    python -m benchmarks.model_speed --model vitae_t --img-size 224 --batch-size 16

Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from benchmarks.report import best_of_rounds, print_table

NUM_CLASSES = 1000


def measure(model_name: str, img_size: int, batch_size: int, steps: int, warmup: int, fused: bool,
            device: str, bf16: bool, compile: bool = False, channels_last: bool = False) -> dict:
    """Training steps (forward, backward, AdamW) of `model_name` with `NUM_CLASSES` classes on a
    random batch; the `warmup` steps (where `torch.compile` compiles) are not timed."""
    import vitae

    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = vitae.create_model(model_name, img_size=img_size, num_classes=NUM_CLASSES)
    model = model.to(device=device, memory_format=memory_format)
    vitae.set_fused_attn(model, fused)
    if compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    on_cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if on_cuda:
        torch.cuda.synchronize(device)
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    elapsed = time.perf_counter() - start
    return {"images_per_s": batch_size * steps / elapsed, "step_ms": 1000 * elapsed / steps, "peak_mib": peak_mib}


def _child(queue: mp.Queue, kwargs: dict) -> None:
    queue.put(measure(**kwargs))


def measure_in_subprocess(**kwargs) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, kwargs))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vitae_t")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per path; best is kept")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    args = parser.parse_args()
    bf16 = args.bf16 or args.device.startswith("cuda")
    common = dict(model_name=args.model, img_size=args.img_size, batch_size=args.batch_size, steps=args.steps,
                  warmup=args.warmup, device=args.device, bf16=bf16)
    paths = {"softmax(QK^T)V (plain)": False, "scaled_dot_product_attention": True}
    best = best_of_rounds({label: lambda fused=fused: measure_in_subprocess(fused=fused, **common)
                           for label, fused in paths.items()}, args.repeats, score=lambda r: r["images_per_s"])
    rows = [("attention path", "images/s", "step ms", "peak MiB")]
    rows += [(label, f"{result['images_per_s']:.1f}", f"{result['step_ms']:.0f}", f"{result['peak_mib']:.0f}")
             for label, result in best.items()]
    plain, fused = best.values()
    print_table(f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {args.device}"
                f"{' bf16' if bf16 else ' fp32'}, {torch.get_num_threads()} threads, best of {args.repeats}", rows,
                f"SDPA = {fused['images_per_s'] / plain['images_per_s']:.2f}x the plain path's images/s, "
                f"peak memory {fused['peak_mib'] / plain['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
