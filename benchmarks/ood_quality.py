"""OOD detection quality on real data: SoftMax vs IsoMax+ on Fashion-MNIST.

One small CNN backbone, trained twice per seed with the same initial backbone
weights, optimizer, batch order and epochs: once with a `Dense` + softmax
cross-entropy head (SoftMax), once with `IsoMaxPlusLayer` + `IsoMaxPlusLoss`
(IsoMax+). Everything runs offline:

* in-distribution: Fashion-MNIST (Debian's raw files, via `keras_isomax.data`);
* far OOD: scikit-learn's handwritten digits resized to 28x28, crops of
  scikit-image's sample photographs; noise controls: Gaussian and uniform;
* near OOD: a separate pair of runs trained on Fashion-MNIST classes 0-5, with
  classes 6-9 (shirt, sneaker, bag, ankle boot) as OOD.

Scores: SoftMax + {max probability, max logit, energy, entropic}; IsoMax+ +
{minimum distance, entropic}; and, when pytorch-ood is installed (the optional
`[bench]` extra, CPU torch), its post-hoc detectors Mahalanobis, ViM and KNN on
the SoftMax model's penultimate features, with their fit and inference cost.
All metrics are exact (`keras_isomax.metrics.ood_metrics`, in-distribution =
positive class). Also reports temperature calibration (ECE before/after) and
the held-out acceptance rate of a threshold calibrated at TPR 95%.

Run from the repository root:

    python benchmarks/ood_quality.py            # full: 3 seeds, ~8 min on 2 CPU cores
    python benchmarks/ood_quality.py --quick    # 1 seed, small subsets, ~1 min
    python benchmarks/ood_quality.py --ablation # entropic/distance scale, normalisation
    python benchmarks/ood_quality.py --markdown results.md --json results.json

Importing torchvision after TensorFlow crashes the process here, so pytorch-ood
is imported first; the benchmark runs without it and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_peers():
    """pytorch-ood's detector classes, or the reason they are unavailable.

    Must run before TensorFlow is imported: importing torchvision (which
    pytorch-ood imports) after TensorFlow crashes the process (seen with
    TF 2.21 and torch 2.14.1 / torchvision 0.29.1).
    """
    if "--no-peers" in sys.argv:
        return None, "disabled with --no-peers"
    try:
        import torch
        from pytorch_ood.detector import KNN, Mahalanobis, ViM
    except Exception as error:  # ImportError, or a broken torch install.
        return None, f"{type(error).__name__}: {error}"
    return {"torch": torch, "Mahalanobis": Mahalanobis, "ViM": ViM, "KNN": KNN}, None


_PEERS, _PEER_PROBLEM = _import_peers()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss  # noqa: E402
from keras_isomax import data as data_lib  # noqa: E402
from keras_isomax.calibration import (  # noqa: E402
    calibrate_temperature,
    calibrate_threshold,
    predict_ood,
)
from keras_isomax.evaluation import evaluate_ood  # noqa: E402
from keras_isomax.layers import pairwise_distances  # noqa: E402
from keras_isomax.metrics import expected_calibration_error, ood_metrics  # noqa: E402

SOFTMAX_SCORES = ("max_probability", "max_logit", "energy", "entropic")
ISOMAX_SCORES = ("minimum_distance", "entropic")
PEERS = ("Mahalanobis", "ViM", "KNN")
FAR_SETS = ("digits", "photos")
NOISE_SETS = ("gaussian_noise", "uniform_noise")
NEAR_SET = "near (classes 6-9)"
METRICS = ("auroc", "tnr_at_tpr95", "detection_accuracy")
METRIC_TITLES = {
    "auroc": "AUROC",
    "tnr_at_tpr95": "TNR at TPR 95%",
    "detection_accuracy": "Detection accuracy",
}

FULL = {
    "seeds": 3,
    "epochs": 3,
    "train_size": 30000,  # Of the 55,000 training images not used for validation.
    "val_size": 5000,
    "test_size": None,  # All 10,000 (6,000 / 4,000 for the near split).
    "ood_size": 5000,
    "knn_bank": 20000,
}
QUICK = {
    "seeds": 1,
    "epochs": 2,
    "train_size": 8000,
    "val_size": 2000,
    "test_size": 2000,
    "ood_size": 1000,
    "knn_bank": 5000,
}


# ------------------------------------------------------------------- model


class UnnormalizedIsoMax(keras.layers.Layer):
    """Ablation only: IsoMax+ without the normalisation of features and prototypes.

    `logits = -|s| * ||x - p_c||`, with the same N(0, 1) prototypes and learnable
    distance scale as `IsoMaxPlusLayer`; isolates what normalisation does.
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def build(self, input_shape):
        self.prototypes = self.add_weight(
            name="prototypes",
            shape=(self.num_classes, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(0.0, 1.0),
        )
        self.distance_scale = self.add_weight(name="distance_scale", shape=(), initializer="ones")

    def call(self, x):
        distances = pairwise_distances(x, self.prototypes)
        return -keras.ops.abs(self.distance_scale) * distances


def build_model(head, num_classes, seed, *, entropic_scale=10.0, variant=None):
    """The shared CNN backbone with a SoftMax (`Dense`) or IsoMax+ head.

    The backbone is created first from the seed, so both heads start from the
    same backbone weights. `variant` (ablation only): `"fixed_scale"` freezes the
    distance scale at 1, `"unnormalized"` drops the normalisation.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    features = keras.layers.Dense(128, activation="relu", name="features")(x)
    if head == "softmax":
        logits = keras.layers.Dense(num_classes, name="logits")(features)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif variant == "unnormalized":
        logits = UnnormalizedIsoMax(num_classes, name="isomax")(features)
        loss = IsoMaxPlusLoss(entropic_scale=entropic_scale)
    else:
        layer = IsoMaxPlusLayer(num_classes, name="isomax")
        logits = layer(features)
        if variant == "fixed_scale":
            layer.distance_scale.trainable = False
        loss = IsoMaxPlusLoss(entropic_scale=entropic_scale)
    model = keras.Model(inputs, logits, name=head)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def train(model, x, y, *, epochs, seed, batch_size=128):
    keras.utils.set_random_seed(seed + 1000)  # Same batch order for both heads.
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    return time.perf_counter() - start


def features_of(model, x):
    extractor = keras.Model(model.inputs, model.get_layer("features").output)
    return extractor.predict(x, batch_size=512, verbose=0)


# ------------------------------------------------------------------- peers


def run_peers(peers, model, x_fit, y_fit, x_in, ood, *, knn_bank, seed):
    """Fits Mahalanobis, ViM and KNN on penultimate features; returns scores + cost."""
    torch = peers["torch"]
    start = time.perf_counter()
    z_fit = features_of(model, x_fit)
    z_in = features_of(model, x_in)
    z_ood = {name: features_of(model, x) for name, x in ood.items()}
    feature_time = time.perf_counter() - start
    kernel, bias = model.get_layer("logits").get_weights()
    t = torch.as_tensor
    detectors = {
        "Mahalanobis": peers["Mahalanobis"](None),
        # ViM needs the classifier's weight (C, F) and bias; principal space d.
        "ViM": peers["ViM"](None, d=kernel.shape[0] // 2, w=t(kernel.T.copy()), b=t(bias.copy())),
        "KNN": peers["KNN"](None, k=50),
    }
    rng = np.random.default_rng(seed)
    bank = rng.choice(len(z_fit), size=min(knn_bank, len(z_fit)), replace=False)
    results, costs = {}, {}
    for name, detector in detectors.items():
        z, y = (z_fit[bank], y_fit[bank]) if name == "KNN" else (z_fit, y_fit)
        start = time.perf_counter()
        with torch.no_grad():
            detector.fit_features(t(z), t(y))
        fit_time = time.perf_counter() - start
        n_scored = 0
        start = time.perf_counter()
        with torch.no_grad():
            # pytorch-ood scores are higher for outliers: negate them.
            in_scores = -detector.predict_features(t(z_in)).numpy().astype(np.float64)
            n_scored += len(z_in)
            ood_scores = {}
            for ood_name, z_o in z_ood.items():
                ood_scores[ood_name] = -detector.predict_features(t(z_o)).numpy().astype(np.float64)
                n_scored += len(z_o)
        predict_time = time.perf_counter() - start
        results[name] = (in_scores, ood_scores)
        costs[name] = {
            "fit_s": fit_time,
            "us_per_example": 1e6 * predict_time / n_scored,
            "state_mb": _state_megabytes(detector, torch),
        }
    return results, costs, feature_time


def _state_megabytes(detector, torch):
    """Size of the tensors a fitted detector keeps for inference."""
    total = 0
    for value in vars(detector).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        else:  # KNN keeps its training features in a scikit-learn index.
            fitted = getattr(value, "_fit_X", None)
            if isinstance(fitted, np.ndarray):
                total += fitted.nbytes
    return total / 2**20


# -------------------------------------------------------------------- data


def load_data(config, seed=0):
    rng = np.random.default_rng(seed)
    x_all, y_all = data_lib.load_dataset("fashion_mnist", "train")
    order = rng.permutation(len(x_all))
    val, rest = order[: config["val_size"]], order[config["val_size"] :]
    if config["train_size"]:
        rest = rest[: config["train_size"]]
    x_test, y_test = data_lib.load_dataset("fashion_mnist", "test", n=config["test_size"])
    n = config["ood_size"]
    ood = {
        "digits": data_lib.load_dataset("digits")[0],
        "photos": data_lib.load_dataset("photos", n=n, seed=1)[0],
        "gaussian_noise": data_lib.load_dataset("gaussian_noise", n=n, seed=2)[0],
        "uniform_noise": data_lib.load_dataset("uniform_noise", n=n, seed=3)[0],
    }
    in_classes = (0, 1, 2, 3, 4, 5)
    near_train = np.isin(y_all[rest], in_classes)
    near_val = np.isin(y_all[val], in_classes)
    near_test = np.isin(y_test, in_classes)
    return {
        "train": (x_all[rest], y_all[rest]),
        "val": (x_all[val], y_all[val]),
        "test": (x_test, y_test),
        "ood": ood,
        "near_train": (x_all[rest][near_train], y_all[rest][near_train]),
        "near_val": (x_all[val][near_val], y_all[val][near_val]),
        "near_test": (x_test[near_test], y_test[near_test]),
        "near_ood": x_test[~near_test],
    }


# ----------------------------------------------------------------- one seed


def run_task(task, data, seed, config, peers, log, entropic_scale=10.0):
    """Trains both heads for one task and seed; returns metric rows + extras."""
    if task == "far":
        (x_train, y_train), (x_val, y_val) = data["train"], data["val"]
        (x_test, y_test), ood = data["test"], data["ood"]
        num_classes = 10
    else:
        (x_train, y_train), (x_val, y_val) = data["near_train"], data["near_val"]
        (x_test, y_test), ood = data["near_test"], {NEAR_SET: data["near_ood"]}
        num_classes = 6
    models, train_time = {}, {}
    for head in ("softmax", "isomax"):
        models[head] = build_model(head, num_classes, seed, entropic_scale=entropic_scale)
        train_time[head] = train(models[head], x_train, y_train, epochs=config["epochs"], seed=seed)
        log(f"  seed {seed} {task}: trained {head} in {train_time[head]:.0f} s")
    result = evaluate_ood(
        {"SoftMax": models["softmax"], "IsoMax+": models["isomax"]},
        (x_test, y_test),
        ood,
        score={"SoftMax": list(SOFTMAX_SCORES), "IsoMax+": list(ISOMAX_SCORES)},
        batch_size=512,
    )
    rows = {}
    for row in result:
        key = (row["model"], row["score"])
        rows.setdefault(key, {"accuracy": row["accuracy"]})[row["ood"]] = {
            m: row[m] for m in METRICS
        }
    extras = {"train_s": train_time}
    if peers is not None:
        peer_scores, costs, feature_time = run_peers(
            peers,
            models["softmax"],
            x_train,
            y_train,
            x_test,
            ood,
            knn_bank=config["knn_bank"],
            seed=seed,
        )
        for name, (in_scores, ood_scores) in peer_scores.items():
            entry = {"accuracy": result.accuracy["SoftMax"]}
            for ood_name, out_scores in ood_scores.items():
                values = ood_metrics(in_scores, out_scores)
                entry[ood_name] = {m: values[m] for m in METRICS}
            rows[("SoftMax", name)] = entry
        extras["peer_costs"] = costs
        extras["feature_s"] = feature_time
    extras["calibration"] = calibration_report(models, x_val, y_val, x_test)
    extras["score_cost_us"] = isomax_score_cost(models["isomax"], x_test)
    return rows, extras, result


def calibration_report(models, x_val, y_val, x_test):
    """ECE before/after temperature scaling; held-out acceptance at TPR 95%."""
    isomax = models["isomax"]
    temperature = calibrate_temperature(isomax, (x_val, y_val), batch_size=512)
    calibrate_threshold(isomax, x_val, tpr=0.95, batch_size=512)
    accepted = 1.0 - predict_ood(isomax, x_test, batch_size=512)["is_ood"].mean()
    logits = models["softmax"].predict(x_val, batch_size=512, verbose=0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return {
        "isomax_temperature": temperature.temperature,
        "isomax_ece_before": temperature.ece_before,
        "isomax_ece_after": temperature.ece_after,
        "isomax_nll_before": temperature.nll_before,
        "isomax_nll_after": temperature.nll_after,
        "softmax_ece": expected_calibration_error(probs, y_val),
        "accepted_on_test_at_tpr95": float(accepted),
    }


def isomax_score_cost(model, x):
    """Microseconds per example: the forward pass, and the minimum distance
    score given the logits."""
    model.predict(x[:512], batch_size=512, verbose=0)  # Warm up (tracing).
    start = time.perf_counter()
    logits = model.predict(x, batch_size=512, verbose=0)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        np.max(logits, axis=-1)
    score = (time.perf_counter() - start) / 10
    return {"score": 1e6 * score / len(logits), "forward": 1e6 * forward / len(logits)}


# ------------------------------------------------------------------ tables


def aggregate(per_seed):
    """{(model, score): [rows per seed]} -> mean and sample std (ddof=1)."""
    summary = {}
    for key, seed_rows in per_seed.items():
        acc = np.array([r["accuracy"] for r in seed_rows])
        entry = {"accuracy": (acc.mean(), _std(acc))}
        for ood_name in seed_rows[0]:
            if ood_name == "accuracy":
                continue
            for metric in METRICS:
                values = np.array([r[ood_name][metric] for r in seed_rows])
                entry[(ood_name, metric)] = (values.mean(), _std(values))
        for metric in METRICS:
            if all(s in seed_rows[0] for s in FAR_SETS):
                values = np.array([np.mean([r[s][metric] for s in FAR_SETS]) for r in seed_rows])
                entry[("far mean", metric)] = (values.mean(), _std(values))
        summary[key] = entry
    return summary


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(pair, seeds):
    mean, std = pair
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def _method(key):
    model, score = key
    return f"{model} + {score}" + (" (pytorch-ood)" if score in PEERS else "")


def tables(far, near, seeds):
    lines = []
    ood_columns = [*FAR_SETS, "far mean", *NOISE_SETS]
    for metric in METRICS:
        lines.append(f"\n**{METRIC_TITLES[metric]}** (%, mean ± std over {seeds} seeds)\n")
        header = ["method", "accuracy", *ood_columns, "near acc.", "near OOD"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for key, entry in far.items():
            cells = [_method(key), _fmt(entry["accuracy"], seeds)]
            cells += [_fmt(entry[(c, metric)], seeds) for c in ood_columns]
            near_entry = near.get(key)
            if near_entry:
                cells += [
                    _fmt(near_entry["accuracy"], seeds),
                    _fmt(near_entry[(NEAR_SET, metric)], seeds),
                ]
            else:
                cells += ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(extras_list, knn_bank):
    lines = [
        "\n**Inference cost of the OOD score** (CPU; per example, given the network's "
        "outputs: logits for IsoMax+, penultimate features for the peers, which are fit "
        f"on the training features; KNN's bank: {knn_bank} of them)\n",
        "| detector | fit (s) | score cost (µs / example) | state kept (MB) |",
        "|---|---:|---:|---:|",
    ]
    forward = np.mean([e["score_cost_us"]["forward"] for e in extras_list])
    cost = np.mean([e["score_cost_us"]["score"] for e in extras_list])
    lines.append(f"| (for scale: the CNN's forward pass, `predict`) | - | {forward:.1f} | - |")
    lines.append(f"| IsoMax+ minimum distance (max logit) | 0 | {cost:.3f} | 0 |")
    if "peer_costs" in extras_list[0]:
        for name in PEERS:
            fit = np.mean([e["peer_costs"][name]["fit_s"] for e in extras_list])
            us = np.mean([e["peer_costs"][name]["us_per_example"] for e in extras_list])
            mb = np.mean([e["peer_costs"][name]["state_mb"] for e in extras_list])
            lines.append(f"| pytorch-ood {name} | {fit:.2f} | {us:.2f} | {mb:.2f} |")
    return "\n".join(lines)


def calibration_table(extras_list, seeds):
    def stat(key):
        values = np.array([e["calibration"][key] for e in extras_list])
        return (values.mean(), _std(values))

    t_mean, t_std = stat("isomax_temperature")
    lines = [
        "\n**Calibration on held-out data** (10 classes; validation split of the "
        "training set, 15-bin ECE in %)\n",
        "| quantity | value |",
        "|---|---:|",
        f"| SoftMax ECE | {_fmt(stat('softmax_ece'), seeds)} |",
        f"| IsoMax+ ECE, T = 1 | {_fmt(stat('isomax_ece_before'), seeds)} |",
        f"| IsoMax+ ECE after `calibrate_temperature` | {_fmt(stat('isomax_ece_after'), seeds)} |",
        f"| fitted temperature | {t_mean:.4f}" + (f" ± {t_std:.4f} |" if seeds > 1 else " |"),
        f"| IsoMax+ NLL before → after | {stat('isomax_nll_before')[0]:.3f} → "
        f"{stat('isomax_nll_after')[0]:.3f} |",
        "| test inputs accepted at the threshold from `calibrate_threshold(tpr=0.95)` "
        f"| {_fmt(stat('accepted_on_test_at_tpr95'), seeds)} |",
    ]
    return "\n".join(lines)


def verdict(far, per_seed):
    """Checks the target: IsoMax+ MDS beats every SoftMax logit score on far AUROC."""
    lines, passed = ["\nTarget check (mean AUROC over seeds):"], True
    for label, sets in (
        ("far sets (digits, photos)", FAR_SETS),
        ("far + noise sets (digits, photos, Gaussian, uniform)", FAR_SETS + NOISE_SETS),
    ):

        def mean_auroc(key, sets=sets):
            return float(np.mean([[row[s]["auroc"] for s in sets] for row in per_seed[key]]))

        isomax = mean_auroc(("IsoMax+", "minimum_distance"))
        best = max((k for k in far if k[0] == "SoftMax" and k[1] in SOFTMAX_SCORES), key=mean_auroc)
        margin = isomax - mean_auroc(best)
        lines.append(
            f"- {label}: IsoMax+ minimum distance {100 * isomax:.1f} vs best SoftMax "
            f"logit score ({best[1]}) {100 * mean_auroc(best):.1f}: "
            f"{'beats it' if margin > 0 else 'DOES NOT beat it'} ({100 * margin:+.1f})."
        )
        if label.startswith("far sets"):
            passed = margin > 0
    gap = (
        far[("IsoMax+", "minimum_distance")]["accuracy"][0]
        - far[("SoftMax", "max_probability")]["accuracy"][0]
    )
    lines.append(
        f"- test accuracy, IsoMax+ minus SoftMax: {100 * gap:+.2f} points "
        f"(IsoMax+ at most 1 point below SoftMax: {'yes' if gap >= -0.01 else 'NO'})."
    )
    return "\n".join(lines), passed and gap >= -0.01


# ---------------------------------------------------------------- ablation


ABLATIONS = (
    ("IsoMax+ (entropic scale 10, learned s, normalised)", 10.0, None),
    ("entropic scale 1", 1.0, None),
    ("entropic scale 30", 30.0, None),
    ("distance scale frozen at 1", 10.0, "fixed_scale"),
    ("no normalisation (IsoMax-like distances)", 10.0, "unnormalized"),
)


def _auroc_row(name, accuracy, in_scores, ood_scores, extra=""):
    values = {k: ood_metrics(in_scores, v)["auroc"] for k, v in ood_scores.items()}
    far_mean = np.mean([values[k] for k in FAR_SETS])
    cells = [name, f"{100 * accuracy:.1f}" if accuracy is not None else "-"]
    cells += [f"{100 * values[k]:.1f}" for k in FAR_SETS]
    cells += [f"{100 * far_mean:.1f}"]
    cells += [f"{100 * values[k]:.1f}" for k in NOISE_SETS]
    cells += [extra]
    return "| " + " | ".join(cells) + " |"


def run_ablation(data, config, log, seed=0):
    """The paper's ablations (entropic scale, distance scale, normalisation) and
    feature-norm diagnostics, one seed, far/noise OOD sets, AUROC."""
    (x_train, y_train), (x_test, y_test), ood = data["train"], data["test"], data["ood"]
    lines = [
        f"\n**Ablation and diagnostics** (seed {seed}, AUROC %, same backbone, "
        "optimizer, epochs and data)\n",
        "| variant / score | accuracy | digits | photos | far mean | gaussian_noise "
        "| uniform_noise | learned abs(s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def outputs(model, x):
        both = keras.Model(model.inputs, [model.get_layer("features").output, model.outputs[0]])
        z, logits = both.predict(x, batch_size=512, verbose=0)
        return z.astype(np.float64), logits.astype(np.float64)

    softmax = build_model("softmax", 10, seed)
    train(softmax, x_train, y_train, epochs=config["epochs"], seed=seed)
    log("  ablation: trained softmax")
    z_in, logits_in = outputs(softmax, x_test)
    z_ood = {k: outputs(softmax, v) for k, v in ood.items()}
    accuracy = float(np.mean(logits_in.argmax(-1) == y_test))
    kernel, _ = softmax.get_layer("logits").get_weights()
    w_unit = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)

    def cosine(z):
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)) @ w_unit

    diagnostics = {
        "SoftMax + max_logit": lambda z, lg: lg.max(-1),
        "SoftMax + energy": lambda z, lg: (
            np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        ),
        "SoftMax + max cosine(z, w_c) (norm removed)": lambda z, lg: cosine(z).max(-1),
        "SoftMax + feature norm ‖z‖": lambda z, lg: np.linalg.norm(z, axis=1),
    }
    for name, fn in diagnostics.items():
        lines.append(
            _auroc_row(
                name,
                accuracy,
                fn(z_in, logits_in),
                {k: fn(*v) for k, v in z_ood.items()},
            )
        )
    for name, scale, variant in ABLATIONS:
        model = build_model("isomax", 10, seed, entropic_scale=scale, variant=variant)
        train(model, x_train, y_train, epochs=config["epochs"], seed=seed)
        log(f"  ablation: trained {name}")
        z_in, logits_in = outputs(model, x_test)
        z_ood = {k: outputs(model, v) for k, v in ood.items()}
        accuracy = float(np.mean(logits_in.argmax(-1) == y_test))
        s_value = abs(float(model.get_layer("isomax").distance_scale.numpy()))
        lines.append(
            _auroc_row(
                f"{name}: minimum distance",
                accuracy,
                logits_in.max(-1),
                {k: v[1].max(-1) for k, v in z_ood.items()},
                f"{s_value:.2f}",
            )
        )
        if variant is None and scale == 10.0:
            lines.append(
                _auroc_row(
                    f"{name}: feature norm ‖z‖",
                    accuracy,
                    np.linalg.norm(z_in, axis=1),
                    {k: np.linalg.norm(v[0], axis=1) for k, v in z_ood.items()},
                )
            )
    return "\n".join(lines)


# -------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, small subsets")
    parser.add_argument("--seeds", type=int, help="number of seeds (full: 3)")
    parser.add_argument("--epochs", type=int, help="training epochs (full: 3)")
    parser.add_argument("--entropic-scale", type=float, default=10.0, help="IsoMax+ loss scale")
    parser.add_argument("--train-size", type=int, help="training images (full: 30000)")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="run only the ablations (entropic scale, distance scale, normalisation)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-ood")
    parser.add_argument("--no-near", action="store_true", help="skip the near split")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")
    parser.add_argument("--json", help="write all per-seed numbers to this file")
    parser.add_argument("--plots", help="write seed-0 histograms / ROC PNGs here")
    args = parser.parse_args(argv)

    config = dict(QUICK if args.quick else FULL)
    if args.seeds:
        config["seeds"] = args.seeds
    if args.epochs:
        config["epochs"] = args.epochs
    if args.train_size:
        config["train_size"] = args.train_size
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    peers, peer_problem = _PEERS, _PEER_PROBLEM
    if args.no_peers:
        peers, peer_problem = None, "disabled with --no-peers"
    if peers is None:
        log(
            f"pytorch-ood peers skipped ({peer_problem}); install the optional extra "
            'with `pip install "keras-isomax[bench]"` (needs torch) to add them.'
        )
    data = load_data(config)
    log(
        f"data: train {len(data['train'][0])}, val {len(data['val'][0])}, test "
        f"{len(data['test'][0])}, OOD " + ", ".join(f"{k} {len(v)}" for k, v in data["ood"].items())
    )

    if args.ablation:
        report = run_ablation(data, config, log)
        print(
            f"Command: `python benchmarks/ood_quality.py {' '.join(argv or sys.argv[1:])}`"
            f"; {config['epochs']} epochs, train {len(data['train'][0])}; wall time "
            f"{(time.perf_counter() - start) / 60:.1f} min."
        )
        print(report)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(report + "\n")
        return 0

    far_rows, near_rows, extras_list, raw = {}, {}, [], {"config": config, "seeds": []}
    for seed in range(config["seeds"]):
        rows, extras, result = run_task(
            "far", data, seed, config, peers, log, entropic_scale=args.entropic_scale
        )
        extras_list.append(extras)
        for key, row in rows.items():
            far_rows.setdefault(key, []).append(row)
        seed_record = {
            "seed": seed,
            "far": {" + ".join(k): v for k, v in rows.items()},
            "extras": extras,
        }
        if args.plots and seed == 0:
            os.makedirs(args.plots, exist_ok=True)
            for model, score in (("IsoMax+", "minimum_distance"), ("SoftMax", "max_logit")):
                stem = os.path.join(args.plots, f"{model.strip('+')}_{score}")
                result.plot_score_histograms(stem + "_hist.png", model=model, score=score)
                result.plot_roc(stem + "_roc.png", model=model, score=score)
        if not args.no_near:
            rows, _, _ = run_task(
                "near", data, seed, config, peers, log, entropic_scale=args.entropic_scale
            )
            for key, row in rows.items():
                near_rows.setdefault(key, []).append(row)
            seed_record["near"] = {" + ".join(k): v for k, v in rows.items()}
        raw["seeds"].append(seed_record)

    far = aggregate(far_rows)
    near = aggregate(near_rows) if near_rows else {}
    elapsed = time.perf_counter() - start
    command = "python benchmarks/ood_quality.py " + " ".join(argv or sys.argv[1:])
    header = (
        f"Command: `{command.strip()}`; machine: {os.cpu_count()}-core CPU, no GPU "
        f"({platform.machine()}, Python {platform.python_version()}, "
        f"Keras {keras.__version__}); date: {datetime.date.today().isoformat()}; "
        f"wall time: {elapsed / 60:.1f} min.\n\n"
        f"Setup: {config['seeds']} seeds, {config['epochs']} epochs, Adam 1e-3, batch "
        f"128; train {len(data['train'][0])} / val {len(data['val'][0])} / test "
        f"{len(data['test'][0])} Fashion-MNIST images; OOD: digits "
        f"{len(data['ood']['digits'])}, photos/noise {config['ood_size']} each; near "
        f"split: train classes 0-5 ({len(data['near_train'][0])} images), test "
        f"{len(data['near_test'][0])} in / {len(data['near_ood'])} OOD. IsoMax+ "
        f"entropic scale {args.entropic_scale:g}. Metrics exact, in-distribution = "
        "positive class; `far mean` = mean of digits and photos."
    )
    if peers is None:
        header += f"\n\npytorch-ood peers not run: {peer_problem}."
    text_verdict, passed = verdict(far, far_rows)
    report = "\n".join(
        [
            header,
            tables(far, near, config["seeds"]),
            cost_table(extras_list, config["knn_bank"]),
            calibration_table(extras_list, config["seeds"]),
            text_verdict,
        ]
    )
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    if args.json:
        raw["elapsed_s"] = elapsed
        raw["passed_target"] = passed
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
