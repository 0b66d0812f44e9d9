"""Sweep benchmark: wall time and trial-epochs of the digits sweep with ASHA early stopping against
the same sweep with every trial run to completion (no scheduler), in the same run, and whether both
pick the same best configuration.

    python -m benchmarks.sweep_efficiency --samples 4 --epochs 4 --concurrent 2

Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.environment import embedded_stack
from benchmarks.report import print_table, timed
from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions
from pipelines.tuning.config import Sweep, load_sweep

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_sweep.yaml"
EXPERIMENT = "benchmarks"


@dataclass
class SweepOutcome:
    wall_s: float
    load: float  # the machine's 5-minute load average when the sweep ended
    trial_epochs: int
    trials: list[dict]  # the sweep's trial table (trials.csv): sampled values, epochs, metrics, status
    best: dict | None  # its row of the best trial


def measure_sweep(name: str, asha: bool, args: argparse.Namespace, data_url: str, checkpoint_bucket: str
                  ) -> tuple[Sweep, SweepOutcome]:
    """Run one sweep to its end; (its config, what its MLflow run says of it)."""
    import ray  # only now: Ray reads the stack's authentication settings when first imported

    from pipelines.tuning.driver import run_sweep  # imports ray

    sweep = load_sweep(CONFIG, [
        f"name={name}", f"overrides.data.url={data_url}", f"overrides.model.img_size={args.digits_size}",
        f"overrides.schedule.epochs={args.epochs}",
        f"overrides.checkpoint.storage_path=s3://{checkpoint_bucket}/sweeps",
        f"overrides.mlflow.experiment={EXPERIMENT}", f"search.num_samples={args.samples}",
        f"trial.num_workers={args.workers_per_trial}", f"max_concurrent_trials={args.concurrent}",
        f"asha.enabled={str(asha).lower()}", "registry.model_name=null",
    ])
    print(f"\n== sweep {name}", flush=True)
    wall_s, status = timed(lambda: run_sweep(sweep, resume=False))
    ray.shutdown()
    if status:
        raise SystemExit(f"sweep {name} did not complete (status {status})")
    return sweep, read_outcome(name, wall_s)


def read_outcome(sweep_name: str, wall_s: float) -> SweepOutcome:
    import mlflow
    import pandas

    from pipelines.tracking.runs import SWEEP_NAME_TAG

    run = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=f"tags.`{SWEEP_NAME_TAG}` = '{sweep_name}'",
                             output_format="list")[0]
    trials = pandas.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/trials.csv")))
    rows = trials.to_dict("records")
    best_id = run.data.tags.get("vitae.best_trial")
    return SweepOutcome(wall_s, os.getloadavg()[1], int(run.data.metrics["trial_epochs"]), rows,
                        next((row for row in rows if row["trial_id"] == best_id), None))


def configuration(row: dict | None, space: list[str]) -> tuple | None:
    return None if row is None else tuple(row[path] for path in space)


def describe_trial(row: dict | None, space: list[str]) -> str:
    if row is None:
        return "none completed"
    return ", ".join(f"{path.rpartition('.')[2]} {row[path]:.3g}" for path in space)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="trials per sweep")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a trial run to completion (ASHA's max_t)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at a time")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--digits-size", type=int, default=16, help="image side of the digits dataset and the model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp, embedded_stack(Path(tmp) / "stack") as env:
        data_url = f"s3://{env['VITAE_DATA_BUCKET']}/digits"
        prepare("digits", data_url, PrepOptions(shard_max_samples=300,
                                                source=SourceOptions(digits_size=args.digits_size)), progress=False)
        sweep, asha = measure_sweep("asha", True, args, data_url, env["VITAE_CHECKPOINT_BUCKET"])
        _, fifo = measure_sweep("to-completion", False, args, data_url, env["VITAE_CHECKPOINT_BUCKET"])

    space = list(sweep.config.search.space)
    same_trials = sorted(configuration(row, space) for row in asha.trials) == sorted(
        configuration(row, space) for row in fifo.trials)
    same_best = asha.best is not None and configuration(asha.best, space) == configuration(fifo.best, space)
    settings = sweep.config.asha
    rows = [("sweep", "wall s", "load (5 min)", "trial-epochs", "stopped early", "best configuration",
             "its val_top1")]
    for label, outcome in ((f"ASHA (grace {settings.grace_period}, reduction {settings.reduction_factor:g})", asha),
                           ("every trial to completion", fifo)):
        stopped = sum(row["status"] == "stopped early" for row in outcome.trials)
        rows.append((label, f"{outcome.wall_s:.0f}", f"{outcome.load:.1f}", str(outcome.trial_epochs), str(stopped),
                     describe_trial(outcome.best, space), f"{outcome.best['val_top1']:.2%}" if outcome.best else "-"))
    print_table(f"\ndigits sweep ({CONFIG.name}: its search space, seed {sweep.config.search.seed}), {args.samples} "
                f"trials of up to {args.epochs} epochs, vitae_t @ {args.digits_size} px, {args.workers_per_trial} "
                f"worker(s) per trial, {args.concurrent} trial(s) at a time", rows,
                f"ASHA = {asha.wall_s / fifo.wall_s:.2f}x the wall time and "
                f"{asha.trial_epochs / fifo.trial_epochs:.2f}x the trial-epochs of running every trial to completion; "
                "same best configuration: "
                f"{'yes' if same_best else 'no'}",
                [f"both sweeps sampled the same {args.samples} configurations: {'yes' if same_trials else 'no'}"])


if __name__ == "__main__":
    main()
