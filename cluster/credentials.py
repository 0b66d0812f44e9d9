"""S3 credentials handed to processes as a file, never as environment variables.

Ray Tune copies `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` from a sweep
driver's environment into the runtime env of every trial actor (ray/tune/execution/class_cache.py),
and Ray's runtime env agent logs each runtime env it creates: credentials kept in variables end up
in `runtime_env_agent.log` on every node. A shared credentials file (the format of
`~/.aws/credentials`, mode 0600) named by `AWS_SHARED_CREDENTIALS_FILE` is read by boto3 and by
pyarrow's S3 filesystem (the AWS C++ SDK) alike, and nothing copies its contents anywhere.

Credential variables override the file in both SDKs, so whoever hands out the file also removes
them (`without_credential_variables`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from cluster.private_files import write_private_file

CREDENTIALS_FILE_VARIABLE = "AWS_SHARED_CREDENTIALS_FILE"
# What the SDKs would prefer to the file: keys, session tokens, and a profile the file lacks.
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def write_credentials_file(path: Path, access_key_id: str, secret_access_key: str) -> Path:
    """Write a `[default]` profile with the key pair to `path` (replaced atomically, mode 0600)."""
    write_private_file(path, f"[default]\naws_access_key_id = {access_key_id}\n"
                             f"aws_secret_access_key = {secret_access_key}\n")
    return path


def credentials_file_env(path: Path) -> dict[str, str]:
    """The variable that points the SDKs at the file (the credential variables must be absent)."""
    return {CREDENTIALS_FILE_VARIABLE: str(path)}


def without_credential_variables(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the variables that would take precedence over a credentials file."""
    return {key: value for key, value in env.items() if key not in CREDENTIAL_VARIABLES}
