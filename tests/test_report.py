"""`keras_isomax.report`: the text and Markdown tables of evaluation rows."""

import math

import numpy as np
import pytest

from keras_isomax import report
from keras_isomax.detection_metrics import OOD_METRIC_NAMES


def _rows(rng):
    rows = []
    for model, score, ood, accuracy in (
        ("SoftMax", "energy", "digits", float(rng.uniform())),
        ("IsoMax+", "minimum_distance", "gaussian noise", math.nan),
    ):
        row = {"model": model, "score": score, "ood": ood, "accuracy": accuracy}
        row.update({key: float(rng.uniform()) for key in OOD_METRIC_NAMES})
        row.update(n_in=int(rng.integers(1, 5000)), n_ood=int(rng.integers(1, 5000)))
        rows.append(row)
    return rows


def test_row_keys_order():
    assert report.ROW_KEYS == (
        "model",
        "score",
        "ood",
        "accuracy",
        *OOD_METRIC_NAMES,
        "n_in",
        "n_ood",
    )


def test_text_table_default_columns(rng):
    rows = _rows(rng)
    lines = report.to_string(rows).splitlines()
    assert lines[0].split() == [
        "model", "score", "OOD", "set", "acc", "AUROC", "AUPR-In", "AUPR-Out",
        "det.acc", "TNR@TPR95", "n_in", "n_ood",
    ]  # fmt: skip
    assert set(lines[1]) == {"-", " "}
    assert len(lines) == 2 + len(rows)
    widths = [len(part) for part in lines[1].split("  ")]
    for line, row in zip(lines[2:], rows, strict=True):
        assert len(line) == len(lines[1])  # every line has the table's width
        cells, start = [], 0
        for width in widths:
            cells.append(line[start : start + width])
            start += width + 2
        assert cells[0].strip() == row["model"] and cells[0].startswith(row["model"])
        assert cells[2].strip() == row["ood"]
        # Numbers are right-aligned percentages with two decimals; NaN reads n/a.
        expected_acc = "n/a" if math.isnan(row["accuracy"]) else f"{100 * row['accuracy']:.2f}"
        assert cells[3].strip() == expected_acc and cells[3].endswith(expected_acc)
        assert cells[4].strip() == f"{100 * row['auroc']:.2f}"
        assert cells[8].strip() == f"{100 * row['tnr_at_tpr95']:.2f}"
        assert cells[9].strip() == str(row["n_in"]) and cells[9].endswith(str(row["n_in"]))


def test_markdown_table(rng):
    rows = _rows(rng)
    text = report.to_markdown(rows, columns=["model", "ood", "auroc", "fpr_at_tpr"], digits=3)
    lines = text.splitlines()
    assert lines[0] == "| model | OOD set | AUROC | FPR@TPR |"
    assert lines[1] == "|---|---|---|---|"
    for line, row in zip(lines[2:], rows, strict=True):
        assert line == (
            f"| {row['model']} | {row['ood']} | {100 * row['auroc']:.3f} | "
            f"{100 * row['fpr_at_tpr']:.3f} |"
        )


def test_unknown_column_names_argument(rng):
    with pytest.raises(ValueError, match=r"Received: columns=\['auroc', 'bogus'\]"):
        report.to_string(_rows(rng), columns=["auroc", "bogus"])
    with pytest.raises(ValueError, match="bogus"):
        report.to_markdown(_rows(rng), columns=["bogus"])


def test_evaluation_delegates_to_report(rng):
    from keras_isomax.evaluation import ROW_KEYS, OODEvaluation

    rows = _rows(rng)
    result = OODEvaluation(rows, {("m", "s"): (np.zeros(1), {})}, {})
    assert ROW_KEYS is report.ROW_KEYS
    assert str(result) == report.to_string(rows)
    assert result.to_markdown(digits=1) == report.to_markdown(rows, digits=1)
