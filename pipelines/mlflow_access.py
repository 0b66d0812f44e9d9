"""MLflow request policy, owned here: how long a request to the tracking server may take (bounded,
quick retries instead of MLflow's default of about four minutes), which failures mean "the server
did not answer", and how an error is shortened for one line without the URI's credentials."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

# Per request: 3 attempts over about 3 s (urllib3 backoff 0 s, then 2 s plus jitter) and 30 s to
# answer, instead of MLflow's 8 attempts over about 4 minutes. A user's own setting of one of these
# variables wins.
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_USERINFO = re.compile(r"(?<=://)[^/@]+@")


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
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):  # MLflow wraps connection errors as INTERNAL_ERROR (500)
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, requests.RequestException)  # artifact uploads: HTTP errors, broken connections


def without_credentials(text: str) -> str:
    """`text` with the `user:password@` of any URI in it left out."""
    return _USERINFO.sub("", text)


def short(error: Exception, head: int = 100, tail: int = 100) -> str:
    """The error's first line, its middle left out if long (MLflow's put the cause at the end)."""
    line = (without_credentials(str(error)).splitlines() or [type(error).__name__])[0]
    return line if len(line) <= head + tail + 5 else f"{line[:head]} ... {line[-tail:]}"
