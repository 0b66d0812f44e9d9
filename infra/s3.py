"""S3 settings and the only place that builds S3 clients: boto3's (objects) and pyarrow's
`S3FileSystem` (Ray Train's run storage), both from one `S3Config` read from the environment.
Credentials stay with the SDKs' own lookup in each process. See docs/design/s3.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from infra.errors import UserError

RETRY_MODES = ("standard", "adaptive")


@dataclass(frozen=True)
class S3Config:
    """Endpoint, region, retries and timeouts of every S3 client; `from_env` is how a process gets one."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    retry_mode: str = "standard"
    max_attempts: int = 5  # per request (the SDKs' default is 3): rides out a few seconds of throttling
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_pool_connections: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> S3Config:
        retry_mode = environ.get("AWS_RETRY_MODE", "standard")
        if retry_mode not in RETRY_MODES:
            raise UserError(f"AWS_RETRY_MODE={retry_mode!r}: expected one of {', '.join(RETRY_MODES)}")
        attempts = environ.get("AWS_MAX_ATTEMPTS", str(cls.max_attempts))
        if not attempts.isdigit() or int(attempts) < 1:
            raise UserError(f"AWS_MAX_ATTEMPTS={attempts!r}: expected a positive integer")
        return cls(
            endpoint_url=environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None,
            region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or cls.region,
            retry_mode=retry_mode,
            max_attempts=int(attempts),
        )

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


def make_client(config: S3Config | None = None, key_pair: tuple[str, str] | None = None):
    """A new boto3 S3 client (thread-safe; build one per process, not per call).

    `key_pair` (access key ID, secret key): sign with exactly these keys, and look up no profile
    of the caller's (which need not exist in its config file)."""
    config = config or S3Config.from_env()
    keys = {} if key_pair is None else {"aws_access_key_id": key_pair[0], "aws_secret_access_key": key_pair[1]}
    try:
        session = _boto3_session(with_profile=key_pair is None)
        return session.client("s3", endpoint_url=config.endpoint_url, region_name=config.region,
                              config=_botocore_config(config), **keys)
    except ValueError as error:
        raise UserError(f"invalid S3 endpoint {config.endpoint_url!r}: {error}") from None


def _botocore_config(config: S3Config):
    import botocore.config

    return botocore.config.Config(
        retries={"mode": config.retry_mode, "total_max_attempts": config.max_attempts},  # the first one included
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        max_pool_connections=config.max_pool_connections,
        # Custom endpoints (MinIO, moto, Ceph) rarely resolve virtual-host bucket names.
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
    )


def _boto3_session(with_profile: bool):
    import boto3
    import botocore.session

    if with_profile:
        return boto3.session.Session()
    # (config file key, environment variable, default, conversion) of the `profile` setting: none
    without_profile = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
    return boto3.session.Session(botocore_session=without_profile)


def s3_filesystem(config: S3Config):
    """pyarrow's `S3FileSystem` with all of `config`; it pickles as `config` (pyarrow's own pickling
    would drop the retry strategy), so every process that unpickles it rebuilds it here."""
    from pyarrow import fs

    class ConfiguredS3FileSystem(fs.S3FileSystem):
        def __reduce__(self):
            return s3_filesystem, (config,)

    return ConfiguredS3FileSystem(
        endpoint_override=config.endpoint_url, region=config.region,
        connect_timeout=config.connect_timeout_s, request_timeout=config.read_timeout_s,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=config.max_attempts),
    )
