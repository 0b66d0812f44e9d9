"""`vitae tune` and `python -m pipelines.tune` (the `ray job submit` entrypoint): a hyperparameter
sweep of training runs with Ray Tune (each trial a Ray Train run, `run_trial`), as many at once as
the cluster holds, tracked in MLflow, interruptible, its best trial registered and optionally
promoted. `--resume` restores, as of Tune's last experiment checkpoint: the trials and their
results, the searcher and ASHA's rungs (`scheduler_state`); unfinished trials resume from their
last epoch checkpoint. Not restored: epochs after that checkpoint (trained again) and, after a
killed driver, what happened since Tune's last experiment checkpoint (docs/design/sweeps.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas
from ray import tune
from ray.tune.execution.class_cache import ENV_VARS_TO_PROPAGATE
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from cluster.credentials import CREDENTIAL_VARIABLES
from data_prep.dataset import PreparedDataset
from infra.errors import INTERRUPTED_EXIT, UserError
from pipelines.model_registry import champions
from pipelines.model_registry.promotion import promote_registered
from pipelines.tracking import plots
from pipelines.tracking.runs import MODEL_URI_TAG
from pipelines.tracking.sweep_run import SweepRun
from pipelines.training.driver import check_dataset, fit, scaling_config
from pipelines.training.ray_cluster import cluster_capacity, connect_to_ray, describe_resources, require_resources
from pipelines.training.run_storage import RunStorage
from pipelines.tuning.config import LogUniform, Sweep, load_sweep, trial_config, trial_run_name
from pipelines.tuning.scheduler_state import SchedulerState

METRIC, MODE = "val_top1", "max"  # what the sweep optimises and ASHA compares
REGISTERED_TAG = "vitae.registered_version"  # on the sweep's run: "<model>/<version>", registered once
TABLE_METRICS = ("val_top1", "val_top5", "val_loss")
TUNE_RESTORE_HINT = "Tuner.restore("  # in the warning Tune ends an interrupted experiment with


def tune_command(args: argparse.Namespace) -> int:
    return run_sweep(load_sweep(args.config, args.overrides), resume=args.resume)


def run_sweep(sweep: Sweep, resume: bool) -> int:
    """Run (or resume) the sweep; 130 when it was interrupted, 1 when a trial failed or none completed, else 0."""
    check_dataset(sweep.base)
    storage = RunStorage.open(sweep.base.checkpoint.storage_path)
    check_experiment(sweep, storage, resume)
    warn_of_copied_credentials()
    connect_to_ray()
    capacity = cluster_capacity()
    require_resources(trial_resources(sweep), capacity, "a trial", "use fewer or smaller workers per trial "
                      "(trial.num_workers, trial.driver_cpus) or a larger cluster")
    concurrency = derive_concurrency(capacity.resources, trial_resources(sweep), sweep.config.search.num_samples,
                                     sweep.config.max_concurrent_trials)
    print(describe_sweep(sweep), concurrency.explanation, sep="\n", flush=True)
    print(f"checkpoints: {storage.run_url(sweep.name)} (the sweep), {storage.run_url(sweep.name)}-<trial id> "
          "(its trials' training runs)", flush=True)
    tracker = attach_sweep_run(sweep, concurrency, resume)
    logging.getLogger("ray.tune.tune").addFilter(without_tunes_restore_hint)
    results = build_tuner(sweep, storage, tracker.run_id, concurrency, resume).fit()
    ended = ended_trials(results)
    if ended < sweep.config.search.num_samples:
        print(f"vitae: interrupted: sweep {sweep.name} stopped with {ended} of {sweep.config.search.num_samples} "
              f"trials ended, nothing registered; continue it with: {sweep.resume_command()}",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    rows = trial_rows(sweep, results)
    best = finish_sweep(sweep, tracker, rows)
    failed = [row["trial_id"] for row in rows if row["status"] == "error"]
    if failed:  # as Tune's own `raise_on_failed_trial`: a sweep with failed trials did not succeed
        print(f"sweep {sweep.name}: {len(failed)} trial(s) failed ({', '.join(failed)}; their errors are above): "
              "run them again with --resume", flush=True)
        return 1
    return 0 if best else 1


def ended_trials(results) -> int:
    """Trials that failed or whose last result is `done`: not those an interruption stopped."""
    return sum(1 for result in results if result.error or (result.metrics or {}).get("done"))


def without_tunes_restore_hint(record: logging.LogRecord) -> bool:
    """Logging filter: `run_sweep` prints the `vitae tune` command that continues a sweep instead."""
    return TUNE_RESTORE_HINT not in record.getMessage()


def warn_of_copied_credentials() -> None:
    """Ray Tune copies the sweep driver's credential variables into every trial's runtime env, and
    Ray's runtime env agent logs runtime envs in full on each node: say so, naming the variables."""
    copied = sorted(name for name in ENV_VARS_TO_PROPAGATE if name in CREDENTIAL_VARIABLES and os.environ.get(name))
    if copied:
        print(f"warning: Ray Tune copies {', '.join(copied)} into every trial's runtime environment, which Ray "
              "logs on each node (runtime_env_agent.log): give S3 credentials as a file "
              "(AWS_SHARED_CREDENTIALS_FILE) or an instance role instead", file=sys.stderr, flush=True)


def check_experiment(sweep: Sweep, storage: RunStorage, resume: bool) -> None:
    """A new sweep must not exist yet; a resumed one must."""
    exists = tune.Tuner.can_restore(experiment_path(sweep, storage), storage_filesystem=storage.filesystem)
    if resume and not exists:
        raise UserError(f"no sweep {sweep.name} to resume in {storage.url}")
    if exists and not resume:
        raise UserError(f"sweep {sweep.name} exists in {storage.url}: continue it with --resume or choose a new name")


def experiment_path(sweep: Sweep, storage: RunStorage) -> str:
    return f"{storage.path}/{sweep.name}"


@dataclass(frozen=True)
class Concurrency:
    trials: int
    explanation: str


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What one running trial occupies: its driver's CPUs and its Ray Train workers."""
    resources = {"CPU": sweep.config.trial.driver_cpus}
    for name, amount in scaling_config(sweep.base).total_resources.items():
        resources[name] = resources.get(name, 0.0) + amount
    return resources


def derive_concurrency(cluster: Mapping[str, float], per_trial: Mapping[str, float], num_samples: int,
                       cap: int | None = None) -> Concurrency:
    """How many trials can run at once with every trial's workers placed (at least one trial fits:
    `ray_cluster.require_resources`)."""
    needed = {name: amount for name, amount in per_trial.items() if amount > 0}
    fits = {name: math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in needed.items()}
    limits = {f"{name}: {_number(cluster[name])} // {_number(needed[name])}": count for name, count in fits.items()}
    limits[f"num_samples {num_samples}"] = num_samples
    if cap is not None:
        limits[f"max_concurrent_trials {cap}"] = cap
    trials = min(limits.values())
    binding = [reason for reason, count in limits.items() if count == trials]
    return Concurrency(trials, f"concurrency: a trial needs {describe_resources(needed)} (driver and workers); "
                               f"cluster {describe_resources({name: cluster.get(name, 0.0) for name in needed})} -> "
                               f"{trials} trial(s) at a time ({'; '.join(binding)})")


def describe_sweep(sweep: Sweep) -> str:
    config = sweep.config
    stopping = (f"ASHA on val_top1 (max_t {sweep.max_t} epochs, grace {config.asha.grace_period}, "
                f"reduction {config.asha.reduction_factor:g})" if config.asha.enabled else "no early stopping")
    return (f"sweep {sweep.name}: {config.search.num_samples} trials, {config.search.algorithm} search over "
            f"{', '.join(config.search.space)}; {stopping}; {sweep.base.scaling.describe()} per trial")


def attach_sweep_run(sweep: Sweep, concurrency: Concurrency, resume: bool) -> SweepRun:
    """The sweep's MLflow run (a resumed sweep's own), with the search space and settings as params."""
    config = sweep.config
    params = {
        **{f"search.{path}": distribution.model_dump_json() for path, distribution in config.search.space.items()},
        "search.algorithm": config.search.algorithm, "search.num_samples": config.search.num_samples,
        "search.seed": config.search.seed, "asha.enabled": config.asha.enabled, "asha.max_t": sweep.max_t,
        "asha.grace_period": config.asha.grace_period, "asha.reduction_factor": config.asha.reduction_factor,
        "trial.num_workers": sweep.base.scaling.num_workers, "trial.resources": describe_resources(trial_resources(sweep)),
        "max_concurrent_trials": concurrency.trials, "data.url": sweep.base.data.url,
        "registry.model_name": config.registry.model_name,
    }
    tracker = SweepRun.attach(sweep.name, sweep.base.mlflow.experiment, sweep.base.mlflow.tracking_uri,
                              params, sweep.resolved_yaml(), resume)
    print(f"MLflow sweep run: {tracker.run_url()}", flush=True)
    started_with = int(tracker.params.get("max_concurrent_trials", concurrency.trials))
    if started_with > concurrency.trials:  # Tune restores the search algorithm with its limit
        print(f"warning: the sweep resumes with its limit of {started_with} trials at a time, but the cluster "
              f"now holds {concurrency.trials}: trials may wait for workers", flush=True)
    return tracker


def build_tuner(sweep: Sweep, storage: RunStorage, parent_run_id: str, concurrency: Concurrency, resume: bool):
    nested = sweep.base.mlflow.model_copy(update={"parent_run_id": parent_run_id})
    base = sweep.base.model_copy(update={"mlflow": nested})
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.model_dump(mode="json")),
                                    {"CPU": sweep.config.trial.driver_cpus})
    if resume:
        print(f"sweep {sweep.name}: resuming from {storage.url}", flush=True)
        return tune.Tuner.restore(experiment_path(sweep, storage), trainable, resume_errored=True,
                                  storage_filesystem=storage.filesystem)
    asha = scheduler(sweep)
    return tune.Tuner(
        trainable,
        param_space={path: distribution.to_tune() for path, distribution in sweep.config.search.space.items()},
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=sweep.config.search.num_samples,
                                    search_alg=searcher(sweep, concurrency.trials), scheduler=asha,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage.path, storage_filesystem=storage.filesystem,
                                  callbacks=[SchedulerState(asha)] if asha else None),
    )


def searcher(sweep: Sweep, max_concurrent: int):
    """The search algorithm, holding at most `max_concurrent` trials running (Tune's own
    `max_concurrent_trials` is ignored for a search generator such as random search)."""
    search = sweep.config.search
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optuna: only for `search.algorithm: optuna`

        return ConcurrencyLimiter(OptunaSearch(seed=search.seed), max_concurrent=max_concurrent)  # TPE sampling
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=search.seed)


def scheduler(sweep: Sweep):
    if not sweep.config.asha.enabled:
        return None
    asha = sweep.config.asha
    return ASHAScheduler(time_attr="epoch", max_t=sweep.max_t, grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor)


def trial_dirname(trial) -> str:
    """A trial's folder is its id, so a result leads back to its training run."""
    return trial.trial_id


def run_trial(sampled: dict[str, Any], base: dict[str, Any]) -> None:
    """One trial, on its Tune trial actor: trains (or resumes) run `<sweep>-<trial id>`.

    Tune stops a trial as soon as it reports its last epoch (ASHA's max_t), which would end the
    training run before it logs its model: the last epoch is reported here, once `fit` returned.
    """
    config = trial_config(base, sampled, trial_run_name(base["name"], tune.get_context().get_trial_id()))
    result = fit(config, RunStorage.open(config.checkpoint.storage_path),
                 callbacks=[epochs_to_tune(config.schedule.epochs)])
    if result.metrics:  # (none when the run had ended before an interruption: Tune has its last epoch)
        tune.report(dict(result.metrics))


def epochs_to_tune(epochs: int):
    """Ray Train callback: every epoch's metrics but the last to Tune (`TuneReportCallback`)."""
    class EpochsBeforeTheLast(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if is_epoch_result(metrics[0], epochs):
                super().after_report(run_context, metrics, checkpoint)

    return EpochsBeforeTheLast()


def is_epoch_result(metrics: dict[str, Any], epochs: int) -> bool:
    """Whether a report goes to Tune: an epoch's before the last. Not a checkpoint within an epoch
    (no `epoch`, no validation): ASHA compares epochs only."""
    return "epoch" in metrics and metrics["epoch"] < epochs


def trial_rows(sweep: Sweep, results) -> list[dict[str, Any]]:
    """One row per trial: id, training run, sampled values, epochs run, last metrics, how it ended."""
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        status = "error" if result.error else "completed" if epochs == sweep.max_t else "stopped early"
        rows.append({"trial_id": trial_id, "run_name": trial_run_name(sweep.name, trial_id),
                     **{path: result.config.get(path) for path in sweep.config.search.space},
                     "epochs": epochs, **{key: metrics.get(key) for key in TABLE_METRICS}, "status": status})
    return sorted(rows, key=lambda row: row["trial_id"])


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest last validation top-1 (stopped trials logged no model)."""
    completed = [row for row in rows if row["status"] == "completed" and row["val_top1"] is not None]
    return max(completed, key=lambda row: row["val_top1"], default=None)


def finish_sweep(sweep: Sweep, tracker: SweepRun, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trials to the sweep's run; the best registered (and promoted) and returned."""
    best = best_trial(rows)
    print(pandas.DataFrame(rows).to_string(index=False))
    log_trials(sweep, tracker, rows, best)
    if best is None:
        print(f"sweep {sweep.name}: no trial completed all {sweep.max_t} epochs; nothing to register")
    else:
        print(f"best trial {best['trial_id']} (run {best['run_name']}): val_top1 {best['val_top1']:.2%}, "
              + ", ".join(f"{path} {best[path]}" for path in sweep.config.search.space))
        register_best(sweep, tracker, best)
    tracker.finish()
    return best


def log_trials(sweep: Sweep, tracker: SweepRun, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Table, figure, counts and best trial to the sweep's run; the runs of trials stopped early end KILLED."""
    stopped = tracker.end_running_children()
    if stopped:
        print(f"MLflow runs of trials stopped early, marked KILLED: {', '.join(stopped)}")
    space = sweep.config.search.space
    tracker.log_table(rows, "trials.csv")
    tracker.log_figure(plots.sweep_trials(rows, list(space), [p for p, d in space.items() if isinstance(d, LogUniform)],
                                          best_trial=best and best["trial_id"]), "trials.png")
    tracker.log_metrics({"trials": len(rows), "trial_epochs": sum(row["epochs"] for row in rows),
                         **({f"best_{key}": best[key] for key in TABLE_METRICS} if best else {})})
    if best:
        tracker.set_tags({"vitae.best_trial": best["trial_id"]})


def register_best(sweep: Sweep, tracker: SweepRun, best: dict[str, Any]) -> None:
    """The best trial's model as a new @challenger version, once per sweep; then promotion if configured."""
    model_name = sweep.config.registry.model_name
    if model_name is None:
        return
    registered = tracker.tags.get(REGISTERED_TAG)
    if registered is None:
        run = tracker.child_runs()[best["run_name"]]
        model_uri = run.data.tags.get(MODEL_URI_TAG)
        if model_uri is None:
            print(f"the best trial's run {run.info.run_id} logged no model (mlflow.log_model): nothing to register")
            return
        version = champions.register_challenger(model_uri, model_name, registration_tags(sweep, tracker, best, run),
                                                tracker.server)
        registered = f"{model_name}/{version}"
        tracker.set_tags({REGISTERED_TAG: registered})
    version = registered.rpartition("/")[2]
    print(f"registered {champions.version_uri(model_name, version)} (@{champions.CHALLENGER})", flush=True)
    if sweep.config.registry.promote:
        promote(sweep, tracker, version)


def registration_tags(sweep: Sweep, tracker: SweepRun, best: dict[str, Any], run) -> dict[str, Any]:
    config = sweep.trial_config(best["trial_id"], {path: best[path] for path in sweep.config.search.space})
    return {
        "trial_id": best["trial_id"], "sweep_run_id": tracker.run_id, "training_run_id": run.info.run_id,
        champions.DATASET_URL_TAG: config.data.url,
        "dataset_manifest_sha256": PreparedDataset.open(config.data.url).manifest_sha256(),
        **{key: best[key] for key in TABLE_METRICS},
        "architecture": config.model.name, "img_size": config.model.img_size,
        "depth": _or_default(config.model.depth), "mlp_ratio": _or_default(config.model.mlp_ratio),
        "lr": config.optim.lr, "peak_lr": config.peak_lr,
        **{f"search.{path}": best[path] for path in sweep.config.search.space},
    }


def promote(sweep: Sweep, tracker: SweepRun, version: str) -> None:
    settings = sweep.config.registry
    outcome = promote_registered(settings.model_name, sweep.base.data.url, split=settings.split, version=version,
                                 margin=settings.margin, metric=settings.metric, lock_url=settings.lock_url,
                                 server=tracker.server)
    tracker.set_tags({"vitae.promoted": outcome.promoted, "vitae.promotion_reason": outcome.reason})
    print(f"promotion: {outcome.reason}", flush=True)


def _or_default(value: Any) -> str:
    return "model default" if value is None else str(value)


def _number(value: float) -> str:
    return f"{value:g}"

