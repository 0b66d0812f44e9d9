"""Input-pipeline benchmark: samples/s of the training loader (`pipelines.training.input_pipeline.train_loader`:
shards streamed from a real moto S3 server, decoded and augmented in N DataLoader workers) against
the same training images read from local files by a plain map-style DataLoader with the same
transform, workers and batch size, in the same run. Beside them: the training loader on the same
shards in a local directory (S3 taken out), and one core decoding (and augmenting) the images from
memory, the ceiling of one loader worker.

    python -m benchmarks.input_speed --images 2000 --side 256 --img-size 224 --workers 2

Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Iterable

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from benchmarks.environment import generate_jpegs, s3_server
from benchmarks.report import best_of_rounds, print_table, timed
from data_prep.dataset import PreparedDataset, decode_sample
from data_prep.images import decode, to_rgb
from data_prep.prep import PrepOptions, prepare
from pipelines.training.augment import TrainTransform
from pipelines.training.input_pipeline import SplitShards, collate, train_loader
from pipelines.training.config import TrainConfig
from pipelines.training.worker import DataSetup, WorkerEnv, build_data, build_model

BASELINE = "DataLoader over local image files (baseline)"


class ImageFiles(Dataset):
    """The baseline: one local image file per sample, read, decoded and transformed in the workers."""

    def __init__(self, files: list[tuple[Path, int]], transform: TrainTransform, seed: str):
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        image = to_rgb(decode(path.read_bytes()))
        return self.transform(image, random.Random(f"{self.seed}:{index}")), label


def loader_setup(dataset_url: str, args: argparse.Namespace) -> tuple[TrainConfig, DataSetup]:
    """What one training worker (rank 0 of 1) would read, from a training config."""
    config = TrainConfig.model_validate({
        "name": "input-benchmark",
        "data": {"url": dataset_url, "batch_size": args.batch_size, "loader_workers": args.workers,
                 "augment": {"randaugment_ops": args.randaugment_ops}},
        "model": {"name": "vitae_t", "img_size": args.img_size},
        "checkpoint": {"storage_path": "unused-by-this-benchmark"},
    })
    dataset = PreparedDataset.open(dataset_url)
    with torch.device("meta"):  # only its preprocessing settings (pretrained_cfg) are needed
        model = build_model(config, len(dataset.class_names))
    return config, build_data(config, WorkerEnv(0, 1, torch.device("cpu")), dataset, model.pretrained_cfg)


def raw_samples(shards: SplitShards) -> list[dict]:
    """The split's webdataset samples (encoded image, class, source record), read from local shards."""
    return [sample for url in shards.urls for sample in wds.tarfile_samples([{"url": url}])]


def samples_per_s(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    seconds, samples = timed(lambda: sum(len(labels) for _, labels in batches))
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="generated JPEGs (80%% land in the train split)")
    parser.add_argument("--side", type=int, default=256, help="their side in pixels")
    parser.add_argument("--img-size", type=int, default=224, help="the training crop")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of every loader")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--randaugment-ops", type=int, default=2, help="RandAugment ops per image (0: off)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per loader; best is kept")
    parser.add_argument("--ceiling-images", type=int, default=400, help="images decoded by the one-core ceiling")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the one-core figures run here, single-threaded like a DataLoader worker

    with tempfile.TemporaryDirectory(prefix="input-bench-") as tmp, s3_server("input-bench"):
        work = Path(tmp)
        generate_jpegs(work / "images", args.images, args.side)
        options = PrepOptions(shard_max_samples=256)
        s3_url, local_url = "s3://input-bench/generated", str(work / "dataset")
        for url in (s3_url, local_url):
            prepare(str(work / "images"), url, options, progress=False)
        config, s3_data = loader_setup(s3_url, args)
        _, local_data = loader_setup(local_url, args)
        transform, batch_size, workers = s3_data.train_transform, config.data.batch_size, config.data.loader_workers
        samples = raw_samples(local_data.train)
        files = [(work / "images" / json.loads(s["json"])["source"], int(s["cls"])) for s in samples]
        rounds = iter(range(10**6))  # a new epoch (shuffle, augmentation) every time a loader runs

        def streaming(data: DataSetup):
            return lambda: samples_per_s(train_loader(data.train, data.layout, transform, batch_size,
                                                      config.data.shuffle_buffer, config.seed, next(rounds)))

        def local_files() -> float:
            generator = torch.Generator().manual_seed(next(rounds))
            return samples_per_s(DataLoader(ImageFiles(files, transform, f"files:{generator.initial_seed()}"),
                                            batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                                            drop_last=True, generator=generator))

        ceiling = samples[:args.ceiling_images]
        rng = random.Random(0)
        loaders = {
            "train_loader, shards streamed from the S3 server": streaming(s3_data),
            "train_loader, shards in a local directory": streaming(local_data),
            BASELINE: local_files,
        }
        one_core = {
            "decode only, 1 core, bytes in memory": lambda: len(ceiling) / timed(
                lambda: [decode_sample(s) for s in ceiling])[0],
            "decode + augment, 1 core, bytes in memory": lambda: len(ceiling) / timed(
                lambda: [transform(decode_sample(s)[0], rng) for s in ceiling])[0],
        }
        best = best_of_rounds({**loaders, **one_core}, args.rounds, score=float)

    rows = [("loader", "samples/s", "vs local files")]
    rows += [(name, f"{best[name]:,.0f}", f"{best[name] / best[BASELINE]:.2f}x") for name in loaders]
    rows += [(name, f"{best[name]:,.0f}", "") for name in one_core]
    print_table(f"{args.images} generated {args.side} px JPEGs ({len(files)} in the train split), random resized crop "
                f"to {args.img_size} px, flip, RandAugment {args.randaugment_ops} ops; batch {batch_size}, "
                f"{workers} loader workers; best of {args.rounds} rounds", rows,
                f"streaming from S3 = {best['train_loader, shards streamed from the S3 server'] / best[BASELINE]:.2f}x "
                "the samples/s of local image files")


if __name__ == "__main__":
    main()
