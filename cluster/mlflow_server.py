"""The embedded MLflow tracking server: `mlflow server` on loopback, sqlite backend, proxied
artifacts, all under one private home directory that survives restarts (docs/design/stack.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster import processes
from cluster.net import LOOPBACK, http_ok, wait_until
from cluster.private_files import private_directory

# One worker process: several processes writing one sqlite file lock it.
WORKERS = 1


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen

    def stop(self) -> None:
        processes.stop_child(self.process)


def mlflow_server_healthy(uri: str) -> bool:
    return http_ok(f"{uri}/health")


def start_mlflow_server(home: Path, port: int, log_path: Path, timeout_s: float = 120) -> MlflowServer:
    """Start `mlflow server` on 127.0.0.1:port storing everything under `home`; wait until healthy.

    It runs in a session of its own (see `processes.launch`) and outlives the caller.
    """
    private_directory(home)
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", str(WORKERS),
        "--backend-store-uri", f"sqlite:///{home.resolve() / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(home.resolve() / "artifacts"),
    ]  # fmt: skip
    # Server-side job execution (GenAI scorers, prompt optimisation) starts seven extra consumer
    # processes that this project never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = processes.launch(argv, log_path, env)
    server = MlflowServer(f"http://{LOOPBACK}:{port}", process)
    try:
        wait_until(lambda: mlflow_server_healthy(server.uri), f"MLflow server at {server.uri}", timeout_s, process)
    except BaseException:
        server.stop()
        raise
    return server
