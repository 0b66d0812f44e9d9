"""`vitae evaluate` (`python -m pipelines.evaluate`), owned here: a logged model scored on one split of
a prepared dataset, in one process, by training's own validation code (so the numbers are training's);
`evaluate_model` is what promotion scores with. The report (`confusion_matrix.png`, `metrics.json`)
goes to a directory or an `s3://` prefix."""

from __future__ import annotations

import argparse
import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlflow
import torch
from torch import nn
from tqdm import tqdm

from data_prep.dataset import PreparedDataset
from data_prep.locations import Storage, open_storage
from infra.errors import UserError
from pipelines.model_packaging import ClassifierInfo
from pipelines.model_registry.options import DEFAULT_BATCH_SIZE, DEFAULT_LOADER_WORKERS, EvaluateOptions, resolve_options
from pipelines.serving import load_classifier
from pipelines.tracking import plots
from pipelines.tracking.client import TrackingServer, answering, loading, model_files_uri
from pipelines.training.augment import EvalTransform
from pipelines.training.input_pipeline import ReaderLayout, SplitShards, eval_loader
from pipelines.training.validation import EvalTotals, evaluate

REPORT_FILES = ("confusion_matrix.png", "metrics.json")


@dataclass
class Evaluation:
    model_uri: str
    data_url: str
    split: str
    info: ClassifierInfo
    totals: EvalTotals

    @property
    def metrics(self) -> dict[str, float]:
        return {**self.totals.metrics(), "samples": float(self.totals.count)}

    def summary(self) -> str:
        metrics = self.metrics
        return (f"{self.model_uri} on {self.data_url} [{self.split}], {self.totals.count} samples: "
                f"top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}  loss {metrics['loss']:.4f}")


def evaluate_model(model_uri: str, data_url: str, split: str = "test",
                   server: TrackingServer | None = None) -> dict[str, float]:
    """`top1`, `top5`, `loss` and `samples` of `model_uri` (of `server`, default the environment's) on
    `split` of the dataset at `data_url`."""
    return run_evaluation(model_uri, data_url, split, server=server).metrics


def run_evaluation(model_uri: str, data_url: str, split: str, batch_size: int = DEFAULT_BATCH_SIZE,
                   loader_workers: int = DEFAULT_LOADER_WORKERS, server: TrackingServer | None = None) -> Evaluation:
    dataset = open_split(data_url, split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(model_uri, device, server)
    check_classes(model_uri, info.class_names, data_url, dataset.class_names)
    shards = SplitShards.of(dataset, split)
    transform = EvalTransform(info.img_size, info.crop_pct, info.interpolation)
    loader = eval_loader(shards, ReaderLayout(0, 1, loader_workers, pin_memory=device.type == "cuda"), transform,
                         batch_size)
    batches = tqdm(loader, desc=f"evaluating on {split}", unit="batch", total=-(-shards.total // batch_size),
                   disable=None)
    totals = evaluate({"model": model}, batches, lambda images: images, len(info.class_names), device)["model"]
    return Evaluation(model_uri, data_url, split, info, totals)


def open_split(data_url: str, split: str) -> PreparedDataset:
    dataset = PreparedDataset.open(data_url)
    if dataset.num_samples(split) == 0:
        raise UserError(f"{data_url} has no samples in split {split!r} (it has: {describe(dataset.splits)})")
    return dataset


def check_classes(model_uri: str, model_classes: list[str], data_url: str, data_classes: list[str]) -> None:
    if model_classes != data_classes:
        raise UserError(f"{model_uri} predicts {len(model_classes)} classes ({describe(model_classes)}), "
                        f"{data_url} has {len(data_classes)} ({describe(data_classes)}): evaluate a model on "
                        "the classes it was trained on")


def load_model(model_uri: str, device: torch.device,
               server: TrackingServer | None = None) -> tuple[nn.Module, ClassifierInfo]:
    """The logged `PackagedClassifier` (uint8 in, logits out) on `device`, with its metadata."""
    server = server or TrackingServer.at()
    with loading(model_uri, server), tempfile.TemporaryDirectory(prefix="vitae-") as directory:
        path = mlflow.artifacts.download_artifacts(model_files_uri(model_uri, server), dst_path=directory,
                                                   tracking_uri=server.uri)
        return load_classifier(path, device)


def describe(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def write_report(evaluation: Evaluation, output: Storage) -> list[str]:
    """`REPORT_FILES` (the confusion matrix figure, the metrics) to `output`; returns where they went."""
    figure = io.BytesIO()
    plots.confusion_matrix(evaluation.totals.confusion, evaluation.info.class_names, evaluation.split).savefig(
        figure, format="png")
    report = {"model_uri": evaluation.model_uri, "data_url": evaluation.data_url, "split": evaluation.split,
              **evaluation.metrics, "class_names": evaluation.info.class_names,
              "confusion": evaluation.totals.confusion.tolist()}
    figure_name, metrics_name = REPORT_FILES
    output.write_bytes(figure_name, figure.getvalue())
    output.write_bytes(metrics_name, (json.dumps(report, indent=2) + "\n").encode())
    return [output.shard_url(name) for name in REPORT_FILES]  # a local path or an s3:// URL


def default_output(model_uri: str, split: str) -> Path:
    """evaluations/<the URI without its scheme, as a file name>-<split>"""
    name = re.sub(r"[^\w.@-]+", "_", model_uri.split(":", 1)[-1].strip("/"))
    return Path("evaluations") / f"{name}-{split}"


def evaluate_command(args: argparse.Namespace) -> int:
    options = resolve_options(args, EvaluateOptions)
    with answering(f"evaluating {options.model}"):
        evaluation = run_evaluation(options.model, options.data, options.split, options.batch_size,
                                    options.loader_workers)
    print(evaluation.summary())
    output = open_storage(options.output or str(default_output(options.model, options.split)))
    output.check(create=True)  # only now: a failed evaluation leaves no empty output behind
    print(f"wrote {', '.join(write_report(evaluation, output))}")
    return 0

