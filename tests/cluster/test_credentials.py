"""S3 credentials travel as a file: both S3 clients of the project sign with the key pair of the file
that AWS_SHARED_CREDENTIALS_FILE names, and a Ray node handed such a file drops the credential
variables of whoever started it (they would take precedence, and Ray Tune would copy them)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from cluster import ray_head
from cluster.credentials import CREDENTIAL_VARIABLES, credentials_file_env, write_credentials_file

FILE_KEY = "AKIAFROMTHEFILE01"
VARIABLE_KEY = "AKIAFROMAVARIABLE"

# Runs in a fresh interpreter (pyarrow resolves credentials once per filesystem, boto3 per session):
# one request from each client to the recording server given as argv[1].
REQUESTS = textwrap.dedent("""
    import os, sys
    from infra.s3 import S3Config, make_client, s3_filesystem
    config = S3Config(endpoint_url=sys.argv[1], max_attempts=1)
    try:
        make_client(config).head_object(Bucket="bucket", Key="boto3")
    except Exception:
        pass
    try:
        s3_filesystem(config).get_file_info("bucket/pyarrow")
    except Exception:
        pass
""")


@pytest.fixture
def recording_server():
    """A loopback HTTP server that answers 404 and records each request's (path, Authorization)."""
    requests: list[tuple[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            requests.append((self.path, self.headers.get("Authorization", "")))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()


def signing_keys(requests: list[tuple[str, str]], client: str) -> set[str]:
    """The access key IDs that signed `client`'s requests (SigV4: `Credential=KEY/date/...`)."""
    return {auth.split("Credential=", 1)[1].split("/", 1)[0] for path, auth in requests
            if path.split("?")[0].endswith(client) and "Credential=" in auth}


def run_requests(endpoint: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", REQUESTS, endpoint], env=env, check=True, timeout=120)


def bare_env(tmp_path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    return {**env, "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_EC2_METADATA_DISABLED": "true"}


def test_boto3_and_pyarrow_sign_with_the_credentials_file(recording_server, tmp_path):
    endpoint, requests = recording_server
    credentials = write_credentials_file(tmp_path / "aws-credentials", FILE_KEY, "file-secret")
    assert credentials.stat().st_mode & 0o777 == 0o600
    run_requests(endpoint, {**bare_env(tmp_path), **credentials_file_env(credentials)})
    assert signing_keys(requests, "boto3") == {FILE_KEY}
    assert signing_keys(requests, "pyarrow") == {FILE_KEY}


def test_a_credential_variable_would_win_over_the_file(recording_server, tmp_path):
    """Why whoever hands out the file must also remove the variables."""
    endpoint, requests = recording_server
    credentials = write_credentials_file(tmp_path / "aws-credentials", FILE_KEY, "file-secret")
    run_requests(endpoint, {**bare_env(tmp_path), **credentials_file_env(credentials),
                            "AWS_ACCESS_KEY_ID": VARIABLE_KEY, "AWS_SECRET_ACCESS_KEY": "variable-secret"})
    assert signing_keys(requests, "boto3") == signing_keys(requests, "pyarrow") == {VARIABLE_KEY}


def test_a_node_handed_a_credentials_file_drops_the_callers_credential_variables(monkeypatch, tmp_path):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.setenv(name, f"caller-{name}")
    worker_env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", **credentials_file_env(tmp_path / "aws-credentials")}
    env = ray_head._node_env("token", worker_env, "127.0.0.1")
    assert not set(CREDENTIAL_VARIABLES) & set(env)
    assert worker_env.items() <= env.items()
    # without a credentials file, a node keeps what its caller has (an instance profile's cluster, say)
    assert ray_head._node_env("token", {}, "127.0.0.1")["AWS_ACCESS_KEY_ID"] == "caller-AWS_ACCESS_KEY_ID"
