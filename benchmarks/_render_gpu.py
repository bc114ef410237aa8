"""Renderers of the GPU results: the paper-length quality run and the layer check on JAX.

`gpu_quality.json` (`benchmarks/gpu_quality_jax.py`) and `gpu_check_jax.json`
(`benchmarks/gpu_check_jax.py`). Absent files render as "not measured yet".
"""

from __future__ import annotations

from _render_quality import FAR_SETS, SET_TITLES, _label, _values
from _tables import mean, num, provenance, table


def render_gpu_quality(load) -> str:
    result = load("gpu_quality")
    p = result["protocol"]
    near_column = p["near_set"]
    far, near = _values(result, "far"), _values(result, "near")
    rows = []
    for key in dict.fromkeys([*far, *near]):
        model, method = _label(key)
        f, n = far.get(key), near.get(key)
        cells = [model, method, num(100 * mean(f["accuracy"]), 2) if f else "-"]
        cells += [num(100 * mean(f[s])) if f and s in f else "-" for s in FAR_SETS]
        cells.append(f"**{num(100 * mean(f['far mean']))}**" if f and "far mean" in f else "-")
        cells.append(num(100 * mean(n["accuracy"]), 2) if n else "-")
        cells.append(f"**{num(100 * mean(n[near_column]))}**" if n and near_column in n else "-")
        rows.append(cells)
    seeds = len({r["seed"] for r in result["runs"]})
    skipped = result.get("skipped", [])
    caption = (
        f"ResNet-{p['depth']} ({p['features']} features, BatchNorm, global average pooling), "
        f"{p['epochs']} epoch{'s' if p['epochs'] != 1 else ''} on {p['train_images']:,} Fashion-MNIST training images, batch "
        f"{p['batch_size']}, SGD lr {p['learning_rate']:g}, Nesterov 0.9, cosine decay, weight "
        f"decay {p['weight_decay']:g}, {p['augmentation']}, {p['precision']}; {seeds} seed"
        + ("s" if seeds != 1 else "")
        + "; "
        f"Keras on JAX. AUROC %, accuracy %. Device time of the run: {result['wall_time_s']:.0f} s."
        + (f" Not run (time budget): {', '.join(skipped)}." if skipped else "")
        + "\n\n"
    )
    header = ["model", "score / detector", "accuracy"]
    header += [SET_TITLES[s] for s in FAR_SETS] + ["**far mean**", "near acc.", "**near**"]
    return (
        caption + table(header, rows, "ll" + "r" * (len(header) - 2)) + "\n\n" + provenance(result)
    )


def render_gpu_check(load) -> str:
    result = load("gpu_check_jax")
    out = ["Nearest-prototype distance, max relative error against float64, per distance band:\n"]
    out.append(
        table(
            ["method", "distance band", "count", "max rel. error"],
            [
                [r["method"], r["band"], f"{r['count']:,}", f"{r['max_rel_error']:.2e}"]
                for r in result["precision"]
            ],
            "llrr",
        )
    )
    out.append(
        f"\nHead alone, B = {result['batch_size']}, jitted, wall clock, {result['reps']} "
        "interleaved repetitions; ratio = median of per-repetition ratios [IQR]:\n"
    )
    rows = [
        [
            f"{r['classes']:,}",
            f"{r['features']:,}",
            r["step"],
            num(r["dense_ms"], 3),
            num(r["isomax_ms"], 3),
            f"{r['ratio']:.2f} [{r['ratio_q25']:.2f}, {r['ratio_q75']:.2f}]",
        ]
        for r in result["speed"]
    ]
    out.append(table(["C", "F", "step", "Dense ms", "IsoMax+ ms", "ratio [IQR]"], rows, "rrlrrl"))
    out.append("\n" + provenance(result))
    return "\n".join(out)


RENDERERS = {"gpu-quality": render_gpu_quality, "gpu-check": render_gpu_check}
