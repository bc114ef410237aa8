"""OOD detection quality of trained models: SoftMax vs IsoMax+ on Fashion-MNIST.

For each seed and each task, a ResNet (`benchmarks/_quality_models.py`: the
CIFAR family's ResNet-8 with BatchNorm and global average pooling) is trained
twice from the same initial weights on the same batches, once with a `Dense`
+ softmax cross-entropy head (SoftMax) and once with `IsoMaxPlusLayer` +
`IsoMaxPlusLoss` (IsoMax+): SGD lr 0.1, Nesterov 0.9, cosine decay, weight
decay 5e-4, batch 128, 6 epochs on 50,000 images, one `fit` call over a
`tf.data` pipeline.

Tasks (everything offline):

* far: Fashion-MNIST (10 classes) in; scikit-learn's handwritten digits,
  crops of scikit-image's photographs, Gaussian and uniform noise out;
* near: a model trained on classes 0-5; classes 6-9 of the test set out.

Rows, every one on both tasks:

* SoftMax + {max probability, max logit, energy, entropic};
* IsoMax+ + {minimum distance, entropic, energy, max logit};
* `replace_head` of the trained SoftMax model (class-mean prototypes), as is
  and after a short fine-tune, IsoMax+ scores;
* the class-mean detector on the SoftMax model (`detectors.ClassMeans`, or,
  where the library has none, `replace_head` at 0 epochs, which is the same
  score; the JSON says which);
* the library's `detectors.Mahalanobis`, `KNN(k=50)` and `ViM(F/2)` on both
  heads' features;
* with `--peers`: pytorch-ood 0.4.0's Mahalanobis, KNN and ViM on the same
  features (parity check).

Detectors and scores see features computed once per model: they are fitted and
scored through a model from the features to the logits that shares the trained
head (`_quality_models.head_model`), which is what `fit(model, data)` computes
on the whole model. Metrics are exact (`keras_isomax.ood_metrics`,
in-distribution = positive class). Calibration: 15-bin ECE on the test set
before and after a temperature fitted on a 5,000-image validation split.

The result (command, commit, machine, every per-seed value) is written to
`benchmarks/results/ood_quality.json` for the default protocol (other settings:
`ood_quality_custom.json`, `--quick`: `ood_quality_quick.json`, or `--output`);
`python benchmarks/render.py` turns it into BENCHMARKS.md's tables and the
README's score table.

    python benchmarks/ood_quality.py               # the protocol: 3 seeds, far + near
    python benchmarks/ood_quality.py --quick       # smoke run, < 3 minutes
    python benchmarks/ood_quality.py --describe    # the protocol as JSON, no training
    python benchmarks/ood_quality.py --peers       # + pytorch-ood parity rows
    python benchmarks/ood_quality.py --prepare-npz benchmarks/data/fmnist_ood.npz
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)


def _stand_in_torchvision() -> bool:
    """Puts stand-in `torchvision` modules in `sys.modules` if it is not installed.

    pytorch-ood imports torchvision only for its model registry, datasets and
    augmentations; its KNN, Mahalanobis and ViM detectors use torch alone.
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
    """pytorch-ood's detectors (imported before TensorFlow), or why they are unavailable."""
    try:
        import torch

        _stand_in_torchvision()
        from pytorch_ood.detector import KNN, Mahalanobis, ViM
    except Exception as error:  # ImportError, or a broken torch install.
        return None, f"{type(error).__name__}: {error}"
    return {"torch": torch, "Mahalanobis": Mahalanobis, "ViM": ViM, "KNN": KNN}, None


# Importing torchvision after TensorFlow crashed the process here: peers first.
_PEERS, _PEER_PROBLEM = _import_peers() if "--peers" in sys.argv else (None, "no --peers")

import _quality_models as qm  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_isomax  # noqa: E402
from keras_isomax import calibrate_temperature, evaluate_ood, ood_metrics, replace_head  # noqa: E402
from keras_isomax import detectors as det_lib  # noqa: E402
from keras_isomax.app import data as data_lib  # noqa: E402
from keras_isomax.detection_metrics import expected_calibration_error  # noqa: E402

SOFTMAX_SCORES = ("max_probability", "max_logit", "energy", "entropic")
ISOMAX_SCORES = ("minimum_distance", "entropic", "energy", "max_logit")
FAR_SETS = ("digits", "photos", "gaussian_noise", "uniform_noise")
NEAR_SET = "classes 6-9"
NEAR_CLASSES = (0, 1, 2, 3, 4, 5)
METRICS = ("auroc", "tnr_at_tpr95", "detection_accuracy", "aupr_in", "aupr_out")
KNN_K = 50
FINETUNE_LR = 0.01  # One tenth of the from-scratch rate: common fine-tuning practice.

# The protocol. Chosen for the SoftMax baseline's test accuracy and for 3 seeds x 2 tasks
# to fit 75 minutes on 2 CPU cores, never for an OOD figure. Measured (SoftMax, seed 0 /
# seed 1, 2 loaded cores): 30,000 images x 10 epochs 91.55 %; 40,000 x 8 92.06 / 92.00;
# 50,000 x 6 92.18 / 92.02 (the same optimizer steps as 40,000 x 8, fewer image passes);
# 40,000 x 10 91.97; 50,000 x 10 92.40; random flips (30,000 x 10) 91.45.
DEFAULTS = {
    "seeds": 3,
    "tasks": ["far", "near"],
    "depth": 8,
    "epochs": 6,
    "finetune_epochs": 2,
    "train_size": 50000,  # Of the 55,000 training images not used for validation.
    "val_size": 5000,
    "test_size": None,  # All 10,000 (6,000 in / 4,000 OOD for the near task).
    "ood_size": 5000,  # Photos and each noise set; the digits are all 1,797.
    "batch_size": qm.BATCH_SIZE,
    "learning_rate": qm.LEARNING_RATE,
    "weight_decay": qm.WEIGHT_DECAY,
    "flip": False,
    "entropic_scale": 10.0,
}
QUICK = {
    **DEFAULTS,
    "seeds": 1,
    "epochs": 2,
    "finetune_epochs": 1,
    "train_size": 3000,
    "val_size": 1000,
    "test_size": 1000,
    "ood_size": 500,
}


# -------------------------------------------------------------------- data


def load_data(config: dict, seed: int = 0, npz: str | None = None) -> dict:
    """Train / val / test splits of both tasks and the far OOD sets.

    The split (which images train, which validate) is drawn from `seed`;
    `npz` is a file written by `--prepare-npz` (for a machine without the raw
    files, scikit-learn or scikit-image).
    """
    n = config["ood_size"]
    noise = {
        "gaussian_noise": data_lib.load_dataset("gaussian_noise", n=n, seed=2)[0],
        "uniform_noise": data_lib.load_dataset("uniform_noise", n=n, seed=3)[0],
    }
    if npz:
        with np.load(npz) as f:
            x_all, y_all = f["x_train"].astype(np.float32) / 255.0, f["y_train"].astype(np.int64)
            x_test, y_test = f["x_test"].astype(np.float32) / 255.0, f["y_test"].astype(np.int64)
            ood = {
                "digits": f["ood_digits"].astype(np.float32),
                "photos": f["ood_photos"][:n].astype(np.float32),
                **noise,
            }
    else:
        x_all, y_all = data_lib.load_dataset("fashion_mnist", "train")
        x_test, y_test = data_lib.load_dataset("fashion_mnist", "test")
        ood = {
            "digits": data_lib.load_dataset("digits")[0],
            "photos": data_lib.load_dataset("photos", n=n, seed=1)[0],
            **noise,
        }
    if config["test_size"]:
        x_test, y_test = x_test[: config["test_size"]], y_test[: config["test_size"]]
    order = np.random.default_rng(seed).permutation(len(x_all))
    val, rest = order[: config["val_size"]], order[config["val_size"] :]
    train = rest[: config["train_size"]] if config["train_size"] else rest
    near = np.isin(y_all, NEAR_CLASSES)
    near_test = np.isin(y_test, NEAR_CLASSES)
    return {
        "far": {
            "train": (x_all[train], y_all[train]),
            "val": (x_all[val], y_all[val]),
            "test": (x_test, y_test),
            "ood": ood,
            "num_classes": 10,
        },
        "near": {
            "train": (x_all[train][near[train]], y_all[train][near[train]]),
            "val": (x_all[val][near[val]], y_all[val][near[val]]),
            "test": (x_test[near_test], y_test[near_test]),
            "ood": {NEAR_SET: x_test[~near_test]},
            "num_classes": len(NEAR_CLASSES),
        },
    }


def prepare_npz(path: str, ood_size: int = 5000) -> int:
    """Writes Fashion-MNIST (uint8), the digits and photo crops (float16) to one `.npz`.

    The noise sets are not stored: `load_data` regenerates them with NumPy.
    Returns the file's size in bytes.
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


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
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


def calibration_of(head_net, head, f_val, y_val, f_test, y_test) -> dict:
    """Test ECE before and after a temperature fitted on the validation split.

    IsoMax+ goes through the library (`calibrate_temperature`, which stores the
    temperature in the layer: run this last); SoftMax through the same NLL fit
    in NumPy.
    """
    logits = head_net.predict(f_test, batch_size=1024, verbose=0).astype(np.float64)
    before = expected_calibration_error(_softmax(logits), y_test)
    if head == "isomax":
        temperature = calibrate_temperature(head_net, (f_val, y_val), batch_size=1024).temperature
        after_logits = head_net.predict(f_test, batch_size=1024, verbose=0).astype(np.float64)
    else:
        val_logits = head_net.predict(f_val, batch_size=1024, verbose=0)
        temperature = _fit_temperature(val_logits, y_val)
        after_logits = logits / temperature
    after = expected_calibration_error(_softmax(after_logits), y_test)
    return {"ece_before": float(before), "ece_after": float(after), "temperature": temperature}


# ---------------------------------------------------------------- scoring


def _metrics(in_scores, ood_scores: dict) -> dict:
    out = {}
    for name, scores in ood_scores.items():
        m = ood_metrics(np.asarray(in_scores, np.float64), np.asarray(scores, np.float64))
        out[name] = {k: float(m[k]) for k in METRICS}
    return out


def score_rows(model_label, head_net, feats, scores, kind="score") -> list[dict]:
    """Rows of the logit scores of one head, through `evaluate_ood` on the features."""
    result = evaluate_ood(
        head_net,
        (feats["test"], feats["y_test"]),
        feats["ood"],
        score=list(scores),
        batch_size=1024,
    )
    rows = []
    for score in scores:
        in_scores, ood_scores = result.scores(score=score)
        rows.append(
            {
                "model": model_label,
                "method": score,
                "kind": kind,
                "accuracy": float(result.accuracy[head_net.name]),
                "metrics": _metrics(in_scores, ood_scores),
            }
        )
    return rows


def library_detectors(feature_dim: int) -> dict:
    """The library's feature detectors of the protocol (name -> factory)."""
    found = {
        "Mahalanobis": lambda: det_lib.Mahalanobis(batch_size=1024),
        f"KNN (k={KNN_K})": lambda: det_lib.KNN(k=KNN_K, batch_size=1024),
        f"ViM (dim={feature_dim // 2})": lambda: det_lib.ViM(feature_dim // 2, batch_size=1024),
    }
    if hasattr(det_lib, "ClassMeans"):
        found["class means"] = lambda: det_lib.ClassMeans(batch_size=1024)
    return found


def detector_rows(model_label, head_net, feats, accuracy) -> tuple[list[dict], dict]:
    """Rows and costs of the library's detectors fitted on one head's training features."""
    rows, costs = [], {}
    feature_dim = feats["train"].shape[1]
    for name, factory in library_detectors(feature_dim).items():
        start = time.perf_counter()
        detector = factory().fit(head_net, (feats["train"], feats["y_train"]))
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        in_scores = detector.score(feats["test"])
        ood_scores = {k: detector.score(v) for k, v in feats["ood"].items()}
        n = len(in_scores) + sum(len(v) for v in ood_scores.values())
        costs[name] = {
            "fit_s": fit_s,
            "score_us_per_example": 1e6 * (time.perf_counter() - start) / n,
            "state_bytes": int(sum(np.asarray(w).nbytes for w in detector.get_weights())),
        }
        rows.append(
            {
                "model": model_label,
                "method": name,
                "kind": "detector",
                "source": "keras_isomax",
                "accuracy": accuracy,
                "metrics": _metrics(in_scores, ood_scores),
            }
        )
    return rows, costs


def peer_rows(peers, model_label, head_net, feats, accuracy) -> list[dict]:
    """pytorch-ood's Mahalanobis, KNN and ViM on the same features (scores negated)."""
    torch = peers["torch"]
    t = torch.as_tensor
    z, y = feats["train"], feats["y_train"]
    detectors = {
        "Mahalanobis": peers["Mahalanobis"](None),
        f"KNN (k={KNN_K})": peers["KNN"](None, k=KNN_K),
    }
    dense = [layer for layer in head_net.layers if isinstance(layer, keras.layers.Dense)]
    if dense:  # pytorch-ood's ViM takes a linear head's W (C, F) and b.
        kernel, bias = dense[0].get_weights()
        detectors[f"ViM (dim={z.shape[1] // 2})"] = peers["ViM"](
            None, d=z.shape[1] // 2, w=t(kernel.T.copy()), b=t(bias.copy())
        )
    rows = []
    for name, detector in detectors.items():
        with torch.no_grad():
            detector.fit_features(t(z), t(y))
            in_scores = -detector.predict_features(t(feats["test"])).numpy()
            ood_scores = {
                k: -detector.predict_features(t(v)).numpy() for k, v in feats["ood"].items()
            }
        rows.append(
            {
                "model": model_label,
                "method": name,
                "kind": "detector",
                "source": "pytorch-ood",
                "accuracy": accuracy,
                "metrics": _metrics(in_scores, ood_scores),
            }
        )
    return rows


def features_of(model, task_data) -> dict:
    """Pooled features of the training, validation, test and OOD images (one pass each)."""
    extractor = qm.feature_model(model)

    width = int(extractor.output.shape[-1])

    def run(x):
        if not len(x):
            return np.zeros((0, width), np.float32)
        # Padded to whole batches: one input shape, one compiled function (JAX).
        padded = np.concatenate([x, np.zeros((-len(x) % 1024, *x.shape[1:]), x.dtype)])
        return extractor.predict(padded, batch_size=1024, verbose=0)[: len(x)]

    return {
        "train": run(task_data["train"][0]),
        "y_train": task_data["train"][1],
        "val": run(task_data["val"][0]),
        "y_val": task_data["val"][1],
        "test": run(task_data["test"][0]),
        "y_test": task_data["test"][1],
        "ood": {k: run(v) for k, v in task_data["ood"].items()},
    }


# ---------------------------------------------------------------- one run

HEAD_LABELS = {"softmax": "SoftMax", "isomax": "IsoMax+"}


def replace_head_label(epochs: int) -> str:
    return f"SoftMax -> replace_head, {epochs} epochs"


def run_task(task: str, data: dict, seed: int, config: dict, peers, log, trainer=None) -> dict:
    """Trains both heads and the replace_head path for one task and seed; scores every row.

    `trainer(model, x, y, epochs=, seed=, batch_size=, flip=)` returns the epochs'
    wall and CPU seconds (`{"epoch_s": [...], "epoch_cpu_s": [...]}`); defaults to
    `_quality_models.train` with `tf_data=True` (one `fit` over a tf.data pipeline).
    """
    trainer = trainer or functools.partial(qm.train, tf_data=True)
    task_start = (time.perf_counter(), time.process_time())
    (x_train, y_train) = data["train"]
    epochs, batch = config["epochs"], config["batch_size"]
    steps = len(x_train) // batch
    models, training, rows, costs, calibration = {}, {}, [], {}, {}
    for head in qm.HEADS:
        model = qm.build_model(
            head,
            data["num_classes"],
            seed,
            depth=config["depth"],
            weight_decay=config["weight_decay"],
        )
        qm.compile_model(
            model,
            head,
            epochs=epochs,
            steps_per_epoch=steps,
            lr=config["learning_rate"],
            entropic_scale=config["entropic_scale"],
        )
        times = trainer(
            model, x_train, y_train, epochs=epochs, seed=seed, batch_size=batch, flip=config["flip"]
        )
        models[head] = model
        training[head] = {"epochs": epochs, "images": len(x_train), **times}
        log(f"seed {seed} {task}: trained {head} in {sum(times['epoch_s']):.0f} s")

    feats = {head: features_of(model, data) for head, model in models.items()}
    heads = {head: qm.head_model(model) for head, model in models.items()}
    for head in qm.HEADS:
        label = HEAD_LABELS[head]
        scores = SOFTMAX_SCORES if head == "softmax" else ISOMAX_SCORES
        head_rows = score_rows(label, heads[head], feats[head], scores)
        rows += head_rows
        accuracy = head_rows[0]["accuracy"]
        training[head]["accuracy"] = accuracy
        found, costs[head] = detector_rows(label, heads[head], feats[head], accuracy)
        rows += found
        if peers is not None:
            rows += peer_rows(peers, label, heads[head], feats[head], accuracy)

    # replace_head: class-mean prototypes on the trained SoftMax model, as is (its
    # backbone and so its features are the SoftMax model's) and fine-tuned.
    swapped = replace_head(
        models["softmax"], init_data=(x_train, y_train), batch_size=1024, name="isomax"
    )
    rows += score_rows(
        replace_head_label(0), qm.head_model(swapped), feats["softmax"], ISOMAX_SCORES
    )
    if not hasattr(det_lib, "ClassMeans"):
        fallback = next(r for r in rows if r["model"] == replace_head_label(0))
        rows.append(
            {
                **fallback,
                "model": "SoftMax",
                "method": "class means",
                "kind": "detector",
                "source": "replace_head, 0 epochs, minimum_distance (no detectors.ClassMeans)",
            }
        )
    ft_epochs = config["finetune_epochs"]
    if ft_epochs:
        qm.compile_model(
            swapped,
            "isomax",
            epochs=ft_epochs,
            steps_per_epoch=steps,
            lr=FINETUNE_LR,
            entropic_scale=config["entropic_scale"],
        )
        times = trainer(
            swapped,
            x_train,
            y_train,
            epochs=ft_epochs,
            seed=seed + 500,
            batch_size=batch,
            flip=config["flip"],
        )
        training["replace_head"] = {"epochs": ft_epochs, "images": len(x_train), **times}
        log(f"seed {seed} {task}: replace_head fine-tuned in {sum(times['epoch_s']):.0f} s")
        ft_feats = features_of(swapped, data)
        rows += score_rows(
            replace_head_label(ft_epochs), qm.head_model(swapped), ft_feats, ISOMAX_SCORES
        )

    if task == "far" and len(
        data["val"][0]
    ):  # Last: calibrate_temperature writes the IsoMax+ layer's temperature.
        for head in qm.HEADS:
            f = feats[head]
            calibration[head] = calibration_of(
                heads[head], head, f["val"], f["y_val"], f["test"], f["y_test"]
            )
    return {
        "seed": seed,
        "task": task,
        # Whole task (training, features, scores, detectors, calibration): wall and CPU s.
        "task_s": time.perf_counter() - task_start[0],
        "task_cpu_s": time.process_time() - task_start[1],
        "training": training,
        "rows": rows,
        "detector_costs": costs,
        "calibration": calibration,
        "sizes": {
            "train": len(x_train),
            "val": len(data["val"][0]),
            "test": len(data["test"][0]),
            "ood": {k: len(v) for k, v in data["ood"].items()},
        },
    }


def row_labels(config: dict, feature_dim: int = 64) -> list[list[str]]:
    """`[model, method]` of every library row a task produces (pytorch-ood's come on top)."""
    labels = [["SoftMax", s] for s in SOFTMAX_SCORES]
    labels += [["IsoMax+", s] for s in ISOMAX_SCORES]
    for n in (0, config["finetune_epochs"]) if config["finetune_epochs"] else (0,):
        labels += [[replace_head_label(n), s] for s in ISOMAX_SCORES]
    for head in ("SoftMax", "IsoMax+"):
        labels += [[head, name] for name in library_detectors(feature_dim)]
    if not hasattr(det_lib, "ClassMeans"):
        labels.append(["SoftMax", "class means"])  # replace_head at 0 epochs: the same score.
    return labels


# --------------------------------------------------------------- describe


def describe(config: dict) -> dict:
    """The protocol as data, for `--describe` and `tests/test_quality_protocol.py`.

    Builds (does not train) both heads of seed 0 and 1, reads the optimizer's
    schedule, and checks that seeds reproduce the initial weights and batches.
    """
    import tensorflow as tf

    def weights(model):
        head = model.layers[-1]
        return [w.numpy() for layer in model.layers if layer is not head for w in layer.weights]

    soft = qm.build_model("softmax", 10, seed=0, depth=config["depth"])
    iso = qm.build_model("isomax", 10, seed=0, depth=config["depth"])
    again = qm.build_model("softmax", 10, seed=0, depth=config["depth"])
    other = qm.build_model("softmax", 10, seed=1, depth=config["depth"])
    steps = config["train_size"] // config["batch_size"]
    qm.compile_model(soft, "softmax", epochs=config["epochs"], steps_per_epoch=steps)
    # The schedule as the optimizer stores it (its config), evaluated at a few steps.
    lr_config = soft.optimizer.get_config()["learning_rate"]
    schedule = keras.optimizers.schedules.deserialize(lr_config)
    total = config["epochs"] * steps
    lr_at = {str(s): float(schedule(s)) for s in (0, steps, total // 2, total - 1, total)}

    convs = [layer for layer in soft.layers if isinstance(layer, keras.layers.Conv2D)]
    bns = [layer for layer in soft.layers if isinstance(layer, keras.layers.BatchNormalization)]
    w = np.random.default_rng(1).normal(size=(5, 3))
    v = tf.Variable(w)
    with tf.GradientTape() as tape:
        penalty = convs[0].kernel_regularizer(v)
    l2_grad = tape.gradient(penalty, v).numpy() / w

    idx_a = qm.batch_indices(1000, seed=0, epochs=2, batch_size=config["batch_size"])
    idx_b = qm.batch_indices(1000, seed=0, epochs=2, batch_size=config["batch_size"])
    idx_c = qm.batch_indices(1000, seed=1, epochs=2, batch_size=config["batch_size"])
    per_epoch = len(idx_a) // 2
    return {
        "config": config,
        "rows": {task: row_labels(config) for task in config["tasks"]},
        "tasks": {"far": list(FAR_SETS), "near": [NEAR_SET]},
        "models_per_seed_and_task": ["softmax", "isomax"]
        + (["replace_head fine-tune"] if config["finetune_epochs"] else []),
        "backbone": {
            "depth": config["depth"],
            "features": int(soft.get_layer("features").output.shape[-1]),
            "feature_layer": type(soft.get_layer("features")).__name__,
            "conv_3x3": sum(c.kernel_size == (3, 3) for c in convs),
            "conv": len(convs),
            "batchnorm": len(bns),
            "residual_adds": sum(isinstance(x, keras.layers.Add) for x in soft.layers),
            "conv_regularised": all(c.kernel_regularizer is not None for c in convs),
            "batchnorm_momentum": sorted({float(b.momentum) for b in bns}),
            "batchnorm_epsilon": sorted({float(b.epsilon) for b in bns}),
            "softmax_head": type(soft.layers[-1]).__name__,
            "isomax_head": type(iso.layers[-1]).__name__,
            "parameters": int(soft.count_params()),
        },
        "optimizer": {
            "class": type(soft.optimizer).__name__,
            "nesterov": bool(soft.optimizer.nesterov),
            "momentum": float(soft.optimizer.momentum),
            "decoupled_weight_decay": soft.optimizer.weight_decay,
            "schedule": type(schedule).__name__,
            "total_steps": total,
            "steps_per_epoch": steps,
            "lr_at_step": lr_at,
            "l2_gradient_over_weight": [float(l2_grad.min()), float(l2_grad.max())],
        },
        "seeding": {
            "heads_share_initial_backbone": all(
                np.array_equal(a, b) for a, b in zip(weights(soft), weights(iso), strict=True)
            ),
            "same_seed_same_weights": all(
                np.array_equal(a, b) for a, b in zip(weights(soft), weights(again), strict=True)
            ),
            "other_seed_other_weights": any(
                not np.array_equal(a, b) for a, b in zip(weights(soft), weights(other), strict=True)
            ),
            "same_seed_same_batches": bool(np.array_equal(idx_a, idx_b)),
            "other_seed_other_batches": not np.array_equal(idx_a, idx_c),
            "every_epoch_a_permutation": all(
                len(np.unique(idx_a[e * per_epoch : (e + 1) * per_epoch]))
                == idx_a[0].size * per_epoch
                for e in range(2)
            ),
            "epochs_differ": not np.array_equal(idx_a[:per_epoch], idx_a[per_epoch:]),
        },
    }


# -------------------------------------------------------------------- main


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, small subsets")
    parser.add_argument("--describe", action="store_true", help="print the protocol as JSON")
    parser.add_argument("--seeds", type=int, help=f"number of seeds ({DEFAULTS['seeds']})")
    parser.add_argument("--tasks", help="comma-separated: far, near (both)")
    parser.add_argument("--epochs", type=int, help=f"training epochs ({DEFAULTS['epochs']})")
    parser.add_argument("--finetune-epochs", type=int, help="replace_head fine-tune (2)")
    parser.add_argument("--depth", type=int, help="ResNet depth, 6n+2 (8)")
    parser.add_argument("--train-size", type=int, help="training images (50000)")
    parser.add_argument("--val-size", type=int, help="validation images (5000)")
    parser.add_argument("--test-size", type=int, help="test images (all 10000)")
    parser.add_argument("--ood-size", type=int, help="photo / noise images (5000)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--peers", action="store_true", help="add pytorch-ood's detectors")
    parser.add_argument("--data", help="a .npz written by --prepare-npz")
    parser.add_argument("--prepare-npz", help="write the data .npz here and exit")
    parser.add_argument("--output", help="result JSON path (default: benchmarks/results/...)")
    return parser, parser.parse_args(argv)


# The options that override the protocol's entry of the same name (besides --tasks).
PROTOCOL_OPTIONS = (
    "seeds",
    "epochs",
    "finetune_epochs",
    "depth",
    "train_size",
    "test_size",
    "ood_size",
)


def override_config(config: dict, args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """A copy of `config` with each of `names` and `tasks` replaced where `args` gives them."""
    config = dict(config)
    for name in names:
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    if args.tasks:
        config["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return config


def config_from(args: argparse.Namespace) -> dict:
    config = override_config(
        QUICK if args.quick else DEFAULTS, args, PROTOCOL_OPTIONS + ("val_size",)
    )
    if args.flip:
        config["flip"] = True
    return config


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)
    if args.prepare_npz:
        size = prepare_npz(args.prepare_npz)
        print(f"wrote {args.prepare_npz}: {size / 2**20:.1f} MiB")
        return 0
    config = config_from(args)
    bad = [t for t in config["tasks"] if t not in ("far", "near")]
    if bad or not config["tasks"]:
        parser.error(f"--tasks must list far and/or near. Received: tasks={args.tasks!r}")
    if args.describe:
        print(json.dumps(describe(config), indent=1))
        return 0
    if args.peers and _PEERS is None:
        parser.error(f"--peers needs pytorch-ood (and torch): {_PEER_PROBLEM}")

    from _results import write_result

    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    data = load_data(config, npz=args.data)
    runs = []
    for seed in range(config["seeds"]):
        for task in config["tasks"]:
            runs.append(
                run_task(task, data[task], seed, config, _PEERS if args.peers else None, log)
            )
    elapsed = time.perf_counter() - start
    far_runs = [r for r in runs if r["task"] == "far"]
    summary = {
        "seeds": list(range(config["seeds"])),
        "softmax_accuracy": [100 * r["training"]["softmax"]["accuracy"] for r in far_runs],
        "isomax_accuracy": [100 * r["training"]["isomax"]["accuracy"] for r in far_runs],
    }
    is_default = config == DEFAULTS and not args.data
    name = (
        "ood_quality" if is_default else "ood_quality_quick" if args.quick else "ood_quality_custom"
    )
    payload = {
        "protocol": {
            **config,
            "default": is_default,
            "quick": bool(args.quick),
            "peers": bool(args.peers),
            "finetune_lr": FINETUNE_LR,
            "knn_k": KNN_K,
            "class_means": "keras_isomax.detectors.ClassMeans"
            if hasattr(det_lib, "ClassMeans")
            else "replace_head at 0 epochs (same score; no detectors.ClassMeans)",
            "far_sets": list(FAR_SETS),
            "near_set": NEAR_SET,
            "metrics": list(METRICS),
            "library": os.path.dirname(os.path.abspath(keras_isomax.__file__)),
        },
        "defaults": DEFAULTS,
        "wall_time_s": elapsed,
        "summary": summary,
        "runs": runs,
    }
    path = write_result(name, payload, path=args.output)
    accuracy = ", ".join(
        f"{label} {np.mean(summary[key]):.2f} %"
        for key, label in (("softmax_accuracy", "SoftMax"), ("isomax_accuracy", "IsoMax+"))
        if summary[key]
    )
    log(f"done in {elapsed / 60:.1f} min; far-task accuracy: {accuracy or '-'}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
