"""MLflow access, owned here: the one place an `MlflowClient` is built (`TrackingServer`, its URI
explicit), the request policy (quick, bounded retries instead of MLflow's ~4 minutes), and how a
failure reads: a server that did not answer vs a real "not found", one line without the URI's
credentials. Why the retry policy goes through MLflow's variables: docs/design/tracking.md."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from infra.errors import UserError

# Per request: 3 attempts over about 3 s (urllib3 backoff 0 s, then 2 s plus jitter) and 30 s to
# answer, instead of MLflow's 8 attempts over about 4 minutes. A user's own setting of one of these
# variables wins.
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_USERINFO = re.compile(r"(?<=://)[^/@]+@")
_MISSING_ALIAS = re.compile(r"alias .* not found", re.IGNORECASE)


@dataclass(frozen=True)
class TrackingServer:
    """An MLflow tracking server and the model registry it serves."""

    uri: str

    @classmethod
    def at(cls, uri: str | None = None) -> TrackingServer:
        """The server at `uri`; default: the environment's (`MLFLOW_TRACKING_URI`)."""
        return cls(uri or mlflow.get_tracking_uri())

    def client(self) -> MlflowClient:
        """A client of this server's runs and model registry."""
        return MlflowClient(self.uri, registry_uri=self.uri)

    @property
    def shown(self) -> str:
        """The URI without credentials."""
        return without_credentials(self.uri)

    @contextlib.contextmanager
    def as_default(self) -> Iterator[None]:
        """This server, inside the block, for MLflow's functions that take no tracking URI
        (`Model.log`, `mlflow.register_model`, `mlflow.pyfunc.load_model`)."""
        previous = mlflow.get_tracking_uri()
        if previous == self.uri:
            yield
            return
        mlflow.set_tracking_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def quick_retries() -> Iterator[None]:
    """MLflow requests in this block use `QUICK_RETRIES` (unless the user set these variables)."""
    added = {key: value for key, value in QUICK_RETRIES.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def unreachable(error: Exception) -> bool:
    """True for an MLflow server that did not answer or answered 5xx/429: worth trying again later."""
    if isinstance(error, MlflowException):  # MLflow wraps connection errors as INTERNAL_ERROR (500)
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, requests.RequestException)  # artifact uploads: HTTP errors, broken connections


def not_found(error: Exception) -> bool:
    """True only for MLflow's answer that the thing asked for does not exist (RESOURCE_DOES_NOT_EXIST,
    HTTP 404, or the registry's "alias ... not found", which it sends as INVALID_PARAMETER_VALUE)."""
    if not isinstance(error, MlflowException):
        return False
    missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and _MISSING_ALIAS.search(error.message or "")
    return error.error_code == "RESOURCE_DOES_NOT_EXIST" or error.get_http_status_code() == 404 or bool(missing_alias)


def failure(error: Exception, doing: str, server: TrackingServer | None = None) -> UserError:
    """`error`, met while `doing`, as one line: the server (default: the environment's) named if it
    did not answer."""
    if unreachable(error):
        shown = (server or TrackingServer.at()).shown
        return UserError(f"the MLflow server {shown} did not answer ({doing}): {short(error)}")
    return UserError(f"MLflow refused {doing}: {short(error)}")


@contextlib.contextmanager
def answering(doing: str, server: TrackingServer | None = None) -> Iterator[None]:
    """MLflow requests in this block use quick retries; a server that does not answer ends it in one
    `UserError` line naming the server (`doing` says what was being done)."""
    with quick_retries():
        try:
            yield
        except Exception as error:
            if not unreachable(error):
                raise
            raise failure(error, doing, server) from None


def check_model_uri(model_uri: str) -> None:
    """`UserError` unless `model_uri` has a scheme (models:/, runs:/, s3://, ...) or is an existing path."""
    if not urlsplit(model_uri).scheme and not Path(model_uri).exists():
        raise UserError(f"{model_uri!r} is not a model URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN_ID/PATH, s3://..., ...) nor a model directory")


@contextlib.contextmanager
def loading(model_uri: str, server: TrackingServer | None = None) -> Iterator[None]:
    """MLflow's failures to find or read `model_uri` (no such model, version or alias; a server that
    does not answer) as one `UserError` line; a `model_uri` that is neither a URI nor a path is refused
    before MLflow is asked."""
    check_model_uri(model_uri)
    try:
        yield
    except MlflowException as error:
        if unreachable(error):
            raise failure(error, f"loading model {model_uri}", server) from None
        raise UserError(f"cannot load model {model_uri}: {short(error)}") from None


def without_credentials(text: str) -> str:
    """`text` with the `user:password@` of any URI in it left out."""
    return _USERINFO.sub("", text)


def short(error: Exception, head: int = 100, tail: int = 100) -> str:
    """The error's message on one line, its middle left out if long (MLflow's put the cause at the end)."""
    message = getattr(error, "message", None) or str(error)  # MlflowException: without its error code
    line = " ".join(part.strip() for part in without_credentials(str(message)).splitlines() if part.strip())
    line = line or type(error).__name__
    return line if len(line) <= head + tail + 5 else f"{line[:head]} ... {line[-tail:]}"
