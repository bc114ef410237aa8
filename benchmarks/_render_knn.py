"""Renders `benchmarks/results/knn_speed.json` (written by `benchmarks/knn_speed.py`).

`RENDERERS = {"knn-speed": render}`: `render(load)` gets `load(name)` (the recorded
result `<name>.json` as a dict) and returns Markdown. Times are medians over the
repetitions; ratios are ours / pytorch-ood (below 1: ours is faster).
"""

from __future__ import annotations

import statistics

from _tables import provenance

PATHS = (("ours_features", "features only"), ("ours_model", "through a model"))


def _median(times, key):
    values = [t[key] for t in times if key in t]
    return statistics.median(values) if values else None


def _cell(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def render(load):
    """Markdown table of the KNN timings: one row per bank size and path."""
    result = load("knn_speed")
    machine = result.get("machine", {})
    lines = [
        "| bank (N x F) | path | reps | ours wall s | pytorch-ood wall s | wall ratio "
        "| ours CPU s | pytorch-ood CPU s | CPU ratio | max abs score diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for size, entry in result.get("sizes", {}).items():
        times = entry["times"]
        peer = times.get("pytorch_ood", [])
        peer_wall, peer_cpu = _median(peer, "wall_s"), _median(peer, "cpu_s")
        for key, label in PATHS:
            ours = times.get(key, [])
            wall, cpu = _median(ours, "wall_s"), _median(ours, "cpu_s")
            ratio_wall = wall / peer_wall if wall and peer_wall else None
            ratio_cpu = cpu / peer_cpu if cpu and peer_cpu else None
            diff = entry.get("max_abs_score_diff", {}).get(f"{key}_vs_pytorch_ood")
            lines.append(
                f"| {size} | {label} | {len([t for t in ours if 'wall_s' in t])} "
                f"| {_cell(wall)} | {_cell(peer_wall)} | {_cell(ratio_wall)} "
                f"| {_cell(cpu)} | {_cell(peer_cpu)} | {_cell(ratio_cpu)} "
                f"| {'—' if diff is None else f'{diff:.1e}'} |"
            )
        errors = [
            f"{lib}: {t['error'][:120]}" for lib, ts in times.items() for t in ts if "error" in t
        ]
        loads = [t.get("load_before") for ts in times.values() for t in ts if "load_before" in t]
        entry_result = {
            **result,
            "command": entry.get("command", result.get("command")),
            "commit": entry.get("commit", result.get("commit")),
            "date": entry.get("date", result.get("date")),
        }
        notes.append(
            f"- {size}: k = {entry['k']}, {entry['queries']} queries, {entry['dtype']}; "
            f"load average before the measurements {min(loads):.1f}-{max(loads):.1f}"
            + (f"; errors: {'; '.join(errors)}" if errors else "")
            + ". "
            + provenance(entry_result)
        )
    header = (
        f"KNN fit + score, keras-isomax `detectors.KNN` vs pytorch-ood "
        f"{machine.get('versions', {}).get('pytorch-ood', '?')} `KNN` (scikit-learn "
        f"`NearestNeighbors`), measured side by side on {machine.get('cpu', '?')} "
        f"({machine.get('cores', '?')} cores, oneDNN {machine.get('onednn', '?')}). "
        "Medians over repetitions; ratio = ours / pytorch-ood."
    )
    return "\n".join([header, "", *lines, "", *notes]) + "\n"


RENDERERS = {"knn-speed": render}
