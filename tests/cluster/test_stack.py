"""`vitae stack`: the embedded stack as a user runs it (CLI subprocesses, `source stack.env`), next
to the session's own Ray head, which it must leave alone; and the session fixtures themselves."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.ray_head import ray_head_healthy, ray_session_logs, ray_temp_dir
from tests.support.listening import listeners, not_on_loopback
from tests.support.private_paths import shared_paths

REPO = Path(__file__).resolve().parents[2]
STACK_NUM_CPUS = 4
ENV_KEYS = {
    "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION",
    "VITAE_DATA_BUCKET", "VITAE_CHECKPOINT_BUCKET", "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
}  # fmt: skip
# What the shell that runs `vitae stack up` has (a profile it lacks included): none of it may reach
# the stack's Ray processes, nor stop `up`.
CALLER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIACALLERS0WNKEY", "AWS_SECRET_ACCESS_KEY": "callers-own-secret",
                      "AWS_PROFILE": "callers-profile"}


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def vitae(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipelines.cli", *map(str, args)], env=env)


def sourced(env_file: Path, shell_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh shell (PATH, HOME and `shell_env` only) after `source env_file`."""
    bare = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **(shell_env or {})}
    shell = run(["bash", "-c", f"source {env_file} && env -0"], env=bare)
    assert shell.returncode == 0, shell.stderr
    return dict(entry.split("=", 1) for entry in shell.stdout.split("\0") if entry)


def in_shell(env_file: Path, command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run(["bash", "-c", f"source {env_file} && {command}"], env={**os.environ}, cwd=tmp_path)


def recorded_pids(directory: Path) -> dict[str, int]:
    services = json.loads((directory / "state.json").read_text())["services"]
    return {name: record["process"]["pid"] for name, record in services.items() if record["process"]}


def session_members(leaders: list[int]) -> list[int]:
    """Living processes in the sessions the stack's services lead (every Ray and MLflow child)."""
    listing = run(["ps", "-A", "-o", "pid=,sid=,stat="]).stdout.split()
    rows = zip(listing[0::3], listing[1::3], listing[2::3])
    return [int(pid) for pid, sid, stat in rows if int(sid) in leaders and not stat.startswith("Z")]


@dataclass
class StackRun:
    directory: Path
    up: subprocess.CompletedProcess

    @property
    def env_file(self) -> Path:
        return self.directory / "stack.env"

    def env(self) -> dict[str, str]:
        return sourced(self.env_file)

    def secrets(self) -> dict[str, str]:
        """The S3 key pair (from the credentials file stack.env names) and the Ray token."""
        env = self.env()
        credentials = configparser.ConfigParser()
        assert credentials.read(env["AWS_SHARED_CREDENTIALS_FILE"])
        return {**credentials["default"], "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_cluster):
    """One stack for this module, started while the session's Ray head runs (two clusters)."""
    directory = tmp_path_factory.mktemp("stack") / ".vitae"
    up = vitae("stack", "up", "--dir", directory, "--num-cpus", STACK_NUM_CPUS, env={**os.environ, **CALLER_CREDENTIALS})
    assert up.returncode == 0, up.stderr
    yield StackRun(directory, up)
    vitae("stack", "down", "--dir", directory)
    shutil.rmtree(ray_temp_dir(directory), ignore_errors=True)


def test_session_fixtures_serve_clients(ray_cluster, mlflow_server, s3_endpoint):
    import ray
    from mlflow import MlflowClient

    ray.init()  # RAY_ADDRESS and the token come from the environment the fixtures set
    try:
        endpoints = ray.remote(lambda: (os.environ["AWS_ENDPOINT_URL_S3"], os.environ["MLFLOW_TRACKING_URI"]))
        seen = ray.get(endpoints.remote())
        assert seen == (s3_endpoint, mlflow_server)
        assert ray.cluster_resources()["CPU"] == 8  # conftest.RAY_NUM_CPUS
    finally:
        ray.shutdown()
    assert MlflowClient().create_experiment(f"fixture-check-{os.getpid()}-{time.time_ns()}")


def test_up_starts_all_services_and_writes_private_env_file(stack):
    lines = stack.up.stdout.splitlines()
    for name in ("s3", "mlflow", "ray"):
        assert any(line.split()[:2] == [name, "started"] for line in lines), stack.up.stdout
    assert f"source {stack.env_file}" in stack.up.stdout
    assert stack.env_file.stat().st_mode & 0o777 == 0o600
    env = stack.env()
    assert ENV_KEYS <= env.keys()
    assert env["RAY_AUTH_MODE"] == "token"
    credentials = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
    assert credentials.parent == stack.directory and credentials.stat().st_mode & 0o777 == 0o600
    secrets = stack.secrets()
    assert {"aws_access_key_id", "aws_secret_access_key", "RAY_AUTH_TOKEN"} <= secrets.keys()
    assert not [key for key in secrets if key.startswith("aws") and secrets[key] in stack.env_file.read_text()]
    for key, secret in secrets.items():  # never on the console, nor in any service log
        assert secret not in stack.up.stdout + stack.up.stderr
        found = run(["grep", "-rlF", secret, stack.directory / "logs", ray_temp_dir(stack.directory)])
        assert found.stdout == "", f"{key} appears in {found.stdout}"


def test_stack_files_are_private_to_the_user(stack):
    """No other user of the machine can read what the stack keeps: its directory (database,
    artifacts, logs, stack.env, credentials, state) and the Ray head's session files."""
    assert (stack.directory / "mlflow" / "mlflow.db").is_file()
    assert list(ray_session_logs(ray_temp_dir(stack.directory)).glob("*.log"))
    shared = [*shared_paths(stack.directory),
              *shared_paths(ray_temp_dir(stack.directory), within_private_directories=False)]
    assert not shared, "readable by other users:\n" + "\n".join(shared)


def test_stack_env_unsets_the_shells_credential_variables(stack):
    """They would take precedence over the stack's credentials file (and Ray Tune would copy them)."""
    env = sourced(stack.env_file, CALLER_CREDENTIALS)
    assert not CALLER_CREDENTIALS.keys() & env.keys()
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == str(stack.directory / "aws-credentials")


def test_s3_and_mlflow_work_from_stack_env(stack, monkeypatch, tmp_path):
    import boto3
    from mlflow import MlflowClient

    env = stack.env()
    for key in ENV_KEYS:
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, env[key])
    buckets = {bucket["Name"] for bucket in boto3.client("s3").list_buckets()["Buckets"]}
    assert {"vitae-data", "vitae-checkpoints"} <= buckets

    client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(client.create_experiment("stack-check")).info.run_id
    client.log_text(run_id, "hello", "notes/hello.txt")
    downloaded = client.download_artifacts(run_id, "notes/hello.txt", str(tmp_path))
    assert Path(downloaded).read_text() == "hello"
    assert list((stack.directory / "mlflow" / "artifacts").rglob("hello.txt"))  # on disk, not in moto


# A job's driver and one of its tasks print the CPUs and the AWS variables they have (names only).
AWS_NAMES = "sorted(k for k in os.environ if k.startswith(\"AWS_\"))"
JOB_SCRIPT = ("import os, ray; ray.init(); print(\"CPUS\", ray.cluster_resources()[\"CPU\"]); "
              f"print(\"DRIVER\", *{AWS_NAMES}); print(\"TASK\", *ray.get(ray.remote(lambda: {AWS_NAMES}).remote()))")


def test_ray_job_submit_with_stack_env_and_token_auth(stack, tmp_path):
    submitted = in_shell(stack.env_file, f"ray job submit -- python -c '{JOB_SCRIPT}'", tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"CPUS {float(STACK_NUM_CPUS)}" in submitted.stdout
    # the stack's S3 settings, its credentials as the file: not the variables `stack up` was run with
    seen = {line.split()[0]: set(line.split()[1:]) for line in submitted.stdout.splitlines()
            if line.startswith(("DRIVER", "TASK"))}
    assert seen.keys() == {"DRIVER", "TASK"}, submitted.stdout
    for names in seen.values():
        assert {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE"} <= names
        assert not names & CALLER_CREDENTIALS.keys()

    no_token = in_shell(stack.env_file, "unset RAY_AUTH_TOKEN RAY_AUTH_MODE; ray job list", tmp_path)
    assert no_token.returncode != 0
    assert "Authentication" in no_token.stdout + no_token.stderr


def test_ray_init_with_stack_env_address(stack, tmp_path):
    script = (
        "import os, ray; ray.init(address=os.environ['RAY_ADDRESS']);"
        "print('SUM', ray.get(ray.remote(lambda: 1 + 2).remote()))"
    )
    connected = run([sys.executable, "-c", script], env=stack.env(), cwd=tmp_path)
    assert "SUM 3" in connected.stdout, connected.stderr


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_services_listen_on_loopback_only(stack):
    found = listeners(session_members(list(recorded_pids(stack.directory).values())))
    assert len(found) >= 10  # S3, MLflow, and Ray's many servers
    exposed = not_on_loopback(found)
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)


def test_up_again_reuses_the_running_stack(stack):
    before = recorded_pids(stack.directory)
    again = vitae("stack", "up", "--dir", stack.directory)
    assert again.returncode == 0, again.stderr
    assert recorded_pids(stack.directory) == before
    assert [line.split()[1] for line in again.stdout.splitlines() if line.startswith("  ")] == ["running"] * 3


def test_status_shows_each_service_healthy(stack):
    status = vitae("stack", "status", "--dir", stack.directory)
    assert status.returncode == 0, status.stdout
    env = stack.env()
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.startswith("  ")}
    assert rows["s3"][1:3] == ["healthy", env["AWS_ENDPOINT_URL_S3"]]
    assert rows["mlflow"][1:3] == ["healthy", env["MLFLOW_TRACKING_URI"]]
    assert rows["ray"][1:3] == ["healthy", env["RAY_ADDRESS"]]


def test_registered_model_survives_restart(stack, tmp_path):
    from mlflow import MlflowClient

    uri = stack.env()["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    run_id = client.create_run(client.create_experiment("registry-check")).info.run_id
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.txt").write_text("tiny weights")
    client.log_artifacts(run_id, str(tmp_path / "model"), "model")
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"runs:/{run_id}/model", run_id).version

    assert vitae("stack", "down", "--dir", stack.directory).returncode == 0
    restarted = vitae("stack", "up", "--dir", stack.directory, "--num-cpus", STACK_NUM_CPUS)
    assert restarted.returncode == 0, restarted.stderr

    uri = stack.env()["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    assert client.get_model_version("tiny", version).run_id == run_id
    restored = client.download_artifacts(run_id, "model/weights.txt", str(tmp_path / "restored"))
    assert Path(restored).read_text() == "tiny weights"


def test_down_twice_stops_exactly_the_stack(stack, ray_cluster):
    members = session_members(list(recorded_pids(stack.directory).values()))
    assert members
    first = vitae("stack", "down", "--dir", stack.directory)
    assert first.returncode == 0
    assert [line.split()[:2] for line in first.stdout.splitlines()] == [
        ["ray:", "stopped"], ["mlflow:", "stopped"], ["s3:", "stopped"]
    ]
    second = vitae("stack", "down", "--dir", stack.directory)
    assert second.returncode == 0
    assert [line.split()[:3] for line in second.stdout.splitlines()] == [
        ["ray:", "not", "running"], ["mlflow:", "not", "running"], ["s3:", "not", "running"]
    ]
    alive = run(["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, members))]).stdout.split()
    assert all(stat.startswith("Z") for stat in alive[1::2]), alive
    assert not stack.env_file.exists() and not (stack.directory / "aws-credentials").exists()
    assert vitae("stack", "status", "--dir", stack.directory).returncode == 1
    assert ray_head_healthy(ray_cluster.ports)  # the other cluster on this machine is untouched


def test_user_errors_are_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for result, expected in [
        (vitae("stack", "up", "--dir", not_a_dir / ".vitae"), "cannot use"),
        (vitae("stack", "status", "--dir", tmp_path / "none"), "no stack in"),
    ]:
        assert result.returncode == 2
        assert result.stderr.startswith("vitae: error: ") and expected in result.stderr
        assert result.stderr.count("\n") == 1

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = vitae("stack", "up", "--dir", tmp_path / "busy", "--mlflow-port", port)
    assert result.returncode == 2 and f"port {port}" in result.stderr
    assert not (tmp_path / "busy" / "state.json").exists()  # ports are checked before anything starts
    down = vitae("stack", "down", "--dir", tmp_path / "never")
    assert down.returncode == 0 and not (tmp_path / "never").exists()
