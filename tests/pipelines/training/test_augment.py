"""Augmentation, normalisation and mixup/cutmix."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.training.augment import RANDAUGMENT_OPS, EvalTransform, TrainTransform, normalize, to_uint8_tensor
from pipelines.training.mixing import Mixing

REPO = Path(__file__).resolve().parents[3]


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

