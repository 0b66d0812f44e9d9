"""`vitae register` (`python -m pipelines.registration`), owned here: the model a `vitae train` run
logged (found by the run's name) or any MLflow model URI, registered as a new version aliased
`@challenger`, tagged with the dataset it was trained on (`dataset_url`), which promotion evaluates on."""

from __future__ import annotations

import argparse

import mlflow.models
from mlflow.exceptions import MlflowException

from infra.errors import UserError
from pipelines.model_registry import champions
from pipelines.model_registry.champions import DATASET_URL_TAG
from pipelines.tracking.client import TrackingServer, answering, failure, loading
from pipelines.tracking.runs import MODEL_URI_TAG, RUN_NAME_TAG


def register_command(args: argparse.Namespace) -> int:
    with answering(f"registering {args.run or args.model} as {args.name}"):
        model_uri, tags = run_model(args.run) if args.run else (args.model, {"source_model_uri": args.model})
        if args.data:
            tags[DATASET_URL_TAG] = args.data
        version = register_model(model_uri, args.name, tags)
    print(f"registered {champions.version_uri(args.name, version)} (@{champions.CHALLENGER}) from {model_uri}")
    return 0


def run_model(run_name: str) -> tuple[str, dict[str, str]]:
    """The model URI that training run `run_name` logged (its latest MLflow run that has one) and the
    tags its registered version gets."""
    client = TrackingServer.at().client()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"]) if experiments else []
    if not runs:
        raise UserError(f"no MLflow run of training run {run_name!r} at this tracking server")
    run = next((run for run in runs if MODEL_URI_TAG in run.data.tags), None)
    if run is None:
        raise UserError(f"training run {run_name!r} logged no model (MLflow run {runs[0].info.run_id} has no "
                        f"{MODEL_URI_TAG!r} tag: did it finish?)")
    tags = {"training_run_id": run.info.run_id, "training_run_name": run_name}
    if "data.url" in run.data.params:
        tags[DATASET_URL_TAG] = run.data.params["data.url"]
    return run.data.tags[MODEL_URI_TAG], tags


def register_model(model_uri: str, model_name: str, tags: dict[str, str]) -> str:
    """`champions.register_challenger` once `model_uri` is known to hold a model; MLflow's refusals (no
    such model, a bad name) as one line."""
    with loading(model_uri):
        mlflow.models.get_model_info(model_uri)
    try:
        return champions.register_challenger(model_uri, model_name, tags)
    except MlflowException as error:
        raise failure(error, f"registering {model_uri} as {model_name}") from None

