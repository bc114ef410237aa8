"""The end-to-end demo: SoftMax vs IsoMax+ on Fashion-MNIST, offline.

Trains the same small CNN twice (Dense + softmax + cross-entropy, and
IsoMax+), compares OOD detection on far OOD sets, calibrates the IsoMax+
temperature and threshold (95% TPR), writes plots and a Markdown report, exports a SavedModel
with the `score` signature and sends it one request. `keras-isomax demo`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_isomax.app import data as data_lib
from keras_isomax.app import models
from keras_isomax.calibration import calibrate_temperature, calibrate_threshold
from keras_isomax.evaluation import evaluate_ood
from keras_isomax.export import export_saved_model
from keras_isomax.losses import IsoMaxPlusLoss
from keras_isomax.metrics import OODScore

DEFAULT_OOD_SETS = ("digits", "photos", "gaussian_noise", "uniform_noise")
IMAGE_SHAPE = (28, 28, 1)


def build_classifier(
    head: str,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = IMAGE_SHAPE,
    width: int = 32,
) -> keras.Sequential:
    """The demo's small CNN: `keras_isomax.app.models.example_cnn`.

    Args:
        head: `"softmax"` (Dense + softmax, trained with cross-entropy) or
            `"isomax"` (IsoMaxPlusLayer, trained with IsoMaxPlusLoss).
        num_classes: Number of classes. Defaults to `10`.
        input_shape: Image shape. Defaults to `(28, 28, 1)`.
        width: Filters of the first convolution (the second has twice as
            many). Defaults to `32`.

    Returns:
        An uncompiled `keras.Sequential`; the softmax model outputs logits.

    Raises:
        ValueError: If `head` is unknown.
    """
    return models.example_cnn(head, num_classes, input_shape, width)


def compile_classifier(model: keras.Model, head: str, learning_rate: float = 1e-3) -> keras.Model:
    """Compiles a `build_classifier` model with its loss (Adam, same for both).

    Args:
        model: A `build_classifier` model.
        head: `"softmax"` or `"isomax"`, as given to `build_classifier`.
        learning_rate: Adam's learning rate. Defaults to `1e-3`.

    Returns:
        The model, compiled with its loss, `accuracy` and (IsoMax+) `OODScore`.
    """
    loss = (
        IsoMaxPlusLoss()
        if head == "isomax"
        else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    metrics = ["accuracy"] + ([OODScore()] if head == "isomax" else [])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    return model


def run_demo(
    output_dir: str | os.PathLike = "demo_output",
    epochs: int = 2,
    train_size: int | None = 30000,
    seed: int = 0,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Runs the demo and returns a dict of what it measured.

    Args:
        output_dir: Directory for the report, plots, models and SavedModel.
            Defaults to `"demo_output"`.
        epochs: Training epochs of each model. Defaults to `2`.
        train_size: Use only this many training images; `None` uses all
            55,000 (60,000 minus the 5,000 held out for calibration). Defaults
            to `30000`, which keeps the demo under 5 minutes on 2 CPU cores.
        seed: Random seed (same for both models). Defaults to `0`.
        verbose: Training output: `1` Keras progress bars, `2` one line per
            epoch, `0` none, `"auto"` progress bars when stdout is a terminal
            and one line per epoch otherwise (a log file gets no progress-bar
            frames). Defaults to `"auto"`.

    Raises:
        ValueError: If `epochs` < 1, `train_size` is not None or positive, or
            `verbose` is not one of `0`, `1`, `2`, `"auto"`.
        FileExistsError: If `output_dir` is a file.

    Returns:
        Dict with `table` (the comparison as text), `temperature`, `threshold`,
        `accepted_test` (fraction of the ID test set accepted at it),
        `report` (path), `saved_model` (path), `request` and `response`
        (the scored request), and `seconds`.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise ValueError(
            "`train_size` must be a positive integer or None (all 55,000 images). "
            f"Received: train_size={train_size!r}"
        )
    if verbose not in (0, 1, 2, "auto") or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")
    if verbose == "auto":
        verbose = 1 if _is_terminal(sys.stdout) else 2
    start = time.perf_counter()
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"The demo's output path exists and is not a directory. Received: output_dir={str(out)!r}"
        )
    out.mkdir(parents=True, exist_ok=True)

    _say("1/6 Loading Fashion-MNIST (offline) and the OOD sets")
    x_all, y_all = data_lib.load_fashion_mnist("train")
    x_test, y_test = data_lib.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_all))
    val_idx, train_idx = order[:5000], order[5000:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    x_val, y_val = x_all[val_idx], y_all[val_idx]
    ood = {
        name: data_lib.load_dataset(name, image_shape=IMAGE_SHAPE, seed=seed)[0]
        for name in DEFAULT_OOD_SETS
    }
    for name, x in ood.items():
        _say(f"    {name}: {len(x)} images")

    models = {}
    for step, (head, label) in enumerate((("softmax", "SoftMax"), ("isomax", "IsoMax+")), 2):
        _say(f"{step}/6 Training the CNN with a {label} head ({epochs} epochs)")
        keras.utils.set_random_seed(seed)
        model = compile_classifier(build_classifier(head), head)
        # verbose=2: our one line per epoch (Keras' own adds an "Epoch i/n" line).
        callbacks = [_EpochLines(label)] if verbose == 2 else []
        model.fit(
            x_train,
            y_train,
            batch_size=128,
            epochs=epochs,
            verbose=1 if verbose == 1 else 0,
            callbacks=callbacks,
        )
        model.save(out / f"{head}.keras")
        models[label] = model

    _say("4/6 Evaluating OOD detection (in-distribution = Fashion-MNIST test set)")
    result = evaluate_ood(
        models,
        (x_test, y_test),
        ood,
        # Energy is the strongest SoftMax score in benchmarks/ood_quality.py: never
        # compare IsoMax+ against the weakest baseline (max probability) alone.
        score={"SoftMax": ["max_probability", "energy"], "IsoMax+": "minimum_distance"},
    )
    columns = ["model", "score", "ood", "accuracy", "auroc", "tnr_at_tpr95"]
    table = result.to_string(columns=columns)
    print(table)

    _say("5/6 Calibrating IsoMax+ on 5,000 held-out images: temperature, threshold at TPR 95%")
    isomax = models["IsoMax+"]
    # Temperature first: it rescales the logits, so it changes the score scale
    # (never its ranking); the threshold is then set on the final scale.
    temperature = calibrate_temperature(isomax, (x_val, y_val))
    _say(f"    {temperature}")
    threshold = float(calibrate_threshold(isomax, x_val, tpr=0.95))
    in_scores = np.max(isomax.predict(x_test, batch_size=512, verbose=0), axis=-1)
    ood_scores = {
        name: np.max(isomax.predict(x, batch_size=512, verbose=0), axis=-1)
        for name, x in ood.items()
    }
    accepted_test = float(np.mean(in_scores >= threshold))
    _say(f"    threshold {threshold:.4f}: accepts {accepted_test:.1%} of the ID test set")
    for name, values in ood_scores.items():
        _say(f"    flags {np.mean(~(values >= threshold)):.1%} of {name} as OOD")
    isomax.save(out / "isomax.keras")  # now with its calibrated threshold

    from keras_isomax.plots import plot_roc, plot_score_histograms

    figures = {}
    for label in models:
        score = "max_probability" if label == "SoftMax" else "minimum_distance"
        s_in, s_ood = (in_scores, ood_scores) if label == "IsoMax+" else result.scores(label, score)
        slug = "softmax" if label == "SoftMax" else "isomax"
        figures[f"{label} histogram"] = plot_score_histograms(
            s_in,
            s_ood,
            out / f"histogram_{slug}.png",
            threshold=threshold if label == "IsoMax+" else None,
            score_name=score,
            in_name="fashion_mnist",
            title=f"{label}: {score} score",
        )
        figures[f"{label} ROC"] = plot_roc(
            s_in, s_ood, out / f"roc_{slug}.png", in_name="fashion_mnist", title=f"{label} ROC"
        )

    _say("6/6 Exporting the IsoMax+ model as a SavedModel and scoring one request")
    saved_model = export_saved_model(isomax, out / "saved_model", version=1, overwrite=True)
    request, response, contract = _score_request(saved_model, x_test[:2], ood["gaussian_noise"][:1])
    _say(f"    input contract: {contract} (the demo feeds pixels scaled to [0, 1])")
    print(json.dumps({"signature_name": "score", "instances": "<3 images>"}))
    print(json.dumps(response, indent=1))

    seconds = time.perf_counter() - start
    report = _write_report(
        out,
        table,
        temperature,
        threshold,
        accepted_test,
        ood_scores,
        figures,
        response,
        epochs,
        seconds,
    )
    _say(f"Report: {report}  (total {seconds:.0f} s)")
    return {
        "table": table,
        "temperature": temperature.temperature,
        "threshold": threshold,
        "accepted_test": accepted_test,
        "report": str(report),
        "saved_model": str(saved_model),
        "request": request,
        "response": response,
        "seconds": seconds,
    }


def _score_request(
    saved_model: str | os.PathLike, x_in: np.ndarray, x_out: np.ndarray
) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], str]:
    """Loads the SavedModel (as TF Serving would) and calls its `score` signature."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))
    signature = loaded.signatures["score"]
    ((input_name, spec),) = signature.structured_input_signature[1].items()
    shape = "(" + ", ".join("None" if d is None else str(d) for d in spec.shape) + ")"
    contract = f"input `{input_name}`, dtype {spec.dtype.name}, shape {shape}"
    batch = np.concatenate([x_in, x_out]).astype("float32")
    outputs = signature(**{input_name: tf.constant(batch)})
    response = {
        "inputs": ["fashion_mnist[0]", "fashion_mnist[1]", "gaussian_noise[0]"],
        "outputs": {
            name: np.asarray(value).tolist()
            for name, value in outputs.items()
            if name != "probabilities"
        },
    }
    response["input_contract"] = contract
    return {input_name: batch.shape}, response, contract


def _write_report(
    out: Path,
    table: str,
    temperature: Any,
    threshold: float,
    accepted: float,
    ood_scores: Mapping[str, np.ndarray],
    figures: Mapping[str, str | os.PathLike],
    response: dict[str, Any],
    epochs: int,
    seconds: float,
) -> Path:
    lines = [
        "# keras-isomax demo: SoftMax vs IsoMax+ on Fashion-MNIST",
        "",
        f"Same CNN, optimizer, seed and {epochs} epochs for both heads. In-distribution: the "
        "Fashion-MNIST test set (10,000 images); OOD: scikit-learn digits, scikit-image photo "
        "crops, Gaussian and uniform noise. Scores: SoftMax + maximum probability (MSP) and "
        "SoftMax + energy vs IsoMax+ + minimum distance score (MDS). This small CNN (no "
        "BatchNorm, no pooled features) is not the paper's backbone: see BENCHMARKS.md for "
        "the ResNet results, which differ. Percent; in-distribution is the positive class.",
        "",
        "```",
        table,
        "```",
        "",
        f"Calibrated on 5,000 held-out training images: {temperature}. Threshold at TPR 95%: "
        f"`{threshold:.4f}`; it accepts {accepted:.1%} of the in-distribution test set.",
        "",
    ]
    for name, values in ood_scores.items():
        lines.append(f"- {name}: {np.mean(~(values >= threshold)):.1%} flagged as OOD")
    lines += ["", "## Score histograms and ROC curves", ""]
    for caption, path in figures.items():
        lines.append(f"![{caption}]({os.path.basename(str(path))})")
    lines += [
        "",
        "## One request to the exported SavedModel's `score` signature",
        "",
        "```json",
        json.dumps(response, indent=1),
        "```",
        "",
        f"Total time: {seconds:.0f} s.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _say(message: str) -> None:
    print(message, flush=True)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # Replaced or closed streams.
        return False


class _EpochLines(keras.callbacks.Callback):
    """Prints one line per epoch: its number, the training logs and its time."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = " - ".join(f"{name} {float(value):.4f}" for name, value in (logs or {}).items())
        seconds = time.perf_counter() - self._start
        epochs = self.params.get("epochs", "?")
        _say(f"    {self.label} epoch {epoch + 1}/{epochs}: {values} ({seconds:.1f} s)")
