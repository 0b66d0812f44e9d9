"""Training-step benchmark: images/s and where a step's time goes (data wait, forward, backward,
optimiser) in the Ray Train job with one worker against a plain PyTorch loop over the same model,
data loader, batch and step code, in the same run; the fixed cost of starting a Ray Train run; and
what checkpoints within epochs cost a step, their upload synchronous or in the background.

    python -m benchmarks.train_step --epochs 3

Method: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.environment import embedded_stack
from benchmarks.report import print_table, timed
from data_prep.dataset import PreparedDataset
from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions
from pipelines.training.run_storage import RunStorage
from pipelines.training.config import TrainConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_vitae_t.yaml"
PHASES = ("data_wait_ms", "forward_ms", "backward_ms", "optimizer_ms")


def plain_loop(config: TrainConfig) -> list[dict[str, float]]:
    """The job's training epochs, run here without Ray: one rank, CPU; per-epoch metrics."""
    # imports ray: only inside `embedded_stack`, once Ray's settings are in the environment
    from pipelines.training.worker import (WorkerEnv, build_data, build_model, epoch_loader, epoch_metrics,
                                           fresh_training, train_epoch)

    env = WorkerEnv(0, 1, torch.device("cpu"))
    dataset = PreparedDataset.open(config.data.url)
    torch.manual_seed(config.seed)
    model = build_model(config, len(dataset.class_names))
    data = build_data(config, env, dataset, model.pretrained_cfg)
    training = fresh_training(config, env, model, data.epoch_blocks)
    history = []
    for epoch in range(config.schedule.epochs):
        loader = epoch_loader(config, env, data, training, epoch)
        seconds, stats = timed(lambda: train_epoch(config, env, data, training, loader))
        history.append(epoch_metrics(epoch, env, training, stats, {}, seconds))
        training.progress.complete_epoch(history[-1])
    return history


CHECKPOINT_METRICS = ("train_steps", "checkpoints_within", "checkpoint_ms")


def ray_job(config: TrainConfig) -> tuple[list[dict[str, float]], float, float]:
    """(per-epoch metrics as logged to MLflow, fit() seconds, seconds from fit() to the MLflow run)."""
    from pipelines.training.driver import fit  # imports ray: only inside `embedded_stack`
    from pipelines.tracking.client import TrackingServer

    storage = RunStorage.open(config.checkpoint.storage_path)
    called_at = time.time()
    fit_s, result = timed(lambda: fit(config, storage))
    client = TrackingServer.at().client()
    run = client.get_run(result.return_value["mlflow_run_id"])
    histories = {key: client.get_metric_history(run.info.run_id, key)
                 for key in ("epoch", "images_per_s", "epoch_time_s", *PHASES, *CHECKPOINT_METRICS)}
    history = [{key: next(m.value for m in metrics if m.step == epoch) for key, metrics in histories.items()}
               for epoch in range(1, config.schedule.epochs + 1)]
    return history, fit_s, run.info.start_time / 1000 - called_at


def fastest_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of the fastest epoch after the first."""
    return max(history[1:], key=lambda epoch: epoch["images_per_s"])


def checkpoint_cost(history: list[dict[str, float]], batch_size: int) -> tuple[float, float]:
    """(ms of a step that takes no checkpoint, ms of one that does) in the fastest epoch after the first."""
    epoch = fastest_epoch(history)
    steps, checkpoints = epoch["train_steps"], epoch["checkpoints_within"]
    total_ms = 1000 * batch_size / epoch["images_per_s"] * steps
    plain_ms = (total_ms - checkpoints * epoch["checkpoint_ms"]) / steps
    return plain_ms, plain_ms + epoch["checkpoint_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="per run; at least 2 (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of both loops")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers of both loops")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--digits-size", type=int, default=32, help="image side of the digits dataset")
    parser.add_argument("--depth", type=int, help="normal cells of the model (default: the config's model's)")
    parser.add_argument("--checkpoint-every", type=int, default=10, metavar="STEPS",
                        help="checkpoint.every_steps of the two runs that checkpoint within epochs")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp, embedded_stack(Path(tmp) / "stack") as env:
        data_url = f"s3://{env['VITAE_DATA_BUCKET']}/digits"
        prepare("digits", data_url, PrepOptions(shard_max_samples=300,
                                                source=SourceOptions(digits_size=args.digits_size)), progress=False)
        config = load_config(CONFIG, [
            "name=train-step-benchmark", f"data.url={data_url}", f"data.batch_size={args.batch_size}",
            f"data.loader_workers={args.loader_workers}", f"model.img_size={args.digits_size}",
            f"schedule.epochs={args.epochs}", f"checkpoint.storage_path=s3://{env['VITAE_CHECKPOINT_BUCKET']}/bench",
            "mlflow.experiment=benchmarks", "mlflow.log_model=false",
            "scaling.num_workers=1", f"scaling.resources_per_worker={{CPU: {args.threads}}}",
            *([f"model.depth={args.depth}"] if args.depth else []),
        ])
        torch.set_num_threads(args.threads)
        print(f"\n== plain PyTorch loop, {args.epochs} epochs", flush=True)
        before = plain_loop(config)
        print(f"\n== Ray Train job, {args.epochs} epochs", flush=True)
        job, fit_s, to_first_epoch_s = ray_job(config)
        uploads = {}
        for upload in ("sync", "async"):
            print(f"\n== Ray Train job, a checkpoint every {args.checkpoint_every} steps, {upload} upload", flush=True)
            uploads[upload], _, _ = ray_job(config.model_copy(update={
                "name": f"train-step-benchmark-{upload}",
                "checkpoint": config.checkpoint.model_copy(update={"every_steps": args.checkpoint_every,
                                                                   "upload": upload})}))
        print(f"\n== plain PyTorch loop again, {args.epochs} epochs", flush=True)
        after = plain_loop(config)
        train_samples = PreparedDataset.open(data_url).num_samples("train")

    runs = {"plain PyTorch loop, before the job": before, "Ray Train job, 1 worker": job,
            "plain PyTorch loop, after the job": after}
    rows = [("run", "images/s", "step ms", *(phase.removesuffix("_ms").replace("_", " ") + " ms" for phase in PHASES))]
    for name, history in runs.items():
        epoch = fastest_epoch(history)
        rows.append((name, f"{epoch['images_per_s']:.1f}", f"{1000 * args.batch_size / epoch['images_per_s']:.0f}",
                     *(f"{epoch[phase]:.1f}" for phase in PHASES)))
    plain = max(fastest_epoch(history)["images_per_s"] for history in (before, after))
    ratio = fastest_epoch(job)["images_per_s"] / plain
    outside_epochs_s = fit_s - sum(epoch["epoch_time_s"] for epoch in job)
    print_table(
        f"{config.model.name} @ {args.digits_size} px on digits ({train_samples} training images), batch "
        f"{args.batch_size}, {args.threads} threads, {args.loader_workers} loader worker(s), {args.epochs} epochs "
        f"per run; each run's fastest epoch after the first", rows,
        f"the Ray Train job (1 worker) runs at {ratio:.2f}x the plain loop's images/s, plus "
        f"{outside_epochs_s:.1f} s of fixed cost per run",
        [f"Ray Train run: fit() {fit_s:.1f} s = {args.epochs} epochs {fit_s - outside_epochs_s:.1f} s (train + "
         f"validation) + {outside_epochs_s:.1f} s outside them (start-up, checkpoints, shutdown); its MLflow run "
         f"began {to_first_epoch_s:.1f} s after fit() was called"])
    rows = [("checkpoints within epochs", "checkpoints/epoch", "step ms without", "step ms with one", "ratio")]
    for upload, history in uploads.items():
        plain_ms, checkpoint_ms = checkpoint_cost(history, args.batch_size)
        rows.append((f"every {args.checkpoint_every} steps, {upload} upload",
                     f"{fastest_epoch(history)['checkpoints_within']:.0f}", f"{plain_ms:.0f}", f"{checkpoint_ms:.0f}",
                     f"{checkpoint_ms / plain_ms:.2f}x"))
    sync_ms, async_ms = (checkpoint_cost(uploads[upload], args.batch_size)[1] for upload in ("sync", "async"))
    print_table("steps that checkpoint vs those that do not, per upload mode (fastest epoch after the first)", rows,
                f"a step that checkpoints takes {async_ms:.0f} ms with the upload in the background vs {sync_ms:.0f} ms "
                f"with it synchronous ({sync_ms / async_ms:.2f}x)", [])


if __name__ == "__main__":
    main()
