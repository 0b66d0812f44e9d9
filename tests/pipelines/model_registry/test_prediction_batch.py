"""`vitae predict --data` on the session's Ray cluster, S3 and MLflow servers: a dataset split scored by
Ray Data's actor pool agrees with `vitae evaluate`, row by row in the Parquet it writes; raw images in a
folder (its undecodable files named, exit 2, the rest kept) and under an `s3://` prefix are scored too."""

from __future__ import annotations

import uuid

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_prep.dataset import PreparedDataset
from infra.s3 import S3Config, make_client, s3_filesystem
from pipelines.cli import main
from pipelines.model_registry.evaluation import evaluate_model
from tests.support.model_helpers import TinyClassifier, digits_dataset, make_classifier

pytestmark = pytest.mark.timeout(600)  # a shared 2-core machine can be slow


@pytest.fixture(scope="module")
def trained(s3_endpoint, mlflow_server) -> TinyClassifier:
    return make_classifier(digits_dataset("batch-predict"), epochs=1)


def test_a_dataset_split_scored_on_ray_agrees_with_evaluate(trained, ray_cluster, capsys):
    bucket = f"predictions-{uuid.uuid4().hex[:8]}"
    make_client().create_bucket(Bucket=bucket)
    output = f"s3://{bucket}/val"
    code = main(["predict", "--model", trained.uri, "--data", trained.data_url, "--split", "val",
                 "--output", output, "--top-k", "3", "--batch-size", "32", "--actors", "2"])
    out = capsys.readouterr().out
    assert code == 0, out

    table = pq.read_table(f"{bucket}/val", filesystem=s3_filesystem(S3Config.from_env())).to_pandas()
    dataset = PreparedDataset.open(trained.data_url)
    truth = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(dataset.shard_urls("val"), shardshuffle=False)}
    assert list(table.columns) == ["key", "target", "class_indices", "class_names", "probabilities"]
    assert sorted(table["key"]) == sorted(truth) and len(table) == dataset.num_samples("val")
    assert all(truth[key] == target for key, target in zip(table["key"], table["target"]))
    for indices, names, probabilities in zip(table["class_indices"], table["class_names"], table["probabilities"]):
        assert len(indices) == 3 and list(names) == [dataset.class_names[i] for i in indices]
        assert list(probabilities) == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6

    top1 = evaluate_model(trained.uri, trained.data_url, "val")["top1"]
    hits = sum(int(indices[0] == target) for indices, target in zip(table["class_indices"], table["target"]))
    assert hits / len(table) == pytest.approx(top1, abs=1e-9)
    assert f"top-1 {top1:.2%}" in out and 0.5 < top1  # one epoch: far above chance (10%)


def test_a_folder_of_raw_images_is_scored_and_bad_files_named(trained, ray_cluster, tmp_path, capsys):
    folder = tmp_path / "raw"
    (folder / "nested").mkdir(parents=True)
    dataset = PreparedDataset.open(trained.data_url)
    samples = list(wds.WebDataset(dataset.shard_urls("test"), shardshuffle=False))[:5]
    for index, sample in enumerate(samples):
        (folder / ("nested" if index % 2 else "") / f"digit{index}.png").write_bytes(sample["png"])
    (folder / "notes.txt").write_text("not an image")

    code = main(["predict", "--model", trained.uri, "--data", str(folder), "--output", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 2 and "1 images not scored" in err and "notes.txt" in err

    table = pq.read_table(tmp_path / "out").to_pandas()
    assert "target" not in table.columns and len(table) == 5
    assert sorted(table["key"]) == sorted(["digit0.png", "nested/digit1.png", "digit2.png", "nested/digit3.png",
                                           "digit4.png"])
    assert all(len(names) == 5 for names in table["class_names"])
    code = main(["predict", "--model", trained.uri, "--data", str(folder), "--output", str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err  # earlier predictions are not mixed in
    assert pq.read_table(tmp_path / "out").num_rows == 5


def test_predict_needs_files_or_data(trained, capsys):
    assert main(["predict", "--model", trained.uri]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert main(["predict", "--model", trained.uri, "--split", "val", "x.png"]) == 2
    assert "--split applies only with --data" in capsys.readouterr().err


def test_raw_images_under_an_s3_prefix_are_scored(trained, ray_cluster, tmp_path, capsys):
    bucket = f"raw-{uuid.uuid4().hex[:8]}"
    client = make_client()
    client.create_bucket(Bucket=bucket)
    samples = list(wds.WebDataset(PreparedDataset.open(trained.data_url).shard_urls("test"), shardshuffle=False))[:3]
    for index, sample in enumerate(samples):
        client.put_object(Bucket=bucket, Key=f"incoming/day {index}/digit.png", Body=sample["png"])

    code = main(["predict", "--model", trained.uri, "--data", f"s3://{bucket}/incoming", "--output",
                 str(tmp_path / "out"), "--top-k", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    table = pq.read_table(tmp_path / "out").to_pandas()
    assert sorted(table["key"]) == [f"day {index}/digit.png" for index in range(3)]
    assert all(len(indices) == 1 for indices in table["class_indices"])
