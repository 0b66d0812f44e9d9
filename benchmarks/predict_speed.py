"""Benchmark of `vitae predict`: images/s of the batch prediction on Ray Data (`--data`, 1 and 2
scoring actors) beside the single-process prediction of the same images as files (`vitae predict
FILES`: mlflow.pyfunc in this process), each end to end (model loading included).

The model is the digits config's vitae_t (untrained: speed does not depend on the weights), logged to
the embedded stack's MLflow; the data are the digits prepared at `--digits-size` px, split `train`.

    python -m benchmarks.predict_speed [--digits-size 32] [--rounds 2]

The last line is the headline ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import torch
import webdataset as wds

from benchmarks.environment import embedded_stack
from benchmarks.report import best_of_rounds, print_table, timed
from data_prep.dataset import PreparedDataset
from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions
from pipelines.training.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_vitae_t.yaml"
SPLIT = "train"


def log_untrained_model(data_url: str, img_size: int) -> str:
    """The digits config's model, randomly initialised, logged as training logs it; its URI."""
    from pipelines.tracking.client import TrackingServer
    from pipelines.tracking.model_logging import log_classifier
    from pipelines.training.worker import WorkerEnv, build_data, build_model

    config = load_config(CONFIG, [f"data.url={data_url}", f"model.img_size={img_size}"])
    dataset = PreparedDataset.open(data_url)
    model = build_model(config, len(dataset.class_names)).eval()
    data = build_data(config, WorkerEnv(0, 1, torch.device("cpu")), dataset, model.pretrained_cfg)
    client = TrackingServer.at().client()
    run_id = client.create_run(client.create_experiment(f"predict-bench-{uuid.uuid4().hex[:6]}")).info.run_id
    return log_classifier(model, data.info, run_id)


def write_files(data_url: str, directory: Path) -> list[str]:
    """The split's images as files, for the single-process path."""
    paths = []
    for sample in wds.WebDataset(PreparedDataset.open(data_url).shard_urls(SPLIT), shardshuffle=False):
        path = directory / f"{sample['__key__']}.png"
        path.write_bytes(sample["png"])
        paths.append(str(path))
    return paths


def predict_files(model_uri: str, paths: list[str]) -> int:
    """What `vitae predict FILES` does, without printing: read, load the pyfunc, predict."""
    import mlflow.pyfunc

    from pipelines.model_registry.prediction import read_images

    readable, _ = read_images(paths)
    model = mlflow.pyfunc.load_model(model_uri)
    return len(model.predict([picture for _, picture in readable]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits-size", type=int, default=32, help="image side in pixels (the model's input)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds, the best of each kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp, embedded_stack(Path(tmp) / "stack") as env:
        from pipelines.model_registry.batch_prediction import predict_dataset  # imports ray: inside the stack

        data_url = f"s3://{env['VITAE_DATA_BUCKET']}/digits"
        prepare("digits", data_url, PrepOptions(source=SourceOptions(digits_size=args.digits_size),
                                                shard_max_samples=200), progress=False)
        model_uri = log_untrained_model(data_url, args.digits_size)
        files = Path(tmp) / "files"
        files.mkdir()
        paths = write_files(data_url, files)
        count = len(paths)

        def batch(actors: int) -> float:
            output = f"s3://{env['VITAE_DATA_BUCKET']}/predictions/{uuid.uuid4().hex[:8]}"
            seconds, result = timed(lambda: predict_dataset(model_uri, data_url, SPLIT, output, actors=actors))
            assert result.scored == count, (result.scored, count)
            return count / seconds

        def single() -> float:
            seconds, scored = timed(lambda: predict_files(model_uri, paths))
            assert scored == count
            return count / seconds

        batch(2)  # warm-up: Ray Data's first run starts its workers
        fastest = best_of_rounds({"single process (vitae predict FILES)": single,
                                  "Ray Data, 1 actor": lambda: batch(1), "Ray Data, 2 actors": lambda: batch(2)},
                                 args.rounds, score=lambda images_per_s: images_per_s)
    baseline = fastest["single process (vitae predict FILES)"]
    rows = [("prediction, end to end", "images/s", "ratio to single process")]
    rows += [(name, f"{value:,.0f}", f"{value / baseline:.2f}x") for name, value in fastest.items()]
    best = max(("Ray Data, 1 actor", "Ray Data, 2 actors"), key=fastest.get)
    print_table(f"vitae predict of {count} digits at {args.digits_size} px ({SPLIT} split), vitae_t, CPU, "
                f"best of {args.rounds} rounds", rows,
                f"vitae predict --data ({best}) = {fastest[best] / baseline:.2f}x the single-process predict")


if __name__ == "__main__":
    main()
