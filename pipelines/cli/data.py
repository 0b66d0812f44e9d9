"""The parsers of `vitae prep` and `vitae verify` (handlers: `data_prep.commands`)."""

from __future__ import annotations

import argparse
import math


def add_prep_parsers(subparsers: argparse._SubParsersAction) -> None:
    prep = subparsers.add_parser(
        "prep", help="convert images into verified WebDataset shards in a directory or s3:// prefix",
        description="Convert an image folder, Parquet file(s) or 'digits' into WebDataset shards "
                    "plus a manifest at DEST. Re-running the same command is idempotent.",
    )
    prep.add_argument("source", metavar="SOURCE",
                      help="image folder (root/<class>/<image> or root/{train,val,test}/<class>/<image>), "
                           "Parquet file or directory, or 'digits'")
    prep.add_argument("--out", required=True, metavar="DEST", help="local directory or s3://bucket/prefix")
    prep.add_argument("--val-fraction", type=_finite, default=0.1, help="when the source has no splits")
    prep.add_argument("--test-fraction", type=_finite, default=0.1, help="when the source has no splits")
    prep.add_argument("--seed", type=int, default=0, help="split and shuffle seed")
    prep.add_argument("--max-side", type=int, metavar="N", help="downscale and re-encode larger images")
    prep.add_argument("--shard-max-samples", type=int, default=10_000)
    prep.add_argument("--shard-max-mb", type=_finite, default=256.0, help="shard size cap in MiB")
    prep.add_argument("--image-column", default="image",
                      help="Parquet: image column (struct{bytes,path} or binary)")
    prep.add_argument("--label-column", default="label", help="Parquet: label column (ints or class names)")
    prep.add_argument("--class-names", type=_names, metavar="A,B,...",
                      help="class names in index order (default: from the data)")
    prep.add_argument("--digits-size", type=int, default=32, help="digits: image side in pixels (at most 1024)")
    prep.add_argument("--workers", type=int, help="image decoding threads (at most 64)")
    prep.add_argument("--staging-dir", help="where shards are staged before upload (default: temp dir); with "
                                            "--ray on several machines, a folder every node sees")
    prep.add_argument("--ray", action="store_true",
                      help="convert with Ray tasks on the cluster at RAY_ADDRESS (same output, byte for byte)")
    prep.add_argument("--ray-tasks", type=int, metavar="N",
                      help="with --ray: tasks at a time (default: the cluster's CPUs)")
    prep.set_defaults(handler="data_prep.commands:run_prep")

    verify = subparsers.add_parser("verify", help="check a prepared dataset against its manifest",
                                   description="Check every shard's size, sha256 and samples; "
                                               "exit 1 on any mismatch.")
    verify.add_argument("dest", metavar="DEST", help="local directory or s3://bucket/prefix")
    verify.set_defaults(handler="data_prep.commands:run_verify")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("expected distinct, non-empty, comma-separated names")
    return names
