"""Benchmark of `vitae prep`: conversion and upload speed, each beside a baseline from the same run.

- conversion: images/s of data_prep (list, split, decode-check every image, write shards, manifest)
  on generated JPEGs, beside `tar -cf` of the same files (a copy that checks nothing);
- upload: MB/s of data_prep's publishing (boto3 managed transfers: multipart, parallel) of those
  shards to a local moto S3 server, beside a loop of single-part `put_object` calls.

Run from the repository root: `python -m benchmarks.prep_speed [--images 3000]` (or, with the
project pip-installed, `python benchmarks/prep_speed.py`). The last line is the headline ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.s3_server import start_s3_server
from data_prep.object_store import make_client
from data_prep.prep import PrepOptions, prepare
from data_prep.storage import S3Prefix, StagedFile, sha256_file


def generate_jpegs(root: Path, count: int, side: int, classes: int = 10) -> None:
    """Smooth random colour fields (JPEG-friendly, like photos), `count` over `classes` folders."""
    for index in range(count):
        folder = root / f"class_{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(index).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((side, side), Image.Resampling.BILINEAR)
        image.save(folder / f"img_{index:06d}.jpg", quality=90)


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


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

    ours, baseline = zip(*[(emptied(publish), emptied(put_object_loop)) for _ in range(rounds)])
    return total / 1e6 / min(ours), total / 1e6 / min(baseline), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256, help="image side in pixels")
    parser.add_argument("--shard-mb", type=int, default=32, help="shard size cap in MiB")
    args = parser.parse_args()

    import webdataset  # noqa: F401  (import cost, mostly torch, kept out of the timings)

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        work = Path(tmp)
        generate_jpegs(work / "images", args.images, args.side)
        images_per_s, tar_images_per_s, dataset = measure_conversion(
            work / "images", work, args.images, args.shard_mb)
        shards = sorted(dataset.glob("*.tar"))

        server = start_s3_server()
        os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        try:
            make_client().create_bucket(Bucket="prep-bench")
            upload_mb_s, put_mb_s, total = measure_upload(shards, "prep-bench")
        finally:
            server.stop()

    rows = [
        ("measure", "data_prep", "baseline", "ratio"),
        (f"convert {args.images} JPEGs {args.side}px", f"{images_per_s:,.0f} img/s",
         f"{tar_images_per_s:,.0f} img/s (tar -cf)", f"{images_per_s / tar_images_per_s:.2f}x"),
        (f"upload {len(shards)} shards, {total / 1e6:.0f} MB", f"{upload_mb_s:,.1f} MB/s",
         f"{put_mb_s:,.1f} MB/s (put_object loop)", f"{upload_mb_s / put_mb_s:.2f}x"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"headline: data_prep upload throughput = {upload_mb_s / put_mb_s:.2f}x a single-part put_object loop")


if __name__ == "__main__":
    main()
