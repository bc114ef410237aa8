"""Renderers of the OOD quality result (`benchmarks/results/ood_quality.json`).

Blocks: the protocol, the headline paired comparisons, AUROC and TNR tables,
accuracy and training time, calibration, detector cost, and the README's
"Which score should I use?" table. Every figure is computed here from the
per-seed values the benchmark recorded.
"""

from __future__ import annotations

import math

from _tables import mean, num, pm, provenance, table

RESULT = "ood_quality"
FAR_SETS = ("digits", "photos", "gaussian_noise", "uniform_noise")
SET_TITLES = {
    "digits": "digits",
    "photos": "photos",
    "gaussian_noise": "Gaussian",
    "uniform_noise": "uniform",
}
SOFTMAX_SCORES = ("max_probability", "max_logit", "energy", "entropic")
MDS = ("IsoMax+", "minimum_distance")
TARGET_ACCURACY = 91.5
REPLACE_HEAD_SHOWN = ("minimum_distance", "entropic")


# ------------------------------------------------------------------- data


def _key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["method"], row.get("source", "keras_isomax")


SCORE_NAMES = ("max_probability", "max_logit", "energy", "entropic", "minimum_distance")


def _method_text(method: str) -> str:
    return f"`{method}`" if method in SCORE_NAMES else method


def _label(key: tuple[str, str, str]) -> tuple[str, str]:
    model, method, source = key
    method = " = ".join(_method_text(m) for m in method.split(" = "))
    if source == "pytorch-ood":
        method += " (pytorch-ood)"
    elif source.startswith("replace_head"):
        method += " (`replace_head`, 0 epochs)"
    return model.replace("-> replace_head", "-> `replace_head`"), method


def _rank(key: tuple[str, str, str]) -> tuple:
    """Table order: logit scores, replace_head, class means, detectors, peers."""
    model, method, source = key
    score = method.split(" = ")[0] in SCORE_NAMES
    if source == "pytorch-ood":
        group = 6
    elif model == "SoftMax" and score:
        group = 0
    elif model == "IsoMax+" and score:
        group = 1
    elif "replace_head" in model:
        group = 2
    elif method == "class means":
        group = 3
    else:
        group = 4 if model == "SoftMax" else 5
    return (group, model)


def _runs(result: dict, task: str) -> list[dict]:
    return sorted((r for r in result["runs"] if r["task"] == task), key=lambda r: r["seed"])


def _values(result: dict, task: str, metric: str = "auroc") -> dict:
    """`{row key: {"seeds": [...], "accuracy": [...], set: [...], "far mean": [...]}}`.

    Rows of one model whose every value is identical (IsoMax+'s `max_logit` is its
    `minimum_distance`) are merged into one key named `a = b`; keys are in table order.
    """
    table_: dict = {}
    raw: dict = {}
    for run in _runs(result, task):
        for row in run["rows"]:
            raw.setdefault(_key(row), []).append(row["metrics"])
            entry = table_.setdefault(_key(row), {"seeds": [], "accuracy": []})
            entry["seeds"].append(run["seed"])
            entry["accuracy"].append(row["accuracy"])
            for name, metrics in row["metrics"].items():
                entry.setdefault(name, []).append(metrics[metric])
            if all(s in row["metrics"] for s in FAR_SETS):
                entry.setdefault("far mean", []).append(
                    mean([row["metrics"][s][metric] for s in FAR_SETS])
                )
    merged: dict = {}  # key -> (entry, first key); a merged name keeps the first's place.
    for key, entry in table_.items():
        twin = next(
            (
                k
                for k in merged
                if k[0] == key[0] and k[2] == key[2] and raw[merged[k][1]] == raw[key]
            ),
            None,
        )
        if twin is None:
            merged[key] = (entry, key)
        else:
            name = (twin[0], f"{twin[1]} = {key[1]}", twin[2])
            merged = {(name if k == twin else k): v for k, v in merged.items()}
    return {k: v[0] for k, v in sorted(merged.items(), key=lambda kv: _rank(kv[0]))}


def _lookup(values: dict, model: str, method: str, peers: bool = False):
    """`(key, entry)` of a row by model and method (also inside a merged `a = b` name)."""
    for key, entry in values.items():
        if key[0] != model or (key[2] == "pytorch-ood") != peers:
            continue
        names = key[1].split(" = ")
        if method in names or any(n.split(" (")[0] == method for n in names):
            return key, entry
    return None, None


def _task_column(result: dict, task: str) -> str:
    return "far mean" if task == "far" else result["protocol"]["near_set"]


def _seeds_text(result: dict) -> str:
    n = len(result["summary"]["seeds"])
    return f"{n} seed" + ("s" if n != 1 else "")


def _caveat(result: dict) -> str:
    """A warning line when the result is not the default protocol's."""
    protocol = result["protocol"]
    if protocol.get("default"):
        return ""
    if protocol.get("quick"):
        return "\n\n**A `--quick` smoke run, not evidence**: `python benchmarks/ood_quality.py` replaces it."
    defaults = result.get("defaults", {})
    differ = [
        f"{k} {protocol[k]!r} (default {defaults[k]!r})"
        for k in defaults
        if k in protocol and protocol[k] != defaults[k]
    ]
    return (
        "\n\n**Not the default protocol's result** (`python benchmarks/ood_quality.py` replaces "
        "it)" + (": " + ", ".join(differ) if differ else "") + "."
    )


# ------------------------------------------------------------------ blocks


def render_protocol(load) -> str:
    result = load(RESULT)
    p = result["protocol"]
    runs = result["runs"]
    sizes = {r["task"]: r["sizes"] for r in runs}
    far, near = sizes.get("far"), sizes.get("near")
    parts = [
        f"ResNet-{p['depth']} (3x3 stem, stages of 16/32/64 filters, BatchNorm, global average "
        f"pooling, 64 features), SGD lr {p['learning_rate']:g}, Nesterov momentum 0.9, cosine "
        f"decay, weight decay {p['weight_decay']:g} (PyTorch convention), batch "
        f"{p['batch_size']}, {p['epochs']} epochs"
        + (", random horizontal flips" if p.get("flip") else ", no augmentation")
        + f", one `fit` call; {_seeds_text(result)}; both heads of a seed start from the "
        "same initial weights and see the same batches.",
    ]
    if far:
        parts.append(
            f"Far task: {far['train']:,} training / {far['val']:,} validation / "
            f"{far['test']:,} test Fashion-MNIST images; OOD: "
            + ", ".join(f"{SET_TITLES.get(k, k)} {v:,}" for k, v in far["ood"].items())
            + "."
        )
    if near:
        parts.append(
            f"Near task: a model trained on classes 0-5 ({near['train']:,} images); test "
            f"{near['test']:,} in, {sum(near['ood'].values()):,} OOD ({p['near_set']})."
        )
    if p.get("finetune_epochs"):
        parts.append(
            "`replace_head`: the trained SoftMax model with class-mean prototypes, scored as is "
            f"(0 epochs) and after {p['finetune_epochs']} fine-tune epoch"
            + ("s" if p["finetune_epochs"] != 1 else "")
            + f" at lr "
            f"{p['finetune_lr']:g}."
        )
    parts.append(
        f"Class means: {p['class_means']}. Detectors: the library's Mahalanobis, "
        f"KNN (k = {p['knn_k']}, all training features), ViM (dim = F/2)"
        + (", and pytorch-ood's on the same features" if p.get("peers") else "")
        + ". Metrics exact, in-distribution = positive class."
    )
    parts.append(f"Wall time of the whole run: {result['wall_time_s'] / 60:.1f} min.")
    return " ".join(parts) + "\n\n" + provenance(result) + _caveat(result)


def render_headline(load) -> str:
    result = load(RESULT)
    rows = []
    for task in ("far", "near"):
        values = _values(result, task)
        _, base = _lookup(values, *MDS)
        if base is None:
            continue
        column = _task_column(result, task)
        softmax = [
            k for k in values if k[0] == "SoftMax" and k[1].split(" = ")[0] in SOFTMAX_SCORES
        ]
        best = max(softmax, key=lambda k: mean(values[k][column]))
        others = [
            (f"best SoftMax logit score ({_label(best)[1]})", values[best]),
            ("SoftMax + class means", _lookup(values, "SoftMax", "class means")[1]),
            (
                "SoftMax -> `replace_head`, 0 epochs, `minimum_distance`",
                _lookup(values, "SoftMax -> replace_head, 0 epochs", "minimum_distance")[1],
            ),
            ("SoftMax + Mahalanobis", _lookup(values, "SoftMax", "Mahalanobis")[1]),
            ("IsoMax+ + Mahalanobis", _lookup(values, "IsoMax+", "Mahalanobis")[1]),
        ]
        for title, other in others:
            if other is None:
                continue
            paired = dict(zip(other["seeds"], other[column], strict=True))
            diffs = [
                100 * (v - paired[s])
                for s, v in zip(base["seeds"], base[column], strict=True)
                if s in paired
            ]
            rows.append(
                [
                    "far (mean of 4 sets)" if task == "far" else f"near ({column})",
                    title,
                    pm(base[column]),
                    pm(other[column]),
                    f"**{mean(diffs):+.1f}**",
                    ", ".join(f"{d:+.1f}" for d in diffs),
                    f"{sum(d > 0 for d in diffs)} of {len(diffs)}",
                ]
            )
    header = [
        "task",
        "IsoMax+ `minimum_distance` vs",
        "IsoMax+ MDS",
        "other",
        "mean difference",
        "per seed",
        "seeds where MDS is higher",
    ]
    return (
        table(header, rows, "llrrrll")
        + "\n\nAUROC in %, mean ± std over seeds; differences (MDS minus other) are paired by seed "
        "(same split, same initial backbone). The best SoftMax logit score is picked per task on "
        "these test results, which favours SoftMax.\n\n" + provenance(result) + _caveat(result)
    )


def _metric_table(result: dict, metric: str, title: str, per_set: bool = True) -> str:
    far, near = _values(result, "far", metric), _values(result, "near", metric)
    near_column = result["protocol"]["near_set"]
    keys = [
        k
        for k in dict.fromkeys([*far, *near])
        if "replace_head" not in k[0] or k[1].split(" = ")[0] in REPLACE_HEAD_SHOWN
    ]
    sets = FAR_SETS if per_set else ()
    header = [
        "model",
        "score / detector",
        *(SET_TITLES[s] for s in sets),
        "**far mean**",
        "**near**",
    ]
    rows = []
    for key in keys:
        f, n = far.get(key), near.get(key)
        cells = list(_label(key))
        cells += [pm(f[s]) if f and s in f else "-" for s in sets]
        cells.append(f"**{pm(f['far mean'])}**" if f and "far mean" in f else "-")
        cells.append(f"**{pm(n[near_column])}**" if n and near_column in n else "-")
        rows.append(cells)
    caption = (
        f"{title} in %, mean ± std over {_seeds_text(result)}; far mean: mean of the four far "
        f"sets; near: {near_column} for the model trained on classes 0-5. Test accuracy of "
        'each model: "Accuracy and training time per model" below.\n\n'
    )
    return caption + table(header, rows, "ll" + "r" * (len(header) - 2))


def render_auroc(load) -> str:
    result = load(RESULT)
    return _metric_table(result, "auroc", "AUROC") + "\n\n" + provenance(result)


def render_tnr(load) -> str:
    result = load(RESULT)
    return (
        _metric_table(result, "tnr_at_tpr95", "TNR at 95 % TPR", per_set=False)
        + "\n\n"
        + provenance(result)
    )


def render_training(load) -> str:
    result = load(RESULT)
    rows = []
    for task in ("far", "near"):
        runs = _runs(result, task)
        if not runs:
            continue
        for model in runs[0]["training"]:
            infos = [r["training"][model] for r in runs if model in r["training"]]
            label = {"softmax": "SoftMax", "isomax": "IsoMax+"}.get(
                model, f"SoftMax -> `replace_head`, fine-tuned {infos[0]['epochs']} epoch(s)"
            )
            accuracy = []
            for run, info in zip(runs, infos, strict=True):
                value = info.get("accuracy")
                if value is None:  # The fine-tuned replace_head model: its rows' accuracy.
                    value = next(
                        r["accuracy"]
                        for r in run["rows"]
                        if r["model"].startswith("SoftMax -> replace_head, ")
                        and not r["model"].endswith(", 0 epochs")
                    )
                accuracy.append(100 * value)
            epoch_s = [s for i in infos for s in i["epoch_s"]]
            cpu_s = [s for i in infos for s in i.get("epoch_cpu_s", [])]
            rows.append(
                [
                    task,
                    label,
                    " / ".join(f"{a:.2f}" for a in accuracy),
                    num(mean(accuracy), 2),
                    f"{infos[0]['epochs']} x {infos[0]['images']:,}",
                    num(mean(epoch_s), 1),
                    num(mean(cpu_s), 1) if cpu_s else "-",
                ]
            )
    summary = result["summary"]
    soft, iso = summary["softmax_accuracy"], summary["isomax_accuracy"]
    lines = [
        "Test accuracy (%) per seed and its mean; training time per epoch (wall clock and "
        "process CPU time, mean over epochs and seeds).\n",
        table(
            [
                "task",
                "model",
                "accuracy per seed",
                "mean",
                "epochs x images",
                "s / epoch",
                "CPU s / epoch",
            ],
            rows,
            "llrrrrr",
        ),
    ]
    if soft and iso:
        gap = mean(iso) - mean(soft)
        met = mean(soft) >= TARGET_ACCURACY and abs(gap) <= 1
        verdict = (
            "needs 3 seeds to be judged"
            if len(soft) < 3
            else "is met by this result"
            if met
            else "is not met by this result"
        )
        lines.append(
            f"\nFar task: SoftMax {mean(soft):.2f} %, IsoMax+ {mean(iso):.2f} % ({gap:+.2f} points) "
            f"over {_seeds_text(result)}. The protocol's aim (SoftMax >= {TARGET_ACCURACY} % over "
            f"3 seeds, IsoMax+ within 1 point) {verdict}."
        )
    task_s = {
        task: [r["task_s"] for r in _runs(result, task) if "task_s" in r]
        for task in ("far", "near")
    }
    if any(task_s.values()):
        lines.append(
            "\nWhole task per seed (training, features, scores, detectors): "
            + ", ".join(f"{t} {mean(v) / 60:.1f} min" for t, v in task_s.items() if v)
            + f"; whole run {result['wall_time_s'] / 60:.1f} min."
        )
    lines.append("\n" + provenance(result) + _caveat(result))
    return "\n".join(lines)


def render_calibration(load) -> str:
    result = load(RESULT)
    runs = [r for r in _runs(result, "far") if r.get("calibration")]
    rows = []
    for head, label in (("softmax", "SoftMax"), ("isomax", "IsoMax+")):
        cal = [r["calibration"][head] for r in runs if head in r["calibration"]]
        if not cal:
            continue
        temps = [c["temperature"] for c in cal]
        rows.append(
            [
                label,
                pm([c["ece_before"] for c in cal]),
                pm([c["ece_after"] for c in cal]),
                " / ".join(f"{t:.3g}" for t in temps),
            ]
        )
    caption = (
        "Far task: 15-bin expected calibration error (%) of `softmax(logits)` on the test set, "
        "before and after a temperature fitted on the validation split "
        "(`calibrate_temperature` for IsoMax+, the same NLL fit in NumPy for SoftMax); "
        "fitted temperature per seed.\n\n"
    )
    return (
        caption
        + table(["head", "ECE, T = 1", "ECE, fitted T", "fitted T"], rows, "lrrl")
        + "\n\n"
        + provenance(result)
    )


def render_costs(load) -> str:
    result = load(RESULT)
    runs = _runs(result, "far")
    rows = []
    for head, label in (("softmax", "SoftMax"), ("isomax", "IsoMax+")):
        names = list(dict.fromkeys(n for r in runs for n in r["detector_costs"].get(head, {})))
        for name in names:
            costs = [
                r["detector_costs"][head][name] for r in runs if name in r["detector_costs"][head]
            ]
            rows.append(
                [
                    label,
                    name,
                    num(mean([c["fit_s"] for c in costs]), 2),
                    num(mean([c["score_us_per_example"] for c in costs]), 1),
                    num(mean([c["state_bytes"] for c in costs]) / 2**10, 1, thousands=True),
                ]
            )
    caption = (
        "Far task, library detectors on precomputed features (the model's forward pass is not "
        "included), mean over seeds: fit on the training features, score per test or OOD "
        "example, fitted state.\n\n"
    )
    return (
        caption
        + table(["head", "detector", "fit s", "score us / example", "state KiB"], rows, "llrrr")
        + "\n\n"
        + provenance(result)
    )


# ------------------------------------------------------------------ README

README_ROWS = (
    (
        "IsoMax+",
        "minimum_distance",
        "nothing to fit; the layer's `ood_threshold` and the exported `score` use it",
    ),
    ("IsoMax+", "entropic", "nothing to fit"),
    ("IsoMax+", "energy", "nothing to fit"),
    ("SoftMax", "max_probability", "nothing to fit"),
    ("SoftMax", "max_logit", "nothing to fit"),
    ("SoftMax", "energy", "nothing to fit"),
    ("SoftMax", "entropic", "nothing to fit"),
    ("SoftMax", "class means", "one pass over the training data; C x F state"),
    (
        "SoftMax -> replace_head, 0 epochs",
        "minimum_distance",
        "one pass over the training data; a new IsoMax+ model",
    ),
    ("SoftMax -> replace_head, 2 epochs", "minimum_distance", "that pass plus a short fine-tune"),
    ("SoftMax", "Mahalanobis", "one pass over the training data; F x F state"),
    ("IsoMax+", "Mahalanobis", "one pass over the training data; F x F state"),
    ("SoftMax", "KNN", "the training features (N x F) as state"),
    ("IsoMax+", "KNN", "the training features (N x F) as state"),
    ("SoftMax", "ViM", "one pass over the training data; F x F state"),
    ("IsoMax+", "ViM", "one pass over the training data; F x F state"),
)
FREE = ("minimum_distance", "entropic", "energy", "max_probability", "max_logit")


def _readme_method(key: tuple[str, str, str]) -> str:
    """The user's spelling of a row: a score name, or the detector's constructor."""
    name = key[1].split(" = ")[0]
    if name in SCORE_NAMES:
        return f"`{name}`"
    if name == "class means":
        return (
            "`detectors.ClassMeans()`"
            if key[2] == "keras_isomax"
            else "class means (`replace_head`, 0 epochs)"
        )
    base, _, arg = name.partition(" (")
    arg = arg.rstrip(")").replace("dim=", "")
    return f"`detectors.{base}({arg})`"


def render_readme(load) -> str:
    result = load(RESULT)
    far, near = _values(result, "far"), _values(result, "near")
    near_column = result["protocol"]["near_set"]
    rows, ranked = [], {"far": [], "near": []}
    finetune = f"SoftMax -> replace_head, {result['protocol']['finetune_epochs']} epochs"
    for model, method, cost in README_ROWS:
        model = model.replace("SoftMax -> replace_head, 2 epochs", finetune)
        fkey, f = _lookup(far, model, method)
        nkey, n = _lookup(near, model, method)
        if f is None and n is None:
            continue
        label = _readme_method(fkey or nkey)
        model_text = model.replace("SoftMax -> replace_head", "SoftMax, `replace_head`")
        far_v = mean(f["far mean"]) if f else math.nan
        near_v = mean(n[near_column]) if n else math.nan
        rows.append([model_text, label, num(100 * far_v), num(100 * near_v), cost])
        free = method in FREE and "replace_head" not in model
        for task, value in (("far", far_v), ("near", near_v)):
            if not math.isnan(value):
                ranked[task].append((value, f"{model_text} + {label}", free))
    out = [
        f"AUROC %, mean over {_seeds_text(result)}; far = mean of digits, photos, Gaussian and "
        "uniform noise; near = Fashion-MNIST classes 6-9 for a model trained on classes 0-5. "
        "Protocol, spreads and paired differences: "
        "[BENCHMARKS.md](BENCHMARKS.md#ood-detection-quality-benchmarksood_qualitypy).\n",
        table(
            ["your model", "score / detector", "far AUROC", "near AUROC", "what it costs"],
            rows,
            "llrrl",
        ),
        "",
    ]
    for task, title in (("far", "Far OOD"), ("near", "Near OOD")):
        ordered = sorted(ranked[task], reverse=True)
        if not ordered:
            continue
        text = f"- **{title}:** highest here {ordered[0][1]} ({100 * ordered[0][0]:.1f})"
        free = [v for v in ordered if v[2]]
        if free:
            text += f"; highest with nothing to fit: {free[0][1]} ({100 * free[0][0]:.1f})"
        out.append(text + ".")
    soft, iso = result["summary"]["softmax_accuracy"], result["summary"]["isomax_accuracy"]
    if soft and iso:
        out.append(
            f"- **Test accuracy** (far task): SoftMax {mean(soft):.2f} %, IsoMax+ {mean(iso):.2f} %."
        )
    out.append(
        "- The order depends on the task and on the training: measure on your own model with "
        "`evaluate_ood` and `keras_isomax.detectors`."
    )
    out.append("\n" + provenance(result) + _caveat(result))
    return "\n".join(out)


RENDERERS = {
    "quality-protocol": render_protocol,
    "quality-headline": render_headline,
    "quality-auroc": render_auroc,
    "quality-tnr": render_tnr,
    "quality-training": render_training,
    "quality-calibration": render_calibration,
    "quality-costs": render_costs,
    "readme-scores": render_readme,
}
