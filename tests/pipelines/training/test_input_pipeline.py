"""The input pipeline on local shards."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep.dataset import PreparedDataset
from infra.errors import UserError
from pipelines.training.augment import EvalTransform, TrainTransform
from pipelines.training.input_pipeline import ReaderLayout, SplitShards, epoch_batches, eval_loader, train_loader
from pipelines.training.sharding import EpochPlan, batch_order, steps_per_epoch
from pipelines.training.driver import check_dataset
from pipelines.training.config import parse_config
from tests.support.train_helpers import make_shapes_folder, prepare_dataset, unit_config

REPO = Path(__file__).resolve().parents[3]


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


def test_batches_come_round_robin_from_the_loader_workers_that_still_have_some():
    assert batch_order([2, 3, 1]) == [0, 1, 2, 0, 1, 1]
    assert batch_order([4]) == [0, 0, 0, 0]


@pytest.mark.parametrize("loader_workers", [0, 1, 3])
def test_an_epoch_resumed_at_any_batch_goes_on_with_the_same_batches_and_augmentations(local_dataset,
                                                                                     loader_workers):
    shards = SplitShards.of(local_dataset, "train")
    transform = TrainTransform(16, (0.3, 1.0), (0.75, 1.33), 0.5, 2, 9.0, "bicubic")
    layout = ReaderLayout(1, 2, loader_workers=loader_workers)

    def batches(start: int) -> list:
        loader = train_loader(shards, layout, transform, 4, 10, 0, epoch=2, start_batch=start)
        return list(epoch_batches(loader))

    whole = batches(0)
    assert len(whole) == steps_per_epoch(shards.total, 2, 4) and len(whole) > 5
    for start in (1, 2, len(whole) // 2 + 1, len(whole) - 1):
        resumed = batches(start)
        assert len(resumed) == len(whole) - start, start
        for (images, labels), (expected_images, expected_labels) in zip(resumed, whole[start:]):
            assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images), start


def fingerprint(image, rng) -> torch.Tensor:
    """A transform that names the sample: the first 8 bytes of its pixels' digest."""
    return torch.tensor(list(hashlib.sha256(image.tobytes()).digest()[:8]), dtype=torch.uint8)


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_an_epoch_resumed_on_fewer_ranks_reads_every_remaining_sample_once(local_dataset, loader_workers):
    """2 ranks train on K batches each, then 1 rank on what is left of the epoch, planned afresh: the
    samples read are the split's (but for the last plan's part of a batch), none twice."""
    shards, batch = SplitShards.of(local_dataset, "train"), 4
    whole_split = eval_loader(shards, ReaderLayout(0, 1, 0), fingerprint, 1)
    split = Counter(bytes(images[0].tolist()) for images, _ in whole_split)
    assert max(split.values()) == 1  # every sample can be told apart

    def read(layout: ReaderLayout, plan: EpochPlan, batches: int | None = None) -> Counter:
        loader = train_loader(shards, layout, fingerprint, batch, 10, 0, epoch=3, plan=plan)
        return Counter(bytes(row.tolist()) for images, _ in itertools.islice(epoch_batches(loader), batches)
                       for row in images)

    whole = EpochPlan.whole_epoch(shards.total // batch, 2, loader_workers)
    for steps in (1, whole.steps // 2 + 1):
        seen = sum((read(ReaderLayout(rank, 2, loader_workers), whole, steps) for rank in range(2)), Counter())
        assert sum(seen.values()) == 2 * steps * batch
        rest = whole.replanned(steps, 1, loader_workers)
        seen += read(ReaderLayout(0, 1, loader_workers), rest)
        assert max(seen.values()) == 1 and set(seen) <= set(split), steps
        assert len(split) - len(seen) < batch, steps  # the last plan reads whole batches only


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
    config = parse_config(unit_config(data={"url": local_dataset.url, "val_split": "holdout"}))
    with pytest.raises(UserError, match=r"^data.val_split: .* no samples in split 'holdout'"):
        check_dataset(config)
    config = parse_config(unit_config(data={"url": local_dataset.url, "batch_size": 64}))
    with pytest.raises(UserError, match=r"^data.batch_size: \d+ training samples do not fill one batch of 64"):
        check_dataset(config)

