"""Training figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display):
learning curves from the per-epoch history and the validation confusion matrix."""

from __future__ import annotations

from typing import Sequence

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


def confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Rows: true class; columns: predicted class; cells: sample counts."""
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    counts = confusion.numpy()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = range(len(class_names))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true",
             title=f"validation confusion matrix ({int(counts.sum())} samples)")
    axes.set_xticklabels(class_names, rotation=90)
    axes.set_yticklabels(class_names)
    if len(class_names) <= ANNOTATE_UP_TO:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, column), count in numpy.ndenumerate(counts):
            axes.text(column, row, str(int(count)), ha="center", va="center", fontsize=8,
                      color="white" if count > threshold else "black")
    return figure
