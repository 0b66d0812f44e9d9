"""The logged model on the real stack (moto S3 server, `mlflow server`): raw images of any size to
class names through `vitae predict` and `mlflow.pyfunc`; `vitae evaluate` equal to the training
code's evaluation; the registered champion loaded by plain MLflow calls in a fresh process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy
import pandas
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep.dataset import PreparedDataset, decode_sample
from pipelines.cli import main
from pipelines.model_registry.evaluation import evaluate_model
from pipelines.model_packaging import PackagedClassifier, package
from tests.support.http_fault_proxy import dead_tracking_uri, tracking_uri
from tests.support.model_helpers import TinyClassifier, digits_dataset, make_classifier
from tests.support.train_helpers import make_shapes_folder, prepare_dataset

pytestmark = pytest.mark.timeout(600)  # a shared 2-core machine can be slow

# (file name, size, format): the model was trained at 16 px
IMAGE_FILES = (("native.png", (16, 16), "PNG"), ("wide.jpg", (48, 30), "JPEG"), ("tall.png", (40, 100), "PNG"))


@pytest.fixture(scope="module")
def trained(s3_endpoint, mlflow_server) -> TinyClassifier:
    return make_classifier(digits_dataset("serving"), epochs=1)


@pytest.fixture(scope="module")
def image_files(trained, tmp_path_factory) -> list[Path]:
    """Test-split digits saved as files of other sizes and formats."""
    directory = tmp_path_factory.mktemp("images")
    samples = wds.WebDataset(PreparedDataset.open(trained.data_url).shard_urls("test"), shardshuffle=False)
    paths = []
    for (name, size, image_format), sample in zip(IMAGE_FILES, samples):
        image, _ = decode_sample(sample)
        image.resize(size, Image.Resampling.BICUBIC).save(directory / name, format=image_format)
        paths.append(directory / name)
    return paths


def top1_by_pytorch_flavour(trained: TinyClassifier, path: Path) -> str:
    """Independently of the pyfunc: the eval transform, the packaged module, argmax."""
    image = Image.open(path).convert("RGB")
    with torch.no_grad():
        logits = package(trained.model, trained.data.info)(trained.data.eval_transform(image)[None])
    return trained.data.class_names[logits.argmax().item()]


def test_predict_prints_top_k_class_names_for_images_of_any_size(trained, image_files, capsys):
    assert main(["predict", "--model", trained.uri, *map(str, image_files), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * len(image_files)
    for index, path in enumerate(image_files):
        block = lines[4 * index: 4 * index + 4]
        assert block[0] == str(path)
        ranks = [line.split() for line in block[1:]]
        assert [rank[0] for rank in ranks] == ["1.", "2.", "3."]
        assert all(rank[1] in trained.data.class_names for rank in ranks)
        probabilities = [float(rank[2].rstrip("%")) for rank in ranks]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 100.01
        assert ranks[0][1] == top1_by_pytorch_flavour(trained, path)


def test_predict_refuses_bad_paths_and_non_images_in_one_line(tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    for bad, message in ((tmp_path / "missing.jpg", "cannot read (No such file or directory)"),
                         (not_an_image, "not a decodable image")):
        assert main(["predict", "--model", "models:/unused@champion", str(bad)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(f"vitae: error: {bad}: ") and message in error


def test_pyfunc_takes_bytes_paths_pil_images_arrays_and_base64_json(trained, image_files, tmp_path):
    model = mlflow.pyfunc.load_model(trained.uri)
    encoded = [path.read_bytes() for path in image_files]
    pictures = [Image.open(io.BytesIO(data)) for data in encoded]
    expected = [top1_by_pytorch_flavour(trained, path) for path in image_files]
    inputs = {
        "bytes": encoded,
        "paths": [str(path) for path in image_files],
        "PIL images": pictures,
        "DataFrame column image": pandas.DataFrame({"image": encoded}),
        "uint8 arrays": pandas.Series([numpy.asarray(picture.convert("RGB")) for picture in pictures], dtype=object),
    }
    for kind, model_input in inputs.items():
        assert model.predict(model_input)["label"].tolist() == expected, kind
    # as a REST request: MLflow sends the bytes base64-encoded in JSON, the signature decodes them
    mlflow.models.predict(trained.uri, pandas.DataFrame({"image": encoded}), output_path=str(tmp_path / "answer.json"),
                          env_manager="local")
    answer = json.loads((tmp_path / "answer.json").read_text())["predictions"]
    assert [row["label"] for row in answer] == expected
    one = model.predict(encoded[0], params={"top_k": 2})
    assert list(one.columns) == ["label", "class_indices", "class_names", "probabilities"]
    assert len(one) == 1 and len(one["class_names"][0]) == 2
    assert one["class_names"][0] == [trained.data.class_names[i] for i in one["class_indices"][0]]

    metadata = model.metadata
    assert metadata.metadata["class_names"] == trained.data.class_names
    assert (metadata.metadata["img_size"], metadata.metadata["crop_pct"]) == (16, 1.0)
    assert metadata.get_input_schema().input_types()[0].name == "binary"
    assert metadata.get_params_schema().params[0].name == "top_k"
    example = metadata.load_input_example(mlflow.artifacts.download_artifacts(trained.uri))
    assert len(model.predict(example)) == 2  # the logged example: two PNGs, neither 16 px

    module = mlflow.pytorch.load_model(trained.uri)
    assert isinstance(module, PackagedClassifier)
    assert module(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)).shape == (3, 10)


def test_evaluate_matches_the_training_code_evaluation(trained, tmp_path, capsys):
    reference = trained.reference_totals("test")
    assert main(["evaluate", "--model", trained.uri, "--data", trained.data_url, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "180 samples: top-1" in out and str(tmp_path / "confusion_matrix.png") in out

    report = json.loads((tmp_path / "metrics.json").read_text())
    assert (report["top1"], report["top5"], report["samples"]) == (reference.top1 / 180, reference.top5 / 180, 180)
    assert report["loss"] == pytest.approx(reference.loss_sum / 180, rel=1e-5)
    assert report["confusion"] == reference.confusion.tolist()
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert evaluate_model(trained.uri, trained.data_url) == pytest.approx(
        {**reference.metrics(), "samples": 180.0}, rel=1e-5)


def test_evaluate_refuses_unknown_models_splits_and_other_classes(trained, tmp_path, capsys):
    shapes = prepare_dataset(str(make_shapes_folder(tmp_path / "shapes", per_class=10)), str(tmp_path / "prepared"),
                             shard_max_samples=50)
    cases = [
        ("models:/no-such-model/1", trained.data_url, "cannot load model models:/no-such-model/1: "),
        (trained.uri, trained.data_url, "has no samples in split 'holdout' (it has: test, train, val)"),
        (trained.uri, shapes, "predicts 10 classes (0, 1, 2, 3, 4, ...), "),
    ]
    for model, data, message in cases:
        split = "holdout" if "holdout" in message else "test"
        argv = ["evaluate", "--model", model, "--data", data, "--split", split, "--output", str(tmp_path)]
        assert main(argv) == 2
        error = capsys.readouterr().err  # after MLflow's download progress, if it got that far
        assert "Traceback" not in error and message in error.splitlines()[-1], error


FRESH_PROCESS = """
import json, sys
import mlflow, mlflow.pyfunc, mlflow.pytorch, torch
from PIL import Image
from pipelines.training.augment import EvalTransform

uri, paths = sys.argv[1], sys.argv[2:]
by_pyfunc = mlflow.pyfunc.load_model(uri).predict([open(p, "rb").read() for p in paths])["label"].tolist()
meta = mlflow.models.get_model_info(uri).metadata
transform = EvalTransform(meta["img_size"], meta["crop_pct"], meta["interpolation"])
module = mlflow.pytorch.load_model(uri)
with torch.no_grad():
    logits = module(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
by_pytorch = [meta["class_names"][i] for i in logits.argmax(dim=1).tolist()]
print(json.dumps({"pyfunc": by_pyfunc, "pytorch": by_pytorch, "module": type(module).__name__}))
"""


def test_the_champion_loads_in_a_fresh_process_with_plain_mlflow(trained, image_files, tmp_path):
    name = f"serving-{uuid.uuid4().hex[:8]}"
    version = mlflow.register_model(trained.uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    env = {key: value for key, value in os.environ.items()
           if key == "MLFLOW_TRACKING_URI" or key.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, f"models:/{name}@champion", *map(str, image_files)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    expected = [top1_by_pytorch_flavour(trained, path) for path in image_files]
    assert answer == {"pyfunc": expected, "pytorch": expected, "module": "PackagedClassifier"}


def test_a_predict_scores_the_readable_images_and_names_the_others(trained, image_files, tmp_path, capsys):
    unreadable = tmp_path / "folder.png"  # unreadable even for root, unlike a file of mode 0
    unreadable.mkdir()
    missing = tmp_path / "missing.png"
    argv = [str(image_files[0]), str(unreadable), str(image_files[1]), str(missing)]
    assert main(["predict", "--model", trained.uri, "--top-k", "1", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[::2] == [str(image_files[0]), str(image_files[1])]
    error = captured.err.splitlines()[-1]
    assert error.startswith("vitae: error: 2 of 4 images not scored: ") and "Traceback" not in captured.err
    assert f"{unreadable}: cannot read (Is a directory)" in error
    assert f"{missing}: cannot read (No such file or directory)" in error


def test_a_evaluate_refuses_a_non_uri_in_one_full_line_and_leaves_no_output(trained, tmp_path, capsys):
    output = tmp_path / "report"
    assert main(["evaluate", "--model", "not a uri", "--data", trained.data_url, "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1] == ("vitae: error: 'not a uri' is not a model URI (models:/NAME@ALIAS, "
                                      "models:/NAME/VERSION, runs:/RUN_ID/PATH, s3://..., ...) nor a model directory")
    assert not output.exists()
    assert main(["evaluate", "--model", "runs:/0123456789abcdef/model", "--data", trained.data_url,
                 "--output", str(output)]) == 2
    assert "Run with id=0123456789abcdef not found" in capsys.readouterr().err.splitlines()[-1]  # not cut short
    assert not output.exists()


def test_a_predict_and_evaluate_fail_fast_on_a_dead_mlflow(trained, image_files, tmp_path, capsys):
    commands = {"predict": ["predict", "--model", "models:/any@champion", str(image_files[0])],
                "evaluate": ["evaluate", "--model", "models:/any/1", "--data", trained.data_url,
                             "--output", str(tmp_path / "report")]}
    with tracking_uri(dead_tracking_uri()) as dead:
        for name, argv in commands.items():
            started = time.monotonic()
            assert main(argv) == 2, name
            elapsed = time.monotonic() - started
            error = capsys.readouterr().err
            assert error.count("\n") == 1 and f"vitae: error: the MLflow server {dead} did not answer (" in error
            assert elapsed < 20, (name, elapsed)
    assert not (tmp_path / "report").exists()
