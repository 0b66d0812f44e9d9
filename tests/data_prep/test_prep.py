"""data_prep end to end: every source kind, both destinations, idempotence, interruption, bad input,
odd names, verification, and shards read back with plain webdataset — against the real moto server."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from cluster.net import free_port
from infra import object_store
from data_prep.dataset import PreparedDataset, decode_sample
from infra.errors import UserError
from infra.s3 import make_client
from pipelines.cli import main
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY

REPO_ROOT = Path(__file__).resolve().parents[2]
PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}


# --- helpers ---------------------------------------------------------------------------------------


def image_bytes(seed: int, extension: str = "png", size: tuple[int, int] = (12, 10)) -> bytes:
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    image.putpixel((seed % size[0], 0), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[extension.lower()])
    return buffer.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert TEST_SECRET_KEY not in out + err and TEST_ACCESS_KEY not in out + err
    return code, out, err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vitae: error: ") and expected in last, last


def read_back(url: str, split: str) -> list[dict]:
    """Samples of a split, read with plain webdataset (local paths or s3:// via our opener)."""
    urls = PreparedDataset.open(url).shard_urls(split)
    return list(wds.WebDataset(urls, shardshuffle=False))


def source_of(sample: dict) -> str:
    return json.loads(sample["json"])["source"]


def stored_image(sample: dict) -> bytes:
    return next(sample[e] for e in ("jpg", "png", "webp", "bmp") if e in sample)


@pytest.fixture(autouse=True)
def fresh_s3_clients(monkeypatch):
    """Each test builds its S3 clients from its own environment (the shared cache is per test)."""
    monkeypatch.setattr(object_store, "_CLIENTS", {})


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"prep-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_writes(monkeypatch) -> Counter:
    """Counts object-writing requests (PutObject, UploadPart) made by data_prep's clients, by key."""
    writes: Counter = Counter()
    lock = threading.Lock()
    real_make_client = object_store.make_client

    def count(params, **kwargs):
        with lock:
            writes[params["Key"].rsplit("/", 1)[-1]] += 1

    def counting_client(config=None):
        client = real_make_client(config)
        for operation in ("PutObject", "UploadPart"):
            client.meta.events.register(f"before-parameter-build.s3.{operation}", count)
        return client

    monkeypatch.setattr(object_store, "make_client", counting_client)
    return writes


# --- sources, destinations, read-back -------------------------------------------------------------

GOOD_FOLDER = {
    # odd names: dots, spaces, unicode, webdataset-like suffixes, upper-case and lying extensions,
    # a class name with a dot and a space
    "cat/a.b c.JPG": image_bytes(1, "jpg"),
    "cat/x..y.png": image_bytes(2, "png"),
    "cat/evil.cls.jpg": image_bytes(3, "jpg"),
    "cat/img.json.webp": image_bytes(4, "webp"),
    "cat/png-inside.jpg": image_bytes(5, "png"),
    "cat/sub dir/nested #1.bmp": image_bytes(6, "bmp"),
    "cat/a.b c/x.JPG": image_bytes(19, "jpg"),
    "dog/ünï cödé (1).Jpeg": image_bytes(7, "jpeg"),
    "dog/d2.png": image_bytes(8, "png"),
    "dog/d3.webp": image_bytes(9, "webp"),
    "dog/d4.bmp": image_bytes(10, "bmp"),
    "dog/d5.jpg": image_bytes(11, "jpg"),
    "dog/d6.png": image_bytes(12, "png"),
    "sea fish.v2/f1.png": image_bytes(13, "png"),
    "sea fish.v2/f2.png": image_bytes(14, "png"),
    "sea fish.v2/f3.jpg": image_bytes(15, "jpg"),
    "sea fish.v2/f4.jpg": image_bytes(16, "jpg"),
    "sea fish.v2/f5.webp": image_bytes(17, "webp"),
    "sea fish.v2/f6.bmp": image_bytes(18, "bmp"),
}
BAD_FOLDER = {
    "cat/truncated.jpg": image_bytes(20, "jpg", (64, 64))[:300],
    "dog/text.png": b"this is not an image",
    "sea fish.v2/notes.txt": b"not an image either",
}


def check_against_folder(url: str, root: Path, splits: dict[str, int]) -> None:
    """Every stored sample equals its source file and class; each good file appears exactly once."""
    class_names = PreparedDataset.open(url).class_names
    seen = []
    for split, expected_count in splits.items():
        samples = read_back(url, split)
        assert len(samples) == expected_count
        for sample in samples:
            source = source_of(sample)
            assert stored_image(sample) == (root / source).read_bytes()
            assert class_names[int(sample["cls"])] == source.split("/")[0]
            image, label = decode_sample(sample)
            assert image.mode == "RGB" and label == int(sample["cls"])
            seen.append(source)
    assert len(seen) == len(set(seen)) == sum(splits.values())


def test_image_folder_to_local_dir_with_bad_files_and_odd_names(tmp_path, capsys):
    root = tmp_path / "images"
    write_files(root, GOOD_FOLDER | BAD_FOLDER)
    (root / "dog" / "gone.jpg").symlink_to(root / "missing.jpg")
    dest = tmp_path / "dataset"

    code, out, _ = run(capsys, "prep", str(root), "--out", str(dest), "--val-fraction", "0.17",
                       "--test-fraction", "0.17", "--shard-max-samples", "4")
    assert code == 0, out
    assert "images/s" in out and "MB/s" in out and "rejected:  4" in out

    info = json.loads((dest / "dataset.json").read_text())
    assert info["class_names"] == ["cat", "dog", "sea fish.v2"] and info["rejected"] == 4
    counts = {split: c["samples"] for split, c in info["counts"].items()}
    assert sum(counts.values()) == len(GOOD_FOLDER) and all(counts.values())
    rejects = {json.loads(line)["source_id"] for line in (dest / "rejects.jsonl").read_text().splitlines()}
    assert rejects == {*BAD_FOLDER, "dog/gone.jpg"}

    check_against_folder(str(dest), root, counts)
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []  # staging removed

    shards = {p.name: p.stat().st_ino for p in dest.glob("*.tar")}
    code, out, _ = run(capsys, "prep", str(root), "--out", str(dest), "--val-fraction", "0.17",
                       "--test-fraction", "0.17", "--shard-max-samples", "4")
    assert code == 0 and f"uploaded 0, already present {len(shards)}" in out
    assert {p.name: p.stat().st_ino for p in dest.glob("*.tar")} == shards  # files left in place
    code, out, _ = run(capsys, "verify", str(dest))
    assert code == 0 and out.strip().splitlines()[-1].startswith("OK:")


def test_presplit_folder_to_s3_keeps_source_splits(tmp_path, bucket, capsys):
    root = tmp_path / "presplit"
    files = {f"{split}/{cls}/{i}.png": image_bytes(i + 10 * n, "png")
             for n, split in enumerate(("train", "val", "test")) for cls in ("a", "b") for i in range(3)}
    write_files(root, files)
    url = f"s3://{bucket}/datasets/presplit"

    code, out, _ = run(capsys, "prep", str(root), "--out", url)
    assert code == 0, out
    for split in ("train", "val", "test"):
        samples = read_back(url, split)
        assert sorted(source_of(s) for s in samples) == sorted(f for f in files if f.startswith(split + "/"))
        for sample in samples:
            assert stored_image(sample) == files[source_of(sample)]
            assert ["a", "b"][int(sample["cls"])] == source_of(sample).split("/")[1]
    assert run(capsys, "verify", url)[0] == 0


def parquet_rows(count: int, start: int = 0) -> list[bytes]:
    return [image_bytes(start + i, "jpg" if i % 2 else "png") for i in range(count)]


def test_parquet_hugging_face_layout_with_file_splits(tmp_path, bucket, capsys):
    names = ["airplane", "bird", "cat"]
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    directory = tmp_path / "hf" / "data"
    directory.mkdir(parents=True)
    expected = {}
    for split, start in (("train", 0), ("test", 100)):
        images = parquet_rows(9, start)
        paths = ["a.b c/../x.JPG" if i == 0 else f"img{i}.png" for i in range(9)]
        table = pa.table({"image": [{"bytes": b, "path": p} for b, p in zip(images, paths)],
                          "label": [i % 3 for i in range(9)]}).replace_schema_metadata(metadata)
        file = f"{split}-00000-of-00001.parquet"
        pq.write_table(table, directory / file)
        expected.update({f"data/{file}#{i}": (images[i], i % 3, split) for i in range(9)})
    url = f"s3://{bucket}/hf"

    code, out, _ = run(capsys, "prep", str(tmp_path / "hf"), "--out", url)
    assert code == 0, out
    dataset = PreparedDataset.open(url)
    assert dataset.class_names == names and dataset.splits == ["test", "train"]
    for split in ("train", "test"):
        for sample in read_back(url, split):
            data, label, source_split = expected[source_of(sample)]
            assert (stored_image(sample), int(sample["cls"]), split) == (data, label, source_split)


def test_parquet_binary_images_and_string_labels(tmp_path, capsys):
    directory = tmp_path / "pq"
    directory.mkdir()
    rows = parquet_rows(12)
    species = ["zebra", "ant", "moth"] * 4
    pq.write_table(pa.table({"img": rows[:6], "species": species[:6]}), directory / "part-0.parquet")
    pq.write_table(pa.table({"img": rows[6:] + [None, b"garbage"], "species": species[6:] + ["ant", "moth"]}),
                   directory / "part-1.parquet")
    (directory / "part-2.parquet").write_bytes(b"PAR1 but not really Parquet")
    dest = tmp_path / "out"

    code, out, _ = run(capsys, "prep", str(directory), "--out", str(dest), "--image-column", "img",
                       "--label-column", "species", "--class-names", "moth,zebra,ant",
                       "--val-fraction", "0.25", "--test-fraction", "0")
    assert code == 0, out
    dataset = PreparedDataset.open(str(dest))
    assert dataset.class_names == ["moth", "zebra", "ant"] and dataset.info.rejected == 3
    by_source = {f"part-{i // 6}.parquet#{i % 6}": (rows[i], species[i]) for i in range(12)}
    samples = read_back(str(dest), "train") + read_back(str(dest), "val")
    assert len(samples) == 12 and dataset.num_samples("test") == 0
    for sample in samples:
        data, name = by_source[source_of(sample)]
        assert stored_image(sample) == data and dataset.class_names[int(sample["cls"])] == name


def test_digits_idempotent_byte_identical_and_multipart(tmp_path, bucket, capsys, s3_writes, monkeypatch):
    monkeypatch.setattr(object_store, "UPLOAD_PART_SIZE", 5 * 2**20)  # S3's minimum part size
    url = f"s3://{bucket}/digits"
    args = ["prep", "digits", "--out", url, "--test-fraction", "0"]

    code, out, _ = run(capsys, *args)
    assert code == 0, out
    dataset = PreparedDataset.open(url)
    train_shard = dataset.split_shards("train")[0]
    assert train_shard.bytes > 5 * 2**20 and s3_writes[train_shard.name] >= 2  # uploaded in parts
    assert dataset.num_samples("train") + dataset.num_samples("val") == 1797
    val_per_class = dataset.info.counts["val"]["per_class"]
    assert list(val_per_class) == dataset.class_names and min(val_per_class.values()) >= 17  # stratified

    s3_writes.clear()
    code, out, _ = run(capsys, *args)
    assert code == 0 and "uploaded 0, already present 2" in out
    shard_writes = {name: n for name, n in s3_writes.items() if name.endswith(".tar")}
    assert shard_writes == {}  # only the manifest files were written again

    local = tmp_path / "digits"
    assert run(capsys, "prep", "digits", "--out", str(local), "--test-fraction", "0")[0] == 0
    assert PreparedDataset.open(str(local)).shards == dataset.shards  # same names, sizes, sha256

    from sklearn.datasets import load_digits

    targets = load_digits().target
    for sample in read_back(url, "val")[:50]:
        image, label = decode_sample(sample)
        assert image.size == (32, 32) and label == targets[int(source_of(sample).split(":")[1])]


def test_interrupted_upload_is_completed_by_rerun(tmp_path, bucket, capsys, s3_writes):
    from botocore.exceptions import EndpointConnectionError

    root = tmp_path / "images"
    write_files(root, GOOD_FOLDER)
    url = f"s3://{bucket}/interrupted"
    args = ["prep", str(root), "--out", url, "--shard-max-samples", "2", "--test-fraction", "0"]
    shard_puts = itertools.count()

    def fail_third_shard(params, **kwargs):
        if params["Key"].endswith(".tar") and next(shard_puts) == 2:
            raise EndpointConnectionError(endpoint_url="simulated network failure")

    counting_make_client = object_store.make_client

    def failing_client(config=None):
        client = counting_make_client(config)
        client.meta.events.register("before-parameter-build.s3.PutObject", fail_third_shard)
        return client

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(object_store, "make_client", failing_client)
        code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "cannot reach the S3 endpoint")
    with pytest.raises(UserError, match="no complete dataset"):
        PreparedDataset.open(url)  # readers refuse it
    listed = make_client().list_objects_v2(Bucket=bucket, Prefix="interrupted/").get("Contents", [])
    present = {obj["Key"].rsplit("/", 1)[-1] for obj in listed}
    assert len(present) >= 2 and not present & {"dataset.json", "manifest.parquet"}

    object_store._CLIENTS.clear()
    s3_writes.clear()
    code, out, _ = run(capsys, *args)
    assert code == 0, out
    total = len(PreparedDataset.open(url).shards)
    uploaded = {name for name in s3_writes if name.endswith(".tar")}
    assert uploaded and not uploaded & present and len(uploaded) == total - len(present)
    assert run(capsys, "verify", url)[0] == 0


def test_max_side_downscales_and_reencodes(tmp_path, capsys):
    root = tmp_path / "big"
    write_files(root, {"a/wide.jpg": image_bytes(1, "jpg", (64, 40)),
                       "a/small.png": image_bytes(2, "png", (8, 8)),
                       "b/tall.bmp": image_bytes(3, "bmp", (20, 50)),
                       "b/x.webp": image_bytes(4, "webp", (30, 30))})
    dest = tmp_path / "out"
    code, out, _ = run(capsys, "prep", str(root), "--out", str(dest), "--max-side", "16",
                       "--val-fraction", "0", "--test-fraction", "0")
    assert code == 0, out
    sizes = {source_of(s): (decode_sample(s)[0].size, [k for k in s if k in ("jpg", "png", "webp", "bmp")][0])
             for s in read_back(str(dest), "train")}
    assert sizes == {"a/wide.jpg": ((16, 10), "jpg"), "a/small.png": ((8, 8), "png"),
                     "b/tall.bmp": ((6, 16), "png"), "b/x.webp": ((16, 16), "webp")}


# --- verification ---------------------------------------------------------------------------------


def small_dataset(tmp_path: Path, url: str, capsys) -> None:
    root = tmp_path / "small"
    write_files(root, {f"{c}/{i}.png": image_bytes(i, "png", (40, 40)) for c in "ab" for i in range(4)})
    assert run(capsys, "prep", str(root), "--out", url, "--shard-max-samples", "3", "--val-fraction", "0",
               "--test-fraction", "0")[0] == 0


def test_verify_catches_tampered_local_shard(tmp_path, capsys):
    dest = tmp_path / "ds"
    small_dataset(tmp_path, str(dest), capsys)
    shard = dest / PreparedDataset.open(str(dest)).shards[0].name
    data = bytearray(shard.read_bytes())
    data[data.index(b"IDAT") + 8] ^= 0xFF  # inside the first sample's PNG pixels; size unchanged
    shard.write_bytes(bytes(data))

    code, out, _ = run(capsys, "verify", str(dest))
    assert code == 1
    assert f"{shard.name}: sha256 differs from the manifest" in out and "FAILED" in out.splitlines()[-1]


def test_verify_catches_missing_and_replaced_s3_shards(tmp_path, bucket, capsys):
    url = f"s3://{bucket}/ds"
    small_dataset(tmp_path, url, capsys)
    first, second = PreparedDataset.open(url).shards[:2]
    client = make_client()
    client.delete_object(Bucket=bucket, Key=f"ds/{first.name}")
    client.put_object(Bucket=bucket, Key=f"ds/{second.name}", Body=b"x" * second.bytes)

    code, out, _ = run(capsys, "verify", url)
    assert code == 1
    assert f"{first.name}: missing" in out and f"{second.name}: unreadable tar" in out


# --- one-line errors ------------------------------------------------------------------------------


def test_source_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    classes_only = tmp_path / "classes_only"
    (classes_only / "cat").mkdir(parents=True)
    (classes_only / "cat" / "readme.txt").write_text("no images here")
    parquet = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "label": [0]}), parquet)
    dest = str(tmp_path / "out")

    cases = [
        (empty, "no class folders"),
        (classes_only, "no images found"),
        (parquet, "no column 'image'"),
        (tmp_path / "missing", "source not found"),
    ]
    for source, expected in cases:
        code, _, err = run(capsys, "prep", str(source), "--out", dest)
        assert_one_line_error(code, err, expected)
    assert not Path(dest).exists()  # a rejected source leaves nothing behind
    code, _, err = run(capsys, "verify", dest)
    assert_one_line_error(code, err, "dataset directory not found")
    Path(dest).mkdir()
    code, _, err = run(capsys, "verify", dest)
    assert_one_line_error(code, err, "no complete dataset")
    code, _, err = run(capsys, "prep", "digits", "--out", dest, "--val-fraction", "1.5")
    assert_one_line_error(code, err, "--val-fraction")


def test_sizes_that_would_exhaust_memory_are_refused_at_once(tmp_path, capsys):
    dest = tmp_path / "out"
    for flag, value, expected in (("--digits-size", "100000", "--digits-size must be at most 1024, got 100000"),
                                  ("--workers", "100000", "--workers must be at most 64, got 100000")):
        started = time.monotonic()
        code, _, err = run(capsys, "prep", "digits", "--out", str(dest), flag, value)
        assert_one_line_error(code, err, expected)
        assert time.monotonic() - started < 5
    for value in ("inf", "nan"):
        with pytest.raises(SystemExit) as exit_status:  # argparse's own usage error
            main(["prep", "digits", "--out", str(dest), "--shard-max-mb", value])
        assert exit_status.value.code == 2
        assert f"argument --shard-max-mb: expected a finite number, got {value}" in capsys.readouterr().err
    assert not dest.exists()


def test_an_output_inside_the_source_or_holding_it_is_refused(tmp_path, capsys):
    source = tmp_path / "images"
    write_files(source, {"cat/0.png": image_bytes(0), "cat/1.png": image_bytes(1), "dog/2.png": image_bytes(2)})
    before = sorted(source.rglob("*"))
    for dest in (source, source / "shards", source / "cat" / ".." / "out"):
        code, _, err = run(capsys, "prep", str(source), "--out", str(dest))
        assert_one_line_error(code, err, f"--out {dest} is inside the source {source}")
    code, _, err = run(capsys, "prep", str(source / "cat"), "--out", str(source))
    assert_one_line_error(code, err, f"the source {source / 'cat'} is inside --out {source}")
    assert sorted(source.rglob("*")) == before  # nothing written


def test_storage_errors_are_one_line(s3_endpoint, bucket, monkeypatch, capsys):
    code, _, err = run(capsys, "prep", "digits", "--out", "s3://no-such-bucket-here/x")
    assert_one_line_error(code, err, "bucket does not exist: s3://no-such-bucket-here")

    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
        env.setenv("AWS_MAX_ATTEMPTS", "2")
        code, _, err = run(capsys, "prep", "digits", "--out", f"s3://{bucket}/x")
    assert_one_line_error(code, err, "cannot reach the S3 endpoint http://127.0.0.1:")

    object_store._CLIENTS.clear()
    with monkeypatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        code, _, err = run(capsys, "verify", f"s3://{bucket}/x")
    assert_one_line_error(code, err, "no S3 credentials found")


def test_cli_process_reports_one_line_without_secrets(s3_endpoint):
    env = dict(os.environ, AWS_MAX_ATTEMPTS="1")
    command = [sys.executable, "-m", "pipelines.cli", "prep", "digits", "--out", "s3://absent-bucket/x"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["vitae: error: bucket does not exist: "
                                                  f"s3://absent-bucket at {s3_endpoint}"]
    assert TEST_SECRET_KEY not in result.stdout + result.stderr
