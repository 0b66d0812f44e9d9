"""Objects in S3 through boto3: `s3://` URLs, head/get/put/delete (conditional ones included),
managed multipart uploads, streaming reads that resume after a dropped connection, and the
translation of failures a user can cause into one-line `UserError`s that name the endpoint and
bucket, never a credential. Clients come from `infra.s3`. See docs/design/s3.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from infra.errors import UserError
from infra.s3 import S3Config, make_client

UPLOAD_PART_SIZE = 64 * 2**20  # multipart above this size, in parts of this size (S3: >= 5 MiB)
UPLOAD_CONCURRENCY = 8  # parallel part/file uploads per transfer


@dataclass(frozen=True)
class S3Url:
    """A parsed `s3://bucket/key` URL; `key` has no leading slash and may be empty."""

    bucket: str
    key: str

    def join(self, name: str) -> S3Url:
        return S3Url(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key.strip("/") else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> S3Url:
    if not is_s3_url(url):
        raise UserError(f"not an s3:// URL: {url}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"no bucket in {url!r}: expected s3://BUCKET/PREFIX")
    return S3Url(bucket, key)


@dataclass(frozen=True)
class StoredObject:
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    etag: str = ""


@dataclass(frozen=True)
class Upload:
    """One local file to store at `key`, with user metadata (e.g. its sha256)."""

    path: str
    key: str
    metadata: dict[str, str]


class EndpointError(UserError):
    """The S3 endpoint failed a request after every attempt, or cannot be reached.

    Readers that stream objects (tarfile, webdataset) append their context to an exception's `args`
    on the way up; the message stays the one given here, so the user still reads one clean line.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ObjectStore:
    """One bucket behind one client; every call translates user-caused failures to `UserError`."""

    def __init__(self, bucket: str, config: S3Config | None = None, client=None):
        self.bucket = bucket
        self.config = config or S3Config.from_env()
        self.client = client or make_client(self.config)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn botocore's connection, credential and bucket errors raised inside into `UserError`."""
        from botocore import exceptions as bx

        where = f"s3://{self.bucket} at {self.config.endpoint_name}"
        try:
            yield
        except (bx.NoCredentialsError, bx.PartialCredentialsError):
            raise UserError(
                f"no S3 credentials found for {where}: point AWS_SHARED_CREDENTIALS_FILE at a "
                "credentials file (or set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        except (bx.ConnectionError, bx.HTTPClientError) as error:  # refused, timed out, reset (after retries)
            endpoint = self.config.endpoint_name
            raise EndpointError(f"cannot reach the S3 endpoint {endpoint} ({type(error).__name__})") from None
        except bx.ClientError as error:
            raise _client_error(error, what, where) from None

    def check_bucket(self) -> None:
        """Fail with one line unless the bucket exists and these credentials may use it."""
        with self.errors("bucket check"):
            self.client.head_bucket(Bucket=self.bucket)

    def head(self, key: str) -> StoredObject | None:
        from botocore.exceptions import ClientError

        with self.errors(f"head {key}"):
            try:
                reply = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return StoredObject(reply["ContentLength"], reply.get("Metadata", {}), reply.get("ETag", ""))

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> ObjectReader:
        """A streaming, file-like body of the object (read(n) / close()) that survives dropped connections."""
        return ObjectReader(self, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.errors(f"write {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        with self.errors(f"delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def put_if_absent(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> str | None:
        """Create `key` only if no object has it (S3 conditional write); its ETag, or None if taken."""
        return self._conditional(f"create {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, Metadata=metadata or {}, IfNoneMatch="*")["ETag"])

    def put_if_match(self, key: str, data: bytes, etag: str, metadata: dict[str, str] | None = None) -> str | None:
        """Overwrite `key` only if it still holds the version `etag`; its new ETag, or None if it changed or is gone."""
        return self._conditional(f"overwrite {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, Metadata=metadata or {}, IfMatch=etag)["ETag"])

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete `key` only if it still holds the version `etag`; False if it changed or is gone."""
        return bool(self._conditional(f"delete {key}", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=key, IfMatch=etag) or True))

    def _conditional(self, what: str, request: Callable[[], object]):
        from botocore.exceptions import ClientError

        with self.errors(what):
            try:
                return request()
            except ClientError as error:
                if _error_code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict",
                                          "NoSuchKey", "404"):
                    return None
                raise

    def upload_files(
        self,
        uploads: list[Upload],
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Upload files with boto3's managed transfers: multipart above `UPLOAD_PART_SIZE`, parts
        and files in parallel on one pool, botocore retries per request. Waits for all; raises the
        first failure (s3transfer aborts that file's multipart upload)."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        transfer_config = TransferConfig(
            multipart_threshold=UPLOAD_PART_SIZE, multipart_chunksize=UPLOAD_PART_SIZE,
            max_concurrency=UPLOAD_CONCURRENCY,
        )
        subscriber = _progress_subscriber(on_bytes)
        with self.errors("upload"), create_transfer_manager(self.client, transfer_config) as manager:
            futures = [
                manager.upload(
                    u.path, self.bucket, u.key,
                    extra_args={"Metadata": u.metadata},
                    subscribers=[subscriber],
                )
                for u in uploads
            ]
            for future in futures:
                future.result()


class ObjectReader:
    """The body of one object, read as a stream. When the connection drops mid-body (the errors
    s3transfer's downloads retry), it requests the remaining bytes again (`Range`, pinned to the
    first response's ETag), up to `max_attempts` times in a row without progress."""

    def __init__(self, store: ObjectStore, key: str):
        self.store, self.key = store, key
        self.position = 0  # bytes returned so far
        self.etag: str | None = None
        self.body = self._request()

    def _request(self):
        from botocore.exceptions import ClientError

        resume = {"Range": f"bytes={self.position}-", "IfMatch": self.etag} if self.position else {}
        with self.store.errors(f"read {self.key}"):
            try:
                reply = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key, **resume)
            except ClientError as error:
                if resume and _error_code(error) in ("PreconditionFailed", "412"):
                    raise UserError(f"s3://{self.store.bucket}/{self.key} changed while it was read") from None
                raise
        self.etag = self.etag or reply.get("ETag")
        return reply["Body"]

    def read(self, size: int | None = -1) -> bytes:
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

        failures = 0
        while True:
            try:
                data = self.body.read() if size is None or size < 0 else self.body.read(size)
            except S3_RETRYABLE_DOWNLOAD_ERRORS as error:
                self.body.close()
                failures += 1
                if failures == self.store.config.max_attempts:
                    raise EndpointError(
                        f"the S3 endpoint {self.store.config.endpoint_name} dropped s3://{self.store.bucket}/"
                        f"{self.key} at byte {self.position} {failures} times in a row ({type(error).__name__})"
                    ) from None
                self.body = self._request()
            else:
                self.position += len(data)
                return data

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _progress_subscriber(on_bytes: Callable[[int], None]):
    from s3transfer.subscribers import BaseSubscriber

    class ProgressSubscriber(BaseSubscriber):
        def on_progress(self, future, bytes_transferred, **kwargs):
            on_bytes(bytes_transferred)

    return ProgressSubscriber()


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _client_error(error, what: str, where: str) -> Exception:
    code = _error_code(error)
    if code == "NoSuchBucket" or (what == "bucket check" and code in ("404", "NotFound")):
        return UserError(f"bucket does not exist: {where}")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
        return UserError(f"access denied to {where} ({what}): check the credentials and their permissions")
    metadata = error.response.get("ResponseMetadata", {})
    status = metadata.get("HTTPStatusCode", 0)
    if status >= 500 or _THROTTLING.search(code):  # what botocore retries, still failing after the last attempt
        attempts = metadata.get("RetryAttempts", 0) + 1
        return EndpointError(f"S3 endpoint unavailable: {what} of {where} failed ({code}, HTTP {status}) "
                             f"after {attempts} attempt(s); try again later or raise AWS_MAX_ATTEMPTS")
    return error


_THROTTLING = re.compile(r"SlowDown|Throttl|RequestLimitExceeded|TooManyRequests")


_CLIENTS: dict[tuple[int, S3Config], object] = {}


def shared_store(bucket: str) -> ObjectStore:
    """An `ObjectStore` on a client shared within this process (rebuilt after a fork)."""
    config = S3Config.from_env()
    key = (os.getpid(), config)
    if key not in _CLIENTS:
        _CLIENTS[key] = make_client(config)
    return ObjectStore(bucket, config, _CLIENTS[key])
