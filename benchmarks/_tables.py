"""Markdown helpers shared by the `_render_*.py` modules (standard library only).

No TensorFlow, Keras or NumPy: `render.py --check` runs in a test in seconds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def machine_text(machine: dict) -> str:
    """`2-core AMD EPYC, oneDNN on, TensorFlow 2.21.0, Keras 3.15.1` from a result's machine."""
    versions = machine.get("versions", {})
    parts = [f"{machine.get('cores', '?')}-core {machine.get('cpu', 'unknown CPU')}"]
    backend = machine.get("keras_backend", "tensorflow")
    if backend == "tensorflow":
        parts.append(f"oneDNN {machine.get('onednn', '?')}")
    used = {"tensorflow": backend == "tensorflow", "jax": backend == "jax", "keras": True}
    for key, label in (("tensorflow", "TensorFlow"), ("jax", "JAX"), ("keras", "Keras")):
        if key in versions and used[key]:
            parts.append(f"{label} {versions[key]}")
    if backend != "tensorflow":
        parts.append(f"Keras backend {backend}")
    if machine.get("device"):
        parts.append(str(machine["device"]))
    return ", ".join(parts)


def provenance(result: dict) -> str:
    """The line every rendered table carries: command, machine, commit, date."""
    return (
        f"Command `{result.get('command', '?')}`; machine: "
        f"{machine_text(result.get('machine', {}))}; commit `{result.get('commit', '?')}`, "
        f"{str(result.get('date', '?'))[:10]}."
    )


def table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column, `l` or `r`."""
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """`mean ± std` (just the mean for one value), scaled (fractions -> percent)."""
    if not values:
        return "-"
    m = mean(values) * scale
    if math.isnan(m):
        return "n/a"
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {std(values) * scale:.{digits}f}"


def num(value, digits: int = 1, thousands: bool = False) -> str:
    """A number with fixed decimals (`-` for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def mib(nbytes: float | None, digits: int = 1) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.{digits}f} MiB"
