"""Renders the rows of an `OODEvaluation` as a text or Markdown table.

`keras_isomax.evaluation` computes the rows; this module only formats them.
Metrics (fractions in `[0, 1]`) are shown in percent, NaN as `n/a`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from keras_isomax import detection_metrics

ROW_KEYS = (
    "model",
    "score",
    "ood",
    "accuracy",
    *detection_metrics.OOD_METRIC_NAMES,
    "n_in",
    "n_ood",
)
"""Keys of every row of an `OODEvaluation`, in table order."""

# The default table shows TNR once, under its earlier header.
_HIDDEN_BY_DEFAULT = ("tnr_at_tpr", "fpr_at_tpr", "fpr_at_tpr95")
_PERCENT_KEYS = ("accuracy", *detection_metrics.OOD_METRIC_NAMES)
_HEADERS = {
    "model": "model",
    "score": "score",
    "ood": "OOD set",
    "accuracy": "acc",
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "tnr_at_tpr": "TNR@TPR",
    "fpr_at_tpr": "FPR@TPR",
    "tnr_at_tpr95": "TNR@TPR95",
    "fpr_at_tpr95": "FPR@TPR95",
    "detection_accuracy": "det.acc",
    "n_in": "n_in",
    "n_ood": "n_ood",
}


def to_string(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 2
) -> str:
    """A fixed-width text table of evaluation rows, metrics in percent.

    Args:
        rows: Dict rows with the keys `ROW_KEYS`.
        columns: Keys to show. Defaults to `None` (all but
            `tnr_at_tpr`, `fpr_at_tpr` and `fpr_at_tpr95`).
        digits: Decimals of the percentages. Defaults to `2`.

    Returns:
        The table as a string: a header line, a rule, one line per row.

    Raises:
        ValueError: If a column is not one of `ROW_KEYS`.
    """
    header, body = _cells(rows, columns, digits)
    widths = [max(len(cell) for cell in column) for column in zip(header, *body, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    for row in body:
        lines.append("  ".join(_align(c, w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def to_markdown(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 2
) -> str:
    """`to_string`'s table (same arguments) as GitHub Markdown.

    Example:

    >>> from keras_isomax.report import to_markdown
    >>> row = {"model": "m", "score": "s", "ood": "noise", "auroc": 0.9512}
    >>> print(to_markdown([row], columns=["model", "ood", "auroc"]))
    | model | OOD set | AUROC |
    |---|---|---|
    | m | noise | 95.12 |
    """
    header, body = _cells(rows, columns, digits)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _cells(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None, digits: int
) -> tuple[list[str], list[list[str]]]:
    if columns is None:
        columns = [key for key in ROW_KEYS if key not in _HIDDEN_BY_DEFAULT]
    unknown = [c for c in columns if c not in ROW_KEYS]
    if unknown:
        raise ValueError(
            f"Unknown columns {unknown}; choose from {list(ROW_KEYS)}. "
            f"Received: columns={columns!r}"
        )
    header = [_HEADERS[c] for c in columns]
    body = []
    for row in rows:
        cells = []
        for key in columns:
            value = row[key]
            if key in _PERCENT_KEYS:
                cells.append("n/a" if math.isnan(value) else f"{100 * value:.{digits}f}")
            else:
                cells.append(str(value))
        body.append(cells)
    return header, body


def _align(cell: str, width: int) -> str:
    return cell.rjust(width) if _is_number(cell) else cell.ljust(width)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "n/a"
    return True
