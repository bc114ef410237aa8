"""PNG plots of OOD scores: histograms and ROC curves.

Needs matplotlib (`pip install "keras-isomax[plots]"`); it is imported only
when a plot is drawn. Figures are rendered off-screen with the Agg canvas
directly (no `pyplot`, no change of the global matplotlib backend), so the
functions work on servers without a display and inside notebooks alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_isomax import detection_metrics as metrics_lib
from keras_isomax._typing import ArrayLike


def _matplotlib() -> tuple[Any, Any]:
    """Imports matplotlib's object API, with an install hint when it is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib, an optional dependency of keras-isomax. "
            'Install it with `pip install "keras-isomax[plots]"` (or '
            "`pip install matplotlib`)."
        ) from error
    return Figure, FigureCanvasAgg


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"`path` must name a .png file. Received: path={path!r}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return path


def _as_ood_dict(ood_scores: ArrayLike | Mapping[str, ArrayLike]) -> dict[Any, ArrayLike]:
    if isinstance(ood_scores, Mapping):
        if not ood_scores:
            raise ValueError("`ood_scores` must not be empty. Received: ood_scores={}")
        return dict(ood_scores)
    return {"OOD": ood_scores}


def _scores_1d(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty. Received: {name} of size 0")
    return array


def plot_score_histograms(
    in_scores: ArrayLike,
    ood_scores: ArrayLike | Mapping[str, ArrayLike],
    path: str | os.PathLike,
    *,
    bins: int = 50,
    threshold: float | None = None,
    score_name: str = "score",
    in_name: str = "in-distribution",
    title: str | None = None,
) -> str:
    """Writes a PNG with the score histograms of in-distribution and OOD data.

    One step histogram (normalised to density) per data set on shared bins,
    with an optional vertical line at the decision threshold.

    Args:
        in_scores: 1-D array of in-distribution scores.
        ood_scores: 1-D array of OOD scores, or a dict name -> 1-D array.
        path: Output file, ending in `.png`; missing directories are created.
        bins: Number of shared bins. Defaults to `50`.
        threshold: Draw a vertical line at this score (e.g. the layer's
            `ood_threshold`). Defaults to `None` (no line).
        score_name: Label of the x axis. Defaults to `"score"`.
        in_name: Legend entry of the in-distribution data. Defaults to
            `"in-distribution"`.
        title: Figure title. Defaults to `None` (a generic title).

    Returns:
        The path written, as a string.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If `path` does not end in `.png` or a score array is empty.
    """
    figure_cls, canvas_cls = _matplotlib()
    path = _check_path(path)
    sets = {in_name: _scores_1d(in_scores, "in_scores")}
    for name, values in _as_ood_dict(ood_scores).items():
        sets[str(name)] = _scores_1d(values, f"ood_scores[{name!r}]")
    finite = np.concatenate([v[np.isfinite(v)] for v in sets.values()])
    if finite.size == 0:
        raise ValueError("All scores are NaN or infinite. Received: no finite scores")
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, int(bins) + 1)

    figure = figure_cls(figsize=(7, 4.5), dpi=100)
    canvas_cls(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, (name, values) in enumerate(sets.items()):
        values = values[np.isfinite(values)]
        axes.hist(
            values,
            bins=edges,
            density=True,
            histtype="stepfilled" if index == 0 else "step",
            alpha=0.35 if index == 0 else 1.0,
            linewidth=1.5,
            label=f"{name} (n={values.size})",
        )
    if threshold is not None and np.isfinite(threshold):
        axes.axvline(float(threshold), color="black", linestyle="--", label="threshold")
    axes.set_xlabel(f"{score_name} (higher = more in-distribution)")
    axes.set_ylabel("density")
    axes.set_title(title or f"OOD score histograms: {score_name}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_roc(
    in_scores: ArrayLike,
    ood_scores: ArrayLike | Mapping[str, ArrayLike],
    path: str | os.PathLike,
    *,
    in_name: str = "in-distribution",
    title: str | None = None,
) -> str:
    """Writes a PNG with the exact ROC curve of each OOD set.

    In-distribution is the positive class: the y axis is the fraction of
    in-distribution inputs accepted (TPR), the x axis the fraction of OOD
    inputs accepted (FPR). The legend gives each set's AUROC; a dotted line
    marks TPR = 95%.

    Args:
        in_scores: 1-D array of in-distribution scores.
        ood_scores: 1-D array of OOD scores, or a dict name -> 1-D array.
        path: Output file, ending in `.png`; missing directories are created.
        in_name: Name of the in-distribution data in the axis label. Defaults
            to `"in-distribution"`.
        title: Figure title. Defaults to `None` (a generic title).

    Returns:
        The path written, as a string.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If `path` does not end in `.png`, or the scores are
            invalid (see `keras_isomax.detection_metrics.ood_metrics`).
    """
    figure_cls, canvas_cls = _matplotlib()
    path = _check_path(path)
    in_values = _scores_1d(in_scores, "in_scores")
    figure = figure_cls(figsize=(5.5, 5), dpi=100)
    canvas_cls(figure)
    axes = figure.add_subplot(1, 1, 1)
    for name, values in _as_ood_dict(ood_scores).items():
        out_values = _scores_1d(values, f"ood_scores[{name!r}]")
        fpr, tpr, _ = metrics_lib.roc_curve(in_values, out_values)
        auroc = metrics_lib.ood_metrics(in_values, out_values)["auroc"]
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {100 * auroc:.2f})")
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    axes.axhline(0.95, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("OOD inputs accepted (FPR)")
    axes.set_ylabel(f"{in_name} inputs accepted (TPR)")
    axes.set_title(title or "ROC (in-distribution = positive)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
