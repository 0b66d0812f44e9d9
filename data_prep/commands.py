"""The handlers of `vitae prep` and `vitae verify` (their parsers: `pipelines.cli.data`)."""

from __future__ import annotations

import argparse

from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions
from data_prep.verify import verify_dataset


def run_prep(args: argparse.Namespace) -> int:
    options = PrepOptions(
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        max_side=args.max_side,
        shard_max_samples=args.shard_max_samples,
        shard_max_bytes=int(args.shard_max_mb * 2**20),
        source=SourceOptions(args.image_column, args.label_column, args.class_names, args.digits_size),
        staging_dir=args.staging_dir,
        ray=args.ray or args.ray_tasks is not None,
        ray_tasks=args.ray_tasks,
        **({"workers": args.workers} if args.workers is not None else {}),
    )
    summary = prepare(args.source, args.out, options)
    print("\n".join(summary.lines()))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    report = verify_dataset(args.dest)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
