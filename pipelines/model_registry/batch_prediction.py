"""`vitae predict --data`, owned here: a whole split of a prepared dataset, or every file under a folder
or `s3://` prefix of raw images, scored with Ray Data on the cluster at RAY_ADDRESS. An actor pool of
`Scorer`s (one GPU each when the cluster has GPUs) loads the model once per actor and preprocesses as
`vitae evaluate`; the top-k of each sample go to Parquet. Design: docs/using-models.md."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data
import torch
import webdataset as wds

from data_prep.dataset import PreparedDataset
from data_prep.images import RejectedImage
from data_prep.manifest import DATASET_NAME
from data_prep.locations import open_storage
from infra.errors import UserError
from infra.object_store import is_s3_url
from infra.s3 import S3Config, s3_filesystem
from pipelines.model_registry.evaluation import check_classes, load_model, open_split
from pipelines.serving import ImageClassifierPyfunc, load_image
from pipelines.tracking.client import TrackingServer, answering
from pipelines.training.ray_cluster import connect_to_ray

DEFAULT_ACTORS = 2  # scoring actors on a cluster without GPUs (with GPUs: one per GPU)
DEFAULT_BATCH = 64  # images per forward pass
SHOWN_PROBLEMS = 5


class Scorer:
    """One actor of the pool: the model loaded once; batches of encoded images -> top-k rows."""

    def __init__(self, model_uri: str, tracking_uri: str, top_k: int):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, info = load_model(model_uri, device, TrackingServer.at(tracking_uri))
        self.classifier = ImageClassifierPyfunc(model, info, device)
        self.top_k = min(top_k, len(info.class_names))

    def __call__(self, batch: pa.Table) -> pa.Table:
        pictures, problems = [], []
        for key, data in zip(batch["key"].to_pylist(), batch["image"].to_pylist()):
            try:
                pictures.append(load_image(data, key))
                problems.append(None)
            except RejectedImage as error:
                problems.append(str(error))
        top = iter(zip(*self.classifier.probabilities(pictures).topk(self.top_k, dim=1))) if pictures else iter(())
        names = self.classifier.info.class_names
        indices, probabilities = [], []
        for problem in problems:
            values, classes = next(top) if problem is None else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            indices.append(classes.tolist())
            probabilities.append(values.tolist())
        target = {"target": batch["target"]} if "target" in batch.column_names else {}
        return pa.table({"key": batch["key"], **target,
                         "class_indices": pa.array(indices, pa.list_(pa.int64())),
                         "class_names": pa.array([[names[i] for i in row] for row in indices], pa.list_(pa.string())),
                         "probabilities": pa.array(probabilities, pa.list_(pa.float64())),
                         "problem": pa.array(problems, pa.string())})


def shard_samples(row: dict) -> Iterator[dict]:
    """The samples of one shard (read by data_prep's opener): key, encoded image, true class."""
    for sample in wds.WebDataset([row["url"]], shardshuffle=False, empty_check=False):
        extension = next(e for e in ("jpg", "png", "webp", "bmp") if e in sample)
        yield {"key": sample["__key__"], "image": sample[extension], "target": int(sample["cls"])}


@dataclass(frozen=True)
class BatchResult:
    scored: int
    unscored: int
    problems: list[str]  # the first few
    top1: float | None  # with labels
    seconds: float

    def lines(self, data: str, output: str) -> list[str]:
        lines = [f"scored {self.scored} images of {data} in {self.seconds:.1f} s "
                 f"({self.scored / max(self.seconds, 1e-9):.0f} images/s); predictions in {output}"]
        if self.top1 is not None:
            lines.append(f"top-1 {self.top1:.2%}")
        return lines


def read_source(data: str, split: str | None, model_classes: list[str], model_uri: str) -> ray.data.Dataset:
    """A prepared dataset's split (key, image, target) or the raw image files under `data` (key, image)."""
    if open_storage(data).read_bytes(DATASET_NAME) is not None:
        dataset: PreparedDataset = open_split(data, split or "test")
        check_classes(model_uri, model_classes, data, dataset.class_names)
        urls = dataset.shard_urls(split or "test")
        return ray.data.from_items([{"url": url} for url in urls], override_num_blocks=len(urls)).flat_map(shard_samples)
    if split is not None:
        raise UserError(f"--split: {data} is not a prepared dataset (no {DATASET_NAME}), a folder of raw images")
    path, filesystem = _location(data)
    try:
        files = ray.data.read_binary_files(path, include_paths=True, filesystem=filesystem)
    except (FileNotFoundError, OSError) as error:
        raise UserError(f"--data {data}: no images there ({error})") from None
    prefix = path.rstrip("/") + "/"
    return files.map(lambda row: {"key": row["path"].removeprefix(prefix), "image": row["bytes"]})


def predict_dataset(model_uri: str, data: str, split: str | None, output: str, top_k: int = 5,
                    batch_size: int = DEFAULT_BATCH, actors: int | None = None) -> BatchResult:
    """Score `data` with `model_uri` on the Ray cluster; predictions as Parquet files under `output`."""
    _check_unused(output)
    server = TrackingServer.at()
    with answering(f"loading model {model_uri}", server):
        _, info = load_model(model_uri, torch.device("cpu"), server)  # a bad URI fails here, in one line
    connect_to_ray()
    ray.data.DataContext.get_current().print_on_execution_start = False  # its settings, not its progress
    gpus = int(ray.cluster_resources().get("GPU", 0))
    started = time.perf_counter()
    scored = read_source(data, split, info.class_names, model_uri).map_batches(
        Scorer, fn_constructor_args=(model_uri, server.uri, top_k), batch_size=batch_size, batch_format="pyarrow",
        concurrency=actors or gpus or DEFAULT_ACTORS, num_gpus=1 if gpus else 0, num_cpus=1).materialize()
    tally = _tally(scored)
    path, filesystem = _location(output)
    scored.filter(lambda row: row["problem"] is None).drop_columns(["problem"]).write_parquet(
        path, filesystem=filesystem)
    return BatchResult(tally["scored"], tally["unscored"], tally["problems"],
                       tally["hits"] / max(tally["scored"], 1) if "hits" in tally else None,
                       time.perf_counter() - started)


def _tally(scored: ray.data.Dataset) -> dict:
    """Counted on the driver from the (small) prediction rows: scored and unscored images, the first
    problems and, with labels, the top-1 hits."""
    labelled = "target" in scored.columns()
    tally = {"scored": 0, "unscored": 0, "problems": [], **({"hits": 0} if labelled else {})}
    columns = ["key", "problem", "class_indices", *(["target"] if labelled else [])]
    for batch in scored.select_columns(columns).iter_batches(batch_format="pyarrow"):
        failed = batch.filter(pc.is_valid(batch["problem"]))
        tally["unscored"] += failed.num_rows
        tally["problems"] += [f"{key}: {problem}" for key, problem in
                              zip(failed["key"].to_pylist(), failed["problem"].to_pylist())]
        good = batch.filter(pc.is_null(batch["problem"]))
        tally["scored"] += good.num_rows
        if labelled:
            first = pc.list_element(good["class_indices"], 0)
            tally["hits"] += pc.sum(pc.cast(pc.equal(first, good["target"]), pa.int64())).as_py() or 0
    tally["problems"] = tally["problems"][:SHOWN_PROBLEMS]
    return tally


def _check_unused(output: str) -> None:
    """Refuse an `output` that already holds something: predictions of two runs are never mixed."""
    path, filesystem = _location(output)
    if (filesystem or pafs.LocalFileSystem()).get_file_info(path).type != pafs.FileType.NotFound:
        raise UserError(f"--output {output} already exists: give a new folder or prefix for the predictions")


def _location(url: str) -> tuple[str, object]:
    """(path, pyarrow filesystem) for Ray Data: an `s3://` URL through infra's S3 settings, else a local path."""
    if is_s3_url(url):
        return url.removeprefix("s3://"), s3_filesystem(S3Config.from_env())
    return str(Path(url).expanduser().absolute()), None


def predict_dataset_command(args: argparse.Namespace) -> int:
    if args.output is None:
        raise UserError("--output is required with --data: a folder or s3:// prefix for the Parquet predictions")
    result = predict_dataset(args.model, args.data, args.split, args.output, args.top_k, args.batch_size,
                             args.actors)
    print("\n".join(result.lines(args.data, args.output)))
    if result.unscored:
        raise UserError(f"{result.unscored} images not scored (undecodable): {'; '.join(result.problems)}"
                        + ("; ..." if result.unscored > len(result.problems) else ""))
    return 0
