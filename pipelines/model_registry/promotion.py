"""`vitae promote` (`python -m pipelines.promote`), owned here: a registered challenger scored against
the champion on the same split (`evaluation.evaluate_model`) under the model's promotion lease, then
`champions.promote` or `champions.rollback`; each promotion and rollback logged as a run of the MLflow
experiment `promotions/<NAME>`, the evaluated versions tagged with their scores. Details:
docs/using-models.md and docs/design/tracking.md."""

from __future__ import annotations

import argparse
import os
import time
from typing import Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from infra.errors import UserError
from infra.lease import Lease
from infra.object_store import parse_s3_url, shared_store
from pipelines.model_registry import champions
from pipelines.model_registry.champions import DATASET_URL_TAG, Promotion, version_uri
from pipelines.model_registry.evaluation import evaluate_model
from pipelines.model_registry.options import LOCK_BUCKET_ENV, LOCK_PREFIX, METRICS, PromoteOptions, resolve_options
from pipelines.tracking.client import TrackingServer, answering, failure, not_found
from pipelines.tracking.runs import ensure_experiment, terminate_run

# The lease is renewed every third of its TTL while a promotion holds it (evaluating two models may
# take long); a waiting promotion gives up after LEASE_WAIT_S.
LEASE_TTL_S = 60.0
LEASE_WAIT_S = 3600.0
EXPERIMENT_PREFIX = "promotions/"  # + the registered model's name


def promote_command(args: argparse.Namespace) -> int:
    options = resolve_options(args, PromoteOptions)
    if options.rollback:
        champion, replaced = rollback_registered(options.model, lock_url=options.lock_url)
        print(f"rolled back: {options.model} @champion is version {champion} again"
              + (f" (version {replaced} is now @previous-champion)" if replaced else ""))
    else:
        promotion = promote_registered(options.model, options.data, split=options.split,
                                       version=str(options.version) if options.version else None,
                                       margin=options.margin, metric=options.metric, lock_url=options.lock_url)
        print(f"{'promoted' if promotion.promoted else 'not promoted'}: {promotion.reason}")
    print(f"logged to the MLflow experiment {EXPERIMENT_PREFIX}{options.model} at {TrackingServer.at().shown}")
    return 0


def promote_registered(model_name: str, data_url: str | None = None, *, split: str = "test",
                       version: str | None = None, margin: float = 0.0, metric: str = "top1",
                       lock_url: str | None = None, server: TrackingServer | None = None) -> Promotion:
    """Promote `version` (default: @challenger) of `model_name` if it beats @champion by more than
    `margin` on `split` of `data_url` (default: the version's `dataset_url` tag); log the outcome.
    `server`: the MLflow server (default: the environment's)."""
    if metric not in METRICS:
        raise UserError(f"promotion metric {metric!r}: expected one of {', '.join(METRICS)}")
    server = server or TrackingServer.at()
    client = server.client()
    with answering(f"promoting {model_name}", server):
        challenger = champions.challenger_version(model_name, version, client)
        data_url = data_url or recorded_dataset(client, model_name, challenger)
        evaluations: dict[str, dict[str, float]] = {}  # model URI -> metrics, for the log

        def evaluate(model_uri: str) -> dict[str, float]:
            evaluations[model_uri] = evaluate_model(model_uri, data_url, split, server)
            return evaluations[model_uri]

        promotion = champions.promote(model_name, evaluate, version=challenger, metric=metric, margin=margin,
                                     lease=registry_lease(model_name, lock_url), client=client)
        log_promotion(client, promotion, evaluations, data_url, split)
    return promotion


def rollback_registered(model_name: str, lock_url: str | None = None) -> tuple[str, str | None]:
    """Make @previous-champion the champion again; returns (champion, the version it replaced)."""
    client = TrackingServer.at().client()
    with answering(f"rolling back {model_name}"):
        champion, replaced = champions.rollback(model_name, lease=registry_lease(model_name, lock_url), client=client)
        log_run(client, model_name, f"rollback to v{champion}", {"action": "rollback", "champion": champion,
                                                                 "replaced": replaced or "none"}, {}, {})
    return champion, replaced


def recorded_dataset(client: MlflowClient, model_name: str, version: str) -> str:
    try:
        tags = client.get_model_version(model_name, version).tags
    except MlflowException as error:
        if not_found(error):
            raise UserError(f"registered model {model_name!r} has no version {version}") from None
        raise failure(error, f"reading {model_name} version {version}") from None
    if DATASET_URL_TAG not in tags:
        raise UserError(f"{model_name} version {version} has no {DATASET_URL_TAG!r} tag: pass --data DEST")
    return tags[DATASET_URL_TAG]


def registry_lease(model_name: str, lock_url: str | None) -> Lease:
    lock_url = lock_url or (f"s3://{os.environ[LOCK_BUCKET_ENV]}" if os.environ.get(LOCK_BUCKET_ENV) else None)
    if lock_url is None:
        raise UserError(f"no place for the promotion lock: pass --lock-url s3://BUCKET or set {LOCK_BUCKET_ENV}")
    location = parse_s3_url(lock_url).join(f"{LOCK_PREFIX}/{model_name}")
    return Lease(shared_store(location.bucket), location.key, ttl_s=LEASE_TTL_S, timeout_s=LEASE_WAIT_S)


def log_promotion(client: MlflowClient, promotion: Promotion, evaluations: Mapping[str, Mapping[str, float]],
                  data_url: str, split: str) -> None:
    """The run in `promotions/<NAME>`; each evaluated version tagged with its scores, the challenger
    with the decision."""
    name = promotion.model_name
    versions = {"challenger": promotion.challenger, "champion": promotion.champion}
    scores = {role: evaluations[version_uri(name, version)] for role, version in versions.items()
              if version and version_uri(name, version) in evaluations}
    params = {"action": "promote", **{role: version or "none" for role, version in versions.items()},
              "margin": promotion.margin, "metric": promotion.metric, "data_url": data_url, "split": split}
    run_id = log_run(client, name, f"v{promotion.challenger} vs v{promotion.champion or '-'}", params, scores,
                     promotion.as_dict())
    for role, metrics in scores.items():
        tags = {**{f"eval.{key}": value for key, value in metrics.items()}, "eval.data": f"{data_url} [{split}]"}
        for key, value in tags.items():
            client.set_model_version_tag(name, versions[role], key, str(value))
    decision = "promoted" if promotion.promoted else "not promoted"
    client.set_model_version_tag(name, promotion.challenger, "promotion", f"{decision}: {promotion.reason}")
    client.set_model_version_tag(name, promotion.challenger, "promotion.run_id", run_id)


def log_run(client: MlflowClient, model_name: str, run_name: str, params: Mapping[str, object],
            scores: Mapping[str, Mapping[str, float]], outcome: Mapping[str, object]) -> str:
    """A finished run in the experiment `promotions/<model_name>`; returns its id."""
    experiment_id = ensure_experiment(client, f"{EXPERIMENT_PREFIX}{model_name}")
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"{role}_{key}", float(value), now, 0) for role, values in scores.items()
               for key, value in values.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(key, str(value)) for key, value in params.items()])
    if outcome:
        client.log_dict(run_id, dict(outcome), "promotion.json")
    terminate_run(client, run_id, "FINISHED")  # without MLflow's "View run" line
    return run_id
