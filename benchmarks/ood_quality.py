"""OOD detection quality on real data: SoftMax vs IsoMax+ on Fashion-MNIST.

The default is the **paper protocol** (see `benchmarks/_quality_models.py` for
every choice and its source): a CIFAR-style ResNet (BatchNorm, global average
pooling; ResNet-8 by default, `--depth 20` for ResNet-20) trained with SGD
lr 0.1, Nesterov momentum 0.9, weight decay 1e-4 (PyTorch convention), the
paper's step decay (x0.1 at 50 / 66.7 / 83.3 % of training), batch 128 (He et
al.'s CIFAR ResNet batch for lr 0.1; the paper's 64 with `--batch-size 64`), random
crop (4-pixel zero padding) + horizontal flip. For each seed the backbone is
trained twice from the same initial weights on the same batches: once with a
`Dense` + softmax cross-entropy head (SoftMax), once with `IsoMaxPlusLayer` +
`IsoMaxPlusLoss` (IsoMax+). The earlier benchmark's small CNN (two strided
convs + `Dense(128, relu)`, no BatchNorm or pooling, Adam 1e-3, batch 128,
3 epochs, no augmentation) runs as a second, labelled backbone (`cnn`), so the
backbone/optimizer effect is measured in the same tables.

Everything runs offline:

* in-distribution: Fashion-MNIST (Debian's raw files, via `keras_isomax.app.data`);
* far OOD: scikit-learn's handwritten digits resized to 28x28, crops of
  scikit-image's sample photographs; noise controls: Gaussian and uniform;
* near OOD: a separate pair of runs trained on Fashion-MNIST classes 0-5, with
  classes 6-9 (shirt, sneaker, bag, ankle boot) as OOD.

Scores: SoftMax + {max probability, max logit, energy, entropic}; IsoMax+ +
{minimum distance, entropic}; on both heads' penultimate features the
pytorch-ood peers Mahalanobis, ViM (SoftMax only: it needs a linear
classifier) and KNN (optional `[bench]` extra, CPU torch), and the library's
own `keras_isomax.detectors` when that module exists. The `replace_head`
path: the trained SoftMax ResNet swapped to IsoMax+ (class-mean prototypes)
and fine-tuned a few epochs, next to IsoMax+ from scratch. Metrics are exact
(`keras_isomax.ood_metrics`, in-distribution = positive class): AUROC,
TNR at TPR 95 %, detection accuracy; test accuracy; ECE on the test set before
and after a temperature fitted on the validation split; mean ± std over seeds.

Run from the repository root:

    python benchmarks/ood_quality.py            # full: 3 seeds, ResNet-8 + CNN
    python benchmarks/ood_quality.py --quick    # 1 seed, small subsets, < 3 min
    python benchmarks/ood_quality.py --backbone cnn            # the CNN only
    python benchmarks/ood_quality.py --markdown results.md --json results.json
    python benchmarks/ood_quality.py --data fmnist.npz --depth 32 --epochs 100  # GPU

pytorch-ood imports torchvision only for its model registry; when torchvision
is absent a stand-in module is installed so that its detectors import. It is
imported before TensorFlow (torchvision after TensorFlow crashed the process
here); the benchmark runs without pytorch-ood and says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)


def _stand_in_torchvision():
    """Puts stand-in `torchvision` modules in `sys.modules` if it is not installed.

    pytorch-ood imports torchvision only for its model registry, datasets and
    augmentations; its KNN, Mahalanobis and ViM detectors use torch alone. Each
    stand-in module answers any attribute with a dummy class.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return False

    class _Dummy:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            return self

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Dummy

    for name in (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.datasets",
        "torchvision.datasets.utils",
        "torchvision.models",
        "torchvision.models.resnet",
        "torchvision.ops",
    ):
        module = _Module(name)
        module.__path__ = []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    return True


def _import_peers():
    """pytorch-ood's detector classes, or the reason they are unavailable.

    Must run before TensorFlow is imported: importing torchvision (which
    pytorch-ood imports) after TensorFlow crashes the process (seen with
    TF 2.21 and torch 2.14.1 / torchvision 0.29.1).
    """
    if "--no-peers" in sys.argv:
        return None, "disabled with --no-peers"
    try:
        import torch  # noqa: F401
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    stand_in = _stand_in_torchvision()
    try:
        import torch
        from pytorch_ood.detector import KNN, Mahalanobis, ViM
    except Exception as error:  # ImportError, or a broken torch install.
        return None, f"{type(error).__name__}: {error}"
    peers = {"torch": torch, "Mahalanobis": Mahalanobis, "ViM": ViM, "KNN": KNN}
    peers["stand_in_torchvision"] = stand_in
    return peers, None


_PEERS, _PEER_PROBLEM = _import_peers()

import _quality_models as qm  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_isomax import calibrate_temperature, evaluate_ood, ood_metrics, replace_head  # noqa: E402
from keras_isomax.app import data as data_lib  # noqa: E402
from keras_isomax.detection_metrics import expected_calibration_error  # noqa: E402

SOFTMAX_SCORES = ("max_probability", "max_logit", "energy", "entropic")
ISOMAX_SCORES = ("minimum_distance", "entropic")
PEERS = ("Mahalanobis", "ViM", "KNN")
FAR_SETS = ("digits", "photos", "gaussian_noise", "uniform_noise")
NEAR_SET = "near (classes 6-9)"
METRICS = ("auroc", "tnr_at_tpr95", "detection_accuracy")
METRIC_TITLES = {
    "auroc": "AUROC",
    "tnr_at_tpr95": "TNR at TPR 95%",
    "detection_accuracy": "Detection accuracy",
}
HEAD_LABELS = {"softmax": "SoftMax", "isomax": "IsoMax+"}

FULL = {
    "seeds": 3,
    # 8 epochs on 10,000 images: what fits 3 seeds x 2 backbones x (far + near) in about an
    # hour on 2 loaded CPU cores (measured 63.6 min, BENCHMARKS.md); more with --epochs/--train-size.
    "epochs": 8,  # ResNet; the CNN keeps its own 3 epochs (CNN_PROTOCOL).
    "finetune_epochs": 2,
    "depth": 8,
    "train_size": 10000,  # Of the 55,000 training images not used for validation.
    "val_size": 5000,
    "test_size": None,  # All 10,000 (6,000 / 4,000 for the near split).
    "ood_size": 5000,
    "knn_bank": 20000,
    # He et al.'s CIFAR ResNet recipe (batch 128, lr 0.1); the paper's is 64
    # (`--batch-size 64`: twice the optimizer steps, more CPU time).
    "batch_size": 128,
}
QUICK = {
    "seeds": 1,
    "epochs": 2,
    "finetune_epochs": 1,
    "depth": 8,
    "train_size": 2000,
    "val_size": 1000,
    "test_size": 1000,
    "ood_size": 300,
    "knn_bank": 2000,
    "batch_size": 128,
}
CNN_PROTOCOL = {"epochs": 3, "batch_size": 128, "augmentation": False}
FINETUNE_LR = 0.01  # One tenth of the from-scratch rate: common fine-tuning practice.


# ------------------------------------------------------------------- peers


def _features(model, arrays):
    """Penultimate features of several arrays with one extractor and one `predict`."""
    extractor = keras.Model(model.inputs, model.get_layer("features").output)
    z = extractor.predict(np.concatenate(arrays), batch_size=512, verbose=0)
    return np.split(z, np.cumsum([len(a) for a in arrays])[:-1])


def run_peers(peers, model, head, x_fit, y_fit, x_in, ood, *, knn_bank, seed):
    """pytorch-ood's Mahalanobis, ViM, KNN on the penultimate features.

    Returns `{name: (in_scores, {ood: scores}) or None}` (None: not applicable)
    and `{name: cost}`; scores are negated (pytorch-ood: higher = outlier).
    """
    torch = peers["torch"]
    t = torch.as_tensor
    z_fit, z_in, *z_out = _features(model, [x_fit, x_in, *ood.values()])
    z_ood = dict(zip(ood, z_out, strict=True))
    detectors = {"Mahalanobis": peers["Mahalanobis"](None), "KNN": peers["KNN"](None, k=50)}
    if head == "softmax":
        # ViM needs the linear classifier's weight (C, F) and bias; principal space F / 2.
        kernel, bias = model.get_layer("logits").get_weights()
        detectors["ViM"] = peers["ViM"](
            None, d=kernel.shape[0] // 2, w=t(kernel.T.copy()), b=t(bias.copy())
        )
    bank = np.random.default_rng(seed).choice(
        len(z_fit), size=min(knn_bank, len(z_fit)), replace=False
    )
    results, costs = {name: None for name in PEERS}, {}
    for name, detector in detectors.items():
        z, y = (z_fit[bank], y_fit[bank]) if name == "KNN" else (z_fit, y_fit)
        start = time.perf_counter()
        with torch.no_grad():
            detector.fit_features(t(z), t(y))
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            in_scores = -detector.predict_features(t(z_in)).numpy().astype(np.float64)
            out = {
                k: -detector.predict_features(t(v)).numpy().astype(np.float64)
                for k, v in z_ood.items()
            }
        n = len(z_in) + sum(len(v) for v in z_ood.values())
        results[name] = (in_scores, out)
        costs[name] = {"fit_s": fit_s, "us_per_example": 1e6 * (time.perf_counter() - start) / n}
    return results, costs


def run_library_detectors(model, head, x_fit, y_fit, x_in, ood, *, knn_bank, seed):
    """`keras_isomax.detectors` (KNN, Mahalanobis, ViM) on one head, if present.

    Returns `({name: (in_scores, {ood: scores}) or None}, note)`; `note` says
    why a detector did not run (module absent, or it refused this head).
    """
    import keras_isomax

    try:
        from keras_isomax import detectors as det
    except ImportError as error:
        return {}, f"keras_isomax.detectors not available ({error})"
    here = os.path.dirname(os.path.abspath(keras_isomax.__file__))
    if os.path.dirname(os.path.abspath(det.__file__)) != here:
        # An editable install can resolve the submodule from another checkout.
        return {}, f"keras_isomax.detectors skipped: {det.__file__} is not part of {here}"
    dim = int(model.get_layer("features").output.shape[-1]) // 2
    bank = np.random.default_rng(seed).choice(
        len(x_fit), size=min(knn_bank, len(x_fit)), replace=False
    )
    results, notes, costs = {}, [], {}
    for name, factory in (
        ("Mahalanobis", lambda: det.Mahalanobis()),
        ("ViM", lambda: det.ViM(dim)),
        ("KNN", lambda: det.KNN(k=50)),
    ):
        x, y = (x_fit[bank], y_fit[bank]) if name == "KNN" else (x_fit, y_fit)
        try:
            detector = factory()
            start = time.perf_counter()
            detector.fit(model, (x, y))
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            in_scores = np.asarray(detector.score(x_in), np.float64)
            out = {k: np.asarray(detector.score(v), np.float64) for k, v in ood.items()}
        except (ValueError, TypeError, NotImplementedError) as error:
            results[name] = None
            notes.append(f"{name} on {HEAD_LABELS[head]}: n/a ({type(error).__name__}: {error})")
            continue
        n = len(x_in) + sum(len(v) for v in ood.values())
        results[name] = (in_scores, out)
        # Per example: the whole model forward pass plus the detector (what a user pays).
        costs[name] = {
            "fit_s": fit_s,
            "us_per_example": 1e6 * (time.perf_counter() - start) / n,
            "state_bytes": int(sum(np.asarray(w).nbytes for w in detector.get_weights())),
        }
    return results, "; ".join(notes), costs


# -------------------------------------------------------------------- data


def load_data(config, seed=0, npz=None):
    """Train / val / test splits, far OOD sets and the near split (0-5 vs 6-9).

    `npz`: a file written by `--prepare-npz` (for a machine without the raw
    files, scikit-learn or scikit-image); otherwise `keras_isomax.app.data`.
    """
    rng = np.random.default_rng(seed)
    n = config["ood_size"]
    if npz:
        with np.load(npz) as f:
            x_all, y_all = f["x_train"].astype(np.float32) / 255.0, f["y_train"].astype(np.int64)
            x_test, y_test = f["x_test"].astype(np.float32) / 255.0, f["y_test"].astype(np.int64)
            ood = {
                "digits": f["ood_digits"].astype(np.float32),
                "photos": f["ood_photos"][:n].astype(np.float32),
                # Noise is regenerated (NumPy only, same seeds as below): it does not compress.
                "gaussian_noise": data_lib.load_dataset("gaussian_noise", n=n, seed=2)[0],
                "uniform_noise": data_lib.load_dataset("uniform_noise", n=n, seed=3)[0],
            }
        if config["test_size"]:
            x_test, y_test = x_test[: config["test_size"]], y_test[: config["test_size"]]
    else:
        x_all, y_all = data_lib.load_dataset("fashion_mnist", "train")
        x_test, y_test = data_lib.load_dataset("fashion_mnist", "test", n=config["test_size"])
        ood = {
            "digits": data_lib.load_dataset("digits")[0],
            "photos": data_lib.load_dataset("photos", n=n, seed=1)[0],
            "gaussian_noise": data_lib.load_dataset("gaussian_noise", n=n, seed=2)[0],
            "uniform_noise": data_lib.load_dataset("uniform_noise", n=n, seed=3)[0],
        }
    order = rng.permutation(len(x_all))
    val, rest = order[: config["val_size"]], order[config["val_size"] :]
    if config["train_size"]:
        rest = rest[: config["train_size"]]
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


def prepare_npz(path, ood_size=5000):
    """Writes Fashion-MNIST (uint8), the digits and photo crops (float16) to one `.npz`.

    The noise sets are not stored: `load_data` regenerates them with NumPy.
    """
    x_train, y_train = data_lib.load_dataset("fashion_mnist", "train")
    x_test, y_test = data_lib.load_dataset("fashion_mnist", "test")
    arrays = {
        "x_train": np.round(x_train * 255).astype(np.uint8),
        "y_train": y_train.astype(np.uint8),
        "x_test": np.round(x_test * 255).astype(np.uint8),
        "y_test": y_test.astype(np.uint8),
        "ood_digits": data_lib.load_dataset("digits")[0].astype(np.float16),
        "ood_photos": data_lib.load_dataset("photos", n=ood_size, seed=1)[0].astype(np.float16),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    staging = path + ".partial.npz"  # Written whole, then moved into place.
    np.savez_compressed(staging, **arrays)
    os.replace(staging, path)
    return os.path.getsize(path)


# ------------------------------------------------------------- calibration


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _fit_temperature(logits, labels):
    """NLL-minimising temperature of plain logits (golden section on log T)."""
    z, y = logits.astype(np.float64), labels.astype(np.int64)

    def nll(log_t):
        s = z / np.exp(log_t)
        s = s - s.max(-1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(-1)) - s[np.arange(len(y)), y]))

    lo, hi, g = np.log(1e-3), np.log(1e3), (np.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def calibration_of(model, head, x_val, y_val, x_test, y_test):
    """Test ECE (%) before and after a temperature fitted on the validation split."""
    logits = model.predict(x_test, batch_size=512, verbose=0).astype(np.float64)
    before = expected_calibration_error(_softmax(logits), y_test)
    if head == "isomax":
        # The library's path: the temperature is stored in the layer.
        temperature = calibrate_temperature(model, (x_val, y_val), batch_size=512).temperature
        after_logits = model.predict(x_test, batch_size=512, verbose=0).astype(np.float64)
    else:
        val_logits = model.predict(x_val, batch_size=512, verbose=0)
        temperature = _fit_temperature(val_logits, y_val)
        after_logits = logits / temperature
    after = expected_calibration_error(_softmax(after_logits), y_test)
    return {"ece_before": float(before), "ece_after": float(after), "temperature": temperature}


# ----------------------------------------------------------------- one seed


def _rows_from(result, label):
    rows = {}
    for row in result:
        key = (label(row["model"]), row["score"])
        rows.setdefault(key, {"accuracy": row["accuracy"]})[row["ood"]] = {
            m: row[m] for m in METRICS
        }
    return rows


def _detector_rows(rows, prefix, head_label, accuracy, results, suffix):
    for name, value in results.items():
        entry = {"accuracy": accuracy}
        if value is None:
            entry["n/a"] = True
        else:
            in_scores, out = value
            for ood_name, out_scores in out.items():
                m = ood_metrics(in_scores, out_scores)
                entry[ood_name] = {k: m[k] for k in METRICS}
        rows[(f"{prefix}{head_label}", f"{name} ({suffix})")] = entry


def run_task(task, backbone, data, seed, config, peers, log, entropic_scale=10.0):
    """Trains both heads (and the replace_head path) for one task, backbone, seed."""
    if task == "far":
        (x_train, y_train), (x_val, y_val) = data["train"], data["val"]
        (x_test, y_test), ood = data["test"], data["ood"]
        num_classes = 10
    else:
        (x_train, y_train), (x_val, y_val) = data["near_train"], data["near_val"]
        (x_test, y_test), ood = data["near_test"], {NEAR_SET: data["near_ood"]}
        num_classes = 6
    if backbone == "cnn":
        epochs, batch, augmentation = (
            CNN_PROTOCOL["epochs"],
            CNN_PROTOCOL["batch_size"],
            CNN_PROTOCOL["augmentation"],
        )
    else:
        epochs, batch, augmentation = config["epochs"], config["batch_size"], True
    steps = -(-len(x_train) // batch)
    models, extras = {}, {"train_s": {}, "calibration": {}, "notes": []}
    for head in ("softmax", "isomax"):
        model = qm.build_model(head, num_classes, seed, backbone=backbone, depth=config["depth"])
        qm.compile_model(
            model,
            head,
            backbone=backbone,
            epochs=epochs,
            steps_per_epoch=steps,
            entropic_scale=entropic_scale,
        )
        extras["train_s"][head] = qm.train(
            model,
            x_train,
            y_train,
            epochs=epochs,
            seed=seed,
            batch_size=batch,
            augmentation=augmentation,
        )
        models[head] = model
        log(f"  seed {seed} {backbone} {task}: trained {head} in {extras['train_s'][head]:.0f} s")

    finetune = task == "far" and backbone == "resnet" and config["finetune_epochs"] > 0
    if finetune:
        swapped = replace_head(models["softmax"], init_data=(x_train, y_train), name="isomax")
        zero_shot = evaluate_ood(
            swapped, (x_test, y_test), ood, score=list(ISOMAX_SCORES), batch_size=512
        )
        qm.compile_model(
            swapped,
            "isomax",
            backbone=backbone,
            epochs=config["finetune_epochs"],
            steps_per_epoch=steps,
            entropic_scale=entropic_scale,
            lr=FINETUNE_LR,
        )
        extras["train_s"]["finetune"] = qm.train(
            swapped,
            x_train,
            y_train,
            epochs=config["finetune_epochs"],
            seed=seed + 500,
            batch_size=batch,
        )
        log(
            f"  seed {seed} {backbone} {task}: replace_head fine-tune in "
            f"{extras['train_s']['finetune']:.0f} s"
        )

    prefix = f"{backbone}: "
    result = evaluate_ood(
        {"SoftMax": models["softmax"], "IsoMax+": models["isomax"]},
        (x_test, y_test),
        ood,
        score={"SoftMax": list(SOFTMAX_SCORES), "IsoMax+": list(ISOMAX_SCORES)},
        batch_size=512,
    )
    rows = _rows_from(result, lambda m: prefix + m)
    if finetune:
        ft = evaluate_ood(swapped, (x_test, y_test), ood, score=list(ISOMAX_SCORES), batch_size=512)
        n_ft = config["finetune_epochs"]
        rows.update(_rows_from(zero_shot, lambda m: prefix + "SoftMax -> replace_head, 0 ep."))
        rows.update(_rows_from(ft, lambda m, n=n_ft: prefix + f"SoftMax -> replace_head, {n} ep."))
    for head, model in models.items():
        accuracy = result.accuracy[HEAD_LABELS[head]]
        if peers is not None:
            peer_results, costs = run_peers(
                peers,
                model,
                head,
                x_train,
                y_train,
                x_test,
                ood,
                knn_bank=config["knn_bank"],
                seed=seed,
            )
            _detector_rows(rows, prefix, HEAD_LABELS[head], accuracy, peer_results, "pytorch-ood")
            extras.setdefault("peer_costs", {})[head] = costs
        lib_results, note, lib_costs = run_library_detectors(
            model, head, x_train, y_train, x_test, ood, knn_bank=config["knn_bank"], seed=seed
        )
        extras.setdefault("library_costs", {})[head] = lib_costs
        _detector_rows(rows, prefix, HEAD_LABELS[head], accuracy, lib_results, "keras_isomax")
        if note:
            extras["notes"].append(note)
        extras["calibration"][head] = calibration_of(model, head, x_val, y_val, x_test, y_test)
    return rows, extras


# ------------------------------------------------------------------ tables


def aggregate(per_seed):
    """{key: [rows per seed]} -> {key: {column: (mean, std)}} (None: n/a)."""
    summary = {}
    for key, seed_rows in per_seed.items():
        acc = np.array([r["accuracy"] for r in seed_rows])
        entry = {"accuracy": (acc.mean(), _std(acc))}
        if any(r.get("n/a") for r in seed_rows):
            summary[key] = {**entry, "n/a": True}
            continue
        ood_names = [k for k in seed_rows[0] if k != "accuracy"]
        for metric in METRICS:
            for ood_name in ood_names:
                values = np.array([r[ood_name][metric] for r in seed_rows])
                entry[(ood_name, metric)] = (values.mean(), _std(values))
            if all(s in seed_rows[0] for s in FAR_SETS):
                values = np.array([np.mean([r[s][metric] for s in FAR_SETS]) for r in seed_rows])
                entry[("far mean", metric)] = (values.mean(), _std(values))
        summary[key] = entry
    return summary


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(pair, seeds):
    if pair is None:
        return "n/a"
    mean, std = pair
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def tables(far, near, seeds):
    lines = []
    columns = [*FAR_SETS, "far mean"]
    for metric in METRICS:
        lines.append(f"\n**{METRIC_TITLES[metric]}** (%, mean ± std over {seeds} seeds)\n")
        header = ["backbone: model", "score", "accuracy", *columns, "near acc.", "near OOD"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
        for key, entry in far.items():
            na = entry.get("n/a")
            cells = [key[0], key[1], _fmt(entry["accuracy"], seeds)]
            cells += [_fmt(None if na else entry[(c, metric)], seeds) for c in columns]
            near_entry = near.get(key)
            if near_entry:
                cells.append(_fmt(near_entry["accuracy"], seeds))
                cells.append(
                    _fmt(None if near_entry.get("n/a") else near_entry[(NEAR_SET, metric)], seeds)
                )
            else:
                cells += ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(extras_by_backbone, seeds):
    lines = [
        "\n**Calibration** (far task, 10 classes; 15-bin ECE in % on the test set, "
        "before / after a temperature fitted on the validation split: "
        "`calibrate_temperature` for IsoMax+, the same NLL fit in NumPy for SoftMax)\n",
        "| backbone | head | ECE, T = 1 | ECE, fitted T | fitted T |",
        "|---|---|---:|---:|---:|",
    ]
    for backbone, extras_list in extras_by_backbone.items():
        for head in ("softmax", "isomax"):
            cal = [e["calibration"][head] for e in extras_list]

            def stat(k, cal=cal):
                v = np.array([c[k] for c in cal])
                return v.mean(), _std(v)

            t_mean, t_std = stat("temperature")
            t_text = f"{t_mean:.4g}" + (f" ± {t_std:.2g}" if seeds > 1 else "")
            lines.append(
                f"| {backbone} | {HEAD_LABELS[head]} | {_fmt(stat('ece_before'), seeds)} | "
                f"{_fmt(stat('ece_after'), seeds)} | {t_text} |"
            )
    return "\n".join(lines)


def time_table(extras_by_backbone):
    lines = [
        "\n**Training wall time** (s per run, mean over seeds, far task)\n",
        "| backbone | SoftMax | IsoMax+ from scratch | replace_head fine-tune |",
        "|---|---:|---:|---:|",
    ]
    for backbone, extras_list in extras_by_backbone.items():

        def mean(k, extras_list=extras_list):
            v = [e["train_s"][k] for e in extras_list if k in e["train_s"]]
            return f"{np.mean(v):.0f}" if v else "-"

        lines.append(f"| {backbone} | {mean('softmax')} | {mean('isomax')} | {mean('finetune')} |")
    return "\n".join(lines)


def cost_table(extras_by_backbone):
    """Fit time, per-example scoring cost and state size of the feature detectors."""
    lines = [
        "\n**Feature detectors: cost** (mean over seeds, far task; per example = model forward "
        "pass + detector, over the test and OOD sets; pytorch-ood scores precomputed features, "
        "so its per-example figure excludes the forward pass)\n",
        "| backbone | head | detector | fit (s) | per example (us) | state |",
        "|---|---|---|---:|---:|---:|",
    ]
    for backbone, extras_list in extras_by_backbone.items():
        for source, key in (("keras_isomax", "library_costs"), ("pytorch-ood", "peer_costs")):
            for head in HEAD_LABELS:
                names = sorted({n for e in extras_list for n in e.get(key, {}).get(head, {})})
                for name in names:
                    rows = [e[key][head][name] for e in extras_list if name in e[key].get(head, {})]
                    fit = np.mean([r["fit_s"] for r in rows])
                    per = np.mean([r["us_per_example"] for r in rows])
                    state = [r["state_bytes"] for r in rows if "state_bytes" in r]
                    size = f"{np.mean(state) / 2**20:.2f} MiB" if state else "-"
                    lines.append(
                        f"| {backbone} | {HEAD_LABELS[head]} | {name} ({source}) | {fit:.2f} "
                        f"| {per:.0f} | {size} |"
                    )
    return "\n".join(lines)


def summary(far, near):
    """What the numbers say: best SoftMax vs best IsoMax+ score per backbone."""
    lines = ["\nSummary (mean AUROC over seeds; far mean = digits, photos, Gaussian, uniform):"]
    backbones = sorted({k[0].split(":")[0] for k in far})
    for backbone in backbones:
        for label, table, column in (("far mean", far, "far mean"), ("near", near, NEAR_SET)):

            def best(model, table=table, column=column, backbone=backbone):
                keys = [
                    k
                    for k in table
                    if k[0] == f"{backbone}: {model}"
                    and (column, "auroc") in table[k]
                    and (model == "IsoMax+" or k[1] in SOFTMAX_SCORES)
                    and k[1] in (*SOFTMAX_SCORES, *ISOMAX_SCORES)
                ]
                if not keys:
                    return None, None
                k = max(keys, key=lambda k: table[k][(column, "auroc")][0])
                return k[1], table[k][(column, "auroc")][0]

            s_name, s_val = best("SoftMax")
            i_name, i_val = best("IsoMax+")
            if s_val is None or i_val is None:
                continue
            lines.append(
                f"- {backbone}, {label}: best IsoMax+ score ({i_name}) {100 * i_val:.1f} vs "
                f"best SoftMax score ({s_name}) {100 * s_val:.1f} ({100 * (i_val - s_val):+.1f})."
            )
    return "\n".join(lines)


# -------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few epochs, small subsets")
    parser.add_argument("--seeds", type=int, help="number of seeds (full: 3)")
    parser.add_argument("--epochs", type=int, help="ResNet training epochs (full: 8)")
    parser.add_argument("--finetune-epochs", type=int, help="replace_head fine-tune (full: 2)")
    parser.add_argument("--depth", type=int, help="ResNet depth: 6n+2, or 34 (full: 8)")
    parser.add_argument("--batch-size", type=int, help="ResNet batch (full: 128; paper: 64)")
    parser.add_argument(
        "--mixed-precision", action="store_true", help="mixed_bfloat16 backbone (GPU)"
    )
    parser.add_argument("--train-size", type=int, help="training images (full: 10000)")
    parser.add_argument("--test-size", type=int, help="test images (full: all 10000)")
    parser.add_argument("--val-size", type=int, help="validation images (full: 5000)")
    parser.add_argument("--ood-size", type=int, help="photo / noise images (full: 5000)")
    parser.add_argument(
        "--backbone",
        default="resnet,cnn",
        help="comma-separated backbones: resnet (paper protocol), cnn (earlier small CNN)",
    )
    parser.add_argument("--entropic-scale", type=float, default=10.0, help="IsoMax+ loss scale")
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-ood")
    parser.add_argument("--no-near", action="store_true", help="skip the near split")
    parser.add_argument("--data", help="a .npz written by --prepare-npz (no raw files needed)")
    parser.add_argument("--prepare-npz", help="write the data .npz here and exit")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")
    parser.add_argument("--json", help="write all per-seed numbers to this file")
    args = parser.parse_args(argv)

    if args.prepare_npz:
        size = prepare_npz(args.prepare_npz)
        print(f"wrote {args.prepare_npz}: {size / 2**20:.1f} MiB")
        return 0
    config = dict(QUICK if args.quick else FULL)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    for name in (
        "seeds",
        "epochs",
        "finetune_epochs",
        "depth",
        "train_size",
        "batch_size",
        "test_size",
        "ood_size",
        "val_size",
    ):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    for backbone in backbones:
        if backbone not in qm.BACKBONES:
            parser.error(f"--backbone must list {qm.BACKBONES}. Received: backbone={backbone!r}")
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
    data = load_data(config, npz=args.data)
    log(
        f"data: train {len(data['train'][0])}, val {len(data['val'][0])}, test "
        f"{len(data['test'][0])}, OOD " + ", ".join(f"{k} {len(v)}" for k, v in data["ood"].items())
    )

    far_rows, near_rows, raw = {}, {}, {"config": config, "backbones": backbones, "runs": []}
    extras_by_backbone, notes = {}, set()
    for backbone in backbones:
        for seed in range(config["seeds"]):
            tasks = ("far",) if args.no_near else ("far", "near")
            for task in tasks:
                rows, extras = run_task(
                    task, backbone, data, seed, config, peers, log, args.entropic_scale
                )
                target = far_rows if task == "far" else near_rows
                for key, row in rows.items():
                    target.setdefault(key, []).append(row)
                if task == "far":
                    extras_by_backbone.setdefault(backbone, []).append(extras)
                notes.update(extras["notes"])
                raw["runs"].append(
                    {
                        "backbone": backbone,
                        "seed": seed,
                        "task": task,
                        "rows": {" | ".join(k): v for k, v in rows.items()},
                        "extras": extras,
                    }
                )

    far = aggregate(far_rows)
    near = aggregate(near_rows) if near_rows else {}
    elapsed = time.perf_counter() - start
    command = "python benchmarks/ood_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setups = []
    if "resnet" in backbones:
        setups.append(
            f"resnet = ResNet-{config['depth']} ("
            + (
                "basic blocks 3/4/6/3 of 64-512 filters, 3x3 stem; 512 features"
                if config["depth"] == 34
                else "CIFAR family: stem conv16, stages 16/32/64; 64 features"
            )
            + "; BatchNorm, global average pooling)"
            + (", mixed_bfloat16" if args.mixed_precision else "")
            + f", SGD lr 0.1, Nesterov 0.9, "
            f"weight decay 1e-4 (PyTorch convention), step decay x0.1 at 50/66.7/83.3% of "
            f"{config['epochs']} epochs, batch {config['batch_size']}, random crop (4-px padding) + horizontal flip; "
            f"replace_head: the trained SoftMax ResNet swapped to IsoMax+ (class-mean "
            f"prototypes), then fine-tuned {config['finetune_epochs']} epochs at lr "
            f"{FINETUNE_LR} (same step decay)"
        )
    if "cnn" in backbones:
        setups.append(
            "cnn = the earlier small CNN (two strided convs, Dense(128, relu) features, no "
            f"BatchNorm or pooling), Adam 1e-3, batch 128, {CNN_PROTOCOL['epochs']} epochs, "
            "no augmentation"
        )
    header = (
        f"Command: `{command.strip()}`; machine: {os.cpu_count()}-core CPU "
        f"({platform.machine()}, Python {platform.python_version()}, Keras "
        f"{keras.__version__}, backend {keras.backend.backend()}); date: "
        f"{datetime.date.today().isoformat()}; wall time: {elapsed / 60:.1f} min.\n\n"
        f"Setup: {config['seeds']} seed(s); " + "; ".join(setups) + ". Both heads of a "
        "backbone start from the same initial weights and see the same batches. Data: "
        f"train {len(data['train'][0])} / val {len(data['val'][0])} / test "
        f"{len(data['test'][0])} Fashion-MNIST images; OOD: digits "
        f"{len(data['ood']['digits'])}, photos/noise {config['ood_size']} each; near split: "
        f"train classes 0-5 ({len(data['near_train'][0])} images), test "
        f"{len(data['near_test'][0])} in / {len(data['near_ood'])} OOD. IsoMax+ entropic "
        f"scale {args.entropic_scale:g}. Metrics exact, in-distribution = positive class."
    )
    if peers is None:
        header += f"\n\npytorch-ood peers not run: {peer_problem}."
    if notes:
        header += "\n\nNotes: " + "; ".join(sorted(notes)) + "."
    report = "\n".join(
        [
            header,
            tables(far, near, config["seeds"]),
            calibration_table(extras_by_backbone, config["seeds"]),
            time_table(extras_by_backbone),
            cost_table(extras_by_backbone),
            summary(far, near),
        ]
    )
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    if args.json:
        raw["elapsed_s"] = elapsed
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
