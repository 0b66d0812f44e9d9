"""S3 credentials handed to processes as a file (`AWS_SHARED_CREDENTIALS_FILE`, mode 0600), never as
environment variables, and the removal of the variables that would take precedence over it.
See docs/design/s3.md.
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
