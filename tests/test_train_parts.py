"""The training job's pieces, one at a time and without services: config, sharding plans, the input
pipeline on local shards, augmentation, mixing, optimisation, all-reduced evaluation, checkpoint
state, packaging, figures, and the CLI's refusal of bad configs before any cluster is used."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitae
from data_prep.dataset import PreparedDataset
from infra.errors import UserError
from pipelines.tracking import plots
from pipelines.training.augment import RANDAUGMENT_OPS, EvalTransform, TrainTransform, normalize, to_uint8_tensor
from pipelines.training.train_state import Checkpointer, RngState, TrainProgress
from pipelines.training.validation import EvalTotals
from pipelines.training.input_pipeline import ReaderLayout, SplitShards, eval_loader, train_loader
from pipelines.training.mixing import Mixing
from pipelines.model_packaging import ClassifierInfo, package
from pipelines.training.optim import build_scheduler, param_groups
from pipelines.training.sharding import eval_plan, steps_per_epoch, train_plan
from pipelines.training.driver import check_dataset
from pipelines.training.config import ScheduleSettings, config_changes, load_config, parse_config
from pipelines.training.worker import accumulation_group
from tests.train_helpers import all_reduce_totals, make_shapes_folder, prepare_dataset, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]


# --- config ---------------------------------------------------------------------------------------


def minimal(**sections) -> dict:
    return tiny_config("unit", "s3://data/set", "s3://checkpoints/runs", **sections)


@pytest.mark.parametrize("path", [path for path in sorted((REPO / "configs").glob("*.yaml"))
                                  # sweep configs: test_tune; promotion configs: test_cluster_jobs
                                  if not path.name.endswith(("_sweep.yaml", "_promote.yaml"))],
                         ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(path)
    assert config.global_batch_size == config.data.batch_size * config.scaling.num_workers


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path / "run.yaml", minimal())
    config = load_config(path, ["model.depth=2", "optim.ema_decay=null", "data.augment.scale=[0.5, 1.0]",
                                "name=other-run", "optim.lr=1e-3", "scaling.resources_per_worker={CPU: 2}"])
    assert (config.model.depth, config.optim.ema_decay, config.data.augment.scale) == (2, None, (0.5, 1.0))
    assert (config.name, config.optim.lr, config.scaling.resources_per_worker) == ("other-run", 1e-3, {"CPU": 2})


def test_lr_is_per_512_images_of_global_batch():
    config = parse_config(minimal(optim={"lr": 1e-3, "accumulation_steps": 4}))
    assert config.global_batch_size == 32 * 2 * 4
    assert config.peak_lr == pytest.approx(1e-3 * 256 / 512)


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
    ({"scaling": {"num_workers": 0}}, "scaling.num_workers: Input should be greater than or equal to 1"),
    ({"name": "my run"}, "name: expected letters, digits"),
    ({"mlflow": {"tracking_uri": "https://me:pw@mlflow.example"}}, "mlflow.tracking_uri: no user:password@ in the URI"),
    ({"extra": {}}, "extra: unknown key"),
])
def test_bad_fields_are_named(sections, field):
    with pytest.raises(UserError) as error:
        parse_config(minimal(**sections))
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
    ("scaling.num_workers=1000000", "scaling.num_workers: Input should be less than or equal to 4096"),
    ("seed=18446744073709551616", "seed: Input should be less than or equal to 4294967295"),
])
def test_absurd_values_are_refused_at_once_naming_the_field(tmp_path, override, message):
    path = write_config(tmp_path / "run.yaml", minimal())
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        load_config(path, [override])
    assert str(error.value) == f"invalid config: {message}"
    assert time.monotonic() - started < 5, "validation is not cheap"


def test_missing_sections_and_bad_files_are_named(tmp_path):
    raw = minimal()
    del raw["checkpoint"]
    with pytest.raises(UserError, match=r"^invalid config: checkpoint: Field required"):
        parse_config(raw)
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML \(line 2\)"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(write_config(tmp_path / "ok.yaml", minimal()), ["model.depth"])


def test_resuming_may_change_resources_only():
    base = parse_config(minimal())
    resized = parse_config(minimal(data={"loader_workers": 3}, scaling={"resources_per_worker": {"CPU": 2}}))
    assert config_changes(base, resized) == []
    longer = parse_config(minimal(schedule={"epochs": 5}))
    assert config_changes(base, longer) == ["schedule.epochs: 3 -> 5"]


@pytest.mark.parametrize("config, overrides, error", [
    (minimal(model={"depth": -1}), ["seed=1"], "model.depth: Input should be greater than or equal to 1"),
    (minimal(), ["model.depth=100000"], "model.depth: Input should be less than or equal to 64"),
    (minimal(), ["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
])
def test_cli_rejects_a_bad_config_with_one_line_before_touching_the_cluster(tmp_path, config, overrides, error):
    path = write_config(tmp_path / "bad.yaml", config)
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    sets = [part for override in overrides for part in ("--set", override)]
    done = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", str(path), *sets],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"vitae: error: invalid config: {error}"]


# --- sharding -------------------------------------------------------------------------------------


def read_counts(plan) -> Counter:
    return Counter((piece.shard, index) for rank in plan for worker in rank for piece in worker
                   for index in range(piece.start, piece.stop))


@pytest.mark.parametrize("shards, world, workers, batch", [
    ([100] * 14 + [37], 2, 2, 32),  # uneven last shard
    ([1437], 2, 2, 32),  # one shard, four slots
    ([5, 300, 17, 0, 90], 3, 1, 16),  # wildly uneven, an empty shard
    ([40, 41, 42], 4, 3, 7),  # more slots than shards
    ([64], 2, 0, 32),  # no DataLoader workers
])
def test_train_plan_gives_every_rank_the_same_full_batches(shards, world, workers, batch):
    steps = steps_per_epoch(sum(shards), world, batch)
    for epoch in range(3):
        plan = train_plan(shards, world, workers, batch, seed=7, epoch=epoch)
        for rank in plan:
            assert len(rank) == max(workers, 1)
            per_worker = [sum(piece.samples for piece in worker) for worker in rank]
            assert all(samples % batch == 0 for samples in per_worker)
            assert sum(per_worker) // batch == steps
        counts = read_counts(plan)
        assert max(counts.values()) == 1  # no sample twice in an epoch, across all ranks
        assert sum(shards) - len(counts) < world * batch  # fewer than one global batch left out
        assert all(0 <= index < shards[shard] for shard, index in counts)


def test_train_plan_reshuffles_every_epoch_and_is_reproducible():
    shards = [50] * 8
    assert train_plan(shards, 2, 2, 10, seed=1, epoch=0) == train_plan(shards, 2, 2, 10, seed=1, epoch=0)
    assert train_plan(shards, 2, 2, 10, seed=1, epoch=0) != train_plan(shards, 2, 2, 10, seed=1, epoch=1)


def test_train_plan_refuses_less_than_a_batch_per_rank():
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_plan([10, 5], 2, 1, 8, seed=0, epoch=0)


@pytest.mark.parametrize("shards, world, workers", [([100, 80], 3, 2), ([5], 4, 2), ([7, 0, 9], 2, 0)])
def test_eval_plan_reads_every_sample_exactly_once(shards, world, workers):
    plan = eval_plan(shards, world, workers)
    counts = read_counts(plan)
    assert set(counts.values()) == {1} and len(counts) == sum(shards)
    per_rank = [sum(piece.samples for worker in rank for piece in worker) for rank in plan]
    assert max(per_rank) - min(per_rank) <= 1


# --- input pipeline on local shards ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> PreparedDataset:
    """Three classes of 40 shapes; 13-sample shards: uneven, several per split."""
    root = tmp_path_factory.mktemp("shapes")
    prepare_dataset(str(make_shapes_folder(root / "source", per_class=40)), str(root / "dataset"), shard_max_samples=13)
    return PreparedDataset.open(str(root / "dataset"))


def test_train_loaders_run_equal_full_batches_on_every_rank(local_dataset):
    shards = SplitShards.of(local_dataset, "train")
    assert len(set(shards.samples)) > 1  # uneven shards
    transform = TrainTransform(16, (0.5, 1.0), (0.75, 1.33), 0.5, 2, 9.0, "bicubic")
    steps = steps_per_epoch(shards.total, 2, 8)
    for rank in range(2):
        batches = list(train_loader(shards, ReaderLayout(rank, 2, loader_workers=2), transform, 8, 20, 0, epoch=1))
        assert len(batches) == steps
        assert all(images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 for images, _ in batches)
        assert all(labels.dtype == torch.long and labels.shape == (8,) for _, labels in batches)


def test_eval_loaders_cover_the_split_once_across_ranks(local_dataset):
    shards = SplitShards.of(local_dataset, "val")
    transform = EvalTransform(16, 0.9, "bicubic")
    labels = Counter()
    for rank in range(3):
        for images, batch_labels in eval_loader(shards, ReaderLayout(rank, 3, loader_workers=2), transform, 4):
            assert images.shape[1:] == (3, 16, 16)
            labels.update(batch_labels.tolist())
    per_class = local_dataset.info.counts["val"]["per_class"]
    assert labels == Counter({local_dataset.class_names.index(name): n for name, n in per_class.items() if n})


def test_dataset_preflight_names_the_field(local_dataset):
    config = parse_config(minimal(data={"url": local_dataset.url, "val_split": "holdout"}))
    with pytest.raises(UserError, match=r"^data.val_split: .* no samples in split 'holdout'"):
        check_dataset(config)
    config = parse_config(minimal(data={"url": local_dataset.url, "batch_size": 64}))
    with pytest.raises(UserError, match=r"^data.batch_size: \d+ training samples do not fill one batch of 64"):
        check_dataset(config)


# --- augmentation and mixing ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 30), (16, 16), (5, 60), (300, 7)])
def test_train_transform_gives_fixed_size_uint8_and_is_seeded(size):
    image = Image.effect_noise(size, 60).convert("RGB")
    transform = TrainTransform(16, (0.08, 1.0), (0.75, 1.33), 0.5, 3, 9.0, "bicubic")
    first = transform(image, random.Random(3))
    assert first.shape == (3, 16, 16) and first.dtype == torch.uint8
    assert torch.equal(first, transform(image, random.Random(3)))


@pytest.mark.parametrize("name", sorted(RANDAUGMENT_OPS))
def test_every_randaugment_op_keeps_size_and_mode(name):
    image = Image.effect_noise((20, 12), 50).convert("RGB")
    out = RANDAUGMENT_OPS[name](image, 1.0, random.Random(0))
    assert (out.size, out.mode) == ((20, 12), "RGB")


def test_eval_transform_resizes_the_short_side_and_crops_the_centre():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (24, 0, 40, 32))  # a white band in the middle
    out = EvalTransform(16, 1.0, "nearest")(image)
    assert out.shape == (3, 16, 16)
    assert out[:, :, 4:12].float().mean() == 255 and out[:, :, :2].float().mean() == 0


def test_normalize_matches_the_definition():
    images = to_uint8_tensor(Image.new("RGB", (2, 2), (255, 0, 51))).unsqueeze(0)
    out = normalize(images, torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0.5, 0.25, 0.1]))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, -2.0, 0.0]))


def test_mixup_and_cutmix_make_probability_targets():
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = Mixing(3, 0.0, 0.0, 1.0, 0.5)
    assert torch.equal(plain(images, labels, random.Random(0))[1], torch.nn.functional.one_hot(labels, 3).float())
    for mixing in (Mixing(3, 0.8, 0.0, 1.0, 0.5), Mixing(3, 0.0, 1.0, 1.0, 0.5)):
        mixed, targets = mixing(images, labels, random.Random(1))
        assert mixed.shape == images.shape and targets.shape == (6, 3)
        assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    # cutmix: the label weight of the partner equals the pasted fraction of the pixels
    mixed, targets = Mixing(3, 0.0, 1.0, 1.0, 0.5)(images, labels, random.Random(1))
    pasted = (mixed[0] != images[0]).any(dim=0).float().mean()
    assert targets[0, labels[5]] == pytest.approx(pasted.item(), abs=1e-6)


# --- optimisation ---------------------------------------------------------------------------------


def test_weight_decay_skips_norms_biases_and_no_weight_decay():
    with torch.device("meta"):
        model = vitae.create_model("vitae_b", num_classes=10, img_size=32, depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"layers.0.RC.cls_token", "layers.0.RC.pos_embed"} <= exempt
    assert all(p.ndim <= 1 or names[id(p)] in model.no_weight_decay() for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" not in exempt
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = ScheduleSettings(epochs=10, warmup_epochs=2, warmup_start_factor=0.1, min_lr_ratio=0.01)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=5)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(50):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55)  # linear: 0.1 -> 1 over 10 steps
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the 40 cosine steps
    assert lrs[50] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("steps, accumulation, groups", [
    (7, 3, [3, 3, 1]), (6, 2, [2, 2, 2]), (4, 1, [1, 1, 1, 1]), (2, 4, [2]),
])
def test_accumulation_groups_cover_the_epoch(steps, accumulation, groups):
    plan = [accumulation_group(index, steps, accumulation) for index in range(steps)]
    ends = [index for index, (_, ends_group) in enumerate(plan) if ends_group]
    assert [size for size, ends_group in plan if ends_group] == groups  # one optimizer step per group
    assert ends[-1] == steps - 1
    assert all(size == groups[sum(1 for end in ends if end < index)] for index, (size, _) in enumerate(plan))


# --- evaluation -----------------------------------------------------------------------------------


def test_eval_totals_count_top1_top5_loss_and_confusion():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, -1], [0, 5, 1, 0, 0, 0, 2], [1, 1, 1, 1, 1, -5, 9]])
    labels = torch.tensor([0, 6, 5])
    totals = EvalTotals.zeros(7)
    totals.add_batch(logits, labels)
    assert (totals.top1, totals.top5, totals.count) == (1, 2, 3)
    assert totals.loss_sum == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item())
    assert totals.confusion[0, 0] == 1 and totals.confusion[6, 1] == 1 and totals.confusion[5, 6] == 1


def test_all_reduced_totals_equal_a_single_process_evaluation(tmp_path):
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(11, 6, generator=generator), torch.randint(0, 6, (11,), generator=generator)
    parts = [(logits[:8], labels[:8]), (logits[8:], labels[8:]), (logits[:0], labels[:0])]  # uneven, one empty
    torch.multiprocessing.spawn(all_reduce_totals, nprocs=len(parts),
                                args=(str(tmp_path / "init"), parts, 6, str(tmp_path / "out.pt")))
    reduced = torch.load(tmp_path / "out.pt", weights_only=False)
    single = EvalTotals.zeros(6)
    single.add_batch(logits, labels)
    assert (reduced.top1, reduced.top5, reduced.count) == (single.top1, single.top5, single.count)
    assert reduced.loss_sum == pytest.approx(single.loss_sum, rel=1e-9)
    assert torch.equal(reduced.confusion, single.confusion)
    assert reduced.metrics("val") == pytest.approx(single.metrics("val"))


# --- checkpoint state, packaging, figures ---------------------------------------------------------


def test_checkpointer_restores_every_state(tmp_path):
    def parts():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = build_scheduler(optimizer, ScheduleSettings(epochs=4, warmup_epochs=1), steps_per_epoch=2)
        progress, private = TrainProgress(), random.Random(5)
        states = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress}
        return states, private, Checkpointer(states, RngState(private), rank=0, config_json='{"name": "x"}')

    saved, private, checkpointer = parts()
    saved["model"](torch.randn(5, 3)).sum().backward()
    saved["optimizer"].step()
    saved["scheduler"].step()
    saved["progress"].complete_epoch({"epoch": 1, "val_top1": 0.5})
    saved["progress"].mlflow_run_id = "run-1"
    checkpointer.save(tmp_path)
    expected_draws = (random.random(), torch.rand(2), private.random())

    restored, restored_private, other = parts()
    other.load(tmp_path)
    assert (random.random(), restored_private.random()) == (expected_draws[0], expected_draws[2])
    assert torch.equal(torch.rand(2), expected_draws[1])
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(restored["model"].state_dict()[key], value)
    assert restored["scheduler"].state_dict() == saved["scheduler"].state_dict()
    assert restored["optimizer"].state_dict()["state"].keys() == saved["optimizer"].state_dict()["state"].keys()
    assert restored["progress"] == saved["progress"]
    assert (tmp_path / "config.json").read_text() == '{"name": "x"}'


def test_packaged_classifier_takes_uint8_and_normalises_inside():
    model = vitae.create_model("vitae_t", num_classes=3, img_size=16, depth=1).eval()
    info = ClassifierInfo("vitae_t", ["a", "b", "c"], 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1.0, "bicubic")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(normalize(images, torch.tensor(info.mean), torch.tensor(info.std)))
        assert torch.allclose(package(model, info)(images), expected, atol=1e-6)
    assert info.metadata()["class_names"] == ["a", "b", "c"]


def test_figures_render_as_png():
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_top1": 0.3 * e, "val_top5": 0.9}
               for e in (1, 2, 3)]
    for figure in (plots.learning_curves(history), plots.confusion_matrix(torch.eye(3, dtype=torch.long) * 4,
                                                                           ["a", "b", "c"])):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        assert buffer.getvalue().startswith(b"\x89PNG")
