"""`vitae quickstart`: the whole pipeline, end to end, on the embedded local stack: start (or reuse)
it, prepare the digits data set, run the digits sweep (its best trial registered as @challenger)
and promote it, then print the champion's test accuracy and where to look (docs/design/sweeps.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.stack import Stack
from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions
from pipelines.model_registry.champions import CHAMPION, alias_version
from pipelines.model_registry.evaluation import evaluate_model
from pipelines.tuning.config import load_sweep

DIGITS_SIZE = 32
SHARD_MAX_SAMPLES = 300  # several shards per split, so that workers stream in parallel


def quickstart_command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    env = start_stack(Path(args.dir))
    dataset_url = f"s3://{env['VITAE_DATA_BUCKET']}/digits-{DIGITS_SIZE}px"
    prepare_digits(dataset_url)
    sweep = load_quickstart_sweep(args.config, args.overrides, dataset_url, env["VITAE_CHECKPOINT_BUCKET"])
    step(f"3/4 sweep {sweep.name}: {sweep.config.search.num_samples} trials, registered as "
         f"{sweep.config.registry.model_name}@challenger, then promoted (4/4)")
    from pipelines.tuning.driver import run_sweep  # imports ray: only once start_stack has set its environment

    status = run_sweep(sweep, resume=False)
    if status:
        return status
    summarize(sweep.config.registry.model_name, dataset_url, env, Path(args.dir), time.monotonic() - started)
    return 0


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def start_stack(directory: Path) -> dict[str, str]:
    """Start or reuse the stack; this process (and what it starts) uses its addresses from now on.

    Ray reads its authentication settings when imported, so nothing may import ray before this
    (this module imports the sweep's driver only once this has run).
    """
    step(f"1/4 embedded stack in {directory}")
    stack = Stack(directory)
    for status in stack.up({}):
        print(f"  {status.name:<7}{status.address}")
    return stack.use_in_this_process()


def prepare_digits(dataset_url: str) -> None:
    step(f"2/4 digits data set -> {dataset_url}")
    summary = prepare("digits", dataset_url, PrepOptions(shard_max_samples=SHARD_MAX_SAMPLES,
                                                         source=SourceOptions(digits_size=DIGITS_SIZE)))
    print(f"  {summary.images} images in {summary.shards} shards {summary.split_counts}; "
          f"uploaded {summary.uploaded}, already there {summary.shards - summary.uploaded}")


def load_quickstart_sweep(config: str, overrides: list[str], dataset_url: str, checkpoint_bucket: str):
    return load_sweep(config, [
        f"name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}",
        f"overrides.data.url={dataset_url}",
        f"overrides.checkpoint.storage_path=s3://{checkpoint_bucket}/sweeps",
        "registry.promote=true",
        *overrides,
    ])


def summarize(model_name: str, dataset_url: str, env: dict[str, str], directory: Path, elapsed_s: float) -> None:
    champion = alias_version(model_name, CHAMPION)
    uri = f"models:/{model_name}@{CHAMPION}"
    metrics = evaluate_model(uri, dataset_url, "test")
    step(f"done in {elapsed_s / 60:.1f} min")
    print(f"  champion:      {model_name} version {champion} ({uri})")
    print(f"  test accuracy: {metrics['top1']:.2%} top-1, {metrics['top5']:.2%} top-5 "
          f"on {metrics['samples']:.0f} images")
    print(f"  MLflow UI:     {env['MLFLOW_TRACKING_URI']}  (the sweep's parent run and its trials, "
          f"promotions/{model_name}, Models > {model_name})")
    print(f"  try it:        source {directory / 'stack.env'} && vitae predict --model {uri} IMAGE.png")
