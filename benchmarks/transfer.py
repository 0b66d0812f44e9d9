"""Transfer benchmark: what `model.pretrained` is for. vitae_t is trained on digits 0-4, saved as a
reference-layout checkpoint, then fine-tuned on a handful of images per class of digits 5-9 (the
head a fresh one, as for another class count); the same fine-tuning from random weights, with the
same fresh head, is the baseline, in the same run. Headline: both validation
top-1 figures and their difference.

    python -m benchmarks.transfer

In this process with plain PyTorch (no Ray): the training code's model (`worker.build_model`),
optimiser and schedule (`optim`), and the pretrained path of `model.pretrained` (the driver's
`read_initial_weights`, the workers' `InitialWeights.load_into`). Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import io
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F

from benchmarks.report import print_table, timed
from data_prep.sources import SourceOptions, digits_source
from pipelines.training.augment import normalize, to_uint8_tensor
from pipelines.training.config import TrainConfig, parse_config
from pipelines.training.initial_weights import read_initial_weights
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.worker import build_model
from vitae.pretrained import reference_checkpoint

IMG_SIZE = 32
SOURCE_CLASSES, TARGET_CLASSES = range(0, 5), range(5, 10)


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every digit as `vitae prep digits` renders it: uint8 (N, 3, size, size) images and labels."""
    source = digits_source(SourceOptions(digits_size=size))
    images = torch.stack([to_uint8_tensor(Image.open(io.BytesIO(image.read()))) for image in source.images])
    return images, torch.tensor([image.label for image in source.images])


def run_config(name: str, epochs: int, batch_size: int, lr: float, pretrained: str | None = None,
               layer_decay: float | None = None) -> TrainConfig:
    """A one-worker vitae_t run at 32 px; `lr` per 512 images, as in every config."""
    return parse_config({
        "name": name, "data": {"url": "unused", "batch_size": batch_size},
        "model": {"name": "vitae_t", "img_size": IMG_SIZE, "drop_path_rate": 0.0, "pretrained": pretrained},
        "optim": {"lr": lr, "weight_decay": 0.05, "layer_decay": layer_decay},
        "schedule": {"epochs": epochs, "warmup_epochs": 1, "min_lr_ratio": 0.01},
        "checkpoint": {"storage_path": "unused"}, "scaling": {"num_workers": 1},
    })


def normalised(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return normalize(images, torch.tensor(model.pretrained_cfg["mean"]), torch.tensor(model.pretrained_cfg["std"]))


def train(model: torch.nn.Module, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    """`config.schedule.epochs` passes over the images in shuffled batches, with the run's optimiser
    and per-step schedule (a random 0-2 px shift as the only augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(images) // config.data.batch_size)
    optimizer = build_optimizer(model, config.optim, config.peak_lr)
    scheduler = build_scheduler(optimizer, config.schedule, lambda step: step / steps)
    inputs = normalised(images, model)
    model.train()
    for _ in range(config.schedule.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(config.data.batch_size):
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            loss = F.cross_entropy(model(torch.roll(inputs[batch], shift, dims=(2, 3))), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def load_keeping_the_head(model: torch.nn.Module, initial) -> None:
    """The checkpoint's weights but for the head, which stays the fresh one the baseline starts
    with: digits 5-9 are other classes than 0-4, and with the same class count `model.pretrained`
    would keep the old head (it replaces a head only for another class count)."""
    fresh_head = {key: value.clone() for key, value in model.state_dict().items() if key.startswith("head.")}
    initial.load_into(model)
    model.load_state_dict(fresh_head, strict=False)


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).argmax(dim=1) for batch in normalised(images, model).split(256)])
    return (predictions == labels).float().mean().item()


def split_target(images: torch.Tensor, labels: torch.Tensor, shots: int, seed: int):
    """`shots` training images per target class (relabelled 0-4), the other target images for validation."""
    rng = random.Random(seed)
    train_index, val_index = [], []
    for offset, digit in enumerate(TARGET_CLASSES):
        members = (labels == digit).nonzero().flatten().tolist()
        rng.shuffle(members)
        train_index += members[:shots]
        val_index += members[shots:]
    relabelled = labels - TARGET_CLASSES.start
    return (images[train_index], relabelled[train_index]), (images[val_index], relabelled[val_index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=5, help="training images per target class (default 5)")
    parser.add_argument("--seeds", type=int, default=6, help="fine-tuning runs per arm, averaged (default 6)")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=20, help="one step each (default 20)")
    parser.add_argument("--lr", type=float, default=2e-2,
                        help="fine-tuning lr per 512 images (default 2e-2: 1e-3 at the batch of 25)")
    parser.add_argument("--layer-decay", type=float, default=1.0,
                        help="fine-tuning optim.layer_decay (default 1.0: none; 0.75 and 0.9 gain less here)")
    args = parser.parse_args()

    images, labels = digits(IMG_SIZE)
    source = torch.isin(labels, torch.tensor(SOURCE_CLASSES))
    torch.manual_seed(0)
    pretrain = run_config("pretrain-0-4", args.pretrain_epochs, 32, 1.6e-2)  # 1e-3 at the batch of 32
    model = build_model(pretrain, len(SOURCE_CLASSES))
    pretrain_s, _ = timed(lambda: train(model, pretrain, images[source], labels[source], seed=0))
    pretrain_top1 = top1(model, images[source], labels[source])
    with tempfile.TemporaryDirectory(prefix="vitae-transfer-") as directory:
        checkpoint = Path(directory) / "vitae_t-digits-0-4.pth"
        torch.save(reference_checkpoint(model), checkpoint)
        arms = {"random weights (baseline)": None, "pretrained on digits 0-4": str(checkpoint)}
        scores: dict[str, list[float]] = {arm: [] for arm in arms}
        for seed in range(args.seeds):
            (train_x, train_y), (val_x, val_y) = split_target(images, labels, args.shots, seed)
            for arm, pretrained in arms.items():
                config = run_config("finetune-5-9", args.finetune_epochs, len(train_x), args.lr, pretrained,
                                    args.layer_decay)
                torch.manual_seed(seed)
                model = build_model(config, len(TARGET_CLASSES))
                if pretrained:  # the path of `model.pretrained`: the driver reads and checks, a worker loads
                    load_keeping_the_head(model, read_initial_weights(config, len(TARGET_CLASSES)))
                train(model, config, train_x, train_y, seed)
                scores[arm].append(top1(model, val_x, val_y))
    means = {arm: sum(values) / len(values) for arm, values in scores.items()}
    baseline, pretrained = means.values()
    rows = [("fine-tuning of vitae_t on digits 5-9", "val top-1 (mean)", "per seed")]
    rows += [(arm, f"{means[arm]:.1%}", " ".join(f"{value:.1%}" for value in scores[arm])) for arm in arms]
    print_table(
        f"vitae_t @ {IMG_SIZE} px: {args.shots} images per class of digits 5-9, {args.finetune_epochs} epochs, "
        f"lr {args.lr:g} per 512, layer decay {args.layer_decay:g}; {args.seeds} seeds (which images, head init, batch order); validation: the "
        f"{len(val_y)} other 5-9 images", rows,
        f"pretrained {pretrained:.1%} vs random {baseline:.1%} val top-1: {100 * (pretrained - baseline):+.1f} points",
        [f"pretraining: {int(source.sum())} images of digits 0-4, {args.pretrain_epochs} epochs, {pretrain_s:.0f} s "
         f"(top-1 on them after: {pretrain_top1:.1%})"])


if __name__ == "__main__":
    main()
