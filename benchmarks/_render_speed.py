"""Markdown tables of the speed, memory and precision results (`benchmarks/render.py` plug-in).

`RENDERERS` maps a marker name of BENCHMARKS.md / README.md (`<!-- render:NAME -->`)
to a function `fn(load) -> str`, where `load(result_name)` returns the parsed
`benchmarks/results/<result_name>.json`. Every figure comes from those files:

- `speed-head`: `speed_head.json` (`benchmarks/speed.py`, head alone);
- `speed-resnet20`: `speed_resnet20.json` (`benchmarks/speed.py`, ResNet-20 step);
- `head-memory`: `head_memory.json` (`benchmarks/head_memory.py`);
- `precision`: `precision.json` (`benchmarks/precision.py`).

Pure Python (no TensorFlow, no NumPy), so that rendering is fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import _tables

PHASES = {"train": "training step", "infer": "inference + score"}
MIB = 1024**2


# ------------------------------------------------------------------ statistics


def quantile(values: Sequence[float], q: float) -> float:
    """The `q`-quantile of `values`, linear interpolation (NumPy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratios(
    times: dict[str, Any], clock: str = "cpu", head: str = "isomax", baseline: str = "dense"
) -> list[float]:
    """Per-repetition ratios `head / baseline` of an `interleaved` record."""
    return [a / b for a, b in zip(times[head][clock], times[baseline][clock], strict=True)]


def ratio_cell(times: dict[str, Any], clock: str = "cpu") -> str:
    """`median [q25, q75]` of the paired ratios IsoMax+ / Dense."""
    ratios = paired_ratios(times, clock)
    return (
        f"{quantile(ratios, 0.5):.2f} [{quantile(ratios, 0.25):.2f}, {quantile(ratios, 0.75):.2f}]"
    )


def _ms(values: Sequence[float]) -> str:
    median = quantile(values, 0.5) * 1e3
    return f"{median:,.1f}" if median >= 10 else f"{median:.2f}"


# ---------------------------------------------------------------- speed tables


def _setting_label(onednn: str, xla: bool) -> str:
    return f"oneDNN {onednn}" + (", XLA" if xla else ", no XLA")


def render_ratio_table(record: dict[str, Any]) -> str:
    """The table of a `speed_*.json` record: one row per (C, phase), one column per
    (oneDNN, XLA) setting; cells are the median ratio IsoMax+ / Dense [IQR]."""
    settings = record.get("settings", {})
    clock = settings.get("clock", "cpu")
    cells: dict[tuple, dict[tuple, str]] = {}
    dense_ms: dict[tuple, dict[tuple, str]] = {}
    columns: list[tuple] = []
    reps: dict[tuple, set] = {}
    for run in record["runs"]:
        for entry in run["results"]:
            column = (run["onednn"], bool(entry["xla"]))
            if column not in columns:
                columns.append(column)
            row = (entry["classes"], entry["features"], entry["phase"])
            cells.setdefault(row, {})[column] = ratio_cell(entry["times"], clock)
            dense_ms.setdefault(row, {})[column] = _ms(entry["times"]["dense"][clock])
            reps.setdefault(row[:2], set()).add(len(entry["times"]["dense"][clock]))
    columns.sort(key=lambda c: (c[1], c[0] != "on"))  # no XLA first; oneDNN on first.
    unit = "CPU" if clock == "cpu" else "wall-clock"
    header = (
        "| C | F | phase | "
        + " | ".join(_setting_label(*c) for c in columns)
        + f" | Dense {unit} ms (same columns) |"
    )
    lines = [header, "|---:|---:|---|" + "---:|" * (len(columns) + 1)]
    for row in sorted(cells, key=lambda r: (r[0], r[1], r[2] != "train")):
        num_classes, feature_dim, phase = row
        lines.append(
            f"| {num_classes:,} | {feature_dim:,} | {PHASES.get(phase, phase)} | "
            + " | ".join(cells[row].get(c, "n/a") for c in columns)
            + " | "
            + " / ".join(dense_ms[row].get(c, "n/a") for c in columns)
            + " |"
        )
    batch = sorted({e["batch_size"] for run in record["runs"] for e in run["results"]})
    counts = {config: _join(sorted(n)) for config, n in sorted(reps.items())}
    usual = max(set(counts.values()), key=list(counts.values()).count)
    exceptions = [f"C = {c:,}: {n}" for (c, _), n in counts.items() if n != usual]
    description = (
        f"Cells: median of the per-repetition ratios IsoMax+ / Dense [interquartile range], "
        f"{'process CPU time' if clock == 'cpu' else 'wall-clock time'}, "
        f"{settings.get('threads', '?')} TensorFlow thread(s), batch "
        f"{', '.join(str(b) for b in batch)}, {usual} interleaved repetitions"
        + (f" ({'; '.join(exceptions)})" if exceptions else "")
        + ". Last column: the Dense head's median time in each setting."
    )
    return "\n".join(lines) + "\n\n" + description + "\n\n" + provenance(record)


def provenance(record: dict[str, Any]) -> str:
    """The shared command / machine / commit / date line, then what speed adds: CPU
    flags, oneDNN as each worker reported it, the layer sources' hash, load averages."""
    machine = dict(record.get("machine", {}))
    if "no GPU" in str(machine.get("device", "")):
        machine.pop("device")  # A CPU-only run: the CPU is already named.
    runs = record.get("runs", [])
    onednn = [
        f"{run['onednn']} (requested {run['onednn_requested']})"
        for run in runs
        if "onednn" in run and "onednn_requested" in run
    ]
    loads = [f"{run['load_start']} -> {run['load_end']}" for run in runs if "load_start" in run]
    parts = [f"CPU flags: {', '.join(machine.get('cpu_flags', [])) or 'no AVX2/AVX-512 flags'}"]
    if onednn:
        parts.append("oneDNN as TensorFlow reported it: " + ", ".join(onednn))
    sha = sorted({run["layers_sha1"] for run in runs if run.get("layers_sha1")})
    if sha:
        parts.append(f"layer sources sha1 {', '.join(sha)}")
    if loads:
        parts.append("load average (1/5/15 min) " + "; ".join(loads))
    return _tables.provenance({**record, "machine": machine}) + " " + "; ".join(parts) + "."


def _join(values):
    return ", ".join(str(v) for v in values) or "?"


def render_speed_head(load: Callable[[str], dict]) -> str:
    return render_ratio_table(load("speed_head"))


def render_speed_resnet20(load: Callable[[str], dict]) -> str:
    return render_ratio_table(load("speed_resnet20"))


# ------------------------------------------------------------------ memory


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


def render_head_memory(load: Callable[[str], dict]) -> str:
    """The large-head memory table of `head_memory.json`."""
    record = load("head_memory")
    b, c, f = record["batch_size"], record["classes"], record["features"]
    check = record.get("method_check", {})
    expected, seen = check.get("expected_bytes"), check.get("peak_bytes")
    if expected and (seen is None or not 0.5 * expected <= seen <= 2 * expected):
        # The measurement cannot see a known allocation: its figures would mislead.
        return (
            f"**No valid measurement on this machine.** The method check "
            f"({check.get('method', '?')}) read {_mib(seen)} for a known "
            f"{_mib(expected)} allocation, so the peaks of the B = {b:,}, C = {c:,}, "
            f"F = {f:,} head are not shown (probably the allocator kept the pages of the warm-up "
            "steps resident). The naive head's tensor alone would be "
            f"B*C*F*4 bytes = {record['naive_tensor_bytes'] / 1e9:.1f} GB.\n\n" + provenance(record)
        )
    naive = record["naive_tensor_bytes"]
    names = {"dense": "Dense + softmax cross-entropy", "isomax": "IsoMaxPlusLayer (library)"}
    lines = [
        f"Head alone, B = {b:,}, C = {c:,}, F = {f:,}: peak transient memory of one step "
        "(training: loss, gradients for the features and the head's weights, SGD update; "
        "inference: `training=False` + score), and the resident memory the first two steps "
        "kept (tracing; for IsoMax+ on TensorFlow, its inference cache).",
        "",
        "| head | training step: peak | inference: kept by the first steps | inference: peak |",
        "|---|---:|---:|---:|",
    ]
    for head, name in names.items():
        train = record["heads"].get(head, {})
        infer = record.get("inference", {}).get(head, {})
        if "error" in train or "error" in infer:
            lines.append(f"| {name} | failed: {train.get('error') or infer.get('error')} | | |")
            continue
        lines.append(
            f"| {name} | {_mib(train.get('peak_bytes'))} | "
            f"{_mib(infer.get('resident_growth_bytes'))} | {_mib(infer.get('peak_bytes'))} |"
        )
    for row in record.get("naive", []):
        if row.get("peak_bytes") is not None:
            lines.append(
                f"| naive exact differences (B*C*F tensor), B = {row['batch_size']} | "
                f"{_mib(row['peak_bytes'])} | | |"
            )
    if "naive_extrapolated_bytes" in record:
        lines.append(
            f"| naive, extrapolated to B = {b:,} | "
            f"{record['naive_extrapolated_bytes'] / 1024**3:,.1f} GiB | | |"
        )
    notes = [
        f"B*C*F*4 bytes = {naive / 1e9:.1f} GB.",
    ]
    if check.get("peak_bytes") is not None:
        notes.append(
            f"Method: {check.get('method', '?')}, each case in its own process; a known "
            f"{_mib(check['expected_bytes'])} allocation reads {_mib(check['peak_bytes'])}."
        )
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n\n" + provenance(record)


# --------------------------------------------------------------- precision


def render_precision(load: Callable[[str], dict]) -> str:
    """The distance precision table of `precision.json`."""
    record = load("precision")
    lines = [
        "| method | distance band | pairs (nearest) | max rel. error, all pairs "
        "| max rel. error, nearest | max abs. error, all pairs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    cells: dict[tuple[str, tuple[float, float]], dict[str, dict]] = {}
    for row in record["rows"]:
        cells.setdefault((row["method"], tuple(row["band"])), {})[row["pairs"]] = row
    # Methods whose figures are the same (training=True and False) share one row.
    by_figures: dict[tuple, list[str]] = {}
    for (method, band), pairs in cells.items():
        key = tuple(
            (band, p, pairs[p]["max_rel"], pairs[p]["max_abs"], pairs[p]["count"])
            for p in sorted(pairs)
        )
        by_figures.setdefault(key, []).append(method)
    for key, methods in by_figures.items():
        band = key[0][0]
        rows = {p: (count, rel, abs_) for _, p, rel, abs_, count in key}
        every, near = rows.get("all", (0, math.nan, math.nan)), rows.get("nearest", (0, math.nan))
        heads = {m.rsplit(", ", 1)[0] for m in methods}
        label = (
            f"{heads.pop()}, " + " / ".join(m.rsplit(", ", 1)[-1] for m in methods)
            if len(methods) > 1 and len(heads) == 1
            else " / ".join(methods)
        )
        lines.append(
            f"| {label} | [{band[0]:g}, {band[1]:g}) | {every[0]:,} ({near[0]:,}) | "
            f"{every[1]:.2e} | {near[1]:.2e} | {every[2]:.2e} |"
        )
    note = (
        f"C = {record['classes']:,}, F = {record['features']:,}, {record['examples']:,} "
        f"features at distances 1e-5 .. 1.6 from random prototypes (seed {record['seed']}); "
        "float32 layer vs the float64 reference `keras_isomax.testing.distances`; "
        f"device {record.get('device', '?')} (TF32 matmuls, GPUs only: "
        f"{'enabled' if record.get('tf32') else 'disabled'})."
    )
    return "\n".join(lines) + "\n\n" + note + "\n\n" + provenance(record)


RENDERERS: dict[str, Callable[[Callable[[str], dict]], str]] = {
    "speed-head": render_speed_head,
    "speed-resnet20": render_speed_resnet20,
    "head-memory": render_head_memory,
    "precision": render_precision,
}
