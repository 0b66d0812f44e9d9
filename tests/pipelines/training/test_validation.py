"""Validation totals and their all-reduce."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.training.validation import EvalTotals
from tests.support.train_helpers import all_reduce_totals

REPO = Path(__file__).resolve().parents[3]


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

