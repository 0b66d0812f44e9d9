"""The parsers of the jobs: `vitae models`, `train`, `tune`, `evaluate`, `predict`, `promote`,
`register`, `export` and `quickstart`. Each names its handler as "module:function", imported only when run."""

from __future__ import annotations

import argparse
from pathlib import Path

from infra.errors import UserError
from pipelines.model_registry.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOADER_WORKERS,
    LOCK_BUCKET_ENV,
    LOCK_PREFIX,
    METRICS,
)

QUICKSTART_SWEEP = Path(__file__).resolve().parents[2] / "configs" / "digits_sweep.yaml"


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the registered models with parameters and GFLOPs")
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vitaev2_*'")
    parser.add_argument("--img-size", type=int, default=224, help="input size for the GFLOPs column")
    parser.set_defaults(handler="pipelines.cli.jobs:list_models_command")


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a ViTAE model on a prepared dataset with Ray Train",
        description="Train a model with Ray Train (DDP over the configured workers), checkpointing every "
                    "epoch and logging to MLflow. Re-running the same run name resumes it.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="training config (YAML)")
    add_overrides(parser, "override a config value", "model.depth=4")
    parser.set_defaults(handler="pipelines.training.driver:train_command")


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="hyperparameter sweep of training runs with Ray Tune (ASHA), best model registered",
        description="Run a sweep: trials are Ray Train runs of the base training config with sampled values, "
                    "stopped early by ASHA, tracked as MLflow runs nested under the sweep's run. The best "
                    "trial is registered as @challenger (and promoted with registry.promote).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="sweep config (YAML)")
    add_overrides(parser, "override a sweep config value", "search.num_samples=8")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of this name: finished trials are kept")
    parser.set_defaults(handler="pipelines.tuning.driver:tune_command")


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a logged model on a split of a prepared dataset",
        description="Evaluate an MLflow model on one split of a prepared dataset with the training code's "
                    "evaluation (one process; a GPU if there is one): prints top-1, top-5 and loss, writes "
                    "confusion_matrix.png and metrics.json.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="these options as YAML (model:, data:, batch_size: for --batch-size, ...); flags "
                             "override it")
    parser.add_argument("--model", metavar="URI",
                        help="an MLflow model URI: models:/NAME@champion, models:/NAME/3, runs:/RUN_ID/model, ... "
                             "(required)")
    parser.add_argument("--data", metavar="DEST", help="the prepared dataset (s3:// URL or path; required)")
    parser.add_argument("--split", help="the split to evaluate on (default: test)")
    parser.add_argument("--output", metavar="DIR|s3://BUCKET/PREFIX",
                        help="where to write the figure and metrics (default: evaluations/<model>-<split>)")
    parser.add_argument("--batch-size", type=int, help=f"images per forward pass (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--loader-workers", type=int,
                        help=f"DataLoader processes decoding images (0: in this process; default: "
                             f"{DEFAULT_LOADER_WORKERS})")
    parser.set_defaults(handler="pipelines.model_registry.evaluation:evaluate_command")


def add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify image files, or a whole dataset split on Ray, with a logged model",
        description="Print the top-k classes of each image (any size; JPEG, PNG, WebP, BMP, ...) as the "
                    "model's pyfunc interface answers them. With --data instead of files: score a whole "
                    "split of a prepared dataset, or every image under a folder or s3:// prefix, with Ray "
                    "Data on the cluster at RAY_ADDRESS, and write the top-k of each to Parquet at --output.",
    )
    parser.add_argument("--model", required=True, metavar="URI",
                        help="an MLflow model URI, e.g. models:/NAME@champion or models:/NAME/3")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or --data)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--data", metavar="DEST|DIR|s3://BUCKET/PREFIX",
                        help="a prepared dataset, or a folder or prefix of raw images: scored on Ray")
    parser.add_argument("--split", help="with a prepared --data: the split to score (default: test)")
    parser.add_argument("--output", metavar="DIR|s3://BUCKET/PREFIX",
                        help="with --data: where the Parquet predictions go (required)")
    parser.add_argument("--batch-size", type=int, default=64, help="with --data: images per forward pass (default: 64)")
    parser.add_argument("--actors", type=int,
                        help="with --data: scoring actors, each loading the model once (default: one per GPU, "
                             "else 2)")
    parser.set_defaults(handler="pipelines.model_registry.prediction:predict_command")


def add_promote_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "promote", help="promote a registered model's challenger to champion if it evaluates better",
        description="Evaluate @challenger (or --version) and @champion of a registered model on the same "
                    "dataset split; move @champion to the challenger only if it beats the champion by more "
                    "than --margin (the old champion becomes @previous-champion). --rollback restores "
                    "@previous-champion instead. Logged to the MLflow experiment promotions/NAME.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="these options as YAML (model:, lock_url: for --lock-url, ...); flags override it")
    parser.add_argument("--model", metavar="NAME", help="the registered model's name (required)")
    parser.add_argument("--version", help="the version to promote (default: the one aliased @challenger)")
    parser.add_argument("--data", metavar="DEST",
                        help="the prepared dataset to evaluate on (default: the challenger version's "
                             "'dataset_url' tag, set when a sweep registers it)")
    parser.add_argument("--split", help="the split to evaluate on (default: test)")
    parser.add_argument("--metric", choices=METRICS, help="the score compared (default: top1)")
    parser.add_argument("--margin", type=float,
                        help="how much the challenger must beat the champion by (default: 0)")
    parser.add_argument("--lock-url", metavar="s3://BUCKET[/PREFIX]",
                        help=f"where the lease serialising promotions lives, as <lock-url>/{LOCK_PREFIX}/NAME "
                             f"(default: s3://${LOCK_BUCKET_ENV})")
    parser.add_argument("--rollback", action="store_true", default=None,
                        help="make @previous-champion the champion again (no evaluation)")
    parser.set_defaults(handler="pipelines.model_registry.promotion:promote_command")


def add_register_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register", help="register a trained model as a registered model's @challenger",
        description="Register the model that a `vitae train` run logged (--run NAME), or any MLflow model "
                    "(--model URI), as a new version of the registered model --name, aliased @challenger: "
                    "what `vitae promote` compares with @champion.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="NAME", help="a training run's name (the config's `name`)")
    source.add_argument("--model", metavar="URI", help="an MLflow model URI, e.g. runs:/RUN_ID/model")
    parser.add_argument("--name", required=True, metavar="MODEL", help="the registered model's name")
    parser.add_argument("--data", metavar="DEST",
                        help="the prepared dataset it was trained on, tagged for promotion (default: the "
                             "training run's data.url)")
    parser.set_defaults(handler="pipelines.model_registry.registration:register_command")


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a logged or registered model as a checkpoint in the reference layout",
        description="Write an MLflow model's weights as {\"model\": state_dict} with the reference "
                    "implementation's key names: what vitae.load_pretrained, the model.pretrained of a "
                    "training config and the reference code read.",
    )
    parser.add_argument("--model", required=True, metavar="URI",
                        help="an MLflow model URI: models:/NAME@champion, models:/NAME/3, runs:/RUN_ID/model, ...")
    parser.add_argument("--out", required=True, metavar="FILE|s3://BUCKET/KEY", help="the checkpoint file to write")
    parser.set_defaults(handler="pipelines.model_registry.export:export_command")


def add_quickstart_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run the whole pipeline on the embedded stack (digits, sweep, registry)",
        description="Run the whole pipeline end to end on the embedded local stack: start it, prepare the "
                    "digits data set, sweep, register the best model and promote it.",
    )
    parser.add_argument("--dir", default=".vitae", help="the embedded stack's directory (default .vitae)")
    parser.add_argument("--config", default=str(QUICKSTART_SWEEP), help="the sweep config (default: %(default)s)")
    add_overrides(parser, "override a sweep config value", "search.num_samples=6")
    parser.set_defaults(handler="pipelines.quickstart:quickstart_command")


def list_models_command(args: argparse.Namespace) -> int:
    """`vitae models`: the model library's table (`vitae.flops.model_table`)."""
    import vitae
    from vitae.flops import model_table

    names = vitae.list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; try `vitae models`")
    print("\n".join(model_table(names, args.img_size)))
    return 0


def add_overrides(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """The repeatable `--set KEY=VALUE` of the commands that read a config file."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help=f"{what}, e.g. --set {example} (repeatable)")
