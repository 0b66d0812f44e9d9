"""MLflow access, owned here: the one place an `MlflowClient` is built (`TrackingServer`, its URI
explicit), the request policy (quick, bounded retries instead of MLflow's ~4 minutes; patience only
where asked for), where a model URI's files are, and how a failure reads: a server that did not
answer vs a real "not found", one line without the URI's credentials. Why: docs/design/tracking.md."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar
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
PATIENCE_S = 240.0  # how long `patiently` waits for a server that does not answer (MLflow's own default)
MAX_PAUSE_S = 30.0
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]{32})/?$")
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_USERINFO = re.compile(r"(?<=://)[^/@]+@")
_MISSING_ALIAS = re.compile(r"alias .* not found", re.IGNORECASE)
T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingServer:
    """An MLflow tracking server and the model registry it serves."""

    uri: str

    @classmethod
    def at(cls, uri: str | None = None) -> TrackingServer:
        """The server at `uri`; default: the environment's (`MLFLOW_TRACKING_URI`)."""
        return cls(uri or mlflow.get_tracking_uri())

    def client(self) -> MlflowClient:
        """A client of this server's runs and model registry; this process's MLflow requests get
        `QUICK_RETRIES` from now on."""
        use_quick_retries()
        return MlflowClient(self.uri, registry_uri=self.uri)

    @property
    def shown(self) -> str:
        """The URI without credentials."""
        return without_credentials(self.uri)



def use_quick_retries() -> None:
    """MLflow reads its request policy from these variables at each request (no client takes one):
    they are set once for the process and never put back; a user's own setting wins."""
    for key, value in QUICK_RETRIES.items():
        os.environ.setdefault(key, value)


def patiently(call: Callable[[], T], doing: str, server: TrackingServer, patience_s: float = PATIENCE_S) -> T:
    """`call()`, tried again while `server` does not answer (a server starting or restarting), pausing
    1, 2, 4 ... 30 s, for up to `patience_s`; then its last failure is raised."""
    deadline, pause = time.monotonic() + patience_s, 1.0
    while True:
        try:
            return call()
        except Exception as error:
            if not unreachable(error) or time.monotonic() + pause > deadline:
                raise
            logger.warning(f"the MLflow server {server.shown} did not answer ({doing}): "
                           f"trying again in {pause:.0f} s")
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)


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
    use_quick_retries()
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


def logged_model_id(model_uri: str) -> str | None:
    """The id in a logged model's URI (`models:/m-...`, what model logging returns); else None."""
    match = _LOGGED_MODEL_URI.match(model_uri)
    return match.group(1) if match else None


def model_files_uri(model_uri: str, server: TrackingServer) -> str:
    """Where the files of `model_uri` are, asked of `server` itself: a logged model's or a registered
    version's artifact location (MLflow would resolve those on the process's default server); any
    other URI as it is."""
    client = server.client()
    registered = _REGISTRY_URI.match(model_uri)
    if registered:
        name, alias, version = registered.group("name", "alias", "version")
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        if not found.model_id:  # registered from a run's or a storage path's files
            return client.get_model_version_download_uri(name, found.version)
        model_uri = f"models:/{found.model_id}"
    model_id = logged_model_id(model_uri)
    return client.get_logged_model(model_id).artifact_location if model_id else model_uri


def without_credentials(text: str) -> str:
    """`text` with the `user:password@` of any URI in it left out."""
    return _USERINFO.sub("", text)


def short(error: Exception, head: int = 100, tail: int = 100) -> str:
    """The error's message on one line, its middle left out if long (MLflow's put the cause at the end)."""
    message = getattr(error, "message", None) or str(error)  # MlflowException: without its error code
    line = " ".join(part.strip() for part in without_credentials(str(message)).splitlines() if part.strip())
    line = line or type(error).__name__
    return line if len(line) <= head + tail + 5 else f"{line[:head]} ... {line[-tail:]}"
