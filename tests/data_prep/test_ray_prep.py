"""`vitae prep --ray` against the session's Ray cluster, in this process and as a Ray job: the same
bytes as the single-process path (shards, manifest, rejects, dataset.json), bad images reported as
rejects; and a Parquet source converted in bounded memory (peak RSS of the `vitae prep` process)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_prep import ray_conversion
from pipelines.cli import main
from tests.data_prep.test_prep import BAD_FOLDER, image_bytes, write_files
from tests.support.train_helpers import ray_job

REPO_ROOT = Path(__file__).resolve().parents[2]


def varied_folder(root: Path) -> Path:
    """60 images of three classes and several sizes and formats, plus unusable files."""
    files = {f"c{i % 3}/img{i:02d}.{('png', 'jpg', 'webp')[i % 3]}":
             image_bytes(i, ("png", "jpg", "webp")[i % 3], (8 + i % 11, 6 + i % 7)) for i in range(60)}
    classes = {"cat": "c0", "dog": "c1", "sea fish.v2": "c2"}
    bad = {classes[name.split("/")[0]] + "/" + name.split("/")[1]: data for name, data in BAD_FOLDER.items()}
    write_files(root, files | bad)
    return root


def dataset_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_ray_prep_writes_the_single_process_bytes(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ray_conversion, "ENCODE_CHUNK", 5)  # shards spanning several encode tasks
    source = varied_folder(tmp_path / "images")
    limits = ["--shard-max-samples", "7", "--shard-max-mb", "0.002"]  # shards cut by count and by bytes
    assert main(["prep", str(source), "--out", str(tmp_path / "single"), *limits]) == 0
    assert main(["prep", str(source), "--out", str(tmp_path / "ray"), *limits, "--ray", "--ray-tasks", "2"]) == 0
    out = capsys.readouterr().out

    single, on_ray = dataset_files(tmp_path / "single"), dataset_files(tmp_path / "ray")
    assert single == on_ray
    shards = [name for name in single if name.endswith(".tar")]
    counts = json.loads(single["dataset.json"])["counts"]
    assert len(shards) > sum(-(-split["samples"] // 7) for split in counts.values()), "no shard cut by bytes"
    rejected = {json.loads(line)["source_id"] for line in single["rejects.jsonl"].decode().splitlines()}
    assert rejected == {"c0/truncated.jpg", "c1/text.png", "c2/notes.txt"}
    assert "images:    60" in out and "rejected:  3" in out


def test_ray_prep_runs_as_a_ray_job(ray_cluster, tmp_path):
    """`ray job submit -- python -m pipelines.cli prep ... --ray`: the job's driver converts on the cluster."""
    dest, options = tmp_path / "job", ["--digits-size", "8", "--shard-max-samples", "500"]
    done = ray_job("submit", "--", sys.executable, "-m", "pipelines.cli", "prep", "digits", "--out", str(dest),
                   "--ray", *options, cwd=REPO_ROOT)
    assert "images:    1797" in done.stdout, done.stdout[-2000:]
    assert main(["prep", "digits", "--out", str(tmp_path / "single"), *options]) == 0
    assert dataset_files(dest) == dataset_files(tmp_path / "single")


def test_ray_tasks_are_retried():
    for task in (ray_conversion.encode_chunk, ray_conversion.write_shard_task):
        assert task._default_options["max_retries"] >= 1 and task._default_options["retry_exceptions"] is True


def peak_rss_mib(*argv: str) -> float:
    """Peak resident memory of `vitae prep ARGV` run as a child process, in MiB (Linux: ru_maxrss in KiB)."""
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", measure, sys.executable, "-m", "pipelines.cli", "prep", *argv]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1024


def write_parquet(path: Path, rows: int, image: bytes) -> Path:
    """`rows` copies of `image`, stored plainly (no dictionary, no compression): the file is as large as its rows."""
    table = pa.table({"image": [image] * rows, "label": [i % 2 for i in range(rows)]})
    pq.write_table(table, path, row_group_size=64, use_dictionary=False, compression="none")
    return path


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_source_converts_in_bounded_memory(tmp_path):
    small = write_parquet(tmp_path / "small.parquet", 8, image_bytes(0))
    large = write_parquet(tmp_path / "large.parquet", 2000, noise_png(160))
    size_mib = large.stat().st_size / 2**20

    baseline = peak_rss_mib(str(small), "--out", str(tmp_path / "small-out"))
    peak = peak_rss_mib(str(large), "--out", str(tmp_path / "large-out"))
    print(f"parquet {size_mib:.0f} MiB: peak RSS {peak:.0f} MiB, {baseline:.0f} MiB for a tiny file")
    assert peak - baseline < size_mib / 3, (peak, baseline, size_mib)  # read whole: more than size_mib
