"""The training job on a cluster of two Ray nodes on this machine, one worker per node, surviving
the preemption and loss of a node.

The session's head runs in Ray's single-machine mode, which refuses other nodes, so this module
starts its own cluster in multi-node mode on the machine's address: a head and a worker node (two
raylets, 2 logical CPUs each), token authentication, every port its own. The test process imported
Ray in single-machine mode, so it drives the cluster through the `ray` CLI in subprocesses.

One scenario serves every assertion: the job (2 workers, STRICT_SPREAD, checkpoints in S3) is
submitted with `ray job submit`; once its workers read their first epoch, the worker node is drained
as a cloud preempts a spot machine (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, a
deadline of 60 s). The workers learn it from Ray Train (`get_preemption_info`) and checkpoint within
the epoch; once that checkpoint is registered the node is killed (its whole process family at once,
as the reclaim would), and a new worker node joins a few seconds later. STRICT_SPREAD cannot place
two workers on one node, so Ray Train's restart of the worker group waits for it, then goes on from
the preemption checkpoint, within the epoch.

Then, on the same cluster, an elastic run (`scaling.num_workers: [1, 2]`, a worker taking a node's
CPUs) starts on both nodes; once it has a checkpoint within its only epoch, the worker node is killed for good. Ray
Train's elastic training restarts the group on the one node left, which reads the rest of the epoch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
# written once a checkpoint is registered
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from cluster.net import free_ports
from cluster.ray_head import (
    PORT_NAMES,
    WORKER_NODE_PORT_NAMES,
    RayNode,
    machine_address,
    ray_client_env,
    ray_temp_dir,
    start_ray_head,
    start_ray_worker_node,
)
from infra import object_store
from data_prep.dataset import PreparedDataset
from pipelines.training.run_storage import RunStorage
from pipelines.training.sharding import steps_per_epoch
from pipelines.tracking.runs import RUN_NAME_TAG
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.train_helpers import prepare_dataset, ray_job, tiny_config, train_entrypoint, write_config

pytestmark = pytest.mark.timeout(480)

RUN_NAME = "digits-two-nodes"
ELASTIC_RUN_NAME = "digits-elastic"
EPOCHS = 3
BATCH_SIZE = 8  # 90 steps per epoch: time for the preemption notice to arrive within the first
PREEMPTION_CHECK_STEPS = 5
DRAIN_DEADLINE_S = 60
WORKERS = 2
CPUS_PER_NODE = 2
WORKER_NODE_RESOURCES = {"worker_node": 1}
REJOIN_AFTER_S = 3
# Ray prefixes a worker's lines with "(RayTrainWorker pid=N)"; the controller lists each group it starts.
WORKER_PID = re.compile(r"\(RayTrainWorker pid=(\d+)")
GROUP_MEMBER = re.compile(r"\(ip=[^,]+, pid=(\d+)\) world_rank=(\d+)")
READS = re.compile(r"epoch (\d+)/\d+: rank (\d+) on node (\w+) reads (\d+) samples in \d+ batches: "
                   r"blocks (.*) of (\d+)")
BLOCKS = re.compile(r"(\d+)-(\d+)")
EPOCH_END = re.compile(r"epoch (\d+)/\d+  train_loss")
RESTORED = re.compile(r"\(RayTrainWorker pid=(\d+).* restored the checkpoint after epoch (\d+) ")
REPLANNED = re.compile(r"epoch 1 goes on with 1 workers instead of 2: its (\d+) blocks left of (\d+) planned afresh")
RESTORED_WITHIN = re.compile(r"restored the checkpoint after epoch \d+ of \d+, batch (\d+) of epoch (\d+) "
                             r"\(step (\d+)\)")
PREEMPTION_NOTICED = re.compile(r"preemption of node\(s\) (\w+): checkpoint at step (\d+)")


@dataclass
class LogLine:
    at: float  # time.monotonic() when it arrived
    text: str


class JobLogs:
    """`ray job logs --follow` of one job in the background, each line stamped as it arrives."""

    def __init__(self, submission_id: str, env: dict[str, str]):
        self.lines: list[LogLine] = []
        self.process = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "job", "logs", "--follow",
                                         submission_id], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(LogLine(time.monotonic(), line.rstrip("\n")))

    def wait_until_finished(self, timeout_s: float) -> None:
        self.process.wait(timeout=timeout_s)  # --follow ends with the job
        self.reader.join(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class ElasticRun:
    """The elastic run on the same cluster: its job's logs and the latest checkpoint when its worker
    node was killed."""

    submission_id: str
    logs: list[LogLine]
    checkpoint_at_kill: dict
    killed_at: float  # time.monotonic() when the worker node was killed

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.logs)


def mlflow_run_named(experiment: str, run_name: str):
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


@dataclass
class Scenario:
    config_raw: dict
    data_url: str
    storage_url: str
    temp_dirs: list[Path]  # each node's, the head's first
    auth_token: str
    submission_id: str
    logs: list[LogLine]
    nodes: list[dict]  # `ray list nodes`: the head, the worker node before the kill, after it
    worker_node_ids: tuple[str, str]  # the worker node's id before the kill, then after it rejoined
    times: dict[str, float]  # time.monotonic() of each step, from "start"
    preemption_checkpoint: dict  # the metrics of the checkpoint taken on the preemption notice
    checkpoint_at_kill: dict  # the latest registered when the node was killed
    elastic: ElasticRun

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.logs)

    def worker_groups(self) -> list[set[int]]:
        """The worker processes (PIDs) of each worker group Ray Train started, in order."""
        members = [int(pid) for pid, _ in GROUP_MEMBER.findall(self.text)]
        return [set(members[start:start + WORKERS]) for start in range(0, len(members), WORKERS)]

    def reads(self) -> list[tuple[int, re.Match]]:
        """The per-epoch reading lines, with the PID of the worker that logged each."""
        return [(int(WORKER_PID.search(line.text)[1]), match) for line in self.logs
                if (match := READS.search(line.text))]

    @property
    def mlflow_run(self):
        return mlflow_run_named(self.config_raw["mlflow"]["experiment"], RUN_NAME)


def latest_checkpoint_metrics(bucket: str, key: str) -> dict | None:
    """The metrics of the latest checkpoint in Ray Train's snapshot `key` (None before one, or when
    the read raced Ray's rewrite of it)."""
    store = object_store.shared_store(bucket)
    try:
        latest = json.loads(store.get_bytes(key))["latest_checkpoint_result"] if store.head(key) else None
    except json.JSONDecodeError:
        return None
    return latest["metrics"] if latest else None


def wait_until(condition, timeout_s: float, what: str, logs: "JobLogs"):
    """The first true value of `condition()`, asked every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f}s; job logs:\n" + "\n".join(
            line.text for line in logs.lines[-60:])
        time.sleep(0.2)
    return value


def list_nodes(env: dict[str, str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "list", "nodes", "--format", "json"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def scenario(s3_endpoint, mlflow_server, tmp_path_factory) -> Scenario:
    times = {"start": time.monotonic()}
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    home = tmp_path_factory.mktemp("multinode")
    data_bucket, checkpoint_bucket = f"mn-data-{uuid.uuid4().hex[:8]}", f"mn-ckpt-{uuid.uuid4().hex[:8]}"
    for bucket in (data_bucket, checkpoint_bucket):
        object_store.make_client().create_bucket(Bucket=bucket)
    storage_url = f"s3://{checkpoint_bucket}/runs"

    token, host = secrets.token_hex(32), machine_address()
    temp_dirs = [ray_temp_dir(home / "head")]
    nodes: list[RayNode] = []

    def join_worker_node() -> None:
        # a node of its own directory: a new node's log monitor would publish the old one's logs again
        temp_dirs.append(ray_temp_dir(home / f"worker-{len(nodes)}"))
        ports = dict(zip(WORKER_NODE_PORT_NAMES, free_ports(len(WORKER_NODE_PORT_NAMES))))
        nodes.append(start_ray_worker_node(nodes[0].gcs_address, ports, CPUS_PER_NODE, WORKER_NODE_RESOURCES,
                                           token, temp_dirs[-1], home / "worker.log"))

    logs, logs_of_runs = None, []
    try:
        with ThreadPoolExecutor(1) as pool:  # the dataset is written while the cluster starts
            prepared = pool.submit(prepare_dataset, "digits", f"s3://{data_bucket}/digits16", shard_max_samples=170,
                                   digits_size=16)
            nodes.append(start_ray_head(dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)))), CPUS_PER_NODE, token,
                                        temp_dirs[0], home / "head.log", host=host))
            join_worker_node()
            times["cluster up"] = time.monotonic()
            data_url = prepared.result()
        raw = tiny_config(RUN_NAME, data_url, storage_url, data={"loader_workers": 0, "batch_size": BATCH_SIZE},
                          mlflow={"log_model": False}, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5},
                          checkpoint={"max_failures": 3, "preemption_check_steps": PREEMPTION_CHECK_STEPS},
                          scaling={"num_workers": WORKERS, "placement_strategy": "STRICT_SPREAD"})
        config_path = write_config(home / "digits.yaml", raw)
        env = {**os.environ, **ray_client_env(nodes[0].ports, token, host)}
        submission_id = f"train-{uuid.uuid4().hex[:8]}"
        # Ray Train's preemption watcher asks every 5 s by default: every second here
        runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}})
        ray_job("submit", "--no-wait", "--submission-id", submission_id, "--runtime-env-json", runtime_env, "--",
                *train_entrypoint(config_path), env=env)
        times["submitted"] = time.monotonic()
        logs = JobLogs(submission_id, env)

        wait_until(lambda: any(READS.search(line.text) for line in logs.lines), 240, "the first epoch's reading", logs)
        times["first epoch started"] = time.monotonic()
        worker_node = next(node["node_id"] for node in list_nodes(env) if not node["is_head_node"])
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", nodes[0].gcs_address,
                        "--node-id", worker_node, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        "spot instance reclaimed", "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)],
                       env=env, check=True, capture_output=True, timeout=120)
        times["worker node drained"] = time.monotonic()
        snapshot = f"runs/{RUN_NAME}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
        preemption_checkpoint = wait_until(
            lambda: (metrics := latest_checkpoint_metrics(checkpoint_bucket, snapshot))
            and str(metrics.get("reason", "")).startswith("preemption") and metrics, 120,
            "a checkpoint on the preemption notice", logs)
        times["preemption checkpoint"] = time.monotonic()
        nodes[1].kill()
        checkpoint_at_kill = wait_until(lambda: latest_checkpoint_metrics(checkpoint_bucket, snapshot), 60,
                                        "the latest checkpoint", logs)
        times["worker node killed"] = time.monotonic()
        time.sleep(REJOIN_AFTER_S)
        join_worker_node()
        times["worker node rejoined"] = time.monotonic()

        logs.wait_until_finished(timeout_s=240)
        times["finished"] = time.monotonic()
        cluster_nodes = list_nodes(env)
        worker_node_ids = tuple(node["node_id"] for node in sorted(
            (node for node in cluster_nodes if not node["is_head_node"]), key=lambda node: node["state"] == "ALIVE"))
        elastic = shrink_an_elastic_run(data_url, storage_url, home, env, nodes, logs_of_runs)
        times["elastic run finished"] = time.monotonic()
        yield Scenario(raw, data_url, storage_url, temp_dirs, token, submission_id, logs.lines, cluster_nodes,
                       worker_node_ids, times, preemption_checkpoint, checkpoint_at_kill, elastic)
    finally:
        for other in logs_of_runs:
            other.stop()
        if logs:
            logs.stop()
            stamped = sorted([*((line.at, line.text) for line in logs.lines),
                              *((at, f"--- {step}") for step, at in times.items())])
            (home / "job.log").write_text("".join(f"{at - times['start']:7.1f} {text}\n" for at, text in stamped))
        for node in reversed(nodes):
            node.stop()
        for directory in temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def shrink_an_elastic_run(data_url: str, storage_url: str, home: Path, env: dict[str, str], nodes: list[RayNode],
                          logs_of_runs: list[JobLogs]) -> ElasticRun:
    """Run `ELASTIC_RUN_NAME` (one epoch, 1 to 2 workers, one per node) on the head and the worker
    node; kill the worker node once the run has a checkpoint within the epoch; wait for its end."""
    raw = tiny_config(ELASTIC_RUN_NAME, data_url, storage_url, data={"loader_workers": 0, "batch_size": BATCH_SIZE},
                      mlflow={"log_model": False}, schedule={"epochs": 1, "warmup_epochs": 0.5},
                      checkpoint={"max_failures": 3, "every_steps": 5},
                      # Ray Train counts the workers that fit in the nodes' resources, not in its
                      # placement strategy: a worker takes a whole node's CPUs, so at most one per node
                      scaling={"num_workers": [1, WORKERS], "resources_per_worker": {"CPU": CPUS_PER_NODE}})
    submission_id = f"elastic-{uuid.uuid4().hex[:8]}"
    # Ray Train's elastic policy counts the nodes in a view refreshed every 20 s: right after the kill it
    # asks for 2 workers again and waits for them (60 s by default) before it asks for what fits
    runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}})
    ray_job("submit", "--no-wait", "--submission-id", submission_id, "--runtime-env-json", runtime_env, "--",
            *train_entrypoint(write_config(home / "elastic.yaml", raw)), env=env)
    logs = JobLogs(submission_id, env)
    logs_of_runs.append(logs)
    location = object_store.parse_s3_url(storage_url)
    snapshot = f"{location.key}/{ELASTIC_RUN_NAME}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    wait_until(lambda: "within_epoch" in (latest_checkpoint_metrics(location.bucket, snapshot) or {}), 240,
               "a checkpoint of the elastic run within its epoch", logs)
    nodes[-1].kill()
    killed_at = time.monotonic()
    at_kill = wait_until(lambda: latest_checkpoint_metrics(location.bucket, snapshot), 60, "the latest checkpoint",
                         logs)
    logs.wait_until_finished(timeout_s=300)
    return ElasticRun(submission_id, logs.lines, at_kill, killed_at)


def test_the_run_survives_losing_a_node_and_finishes(scenario):
    # `ray job logs --follow` ends with the job's final status
    assert f"Job '{scenario.submission_id}' succeeded" in scenario.text, scenario.text[-4000:]
    assert f"epoch {EPOCHS}/{EPOCHS}  train_loss" in scenario.text
    assert scenario.mlflow_run.info.status == "FINISHED"
    times = {**scenario.times, "checkpoint restored": next(line.at for line in scenario.logs
                                                           if RESTORED.search(line.text))}
    steps = sorted(times.items(), key=lambda item: item[1])
    print("timeline (s):", ", ".join(f"{step} {at - times['start']:.1f}" for step, at in steps))


def test_it_restarted_once_from_the_checkpoint_without_redoing_finished_epochs(scenario):
    first, second = scenario.worker_groups()  # the group that lost its node, and the one that replaced it
    restored = RESTORED.findall(scenario.text)
    assert len(restored) == 1 and int(restored[0][0]) in second, restored
    resumed_after = int(restored[0][1])
    assert 0 <= resumed_after < EPOCHS
    epochs_read = [{int(match[1]) for pid, match in scenario.reads() if pid in group} for group in (first, second)]
    assert set(range(1, resumed_after + 1)) <= epochs_read[0] <= set(range(1, resumed_after + 2))
    assert epochs_read[1] == set(range(resumed_after + 1, EPOCHS + 1))  # finished epochs are not trained again
    ends = [int(epoch) for epoch in EPOCH_END.findall(scenario.text)]
    assert sorted(set(ends)) == list(range(1, EPOCHS + 1)), ends
    # the first group trains on after the checkpoint taken on the notice until its node goes: it may end
    # the epoch the restart goes on within (then the second group ends it again); no other epoch twice
    assert all(ends.count(epoch) == 1 for epoch in range(1, EPOCHS + 1) if epoch != resumed_after + 1), ends
    history = MlflowClient().get_metric_history(scenario.mlflow_run.info.run_id, "epoch")
    assert sorted(metric.step for metric in history) == list(range(1, EPOCHS + 1))


def test_a_preempted_node_is_checkpointed_within_the_epoch_and_training_goes_on_from_there(scenario):
    before, _ = scenario.worker_node_ids
    noticed = scenario.preemption_checkpoint
    [(node, step)] = PREEMPTION_NOTICED.findall(scenario.text)
    assert before.startswith(node) and int(step) == noticed["step"] and noticed["epoch_batches"] > 0
    assert scenario.checkpoint_at_kill["step"] >= noticed["step"]
    # The group went on from the notice's checkpoint or a later one: the first group trains on until
    # its node goes, and a checkpoint it reported before then (an epoch's end) may finish uploading
    # and be registered after the kill.
    within = RESTORED_WITHIN.findall(scenario.text)
    if within:  # restarted at the batch after a checkpoint within the epoch, not at the epoch's start
        [(batch, epoch, restored_step)] = within
        assert int(restored_step) >= noticed["step"] and int(epoch) >= noticed["within_epoch"]
        if int(restored_step) == noticed["step"]:
            assert (int(batch), int(epoch)) == (noticed["epoch_batches"], noticed["within_epoch"])
    else:
        [(_, resumed_after)] = RESTORED.findall(scenario.text)
        assert int(resumed_after) >= noticed["within_epoch"], (resumed_after, noticed)  # the notice's epoch ended


def test_one_worker_per_node_each_reading_its_own_samples(scenario):
    head = next(node["node_id"][:8] for node in scenario.nodes if node["is_head_node"])
    before, after = (node_id[:8] for node_id in scenario.worker_node_ids)
    worker_nodes = [node for node in scenario.nodes if not node["is_head_node"]]
    assert sorted(node["state"] for node in worker_nodes) == ["ALIVE", "DEAD"]
    assert all(node["resources_total"]["worker_node"] == 1 for node in worker_nodes)
    train_samples = PreparedDataset.open(scenario.data_url).num_samples("train")
    per_rank = steps_per_epoch(train_samples, WORKERS, BATCH_SIZE)  # batches, each a block of the epoch
    groups = scenario.worker_groups()
    node_of, reading = {}, {}  # (group, rank) -> node; (group, epoch) -> rank -> blocks
    for pid, match in scenario.reads():  # rank 0 logs every rank's line
        group = next(index for index, members in enumerate(groups) if pid in members)
        epoch, rank, node = int(match[1]), int(match[2]), match[3]
        assert node_of.setdefault((group, rank), node) == node  # a worker stays where it was placed
        blocks = {block for first, last in BLOCKS.findall(match[5]) for block in range(int(first), int(last) + 1)}
        assert int(match[4]) == len(blocks) * BATCH_SIZE == per_rank * BATCH_SIZE
        assert int(match[6]) == train_samples // BATCH_SIZE and max(blocks) < int(match[6])
        reading.setdefault((group, epoch), {})[rank] = blocks
    for group, worker_node in enumerate((before, after)):  # STRICT_SPREAD: one worker on each node
        assert sorted(node_of[group, rank] for rank in range(WORKERS)) == sorted([head, worker_node])
    for (group, epoch), ranks in reading.items():
        assert sorted(ranks) == list(range(WORKERS))
        assert not ranks[0] & ranks[1], f"epoch {epoch}: both nodes read {sorted(ranks[0] & ranks[1])[:5]}"
    assert {epoch for _, epoch in reading} == set(range(1, EPOCHS + 1))


def test_checkpoints_live_in_s3_only(scenario):
    location = object_store.parse_s3_url(scenario.storage_url)
    prefix = f"{location.key}/{RUN_NAME}/"
    listing = object_store.make_client().list_objects_v2(Bucket=location.bucket, Prefix=prefix)
    keys = [item["Key"] for item in listing.get("Contents", [])]
    checkpoints = {key.removeprefix(prefix).split("/")[0] for key in keys
                   if key.removeprefix(prefix).startswith("checkpoint_") and "/" in key.removeprefix(prefix)}
    assert checkpoints and all(f"{prefix}{name}/train_state.pt" in keys for name in checkpoints)
    result = RunStorage.open(scenario.storage_url).previous_result(RUN_NAME)
    assert result.metrics["epoch"] == EPOCHS
    assert result.checkpoint.filesystem.type_name == "s3"
    assert result.checkpoint.path.startswith(f"{location.bucket}/{location.key}/{RUN_NAME}/checkpoint_")
    local = [path for directory in (*scenario.temp_dirs, Path.home() / "ray_results" / RUN_NAME)
             for path in directory.rglob("checkpoint_*")]
    assert not local, local


def test_no_secret_in_the_job_logs(scenario):
    assert not any(secret in scenario.text for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, scenario.auth_token))


def test_an_elastic_run_goes_on_with_the_workers_left_reading_the_rest_of_its_epoch_once(scenario):
    elastic, at_kill = scenario.elastic, scenario.elastic.checkpoint_at_kill
    assert f"Job '{elastic.submission_id}' succeeded" in elastic.text, elastic.text[-4000:]
    assert "1 to 2 workers (elastic)" in elastic.text
    assert at_kill.get("within_epoch") == 1, at_kill  # the node went within the epoch
    # one restart, on the node left, from the checkpoint registered at the kill or a later one (one that
    # was still uploading)
    [(batch, _, step)] = RESTORED_WITHIN.findall(elastic.text)
    assert int(step) >= at_kill["step"] and int(batch) == int(step)  # one optimizer step per batch
    blocks = PreparedDataset.open(scenario.data_url).num_samples("train") // BATCH_SIZE
    [(left, of)] = REPLANNED.findall(elastic.text)
    assert (int(left), int(of)) == (blocks - WORKERS * int(batch), blocks), elastic.text[-4000:]
    run = mlflow_run_named(scenario.config_raw["mlflow"]["experiment"], ELASTIC_RUN_NAME)
    assert run.info.status == "FINISHED"
    # the epoch trained on each block once: the 2 workers' batches up to the checkpoint, then the rest on 1
    assert run.data.metrics["train_samples"] == blocks * BATCH_SIZE
    restored_at = next(line.at for line in elastic.logs if RESTORED_WITHIN.search(line.text))
    print(f"elastic run: node killed -> the checkpoint restored on 1 worker in {restored_at - elastic.killed_at:.1f} s")
