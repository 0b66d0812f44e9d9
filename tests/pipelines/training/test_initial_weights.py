"""Fine-tuning options without Ray: every kind of `model.pretrained` source read by the driver's code
and loaded by the workers' (files, the session's S3 and MLflow servers), its refusals, `model.freeze`,
`optim.layer_decay` (also in a sweep's space) and `model.grad_checkpointing`."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest
import torch
import yaml

import vitae
from infra import object_store
from infra.errors import UserError
from pipelines.cli import main as cli_main
from pipelines.model_packaging import ClassifierInfo
from pipelines.model_registry.champions import register_challenger
from pipelines.tracking.model_logging import log_classifier
from pipelines.training.config import TrainConfig, parse_config
from pipelines.training.initial_weights import read_initial_weights
from pipelines.training.optim import build_optimizer, peak_group_lr
from pipelines.training.worker import build_model
from pipelines.tuning.config import load_sweep
from tests.support.train_helpers import unit_config, write_config

NON_HEAD = lambda name: not name.startswith("head.")  # noqa: E731


def config_with(pretrained: str | None = None, **model) -> TrainConfig:
    return parse_config(unit_config(model={"img_size": 32, "depth": 1, "pretrained": pretrained, **model}))


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A vitae_t (one normal cell) as published: 224 px, 1000 classes, `module.` prefix, wrapped."""
    torch.manual_seed(3)
    state = vitae.create_model("vitae_t", depth=1).state_dict()
    path = save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 300},
                tmp_path_factory.mktemp("published") / "vitae_t.pth.tar")
    return path, state


def assert_starts_from(config: TrainConfig, state: dict[str, torch.Tensor], num_classes: int = 10) -> None:
    """The worker's model, built and initialised as `train_worker` does, holds `state` (head aside)."""
    initial = read_initial_weights(config, num_classes)
    model = build_model(config, num_classes)
    initial.load_into(model)
    for name, value in model.state_dict().items():
        if NON_HEAD(name) or not initial.report.head_replaced:
            torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
    assert model.head.weight.shape[0] == num_classes


def test_a_local_reference_checkpoint_at_another_size_and_class_count(published):
    path, state = published
    config = config_with(str(path))
    initial = read_initial_weights(config, 10)
    assert initial.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert initial.params()["pretrained.replaced"] == "head.weight, head.bias"
    assert initial.report.checkpoint_classes == 1000 and initial.report.loaded_keys == 96 - 2
    assert_starts_from(config, state)


def test_a_position_embedding_is_resampled_for_another_image_size(tmp_path):
    state = vitae.create_model("vitae_b", img_size=64, depth=1, num_classes=10).state_dict()
    config = parse_config(unit_config(model={"name": "vitae_b", "img_size": 32, "depth": 1, "mlp_ratio": 1.0,
                                             "pretrained": str(save(state, tmp_path / "b.pth"))}))
    with pytest.raises(UserError, match="key layers.2.NC.0.mlp.fc1.weight has shape"):  # mlp_ratio 1 vs 4
        read_initial_weights(config, 10)
    config = config.model_copy(update={"model": config.model.model_copy(update={"mlp_ratio": None})})
    initial = read_initial_weights(config, 10)
    assert initial.params()["pretrained.resampled"] == "layers.0.RC.pos_embed"
    assert initial.params()["pretrained.replaced"] == "none"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it (No such file or directory)"),
    (b"not a checkpoint", "not a PyTorch checkpoint of tensors (torch.load: Unsupported operand"),
    ({"model": {"w": print}}, "not a PyTorch checkpoint of tensors (torch.load: Unsupported global: GLOBAL print was not an allowed global"),
    ({"epoch": 3}, "the checkpoint holds no tensors"),
    ("depth 2", "does not fit vitae_t at 32 px: key layers.2.NC.1.norm1.weight of the checkpoint is not in the model"),
])
def test_a_bad_source_is_one_line_naming_the_field(tmp_path, content, message):
    path = tmp_path / "source.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "depth 2":
        save(vitae.create_model("vitae_t", img_size=32, depth=2).state_dict(), path)
    elif content is not None:
        save(content, path)
    with pytest.raises(UserError) as error:
        read_initial_weights(config_with(str(path)), 10)
    assert str(error.value).startswith(f"model.pretrained: {path}") and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_the_train_command_refuses_a_bad_source_before_connecting_to_ray(tmp_path, monkeypatch, capsys):
    """The digits dataset and storage are local directories: no service is involved."""
    from tests.support.train_helpers import prepare_dataset

    data = prepare_dataset("digits", str(tmp_path / "digits"), shard_max_samples=2000, digits_size=16)
    raw = unit_config(model={"img_size": 16, "depth": 1})
    raw["data"]["url"], raw["checkpoint"]["storage_path"] = data, str(tmp_path / "runs")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # connecting would fail differently, 41 s later
    path = write_config(tmp_path / "run.yaml", raw)
    code = cli_main(["train", "--config", str(path), "--set", f"model.pretrained={tmp_path}/missing.pth"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vitae: error: model.pretrained: {tmp_path}/missing.pth: cannot read it (No such file or directory)"]


def test_an_s3_object_source(s3_endpoint, published):
    path, state = published
    bucket = f"pretrained-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    object_store.shared_store(bucket).put_bytes("weights/vitae_t.pth.tar", path.read_bytes())
    initial = read_initial_weights(config_with(f"s3://{bucket}/weights/vitae_t.pth.tar"), 10)
    assert initial.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_starts_from(config_with(f"s3://{bucket}/weights/vitae_t.pth.tar"), state)
    for url, message in [(f"s3://{bucket}/weights/absent.pth", "no such object"),
                         ("s3://no-such-bucket-vitae/w.pth", "bucket does not exist")]:
        with pytest.raises(UserError, match=f"^model.pretrained: {url}: .*{message}"):
            read_initial_weights(config_with(url), 10)


def test_mlflow_model_sources_and_fine_tuning_from_one(mlflow_server, s3_endpoint):
    torch.manual_seed(4)
    logged = vitae.create_model("vitae_t", num_classes=3, img_size=32, depth=1).eval()
    info = ClassifierInfo("vitae_t", ["a", "b", "c"], 32, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    import mlflow

    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("vitae-pretrained-tests").experiment_id).info.run_id
    uri = log_classifier(logged, info, run_id)
    name = f"pretrained-{uuid.uuid4().hex[:8]}"
    version = register_challenger(uri, name, {})
    state = logged.state_dict()
    hashes = set()
    for source in (f"models:/{name}@challenger", f"models:/{name}/{version}", f"runs:/{run_id}/model"):
        initial = read_initial_weights(config_with(source), 3)
        assert not initial.report.head_replaced, source
        model = build_model(config_with(source), 3)
        initial.load_into(model)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
        hashes.add(initial.sha256)
    assert len(hashes) == 1  # the same weights, the same reference-layout bytes
    config = config_with(f"runs:/{run_id}/model")
    model = build_model(config, 10)  # fine-tuning on 10 classes: the worker gives it a new head, then it trains
    assert initial.load_into(model).head_replaced
    optimizer = build_optimizer(model, config.optim, 1e-3)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match=f"^model.pretrained: models:/{name}@nobody: cannot load model"):
        read_initial_weights(config_with(f"models:/{name}@nobody"), 3)


def test_freeze_keeps_matched_parameters_out_of_the_optimizer_but_never_the_head():
    config = config_with(freeze=["*"], pretrained=None)
    model = build_model(config, 10)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]  # a linear probe
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, config.optim, 1e-2)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == {id(model.head.weight), id(model.head.bias)}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("head."), name
    cells = build_model(config_with(freeze=["layers.0.*", "layers.1.RC.PCM.*"]), 10)
    frozen = {name for name, p in cells.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("layers.0.", "layers.1.RC.PCM.")) or n.endswith("attn.w") for n in frozen)
    assert any(n.startswith("layers.1.RC.PCM.") for n in frozen) and all(
        p.requires_grad for n, p in cells.named_parameters() if n.startswith("layers.2.NC."))
    with pytest.raises(UserError, match=r"model.freeze: 'blocks\.\*' matches no parameter of vitae_t"):
        config_with(freeze=["blocks.*"])


@pytest.mark.parametrize("name, kwargs, top", [("vitae_t", {"depth": 2}, 5), ("vitae_b", {"depth": 2}, 3),
                                                ("vitaev2_s", {"depth": 1, "img_size": 64}, 11)])
def test_layer_decay_scales_each_cells_lr_with_the_head_at_full_rate(name, kwargs, top):
    config = parse_config(unit_config(model={"name": name, "img_size": 32, "drop_path_rate": 0.0, **kwargs},
                                      optim={"layer_decay": 0.5}))
    model = build_model(config, 10)
    optimizer = build_optimizer(model, config.optim, 1e-3)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    depths, head = model.layer_ids()
    assert head == top
    for param_name, p in model.named_parameters():
        if p.requires_grad:  # (not the performer's fixed random features)
            assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (top - depths[param_name])), param_name
    assert lr_of[id(model.head.weight)] == 1e-3 == peak_group_lr(optimizer)
    embedding = next(p for n, p in model.named_parameters() if n.startswith("layers.0.RC."))
    assert lr_of[id(embedding)] == pytest.approx(1e-3 * 0.5 ** top)  # the lowest
    decays = {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert len(decays) == len(optimizer.param_groups)  # one group per (depth, decay or not)
    without = build_optimizer(model, config.optim.model_copy(update={"layer_decay": None}), 1e-3)
    assert {g["lr"] for g in without.param_groups} == {1e-3} and len(without.param_groups) == 2


def test_a_sweep_searches_layer_decay(tmp_path):
    write_config(tmp_path / "base.yaml", unit_config(model={"img_size": 16, "depth": 1}))
    sweep = {"name": "decay-sweep", "base": "base.yaml", "search": {"num_samples": 2, "space": {
        "optim.layer_decay": {"kind": "uniform", "low": 0.6, "high": 0.9}}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    loaded = load_sweep(tmp_path / "sweep.yaml")
    assert loaded.trial_config("t_00001", {"optim.layer_decay": 0.75}).optim.layer_decay == 0.75
    with pytest.raises(UserError, match="search.space.optim.layer_decay: 1.5 does not make a valid training config"):
        load_sweep(tmp_path / "sweep.yaml", ["search.space.optim.layer_decay={kind: choice, values: [0.8, 1.5]}"])


def test_grad_checkpointing_recomputes_normal_cells_in_the_backward_pass():
    calls = []
    for enabled in (False, True):
        model = build_model(config_with(grad_checkpointing=enabled), 10)
        counted = []
        model.layers[2].NC[0].register_forward_pre_hook(lambda *_: counted.append(1))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        calls.append(len(counted))
    assert calls == [1, 2]  # forward only; forward, then again in the backward pass


def test_the_fine_tuning_example_config_loads():
    from pipelines.training.config import load_config

    config = load_config(Path(__file__).resolve().parents[3] / "configs" / "finetune_vitaev2_s.yaml")
    assert config.model.name == "vitaev2_s" and config.model.pretrained.endswith(".pth.tar")
    assert config.optim.layer_decay is not None and config.scaling.use_gpu
