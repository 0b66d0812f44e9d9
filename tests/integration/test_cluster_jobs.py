"""Every job through the real `ray job submit` CLI as docs/cluster-jobs.md submits it:
`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m pipelines.<job>
--config FILE`, with Ray's token authentication.

The module's scenario runs against the session's Ray head (`ray start --head`, the embedded stack's
code; its nodes carry the S3 and MLflow settings, as a configured cluster's nodes do) from a copy
of the repository's files, with the jobs' configs inside it so that they travel with the working
directory: a job with a bad config; then side by side a training job, a 2-trial sweep that
registers its best trial as @challenger, and a sweep with a trial that fails on its workers; then, side by
side, promote and an evaluation of @challenger into S3. Resuming a re-submitted run is covered by
tests/pipelines/training/test_driver.py and tests/pipelines/tuning/test_driver.py.

`test_the_walkthrough_runs_verbatim` runs the walkthrough block of docs/cluster-jobs.md itself with bash, in a
fresh copy of the repository, against a `vitae stack up` of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from infra import object_store
from infra.errors import UserError
from pipelines.model_registry import champions
from pipelines.training.train_state import STATE_NAME
from pipelines.cli import build_parser
from pipelines.model_registry.options import EvaluateOptions, PromoteOptions, resolve_options
from pipelines.tracking.runs import PARENT_RUN_TAG, RUN_NAME_TAG, SWEEP_NAME_TAG
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.train_helpers import prepare_dataset, ray_job, tiny_config, write_config

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH_PAGE = REPO / "docs" / "cluster-jobs.md"
WALKTHROUGH_SECTION = "## Walkthrough on the embedded stack"
RUNTIME_ENV = "cluster/runtime_env.yaml"
EPOCHS = 2
TEST_SAMPLES = 180  # digits: 10% of 1797
# Planted where a user's clone keeps its datasets (`data/`, `*.tar`, neither of them git-ignored):
# the runtime env's excludes (and .rayignore) keep it out of the upload.
BULK_FILE, BULK_BYTES = "data/raw/train-000000.tar", 24 * 2**20
MAX_UPLOAD_MIB = 4.0


def repository_copy(destination: Path) -> Path:
    """The files a clone of the working tree holds (tracked, or untracked but not ignored), copied."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listing.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


def submit(workdir: Path, submission_id: str, job: str, config: str) -> subprocess.CompletedProcess:
    """`ray job submit` as docs/cluster-jobs.md writes it, following the job's logs until it ends."""
    return ray_job("submit", "--working-dir", ".", "--runtime-env", RUNTIME_ENV, "--submission-id", submission_id,
                   "--", sys.executable, "-m", f"pipelines.{job}", "--config", config, check=False, cwd=workdir)


def without_training_shards(data_url: str) -> str:
    """A copy of the dataset without its training shards: the driver's checks pass (they read the
    manifest), the workers' first read fails."""
    source = object_store.parse_s3_url(data_url)
    store = object_store.shared_store(source.bucket)
    target = f"{source.key}-without-train"
    for item in store.client.list_objects_v2(Bucket=source.bucket, Prefix=f"{source.key}/")["Contents"]:
        name = item["Key"].rsplit("/", 1)[1]
        if not name.startswith("train-"):
            store.client.copy_object(Bucket=source.bucket, Key=f"{target}/{name}",
                                     CopySource={"Bucket": source.bucket, "Key": item["Key"]})
    return f"s3://{source.bucket}/{target}"


def sweep_config(name: str, data_url: str, storage_url: str, experiment: str, **sections) -> dict:
    """Two trials of the tiny training run over the learning rate, one worker each, no ASHA; `sections`
    replace these."""
    sweep = {
        "name": name,
        "base": tiny_config("ignored", data_url, storage_url, mlflow={"experiment": experiment}),
        "overrides": {"schedule.epochs": EPOCHS},
        "search": {"num_samples": 2, "seed": 0, "space": {"optim.lr": {"kind": "choice", "values": [1.6e-2, 8e-3]}}},
        "asha": {"enabled": False},
        "trial": {"num_workers": 1, "driver_cpus": 1},
    }
    return {**sweep, **sections}


def checkpoint_keys(storage_url: str, run_name: str) -> list[str]:
    """The training-state files of run `run_name`'s checkpoints in S3."""
    location = object_store.parse_s3_url(storage_url).join(run_name)
    listing = object_store.shared_store(location.bucket).client.list_objects_v2(
        Bucket=location.bucket, Prefix=f"{location.key}/checkpoint_")
    return [item["Key"] for item in listing.get("Contents", []) if item["Key"].endswith(f"/{STATE_NAME}")]


@dataclass
class Scenario:
    suffix: str
    workdir: Path
    storage_url: str
    experiment: str
    model_name: str
    submitted: dict[str, subprocess.CompletedProcess]  # job -> `ray job submit`'s outcome

    def submission_id(self, job: str) -> str:
        return f"{job}-{self.suffix}"

    def output(self, job: str) -> str:
        return self.submitted[job].stdout + self.submitted[job].stderr

    def info(self, job: str):
        from ray.job_submission import JobSubmissionClient  # the jobs API at RAY_API_SERVER_ADDRESS

        return JobSubmissionClient().get_job_info(self.submission_id(job))

    def logs(self, job: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient().get_job_logs(self.submission_id(job))

    def runs(self, filter_string: str) -> list:
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment).experiment_id
        return client.search_runs([experiment], filter_string=filter_string)


@pytest.fixture(scope="module")
def scenario(ray_cluster, tmp_path_factory) -> Scenario:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    suffix = uuid.uuid4().hex[:8]
    data_bucket, checkpoint_bucket = f"jobs-data-{suffix}", f"jobs-ckpt-{suffix}"
    for bucket in (data_bucket, checkpoint_bucket):
        object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{data_bucket}/digits16", shard_max_samples=170, digits_size=16)
    storage_url, experiment, model_name = f"s3://{checkpoint_bucket}/runs", f"cluster-jobs-{suffix}", f"jobs-{suffix}"

    workdir = repository_copy(tmp_path_factory.mktemp("clone"))
    (workdir / BULK_FILE).parent.mkdir(parents=True)
    (workdir / BULK_FILE).write_bytes(os.urandom(BULK_BYTES))
    jobs = workdir / "jobs"  # inside the working directory: uploaded with it, read by the drivers
    jobs.mkdir()
    train = tiny_config(f"train-{suffix}", data_url, storage_url, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5},
                        mlflow={"experiment": experiment})
    write_config(jobs / "train.yaml", train)
    write_config(jobs / "bad.yaml", {**train, "model": {**train["model"], "depht": 2}})
    write_config(jobs / "sweep.yaml", sweep_config(f"sweep-{suffix}", data_url, storage_url, experiment,
                                                   registry={"model_name": model_name}))
    # Two trials, one on the dataset and one on its copy without training shards (seed 1 draws both in Ray 2.60).
    failing = sweep_config(f"failing-{suffix}", data_url, storage_url, experiment, search={
        "num_samples": 2, "seed": 1,
        "space": {"data.url": {"kind": "choice", "values": [data_url, without_training_shards(data_url)]}}})
    failing["overrides"] = {"schedule.epochs": 1, "checkpoint.max_failures": 0}
    write_config(jobs / "failing.yaml", failing)
    write_config(jobs / "promote.yaml", {"model": model_name, "lock_url": f"s3://{checkpoint_bucket}"})
    write_config(jobs / "evaluate.yaml", {"model": f"models:/{model_name}@challenger", "data": data_url,
                                          "output": f"s3://{checkpoint_bucket}/evaluations/challenger"})

    scenario = Scenario(suffix, workdir, storage_url, experiment, model_name, {})

    def run(job: str, module: str) -> None:
        scenario.submitted[job] = submit(workdir, scenario.submission_id(job), module, f"jobs/{job}.yaml")

    def side_by_side(*jobs: tuple[str, str]) -> None:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(run, job, module) for job, module in jobs]:
                future.result()

    run("bad", "train")  # first: it uploads the working directory, which the others reuse
    side_by_side(("train", "train"), ("sweep", "tune"), ("failing", "tune"))  # 2 + 2x2 + 2 of 8 CPUs
    side_by_side(("promote", "promote"), ("evaluate", "evaluate"))
    return scenario


def test_the_working_dir_upload_is_small_and_shared(scenario, tmp_path):
    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    # The package's name is the hash of the files Ray packs with these excludes: the jobs got exactly these.
    excludes = yaml.safe_load((scenario.workdir / RUNTIME_ENV).read_text())["excludes"]
    uri = get_uri_for_directory(str(scenario.workdir), include_gitignore=True, excludes=excludes)
    assert {scenario.info(job).runtime_env["working_dir"] for job in scenario.submitted} == {uri}
    assert [job for job in scenario.submitted if f"Uploading package {uri}" in scenario.output(job)] == ["bad"]
    package = tmp_path / "package.zip"
    create_package(str(scenario.workdir), package, include_gitignore=True, excludes=excludes)
    assert package.stat().st_size < MAX_UPLOAD_MIB * 2**20 < BULK_BYTES
    packed = set(zipfile.ZipFile(package).namelist())
    assert {"pyproject.toml", "pipelines/train.py", "jobs/train.yaml"} <= packed and BULK_FILE not in packed


def test_a_job_with_a_bad_config_fails_with_its_reason(scenario):
    reason = "vitae: error: invalid config: model.depht: unknown key"
    assert scenario.submitted["bad"].returncode != 0  # `ray job submit` reports the failure
    assert f"Job '{scenario.submission_id('bad')}' failed" in scenario.output("bad")
    info = scenario.info("bad")
    assert (info.status, info.driver_exit_code) == ("FAILED", 2) and reason in info.message
    logs = scenario.logs("bad")
    assert reason in logs.splitlines() and "Traceback" not in logs


def test_the_training_job_trains_on_workers_and_says_where_results_went(scenario):
    from ray.util.state import list_actors

    output, run_name = scenario.output("train"), f"train-{scenario.suffix}"
    assert scenario.submitted["train"].returncode == 0, output[-4000:]
    info = scenario.info("train")
    assert (info.status, info.driver_exit_code) == ("SUCCEEDED", 0)
    # The driver stays light: the training ran in the job's two Ray Train worker actors.
    actors = list_actors(address=os.environ["RAY_API_SERVER_ADDRESS"], filters=[("job_id", "=", info.job_id)],
                         limit=1000, raise_on_missing_output=False)
    assert sum(actor.class_name == "RayTrainWorker" for actor in actors) == 2, [a.class_name for a in actors]
    (run,) = scenario.runs(f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == EPOCHS
    assert f"checkpoints: {scenario.storage_url}/{run_name} (latest: " in output
    assert f"MLflow run: {os.environ['MLFLOW_TRACKING_URI']}" in output and run.info.run_id in output
    assert f"model: {run.data.tags['vitae.model_uri']}" in output
    assert len(checkpoint_keys(scenario.storage_url, run_name)) == EPOCHS  # num_to_keep 2


def test_the_sweep_job_trains_its_trials_and_registers_the_best(scenario):
    output, sweep_name = scenario.output("sweep"), f"sweep-{scenario.suffix}"
    assert scenario.submitted["sweep"].returncode == 0, output[-4000:]
    assert scenario.info("sweep").status == "SUCCEEDED"
    assert "-> 2 trial(s) at a time" in output
    assert f"checkpoints: {scenario.storage_url}/{sweep_name} (the sweep)" in output
    (parent,) = scenario.runs(f"tags.`{SWEEP_NAME_TAG}` = '{sweep_name}'")
    trials = scenario.runs(f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
    for run in trials:
        assert checkpoint_keys(scenario.storage_url, run.data.tags[RUN_NAME_TAG]), run.data.tags[RUN_NAME_TAG]
    challenger = MlflowClient().get_model_version(scenario.model_name,
                                                  champions.alias_version(scenario.model_name, champions.CHALLENGER))
    assert challenger.run_id in {run.info.run_id for run in trials}
    assert f"registered models:/{scenario.model_name}/{challenger.version}" in output


def test_a_sweep_with_a_failed_trial_fails_its_job(scenario):
    output = scenario.output("failing")
    assert scenario.submitted["failing"].returncode != 0, output[-4000:]
    info = scenario.info("failing")
    assert (info.status, info.driver_exit_code) == ("FAILED", 1)
    assert f"sweep failing-{scenario.suffix}: 1 trial(s) failed" in info.message
    # Although the other trial completed: a sweep with a failed trial has not succeeded.
    logs = scenario.logs("failing")
    statuses = re.findall(r"^\s*\S+_0000\d .* (completed|error)\s*$", logs, re.MULTILINE)  # the trial table
    assert sorted(statuses) == ["completed", "error"], logs[-4000:]
    assert "NoSuchKey" in logs  # the workers' error: a training shard is missing


def test_the_promote_job_moves_the_champion(scenario):
    output = scenario.output("promote")
    assert scenario.submitted["promote"].returncode == 0, output[-4000:]
    challenger = champions.alias_version(scenario.model_name, champions.CHALLENGER)
    assert champions.alias_version(scenario.model_name, champions.CHAMPION) == challenger
    assert f"promoted: no champion yet: version {challenger}" in output
    assert (f"logged to the MLflow experiment promotions/{scenario.model_name} at "
            f"{os.environ['MLFLOW_TRACKING_URI']}") in output


def test_the_evaluate_job_writes_its_report_to_s3(scenario):
    output = scenario.output("evaluate")
    assert scenario.submitted["evaluate"].returncode == 0, output[-4000:]
    report_url = f"s3://jobs-ckpt-{scenario.suffix}/evaluations/challenger"
    assert f"wrote {report_url}/confusion_matrix.png, {report_url}/metrics.json" in output
    location = object_store.parse_s3_url(report_url)
    store = object_store.shared_store(location.bucket)
    report = json.loads(store.get_bytes(f"{location.key}/metrics.json"))
    assert report["samples"] == TEST_SAMPLES and report["split"] == "test"
    assert store.get_bytes(f"{location.key}/confusion_matrix.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # The same model on the same split as promotion scored it: the same number.
    challenger = champions.alias_version(scenario.model_name, champions.CHALLENGER)
    tags = MlflowClient().get_model_version(scenario.model_name, challenger).tags
    assert report["top1"] == pytest.approx(float(tags["eval.top1"]))


def test_no_secret_in_the_jobs_submissions_or_logs(scenario):
    secrets = (TEST_ACCESS_KEY, TEST_SECRET_KEY, os.environ["RAY_AUTH_TOKEN"])
    for job in scenario.submitted:
        info = scenario.info(job)
        texts = [json.dumps(info.runtime_env), json.dumps(info.metadata), info.entrypoint, scenario.output(job),
                 scenario.logs(job)]
        assert not [secret for secret in secrets for text in texts if secret in text], job


# --- --config for the jobs whose settings are flags: no cluster ----------------------------------

def test_flags_override_the_options_file(tmp_path):
    path = write_config(tmp_path / "promote.yaml", {"model": "digits", "margin": 0.01, "lock_url": "s3://locks"})
    args = build_parser().parse_args(["promote", "--config", str(path), "--margin", "0", "--version", "3"])
    options = resolve_options(args, PromoteOptions)
    assert (options.model, options.margin, options.version, options.lock_url) == ("digits", 0.0, 3, "s3://locks")
    assert (options.split, options.metric, options.rollback) == ("test", "top1", False)


@pytest.mark.parametrize("options_type, file, argv, message", [
    (PromoteOptions, None, ["promote"], "--model is required (the flag, or `model:` in the --config file)"),
    (PromoteOptions, {"model": "digits"}, ["promote", "--margin", "-1"],
     "invalid options (flags and {file}): margin: Input should be greater than or equal to 0"),
    (EvaluateOptions, {"model": "m", "margn": 1}, ["evaluate", "--data", "s3://d/x"],
     "invalid options (flags and {file}): margn: unknown key"),
])
def test_bad_options_are_one_line_naming_the_key(tmp_path, options_type, file, argv, message):
    path = write_config(tmp_path / "options.yaml", file) if file else None
    args = build_parser().parse_args(argv + (["--config", str(path)] if path else []))
    with pytest.raises(UserError) as error:
        resolve_options(args, options_type)
    assert str(error.value) == message.format(file=path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*_promote.yaml")), ids=lambda p: p.name)
def test_example_promote_configs_validate(path):
    options = resolve_options(argparse.Namespace(config=str(path)), PromoteOptions)
    assert options.model and options.lock_url.startswith("s3://")


# --- the documented walkthrough, verbatim, on a stack of its own ----------------------------------

def walkthrough() -> str:
    text = WALKTHROUGH_PAGE.read_text()
    section = text[text.index(WALKTHROUGH_SECTION):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
@pytest.mark.services  # a `vitae stack up` of its own
def test_the_walkthrough_runs_verbatim(tmp_path):
    workdir = repository_copy(tmp_path / "clone")
    # Only what the block itself sets up: no address, credential or token of the session's services.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_", "MLFLOW_", "VITAE_"))}
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", walkthrough()], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=840)
    finally:
        subprocess.run([sys.executable, "-m", "pipelines.cli", "stack", "down", "--dir", str(workdir / ".vitae")],
                       capture_output=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    for submission_id in re.findall(r"--submission-id (\S+)", walkthrough()):
        assert f"Job '{submission_id}' succeeded" in output
    assert re.search(r"^promoted: no champion yet: version 1 ", output, re.MULTILINE)
    # The block's last step: what landed in MLflow and S3.
    runs = {name: int(count) for name, count in re.findall(r"^MLflow (\S+): (\d+) finished runs$", output, re.MULTILINE)}
    assert runs.keys() == {"vitae-digits", "vitae-digits-sweeps", "promotions/digits-vitae"}, runs
    assert (runs["vitae-digits"], runs["vitae-digits-sweeps"], runs["promotions/digits-vitae"]) == (1, 3, 1)
    assert re.search(r"^MLflow models:/digits-vitae@champion: version 1, test top-1 0\.\d+$", output, re.MULTILINE)
    checkpoints = dict(re.findall(r"^S3 (s3://\S+): (\d+) checkpoints$", output, re.MULTILINE))
    assert checkpoints == {"s3://vitae-checkpoints/train/": "2", "s3://vitae-checkpoints/sweeps/": "4"}  # 2 epochs each
