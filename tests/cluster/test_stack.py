"""`vitae stack`: the embedded stack as a user runs it (CLI subprocesses, `source stack.env`), next
to the session's own Ray head, which it must leave alone; and the session fixtures themselves.
Its S3 objects (a dataset, a training run's checkpoints) survive a SIGKILL of the S3 server and
`down`/`up`, and the training run resumes from them."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import processes
from cluster.processes import ProcessId
from cluster.ray_head import ray_head_healthy, ray_session_logs, ray_temp_dir
from cluster.s3_server import REGION, snapshot_header
from infra.s3 import S3Config, make_client
from tests.support.listening import listeners, not_on_loopback
from tests.support.private_paths import shared_paths
from tests.support.train_helpers import checkpointed_epoch, tiny_config, write_config
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
STACK_NUM_CPUS = 4
SNAPSHOT_INTERVAL_S = 2  # of the stack's S3 server (default 30)
DATA_URL, STORAGE_URL, RUN, EPOCHS = "s3://vitae-data/digits16", "s3://vitae-checkpoints/runs", "survivor", 3
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
    up = vitae("stack", "up", "--dir", directory, "--num-cpus", STACK_NUM_CPUS, "--s3-snapshot-interval",
               SNAPSHOT_INTERVAL_S, env={**os.environ, **CALLER_CREDENTIALS})
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


def stack_objects(stack: StackRun) -> dict[str, str]:
    """bucket/key -> ETag of every object in the stack's S3."""
    secrets = stack.secrets()
    s3 = make_client(S3Config(endpoint_url=stack.env()["AWS_ENDPOINT_URL_S3"], region=REGION),
                     key_pair=(secrets["aws_access_key_id"], secrets["aws_secret_access_key"]))
    objects = {}
    for bucket in ("vitae-data", "vitae-checkpoints"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objects.update({f"{bucket}/{item['Key']}": item["ETag"] for item in page.get("Contents", [])})
    return objects


def snapshot_taken(stack: StackRun) -> float:
    return (snapshot_header(stack.directory / "s3" / "objects.snapshot") or {"written": 0.0})["written"]


@dataclass
class Survival:
    killed_at_epoch: int  # the run's checkpointed epochs when the S3 server was killed
    resumed: subprocess.CompletedProcess  # `vitae train` again, after `stack up`
    final_epoch: int


@pytest.fixture(scope="module")
def survived_s3_kill(stack, tmp_path_factory) -> Survival:
    """`vitae prep` a dataset and start `vitae train` (3 epochs, 1 worker); kill the driver once
    epoch 1 is checkpointed; once the S3 server has taken a snapshot, SIGKILL it; `stack up`, then
    `vitae train` again."""
    home, env = tmp_path_factory.mktemp("survival"), stack.env()
    prep = vitae("prep", "digits", "--out", DATA_URL, "--digits-size", 16, "--shard-max-samples", 170, env=env)
    assert prep.returncode == 0, prep.stderr
    config = write_config(home / "train.yaml", tiny_config(
        RUN, DATA_URL, STORAGE_URL, scaling={"num_workers": 1}, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5},
        mlflow={"experiment": "stack-survival"}))
    log = home / "first.log"
    with log.open("w") as output, pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.setenv(key, env[key])
        first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(config)], env=env,
                                 cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: first.poll() is not None or checkpointed_epoch(STORAGE_URL, RUN) >= 1, 300,
                     "a checkpoint of epoch 1", lambda: log.read_text()[-3000:])
            assert first.poll() is None, log.read_text()[-3000:]
        finally:
            processes.kill_child(first)  # the driver dies; its Ray Train run with it
        killed = time.time()  # a snapshot taken after this holds what was written before
        make_client(S3Config.from_env()).put_object(Bucket="vitae-data", Key="marker", Body=b"")  # one will come
        wait_for(lambda: snapshot_taken(stack) > killed, 30, "an S3 snapshot",
                 lambda: (stack.directory / "logs" / "s3.log").read_text()[-3000:])
        s3 = ProcessId(**json.loads((stack.directory / "state.json").read_text())["services"]["s3"]["process"])
        os.kill(s3.pid, signal.SIGKILL)
        wait_for(lambda: not processes.is_running(s3), 30, "the S3 server gone")
        up = vitae("stack", "up", "--dir", stack.directory)
        assert up.returncode == 0, up.stderr
        assert [line.split()[:2] for line in up.stdout.splitlines() if line.startswith("  ")] == [
            ["s3", "started"], ["mlflow", "running"], ["ray", "running"]]
        killed_at_epoch = checkpointed_epoch(STORAGE_URL, RUN)
        resumed = vitae("train", "--config", config, env=env)
        return Survival(killed_at_epoch, resumed, checkpointed_epoch(STORAGE_URL, RUN))


def test_a_killed_s3_server_keeps_the_dataset_and_checkpoints_and_training_resumes(stack, survived_s3_kill):
    survival = survived_s3_kill
    assert survival.killed_at_epoch >= 1  # the checkpoint written since `up` survived the SIGKILL
    assert survival.resumed.returncode == 0, (survival.resumed.stdout + survival.resumed.stderr)[-4000:]
    assert f"run {RUN}: resuming after epoch {survival.killed_at_epoch} of {EPOCHS}" in survival.resumed.stdout
    assert survival.final_epoch == EPOCHS
    verify = vitae("verify", DATA_URL, env=stack.env())
    assert verify.returncode == 0, verify.stdout + verify.stderr


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
    objects = stack_objects(stack)

    down = vitae("stack", "down", "--dir", stack.directory)
    assert down.returncode == 0
    snapshot = stack.directory / "s3" / "objects.snapshot"
    assert f"S3 objects: {snapshot} (" in down.stdout and "`vitae stack down --purge` deletes them" in down.stdout
    restarted = vitae("stack", "up", "--dir", stack.directory, "--num-cpus", STACK_NUM_CPUS)
    assert restarted.returncode == 0, restarted.stderr

    uri = stack.env()["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    assert client.get_model_version("tiny", version).run_id == run_id
    restored = client.download_artifacts(run_id, "model/weights.txt", str(tmp_path / "restored"))
    assert Path(restored).read_text() == "tiny weights"
    assert stack_objects(stack) == objects  # the S3 objects, written back by the stopping server


def test_status_shows_where_the_s3_objects_are_and_how_large(stack):
    status = vitae("stack", "status", "--dir", stack.directory)
    snapshot = stack.directory / "s3" / "objects.snapshot"
    size = f"{snapshot.stat().st_size / 1e6:.1f} MB"
    assert f"S3 objects: {snapshot} ({size}, snapshot of " in status.stdout, status.stdout
    assert snapshot.stat().st_mode & 0o777 == 0o600


def test_down_twice_stops_exactly_the_stack(stack, ray_cluster):
    members = session_members(list(recorded_pids(stack.directory).values()))
    assert members
    first = vitae("stack", "down", "--dir", stack.directory, "--purge")
    assert first.returncode == 0
    assert [line.split()[:2] for line in first.stdout.splitlines()] == [
        ["ray:", "stopped"], ["mlflow:", "stopped"], ["s3:", "stopped"], ["S3", "objects"]
    ]
    assert not list((stack.directory / "s3").iterdir())  # --purge: the objects' snapshot is gone
    second = vitae("stack", "down", "--dir", stack.directory)
    assert second.returncode == 0
    assert [line.split()[:3] for line in second.stdout.splitlines()] == [
        ["ray:", "not", "running"], ["mlflow:", "not", "running"], ["s3:", "not", "running"],
        ["S3", "objects:", str(stack.directory / "s3" / "objects.snapshot")]
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
