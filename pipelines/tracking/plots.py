"""Training figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display):
learning curves from the per-epoch history and a split's confusion matrix (validation in training,
any split in `vitae evaluate`)."""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

import numpy
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LOSS_CURVES = ("train_loss", "val_loss", "val_ema_loss")
ACCURACY_CURVES = ("val_top1", "val_top5", "val_ema_top1")
ANNOTATE_UP_TO = 20  # classes; larger matrices are drawn without counts


def learning_curves(history: Sequence[dict[str, float]]) -> Figure:
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    epochs = [record["epoch"] for record in history]
    for axes, keys, title in zip(figure.subplots(1, 2), (LOSS_CURVES, ACCURACY_CURVES), ("loss", "accuracy")):
        for key in keys:
            if history and key in history[0]:
                axes.plot(epochs, [record[key] for record in history], marker="o", label=key)
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], split: str = "validation") -> Figure:
    """Rows: true class; columns: predicted class; cells: sample counts of `split`."""
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    counts = confusion.numpy()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = range(len(class_names))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true",
             title=f"{split} confusion matrix ({int(counts.sum())} samples)")
    axes.set_xticklabels(class_names, rotation=90)
    axes.set_yticklabels(class_names)
    if len(class_names) <= ANNOTATE_UP_TO:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, column), count in numpy.ndenumerate(counts):
            axes.text(column, row, str(int(count)), ha="center", va="center", fontsize=8,
                      color="white" if count > threshold else "black")
    return figure


def sweep_trials(trials: Sequence[Mapping[str, Any]], params: Sequence[str], log_params: Collection[str],
                 metric: str = "val_top1", best_trial: str | None = None) -> Figure:
    """One panel per searched parameter: each trial's last `metric` against its value, marked by
    how the trial ended (`status`); the best trial (`trial_id` == `best_trial`) is ringed."""
    figure = Figure(figsize=(4.5 * len(params), 4), layout="constrained")
    FigureCanvasAgg(figure)
    markers = {"completed": "o", "stopped early": "v", "error": "x"}
    for axes, param in zip(numpy.atleast_1d(figure.subplots(1, len(params), sharey=True)), params):
        for status, marker in markers.items():
            shown = [t for t in trials if t["status"] == status and t.get(metric) is not None]
            if shown:
                axes.scatter([_axis_value(t[param]) for t in shown], [t[metric] for t in shown], marker=marker,
                             label=status, alpha=0.8)
        best = [t for t in trials if t["trial_id"] == best_trial]
        if best:
            axes.scatter([_axis_value(t[param]) for t in best], [t[metric] for t in best], s=200,
                         facecolors="none", edgecolors="red", label="best")
        if param in log_params:
            axes.set_xscale("log")
        axes.set(xlabel=param)
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel(f"last {metric}")
    if figure.axes[0].get_legend_handles_labels()[0]:
        figure.axes[0].legend()
    return figure


def _axis_value(value: Any) -> Any:
    """Numbers stay numbers; anything else (e.g. a model name) is a category."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
