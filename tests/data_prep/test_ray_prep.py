"""`vitae prep --ray` against the session's Ray cluster, in this process and as a Ray job: the same
bytes as the single-process path (shards, manifest, rejects, dataset.json), bad images reported as
rejects, a task whose worker is killed run again; and a Parquet source converted in bounded memory
(peak RSS of the `vitae prep` process)."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from tqdm import tqdm

from data_prep import ray_conversion
from infra.errors import UserError
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


def readers_of(path: Path) -> set[int]:
    """The processes other than this one that have `path` open."""
    found = set()
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{process.pid}/fd")
            if any(os.readlink(f"/proc/{process.pid}/fd/{fd}") == str(path) for fd in fds):
                found.add(process.pid)
        except OSError:
            continue
    return found


def open_for_writing(fifo: Path) -> int | None:
    """A write end of `fifo` once a reader waits on it (which lets the reader's open return), else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_a_task_whose_worker_dies_is_retried(ray_cluster, tmp_path, capsys):
    """An image that is a FIFO holds its encode task until the test writes it: the test kills that
    task's worker, Ray runs the task again, the test feeds the image to the new attempt, and prep
    completes with the single-process bytes."""
    source = varied_folder(tmp_path / "images")
    fifo = source / "c1" / "waiting.png"
    os.mkfifo(fifo)
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(main(["prep", str(source), "--out", str(tmp_path / "ray"),
                                                                 "--ray", "--ray-tasks", "2"])))
    worker.start()
    first = wait_for(lambda: open_for_writing(fifo), 120, "encode task reading the FIFO")
    killed = [psutil.Process(pid) for pid in wait_for(lambda: readers_of(fifo), 30, "process holding the FIFO")]
    for process in killed:
        process.send_signal(signal.SIGKILL)
    assert not psutil.wait_procs(killed, timeout=30)[1], "the killed worker is still alive"
    os.close(first)
    retried = wait_for(lambda: open_for_writing(fifo), 120, "second attempt of the task after its worker died")
    data = image_bytes(99, "png")
    os.write(retried, data)  # smaller than a pipe's buffer: written at once
    os.close(retried)
    worker.join(timeout=120)
    assert done == [0], capsys.readouterr().err[-2000:]
    fifo.unlink()
    fifo.write_bytes(data)
    assert main(["prep", str(source), "--out", str(tmp_path / "single")]) == 0
    assert dataset_files(tmp_path / "ray") == dataset_files(tmp_path / "single")


def wait_for(probe, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None and found != set():
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s:.0f} s")


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


def test_a_task_that_keeps_failing_is_one_line_naming_its_cause(ray_cluster):
    """What `vitae prep --ray` reports when a task fails on every attempt (a shard directory that a
    node cannot write, say): one line with the task's own error, not Ray's traceback."""
    ray_conversion.connect()

    @ray.remote(max_retries=0)
    def failing():
        raise OSError(28, "No space left on device")

    tasks = ray_conversion._Tasks(limit=2, bar=tqdm(disable=True))
    ref = failing.remote()
    tasks.add(ref)
    with pytest.raises(UserError) as error:
        tasks.finish([ref])
    message = str(error.value)
    assert message == ("a conversion task failed, run 4 times at most: OSError: [Errno 28] No space left on device"), message
