"""The model registry: a sweep's best model registered as `@challenger`, promoted to `@champion`
only when it evaluates better, with `@previous-champion` kept for rollback.

Promotions of one registered model are serialised by a lease on an object-storage key (see
`infra.lease`): between reading the champion and moving the alias no other promotion can
interleave, so a slower promotion never replaces a better champion that a faster one just set.
Challenger and champion are scored by the same `evaluate(model_uri) -> metrics` function.

Only MLflow's real "not found" reads as an absent alias: any other failure to read one (a server
that answers 5xx or not at all) aborts the promotion or rollback in one line, before anything moved.
A rollback is one step back, not a toggle: it records on the registered model the version it
replaced (`ROLLED_BACK_FROM_TAG`), and a second rollback, whose @previous-champion would be that
version, is refused (a promotion clears the record).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

from infra.errors import UserError

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


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def version_uri(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def alias_version(model_name: str, alias: str, client=None) -> str | None:
    """The version number behind `name@alias`, or None when MLflow answers that the alias (or the
    model) does not exist; `UserError` for any other failure."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking.client import failure, not_found

    try:
        return (client or _client()).get_model_version_by_alias(model_name, alias).version
    except MlflowException as error:
        if not_found(error):
            return None
        raise failure(error, f"reading {model_name}@{alias}") from None


def register_challenger(model_uri: str, model_name: str, tags: Mapping[str, object]) -> str:
    """Register `model_uri` as a new version of `model_name`, tagged, and alias it `challenger`."""
    import mlflow

    version = mlflow.register_model(model_uri, model_name, tags={k: str(v) for k, v in tags.items()}).version
    _client().set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def challenger_version(model_name: str, version: str | None = None, client=None) -> str:
    """`version` if given, else the version behind `@challenger`; `UserError` when there is none."""
    challenger = version or alias_version(model_name, CHALLENGER, client)
    if challenger is None:
        raise UserError(f"registered model {model_name!r} has no @{CHALLENGER} version: run a sweep "
                        "first or pass --version")
    return challenger


def promote(model_name: str, evaluate: Evaluate, *, version: str | None = None, metric: str = "top1",
            margin: float = 0.0, lease: contextlib.AbstractContextManager | None = None) -> Promotion:
    """Score the challenger (or `version`) and the champion; move `champion` only if the challenger
    beats it by more than `margin`. The old champion becomes `previous-champion`."""
    client = _client()
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


def rollback(model_name: str, lease: contextlib.AbstractContextManager | None = None) -> tuple[str, str | None]:
    """Make `previous-champion` the champion again (the two aliases swap); returns (new, old).
    Refused when `previous-champion` is the version the last rollback replaced."""
    client = _client()
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
