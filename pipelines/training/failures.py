"""Why a training run failed: Ray Train's failure types unwrapped to their root causes, the causes
a user can fix told as one `UserError` line, and the callback that ends a run on one instead of
restarting its workers (docs/design/training.md).
"""

from __future__ import annotations

from typing import Iterator

from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision

from infra.errors import UserError
from infra.object_store import S3Config


def root_causes(error: BaseException) -> Iterator[BaseException]:
    """The exceptions underneath Ray Train's wrappers: the controller's, then each rank's."""
    if isinstance(error, ControllerError):
        yield from root_causes(error.controller_failure)
    elif isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            yield from root_causes(failure)
    elif isinstance(error, UserExceptionWithTraceback):
        yield from root_causes(error._base_exc)  # the rank's own exception; Ray keeps no public accessor
    else:
        yield error


def user_error(error: BaseException) -> UserError | None:
    """The first root cause of `error` that a user can fix, as a `UserError`; None if there is none."""
    for cause in root_causes(error):
        if isinstance(cause, UserError):
            return own_line(cause)
        if (storage_failure := storage_error(cause)) is not None:
            return storage_failure
    return None


def own_line(error: UserError) -> UserError:
    """`error` with its own one-line message. Raised in a DataLoader worker process, it comes back from
    torch as `type(error)(text)`, the text being the worker's traceback: its last line holds
    `module.Type: message`."""
    lines = str(error).strip().splitlines()
    if len(lines) <= 1:
        return error
    return UserError(lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: "))


def storage_error(cause: BaseException) -> UserError | None:
    """pyarrow's error for an S3 request that failed after its retries (`AWS Error ...`), naming the endpoint."""
    message = str(cause)
    if not isinstance(cause, OSError) or "AWS Error" not in message:
        return None
    return UserError(f"the checkpoint storage failed at the S3 endpoint {S3Config.from_env().endpoint_name}: "
                     f"{message.splitlines()[0]}")


class UserErrorsEndTheRun(WorkerGroupCallback, ControllerCallback):
    """Ray Train callback (controller side): no worker-group restart for a failure a user must fix."""

    def __init__(self) -> None:
        self.latest_user_error: UserError | None = None  # of the latest poll of the worker group

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = worker_group_status.errors.values()
        self.latest_user_error = next(filter(None, map(user_error, errors)), None)

    def before_controller_execute_failure_decision(self, failure_decision: FailureDecision) -> None:
        if failure_decision == FailureDecision.RETRY and self.latest_user_error is not None:
            raise self.latest_user_error
