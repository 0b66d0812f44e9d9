"""The training config: validation, overrides, resumable changes, the CLI's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.errors import UserError
from pipelines.training.config import TrainConfig, config_changes, load_config, parse_config
from tests.support.train_helpers import unit_config, write_config

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("path", [path for path in sorted((REPO / "configs").glob("*.yaml"))
                                  # sweep configs: test_tune; promotion configs: test_cluster_jobs
                                  if not path.name.endswith(("_sweep.yaml", "_promote.yaml"))],
                         ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(path)
    assert config.global_batch_size == config.data.batch_size * config.scaling.max_workers


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path / "run.yaml", unit_config())
    config = load_config(path, ["model.depth=2", "optim.ema_decay=null", "data.augment.scale=[0.5, 1.0]",
                                "name=other-run", "optim.lr=1e-3", "scaling.resources_per_worker={CPU: 2}"])
    assert (config.model.depth, config.optim.ema_decay, config.data.augment.scale) == (2, None, (0.5, 1.0))
    assert (config.name, config.optim.lr, config.scaling.resources_per_worker) == ("other-run", 1e-3, {"CPU": 2})


def test_lr_is_per_512_images_of_global_batch():
    config = parse_config(unit_config(optim={"lr": 1e-3, "accumulation_steps": 4}))
    assert config.global_batch_size == 32 * 2 * 4
    assert config.peak_lr == pytest.approx(1e-3 * 256 / 512)


def test_elastic_workers_are_a_min_max_pair_and_the_nominal_lr_is_the_most_workers():
    config = parse_config(unit_config(scaling={"num_workers": [1, 4]}, optim={"lr": 1e-3}))
    assert config.scaling.num_workers == (1, 4) and (config.scaling.min_workers, config.scaling.max_workers) == (1, 4)
    assert config.scaling.describe() == "1 to 4 workers (elastic)"
    assert config.global_batch_size == 32 * 4 and config.peak_lr == pytest.approx(1e-3 * 128 / 512)
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config  # as checkpoints store it
    assert parse_config(unit_config(scaling={"num_workers": 3})).scaling.describe() == "3 workers"


@pytest.mark.parametrize("sections, field", [
    ({"model": {"depth": 0}}, "model.depth: Input should be greater than or equal to 1"),
    ({"model": {"img_size": 24}}, "model: ViTAE v1 models need a square image size divisible by 16"),
    ({"model": {"name": "resnet50"}}, "model.name: unknown model 'resnet50'"),
    ({"model": {"mlp_ratio": 1.3}}, "model: normal-cell PCM with mlp_ratio=1.3"),
    ({"optim": {"lr_rate": 1}}, "optim.lr_rate: unknown key"),
    ({"optim": {"betas": [0.9, 1.5]}}, "optim.betas.1: Input should be less than 1"),
    ({"data": {"batch_size": "many"}}, "data.batch_size: Input should be a valid integer"),
    ({"data": {"augment": {"scale": [0.9, 0.2]}}}, "data.augment.scale: expected 0 < low <= high"),
    ({"schedule": {"epochs": 2, "warmup_epochs": 2}}, "schedule.warmup_epochs: must be less than schedule.epochs"),
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers: expected 1 <= min <= max <= 4096, got 0"),
    ({"scaling": {"num_workers": [3, 2]}}, "scaling.num_workers: expected 1 <= min <= max <= 4096, got [3, 2]"),
    ({"scaling": {"num_workers": [1, 2, 4]}}, "scaling.num_workers: expected a number of workers or [min, max]"),
    ({"name": "my run"}, "name: expected letters, digits"),
    ({"mlflow": {"tracking_uri": "https://me:pw@mlflow.example"}}, "mlflow.tracking_uri: no user:password@ in the URI"),
    ({"extra": {}}, "extra: unknown key"),
    ({"checkpoint": {"storage_path": "s3://c/r", "every_steps": 0}},
     "checkpoint.every_steps: Input should be greater than or equal to 1"),
    ({"checkpoint": {"storage_path": "s3://c/r", "upload": "later"}}, "checkpoint.upload: Input should be 'async'"),
])
def test_bad_fields_are_named(sections, field):
    with pytest.raises(UserError) as error:
        parse_config(unit_config(**sections))
    assert str(error.value).startswith(f"invalid config: {field}"), str(error.value)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
    ("optim.weight_decay=-.inf", "optim.weight_decay: Input should be a finite number"),
    ("data.augment.mixup_alpha=.inf", "data.augment.mixup_alpha: Input should be a finite number"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean.0: Input should be a finite number"),
    ("scaling.resources_per_worker={CPU: .inf}", "scaling.resources_per_worker.CPU: Input should be a finite number"),
    ("model.depth=100000", "model.depth: Input should be less than or equal to 64"),
    ("model.img_size=100000", "model.img_size: Input should be less than or equal to 1024"),
    ("model.mlp_ratio=1.0e6", "model.mlp_ratio: Input should be less than or equal to 16"),
    ("data.batch_size=10000000", "data.batch_size: Input should be less than or equal to 4096"),
    ("data.shuffle_buffer=1000000000", "data.shuffle_buffer: Input should be less than or equal to 100000"),
    ("data.loader_workers=100000", "data.loader_workers: Input should be less than or equal to 64"),
    ("optim.accumulation_steps=1000000", "optim.accumulation_steps: Input should be less than or equal to 1024"),
    ("schedule.epochs=100000000", "schedule.epochs: Input should be less than or equal to 10000"),
    ("scaling.num_workers=1000000", "scaling.num_workers: expected 1 <= min <= max <= 4096, got 1000000"),
    ("seed=18446744073709551616", "seed: Input should be less than or equal to 4294967295"),
    ("checkpoint.every_minutes=1.0e9", "checkpoint.every_minutes: Input should be less than or equal to 1440"),
    ("checkpoint.every_minutes=.nan", "checkpoint.every_minutes: Input should be a finite number"),
])
def test_absurd_values_are_refused_at_once_naming_the_field(tmp_path, override, message):
    path = write_config(tmp_path / "run.yaml", unit_config())
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        load_config(path, [override])
    assert str(error.value) == f"invalid config: {message}"
    assert time.monotonic() - started < 20, "validation is not cheap"  # milliseconds when quiet; seconds under load


def test_missing_sections_and_bad_files_are_named(tmp_path):
    raw = unit_config()
    del raw["checkpoint"]
    with pytest.raises(UserError, match=r"^invalid config: checkpoint: Field required"):
        parse_config(raw)
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML \(line 2\)"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(write_config(tmp_path / "ok.yaml", unit_config()), ["model.depth"])


def test_resuming_may_change_resources_only():
    base = parse_config(unit_config())
    resized = parse_config(unit_config(data={"loader_workers": 3}, scaling={"resources_per_worker": {"CPU": 2}},
                                       checkpoint={"storage_path": "s3://checkpoints/runs", "every_steps": 50,
                                                   "every_minutes": 10, "upload": "sync"}))
    assert config_changes(base, resized) == []
    longer = parse_config(unit_config(schedule={"epochs": 5}))
    assert config_changes(base, longer) == ["schedule.epochs: 3 -> 5"]


@pytest.mark.parametrize("config, overrides, error", [
    (unit_config(model={"depth": -1}), ["seed=1"], "model.depth: Input should be greater than or equal to 1"),
    (unit_config(), ["model.depth=100000"], "model.depth: Input should be less than or equal to 64"),
    (unit_config(), ["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
])
def test_cli_rejects_a_bad_config_with_one_line_before_touching_the_cluster(tmp_path, config, overrides, error):
    path = write_config(tmp_path / "bad.yaml", config)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    sets = [part for override in overrides for part in ("--set", override)]
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", str(path), *sets],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"vitae: error: invalid config: {error}"]

