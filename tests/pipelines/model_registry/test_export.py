"""`vitae export` on the session's MLflow and S3 servers: a registered model written back in the
reference layout, with the reference implementation's keys and shapes, read back by
`vitae.load_pretrained` and by `model.pretrained`; a bad model or destination is one line."""

from __future__ import annotations

import hashlib
import uuid

import mlflow
import torch

import vitae
from infra import object_store
from pipelines.cli import main as cli_main
from pipelines.model_packaging import ClassifierInfo
from pipelines.model_registry.champions import register_challenger
from pipelines.tracking.model_logging import log_classifier
from pipelines.training.config import parse_config
from pipelines.training.initial_weights import read_initial_weights
from tests.support.train_helpers import unit_config
from vitae.pretrained import read_checkpoint


def test_a_registered_model_exports_to_the_reference_layout_and_back(mlflow_server, s3_endpoint, tmp_path, capsys):
    torch.manual_seed(5)
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32).eval()  # the reference architecture
    info = ClassifierInfo("vitae_t", [str(d) for d in range(10)], 32, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("vitae-export-tests").experiment_id).info.run_id
    name = f"export-{uuid.uuid4().hex[:8]}"
    register_challenger(log_classifier(model, info, run_id), name, {})

    out = tmp_path / "vitae_t-digits.pth"
    assert cli_main(["export", "--model", f"models:/{name}@challenger", "--out", str(out)]) == 0
    sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"wrote {out}: 264 tensors in the reference layout" in capsys.readouterr().out
    written = read_checkpoint(out)
    assert list(written) == ["model"]
    reference = torch.load("tests/fixtures/reference_logits.pt", weights_only=True)["vitae_t"]["keys_shapes"]
    expected = {key: (10, *shape[1:]) if key.startswith("head.") else tuple(shape) for key, shape in reference.items()}
    assert {key: tuple(value.shape) for key, value in written["model"].items()} == expected

    copy = vitae.create_model("vitae_t", num_classes=10, img_size=32).eval()
    assert not vitae.load_pretrained(copy, out).head_replaced
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy(images), model(images), rtol=0, atol=0)

    bucket = f"export-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/exported/vitae_t.pth"
    assert cli_main(["export", "--model", f"runs:/{run_id}/model", "--out", url]) == 0
    assert object_store.shared_store(bucket).get_bytes("exported/vitae_t.pth") == out.read_bytes()
    config = parse_config(unit_config(model={"img_size": 32, "depth": None, "pretrained": url}))
    assert read_initial_weights(config, 10).sha256 == sha256  # what a models:/ source of this model records
    capsys.readouterr()

    for model_uri, destination, message in [
        (f"models:/{name}@nobody", str(tmp_path / "never.pth"), f"cannot load model models:/{name}@nobody"),
        (f"models:/{name}/1", "s3://no-such-bucket-vitae/x.pth", "bucket does not exist"),
        (f"models:/{name}/1", str(tmp_path / "no" / "dir.pth"), f"no directory {tmp_path / 'no'}"),
    ]:
        assert cli_main(["export", "--model", model_uri, "--out", destination]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vitae: error: ") and message in lines[0], lines
    assert not (tmp_path / "never.pth").exists() and list(tmp_path.iterdir()) == [out]
