"""Benchmark of `vitae prep`: conversion and upload speed, each beside a baseline from the same run.

- conversion: images/s of data_prep (list, split, decode-check every image, write shards, manifest)
  on generated JPEGs, beside `tar -cf` of the same files (a copy that checks nothing);
- upload: MB/s of data_prep's publishing (boto3 managed transfers: multipart, parallel) of those
  shards to a local moto S3 server, beside a loop of single-part `put_object` calls;
- `--ray`: conversion images/s of `vitae prep --ray` with 1, 2 and 4 tasks at a time, beside the
  single-process conversion (best of `--rounds` alternating rounds, each after a warm-up run that
  starts Ray's workers), on a local Ray instance with 4 logical CPUs (or RAY_ADDRESS's cluster).

Run from the repository root: `python -m benchmarks.prep_speed [--images 3000] [--ray]`. The last
line is the headline ratio.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.environment import generate_jpegs, s3_server
from benchmarks.report import best_of_rounds, print_table, timed
from infra.s3 import make_client
from data_prep.prep import PrepOptions, prepare
from data_prep.locations import S3Prefix, StagedFile, sha256_file


def measure_conversion(images: Path, work: Path, count: int, shard_mb: int) -> tuple[float, float, Path]:
    """(data_prep images/s, tar images/s, the dataset directory)."""
    tar_s, _ = timed(lambda: subprocess.run(["tar", "-cf", str(work / "baseline.tar"), "-C", str(images), "."],
                                            check=True))
    dataset = work / "dataset"
    options = PrepOptions(shard_max_bytes=shard_mb * 2**20)
    prep_s, _ = timed(lambda: prepare(str(images), str(dataset), options, progress=False))
    return count / prep_s, count / tar_s, dataset


def measure_upload(shards: list[Path], bucket: str, rounds: int = 3) -> tuple[float, float, int]:
    """(data_prep MB/s, put_object loop MB/s, bytes): best of `rounds` alternating rounds, each
    uploading to an emptied bucket (moto keeps objects in memory)."""
    total = sum(p.stat().st_size for p in shards)
    staged = [StagedFile(p, p.name, p.stat().st_size, sha256_file(p)) for p in shards]
    client = make_client()

    def put_object_loop() -> None:
        for path in shards:
            with open(path, "rb") as body:
                client.put_object(Bucket=bucket, Key=f"baseline/{path.name}", Body=body)

    def publish() -> None:
        S3Prefix(f"s3://{bucket}/ours").publish(staged, lambda n: None)

    def emptied(upload) -> float:
        seconds, _ = timed(upload)
        for listed in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            client.delete_object(Bucket=bucket, Key=listed["Key"])
        return seconds

    fastest = best_of_rounds({"publish": lambda: emptied(publish), "put_object": lambda: emptied(put_object_loop)},
                             rounds, score=lambda seconds: -seconds)
    return total / 1e6 / fastest["publish"], total / 1e6 / fastest["put_object"], total


def measure_ray(images: Path, work: Path, count: int, shard_mb: int, tasks: tuple[int, ...],
                rounds: int) -> tuple[dict[str, float], bool]:
    """(conversion images/s by path: "single" and "ray N" for N in `tasks`; whether every run wrote the
    single-process manifest). Conversion only: listing and publishing are the same code in both."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(tasks), include_dashboard=False)  # RAY_ADDRESS set: that cluster instead
    options = {"single": PrepOptions(shard_max_bytes=shard_mb * 2**20)}
    options |= {f"ray {n}": PrepOptions(shard_max_bytes=shard_mb * 2**20, ray=True, ray_tasks=n) for n in tasks}
    manifests = []

    def convert(name: str) -> float:
        dest = work / name.replace(" ", "-")
        summary = prepare(str(images), str(dest), options[name], progress=False)
        manifests.append((dest / "manifest.parquet").read_bytes())
        shutil.rmtree(dest)
        return count / summary.convert_s

    convert(f"ray {max(tasks)}")  # warm-up: starts the workers and their imports
    fastest = best_of_rounds({name: (lambda name=name: convert(name)) for name in options}, rounds,
                             score=lambda images_per_s: images_per_s)
    return fastest, len(set(manifests)) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256, help="image side in pixels")
    parser.add_argument("--shard-mb", type=int, default=32, help="shard size cap in MiB")
    parser.add_argument("--ray", action="store_true", help="only the single-process vs --ray conversion")
    parser.add_argument("--rounds", type=int, default=2, help="with --ray: alternating rounds, best kept")
    args = parser.parse_args()
    if args.ray:
        return main_ray(args)

    import webdataset  # noqa: F401  (import cost, mostly torch, kept out of the timings)

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        work = Path(tmp)
        generate_jpegs(work / "images", args.images, args.side)
        images_per_s, tar_images_per_s, dataset = measure_conversion(
            work / "images", work, args.images, args.shard_mb)
        shards = sorted(dataset.glob("*.tar"))

        with s3_server("prep-bench"):
            upload_mb_s, put_mb_s, total = measure_upload(shards, "prep-bench")

    rows = [
        ("measure", "data_prep", "baseline", "ratio"),
        (f"convert {args.images} JPEGs {args.side}px", f"{images_per_s:,.0f} img/s",
         f"{tar_images_per_s:,.0f} img/s (tar -cf)", f"{images_per_s / tar_images_per_s:.2f}x"),
        (f"upload {len(shards)} shards, {total / 1e6:.0f} MB", f"{upload_mb_s:,.1f} MB/s",
         f"{put_mb_s:,.1f} MB/s (put_object loop)", f"{upload_mb_s / put_mb_s:.2f}x"),
    ]
    print_table(f"vitae prep on {args.images} generated JPEGs, local moto S3 server", rows,
                f"data_prep upload throughput = {upload_mb_s / put_mb_s:.2f}x a single-part put_object loop")


def main_ray(args: argparse.Namespace) -> None:
    import webdataset  # noqa: F401  (import cost, mostly torch, kept out of the timings)

    tasks = (1, 2, 4)
    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        work = Path(tmp)
        generate_jpegs(work / "images", args.images, args.side)
        fastest, identical = measure_ray(work / "images", work, args.images, args.shard_mb, tasks, args.rounds)
    single = fastest["single"]
    rows = [("conversion", "images/s", "ratio to single-process")]
    rows += [(name, f"{value:,.0f}", f"{value / single:.2f}x") for name, value in fastest.items()]
    best = max(tasks, key=lambda n: fastest[f"ray {n}"])
    print_table(f"vitae prep conversion of {args.images} generated JPEGs {args.side}px: single process vs --ray "
                f"(best of {args.rounds} rounds)", rows,
                f"vitae prep --ray with {best} tasks = {fastest[f'ray {best}'] / single:.2f}x the single-process "
                f"conversion", notes=[f"manifests identical across all runs: {identical}"])


if __name__ == "__main__":
    main()
