"""`vitae predict`, owned here: the top-k classes of image files through the model's pyfunc interface
(what `mlflow.pyfunc.load_model` and a serving endpoint run). Files that cannot be read or decoded are
left out before the model loads, and named in one line at the end (exit 2). With `--data`, the batch
prediction on Ray (`batch_prediction`) answers instead."""

from __future__ import annotations

import argparse
from typing import Sequence

import mlflow.pyfunc

from data_prep.images import RejectedImage
from infra.errors import UserError
from pipelines.model_registry.batch_prediction import predict_dataset_command
from pipelines.serving import decode
from pipelines.tracking.client import answering, loading


def predict_command(args: argparse.Namespace) -> int:
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--actors", args.actors)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if bool(args.images) == bool(args.data):
        raise UserError("give image files or --data (a dataset, folder or s3:// prefix), not both" if args.images
                        else "nothing to predict: give image files or --data")
    if args.data:
        return predict_dataset_command(args)
    extra = [flag for flag, value in (("--split", args.split), ("--output", args.output)) if value is not None]
    if extra:
        raise UserError(f"{extra[0]} applies only with --data")
    readable, problems = read_images(args.images)
    if readable:
        paths, pictures = zip(*readable)
        with answering(f"loading model {args.model}"), loading(args.model):
            model = mlflow.pyfunc.load_model(args.model)
        print_predictions(paths, model.predict(list(pictures), params={"top_k": args.top_k}))
    if problems:
        raise UserError(problems[0] if len(problems) == 1 and not readable else
                        f"{len(problems)} of {len(args.images)} images not scored: {'; '.join(problems)}")
    return 0


def read_images(paths: list[str]) -> tuple[list[tuple[str, object]], list[str]]:
    """(path, decoded image) of each file that could be read and decoded, and a line for each other."""
    readable, problems = [], []
    for path in paths:
        try:
            readable.append((path, read_image(path)))
        except UserError as error:
            problems.append(str(error))
    return readable, problems


def print_predictions(paths: Sequence[str], predictions) -> None:
    width = max(len(name) for names in predictions["class_names"] for name in names)
    for path, names, probabilities in zip(paths, predictions["class_names"], predictions["probabilities"]):
        print(path)
        for rank, (name, probability) in enumerate(zip(names, probabilities), start=1):
            print(f"  {rank}. {name:<{width}}  {probability:7.2%}")


def read_image(path: str):
    """The decoded image at `path`; `UserError` if it cannot be read or is not an image."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        return decode(data, path)
    except RejectedImage as error:
        raise UserError(str(error)) from None
