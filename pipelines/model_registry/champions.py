"""Registry aliases, owned here: a model registered as `@challenger`, promoted to `@champion` only
when it evaluates better (the old one kept as `@previous-champion`), rolled back one step at most,
every alias move under the promotion lease. The rules and why: docs/design/tracking.md."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from infra.errors import UserError
from pipelines.tracking.client import TrackingServer, failure, logged_model_id, not_found

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
DATASET_URL_TAG = "dataset_url"  # on a registered version: the prepared dataset it was trained on
ROLLED_BACK_FROM_TAG = "vitae.rolled_back_from"  # on a registered model: the champion the last rollback replaced

Evaluate = Callable[[str], Mapping[str, float]]


@dataclass
class Promotion:
    """The outcome of one promotion attempt, as logged and printed."""

    model_name: str
    challenger: str
    champion: str | None
    metric: str
    challenger_score: float | None
    champion_score: float | None
    margin: float
    promoted: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def version_uri(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def alias_version(model_name: str, alias: str, client: MlflowClient | None = None) -> str | None:
    """The version number behind `name@alias` (at `client`'s server, default the environment's), or
    None when MLflow answers that the alias (or the model) does not exist; `UserError` for any other
    failure."""
    try:
        return (client or TrackingServer.at().client()).get_model_version_by_alias(model_name, alias).version
    except MlflowException as error:
        if not_found(error):
            return None
        raise failure(error, f"reading {model_name}@{alias}") from None


def register_challenger(model_uri: str, model_name: str, tags: Mapping[str, object],
                        server: TrackingServer | None = None) -> str:
    """Register `model_uri` as a new version of `model_name` at `server` (default: the environment's),
    tagged, and alias it `challenger`. A logged model (`models:/m-...`, what training logs) is
    registered through `server`'s own client; MLflow resolves any other URI (runs:/, a registered
    version, a storage path) on the environment's server only."""
    server = server or TrackingServer.at()
    client = server.client()
    tags = {key: str(value) for key, value in tags.items()}
    model_id = logged_model_id(model_uri)
    if model_id:
        _ensure_registered_model(client, model_name)
        version = client.create_model_version(model_name, model_uri, tags=tags, model_id=model_id).version
    elif server == TrackingServer.at():
        version = mlflow.register_model(model_uri, model_name, tags=tags).version
    else:
        raise ValueError(f"only a logged model's URI can be registered at another server than the environment's: "
                         f"{model_uri}")
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    """`model_name` in the registry (created unless it is, also when another process races us)."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def challenger_version(model_name: str, version: str | None = None, client: MlflowClient | None = None) -> str:
    """`version` if given, else the version behind `@challenger`; `UserError` when there is none."""
    challenger = version or alias_version(model_name, CHALLENGER, client)
    if challenger is None:
        raise UserError(f"registered model {model_name!r} has no @{CHALLENGER} version: run a sweep "
                        "first or pass --version")
    return challenger


def promote(model_name: str, evaluate: Evaluate, *, version: str | None = None, metric: str = "top1",
            margin: float = 0.0, lease: contextlib.AbstractContextManager | None = None,
            client: MlflowClient | None = None) -> Promotion:
    """Score the challenger (or `version`) and the champion; move `champion` only if the challenger
    beats it by more than `margin`. The old champion becomes `previous-champion`."""
    client = client or TrackingServer.at().client()
    with lease or contextlib.nullcontext() as held:
        challenger = challenger_version(model_name, version, client)
        champion = alias_version(model_name, CHAMPION, client)
        if champion == challenger:
            return Promotion(model_name, challenger, champion, metric, None, None, margin, False,
                             f"version {challenger} is already the champion")
        challenger_score = _score(evaluate, model_name, challenger, metric)
        champion_score = _score(evaluate, model_name, champion, metric) if champion else None
        promoted = champion_score is None or challenger_score > champion_score + margin
        if promoted:
            _still_held(held)
            if champion:
                client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, champion)
            client.set_registered_model_alias(model_name, CHAMPION, challenger)
            client.delete_registered_model_tag(model_name, ROLLED_BACK_FROM_TAG)
        reason = _reason(promoted, challenger, champion, metric, challenger_score, champion_score, margin)
        return Promotion(model_name, challenger, champion, metric, challenger_score, champion_score, margin,
                         promoted, reason)


def rollback(model_name: str, lease: contextlib.AbstractContextManager | None = None,
             client: MlflowClient | None = None) -> tuple[str, str | None]:
    """Make `previous-champion` the champion again (the two aliases swap); returns (new, old).
    Refused when `previous-champion` is the version the last rollback replaced."""
    client = client or TrackingServer.at().client()
    with lease or contextlib.nullcontext() as held:
        previous = alias_version(model_name, PREVIOUS_CHAMPION, client)
        if previous is None:
            raise UserError(f"registered model {model_name!r} has no @{PREVIOUS_CHAMPION} to roll back to")
        if client.get_registered_model(model_name).tags.get(ROLLED_BACK_FROM_TAG) == previous:
            raise UserError(f"{model_name} was already rolled back from version {previous} (its "
                            f"@{PREVIOUS_CHAMPION}): a second rollback would undo the first; to make version "
                            f"{previous} champion again, promote it with --version {previous}")
        current = alias_version(model_name, CHAMPION, client)
        _still_held(held)
        client.set_registered_model_alias(model_name, CHAMPION, previous)
        if current:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, current)
            client.set_registered_model_tag(model_name, ROLLED_BACK_FROM_TAG, current)
        return previous, current


def _still_held(lease) -> None:
    """Before moving an alias: `UserError` if the lease serialising this change was lost meanwhile."""
    if lease is not None and hasattr(lease, "check"):
        lease.check()


def _score(evaluate: Evaluate, model_name: str, version: str, metric: str) -> float:
    metrics = evaluate(version_uri(model_name, version))
    if metric not in metrics:
        raise UserError(f"promotion metric {metric!r} is not among the evaluation's: {', '.join(metrics)}")
    return float(metrics[metric])


def _reason(promoted: bool, challenger: str, champion: str | None, metric: str, challenger_score: float,
            champion_score: float | None, margin: float) -> str:
    if champion is None:
        return f"no champion yet: version {challenger} ({metric} {challenger_score:.4f}) becomes champion"
    verdict = "beats" if promoted else "does not beat"
    return (f"version {challenger} ({metric} {challenger_score:.4f}) {verdict} champion version {champion} "
            f"({metric} {champion_score:.4f}) by more than {margin:.4f}")
