"""Renderers of the deployment timings: edge exports and the exported `score` signature.

`edge_latency.json` (`benchmarks/edge_latency.py`) and `serving_speed.json`
(`benchmarks/serving_speed.py`); medians and paired ratios are computed here from
every recorded round or repetition.
"""

from __future__ import annotations

import statistics

from _tables import num, provenance, table

RUNTIMES = (
    ("saved_model", "SavedModel (`score`, TensorFlow)"),
    ("litert", "LiteRT"),
    ("onnx", "ONNX (onnxruntime)"),
)


def _paired(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round ratios `values / base`."""
    ratios = [v / b for v, b in zip(values, base, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q1, q3


def _load_text(result: dict) -> str:
    load = result.get("load_average")
    if not load:
        return ""
    start, end = (
        " ".join(f"{v:.1f}" for v in load[k]) if isinstance(load[k], list) else load[k]
        for k in ("start", "end")
    )
    return f" Load average (1, 5, 15 min) at start / end: {start} / {end}."


def render_edge(load) -> str:
    result = load("edge_latency")
    rows = []
    for batch, times in result["per_example_s"].items():
        base = times["saved_model"]
        cells = [f"batch {batch}"]
        for name, _ in RUNTIMES:
            ratio, _, _ = _paired(times[name], base)
            cells.append(f"{1e6 * statistics.median(times[name]):,.0f} us ({ratio:.2f}x)")
        rows.append(cells)
    rows.append(["size"] + [f"{result['size_bytes'][name]:,} B" for name, _ in RUNTIMES])
    runtimes = ", ".join(f"{k} {v}" for k, v in result.get("runtimes", {}).items())
    caption = (
        f"Model: {result['model']}. Per-example time, median of {result['rounds']} rounds of "
        f"{result['reps']} calls, the three runtimes interleaved round by round; in parentheses "
        "the median of the per-round ratios to the SavedModel. Each artifact's `score` output "
        f"was checked equal to the SavedModel's (rtol 1e-5) before timing. Runtimes: {runtimes}."
        + _load_text(result)
        + "\n\n"
    )
    return (
        caption
        + table(["per example", *(title for _, title in RUNTIMES)], rows, "lrrr")
        + "\n\n"
        + provenance(result)
    )


def render_serving(load) -> str:
    result = load("serving_speed")
    clock = result.get("clock", "cpu")
    rows = []
    for config in result["configs"]:
        times = config["times_s"]
        ratio, q1, q3 = _paired(times["isomax"][clock], times["dense"][clock])
        wall, _, _ = _paired(times["isomax"]["wall"], times["dense"]["wall"])
        live, l1, l3 = _paired(times["isomax_logits"][clock], times["dense_logits"][clock])
        rows.append(
            [
                f"{config['classes']:,}",
                f"{config['features']:,}",
                num(1e3 * statistics.median(times["dense"][clock]), 1, thousands=True),
                num(1e3 * statistics.median(times["isomax"][clock]), 1, thousands=True),
                f"**{ratio:.2f}** [{q1:.2f}, {q3:.2f}] ({wall:.2f})",
                f"{live:.2f} [{l1:.2f}, {l3:.2f}]",
                f"{config['size_mib']['dense']:,.1f} / {config['size_mib']['isomax']:,.1f}",
            ]
        )
    threads = result.get("threads") or "default"
    caption = (
        "Each head (features in) exported, loaded with `tf.saved_model.load` and its signature "
        "called (TensorFlow kernels, no XLA): a Dense + softmax head with the same outputs as "
        "the `score` signature of `export_saved_model`; and each head's plain `model.export` "
        f"(logits only; the layer's live math). Batch {result['batch_size']}, {threads} "
        f"TensorFlow thread(s), {result['reps']} interleaved repetitions, process {clock.upper()} "
        "time; ratio = median of the per-repetition ratios [interquartile range] (wall-clock "
        "ratio)." + _load_text(result) + "\n\n"
    )
    header = [
        "C",
        "F",
        "Dense `score` ms",
        "IsoMax+ `score` ms",
        "IsoMax+ / Dense, `score`",
        "IsoMax+ / Dense, logits",
        "SavedModel MiB, Dense / IsoMax+",
    ]
    return caption + table(header, rows, "rrrrrrr") + "\n\n" + provenance(result)


RENDERERS = {"edge-latency": render_edge, "serving": render_serving}
