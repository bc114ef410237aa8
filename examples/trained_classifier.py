"""OOD detection for a classifier you already trained: replace_head or a detector.

1. Trains an ordinary SoftMax classifier briefly on Fashion-MNIST (a stand-in for your
   trained model: `Dense(10, activation="softmax")`, cross-entropy).
2. Adds OOD detection two ways, without retraining from scratch:
   `replace_head` (the softmax head becomes an `IsoMaxPlusLayer` with class-mean
   prototypes, optionally fine-tuned) and post-hoc detectors fitted on the unchanged
   model's features (`ClassMeans`, `Mahalanobis`, `KNN`).
3. Compares them with the SoftMax scores in one `evaluate_ood` table (handwritten
   digits, photo crops and Gaussian noise as OOD sets).
4. Calibrates both routes on held-out images (95% accepted), exports the IsoMax+
   model and the SoftMax model with its KNN detector as SavedModels for TF Serving,
   loads each export without Keras and sends one batch to its `score` signature.

Offline data (Debian's `dataset-fashion-mnist`; the `[data]` extra for digits and
photos). About a minute on 2 CPU cores:

    python examples/trained_classifier.py
    python examples/trained_classifier.py --epochs 5 --train-size 50000   # a better model
"""

import argparse
import os
import tempfile

import keras
import numpy as np

from keras_isomax import (
    IsoMaxPlusLoss,
    calibrate_temperature,
    calibrate_threshold,
    detectors,
    evaluate_ood,
    export_saved_model,
    replace_head,
)
from keras_isomax.app import data
from keras_isomax.app.models import example_cnn_layers


def train_softmax_classifier(x, y, epochs):
    """The model you already have: a small CNN ending in Dense + softmax."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            *example_cnn_layers(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=2)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="SoftMax training epochs")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--fine-tune-epochs", type=int, default=1, help="after replace_head")
    parser.add_argument("--ood-size", type=int, default=2000, help="examples per OOD set")
    parser.add_argument("--export-dir", default=None, help="TF Serving model base path")
    args = parser.parse_args(argv)
    export_dir = args.export_dir or os.path.join(tempfile.mkdtemp(), "fashion")

    keras.utils.set_random_seed(0)
    x_all, y_all = data.load_dataset("fashion_mnist", "train")
    x_train, y_train = x_all[: args.train_size], y_all[: args.train_size]
    x_val, y_val = x_all[-5000:], y_all[-5000:]  # held out: never trained on
    x_test, y_test = data.load_dataset("fashion_mnist", "test")
    ood = {
        name: data.load_dataset(name, n=args.ood_size)[0]
        for name in ("digits", "photos", "gaussian_noise")
    }

    softmax_model = train_softmax_classifier(x_train, y_train, args.epochs)

    # Route 1: replace the head. Class-mean prototypes give a working IsoMax+ model at
    # once; a short fine-tune with IsoMaxPlusLoss trains the prototypes and the backbone.
    isomax_model = replace_head(softmax_model, init_data=(x_train, y_train))
    if args.fine_tune_epochs:
        isomax_model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
            loss=IsoMaxPlusLoss(),
            metrics=["accuracy"],
        )
        isomax_model.fit(x_train, y_train, batch_size=128, epochs=args.fine_tune_epochs, verbose=2)

    # Route 2: keep the model, fit detectors on its features (the input of the last Dense).
    train = (x_train, y_train)
    class_means = detectors.ClassMeans().fit(softmax_model, train, verbose=0)
    mahalanobis = detectors.Mahalanobis().fit(softmax_model, train, verbose=0)
    knn = detectors.KNN(k=50).fit(softmax_model, train, verbose=0)

    result = evaluate_ood(
        {"softmax": softmax_model, "replace_head": isomax_model},
        (x_test, y_test),
        ood,
        score={
            "softmax": ["max_probability", "energy", class_means, mahalanobis, knn],
            "replace_head": ["minimum_distance"],
        },
        verbose=0,
    )
    print(result)
    print("\nMean AUROC over the OOD sets:")
    for model_name, score_name in dict.fromkeys((r["model"], r["score"]) for r in result):
        rows = result.filter(model=model_name, score=score_name)
        mean = np.mean([row["auroc"] for row in rows])
        print(f"  {model_name:<14}{score_name:<18}{100 * mean:6.2f}")

    # Calibrate both routes on held-out images (95% of them accepted) and export each as
    # a SavedModel for TF Serving; its `score` signature returns the score and decision.
    calibrate_temperature(isomax_model, (x_val, y_val), verbose=0)  # calibrated probabilities
    calibrate_threshold(isomax_model, x_val, tpr=0.95, verbose=0)
    calibrate_threshold(softmax_model, x_val, tpr=0.95, detector=knn, verbose=0)
    exports = {
        "replace_head": export_saved_model(isomax_model, f"{export_dir}_isomax", version=1),
        "softmax + knn": export_saved_model(
            softmax_model, f"{export_dir}_knn", version=1, detector=knn
        ),
    }

    # What TF Serving runs: the SavedModel alone (no Keras model, no keras-isomax).
    import tensorflow as tf

    batch = np.concatenate([x_test[:3], ood["digits"][:3], ood["gaussian_noise"][:2]])
    print("\nOne request to each `score` signature: 3 Fashion-MNIST, 3 digits, 2 noise images")
    for name, path in exports.items():
        served = tf.saved_model.load(path)
        outputs = served.signatures["score"](inputs=tf.constant(batch))
        print(f"{name} ({path}):")
        print("  is_ood  ", outputs["is_ood"].numpy().tolist())
        print("  class_id", outputs["class_id"].numpy().tolist())
    print(
        "\nThe same request to TF Serving (REST): POST /v1/models/<name>:predict with "
        '{"signature_name": "score", "instances": images.tolist()}'
    )


if __name__ == "__main__":
    main()
