"""Fine-tuning on the real stack, one Ray Train run: a reference-layout vitae_t checkpoint (224 px,
1000 classes, `module.` prefix) in S3 initialises a 10-class 32 px digits run through
`--set model.pretrained=s3://...`, as a linear probe (`model.freeze: ["*"]`), so every non-head
parameter of its last checkpoint must still equal the checkpoint's. The finished run then serves as
a `run:` source, and shows that a resumed run never reads its source again.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import vitae
from infra import object_store
from infra.errors import UserError
from pipelines.tracking.runs import RUN_NAME_TAG
from pipelines.training.config import TrainConfig
from pipelines.training.initial_weights import initial_weights_for, read_initial_weights
from pipelines.training.run_storage import RunStorage
from pipelines.training.train_state import STATE_NAME
from tests.support.train_helpers import prepare_dataset, tiny_config, train_entrypoint, write_config

pytestmark = pytest.mark.timeout(600)

RUN_NAME = "digits-probe"


@dataclass
class ProbeRun:
    config: TrainConfig
    source_url: str
    source_sha256: str
    source_state: dict[str, torch.Tensor]
    storage_url: str
    done: subprocess.CompletedProcess

    def final_state(self) -> dict[str, torch.Tensor]:
        result = RunStorage.open(self.storage_url).previous_result(RUN_NAME)
        with result.checkpoint.as_directory() as directory:
            return torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def probe(ray_cluster, tmp_path_factory) -> ProbeRun:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    bucket = f"probe-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{bucket}/digits32", shard_max_samples=400, digits_size=32)
    torch.manual_seed(1)
    reference = vitae.create_model("vitae_t")  # 224 px, 1000 classes: as published
    state = {key: value.clone() for key, value in reference.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"model": {f"module.{key}": value for key, value in state.items()}, "epoch": 300}, buffer)
    source_url = f"s3://{bucket}/published/vitae_t.pth"
    object_store.shared_store(bucket).put_bytes("published/vitae_t.pth", buffer.getvalue())
    storage_url = f"s3://{bucket}/runs"
    raw = tiny_config(RUN_NAME, data_url, storage_url, model={"img_size": 32, "depth": None, "freeze": ["*"]},
                      schedule={"epochs": 1, "warmup_epochs": 0}, scaling={"num_workers": 1},
                      data={"batch_size": 64}, optim={"ema_decay": None})
    config_path = write_config(tmp_path_factory.mktemp("probe") / "probe.yaml", raw)
    done = subprocess.run(train_entrypoint(config_path, f"model.pretrained={source_url}"), capture_output=True,
                          text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    config = TrainConfig.model_validate({**raw, "model": {**raw["model"], "pretrained": source_url}})
    return ProbeRun(config, source_url, hashlib.sha256(buffer.getvalue()).hexdigest(), state, storage_url, done)


def test_every_non_head_parameter_is_the_checkpoints(probe):
    final = probe.final_state()
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32)
    parameters = {name for name, _ in model.named_parameters()}
    assert final["head.weight"].shape == (10, 256)
    for name in parameters - {"head.weight", "head.bias"}:
        torch.testing.assert_close(final[name], probe.source_state[name], rtol=0, atol=0, msg=name)
    assert f"initial weights: {probe.source_url} (sha256 {probe.source_sha256[:12]}" in probe.done.stdout
    assert "head replaced (1000 classes in the checkpoint)" in probe.done.stdout


def test_mlflow_records_source_sha256_and_what_was_replaced(probe):
    client = MlflowClient()
    experiment = client.get_experiment_by_name(probe.config.mlflow.experiment).experiment_id
    (run,) = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN_NAME}'")
    params = run.data.params
    assert params["model.pretrained"] == probe.source_url
    assert params["pretrained.sha256"] == probe.source_sha256
    assert params["pretrained.replaced"] == "head.weight, head.bias"
    assert params["model.freeze"] == "['*']"


def test_a_finished_runs_checkpoint_is_a_source(probe):
    config = probe.config.model_copy(update={"model": probe.config.model.model_copy(
        update={"pretrained": f"run:{probe.storage_url}/{RUN_NAME}"})})
    initial = read_initial_weights(config, 10)
    assert not initial.report.head_replaced and initial.report.loaded_keys == 264
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32)
    initial.load_into(model)
    final = probe.final_state()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)


def test_a_resumed_run_never_reads_its_source_again(probe):
    location = object_store.parse_s3_url(probe.source_url)
    object_store.shared_store(location.bucket).delete(location.key)
    storage = RunStorage.open(probe.storage_url)
    assert initial_weights_for(probe.config, storage) is None  # resuming: the run's own checkpoint
    fresh = probe.config.model_copy(update={"name": "another-run"})
    with pytest.raises(UserError, match=f"^model.pretrained: {probe.source_url}: no such object$"):
        initial_weights_for(fresh, storage)
