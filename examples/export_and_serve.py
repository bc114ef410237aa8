"""Train, calibrate and export an IsoMax+ classifier for TF Serving; call both signatures.

Trains a small Fashion-MNIST classifier briefly (offline data, see
`keras_isomax.app.data`), calibrates its OOD threshold on held-out in-distribution
images (95% of them accepted), exports a SavedModel in TF Serving's layout
(`EXPORT_DIR/1/`) and then, in this process but without using the Keras model,
loads the SavedModel and calls its `serving_default` and `score` signatures on
Fashion-MNIST test images, handwritten digits and noise:

    python examples/export_and_serve.py --epochs 1 --export-dir /tmp/fashion

The model takes raw uint8 pixels (a `Rescaling` layer inside the model divides
by 255), so clients send integers. Serve the export with:

    docker run -p 8501:8501 -v /tmp/fashion:/models/fashion \\
        -e MODEL_NAME=fashion tensorflow/serving
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax.app import data
from keras_isomax.app.models import example_cnn_layers
from keras_isomax.calibration import calibrate_threshold
from keras_isomax.export import export_saved_model


def build_model():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), dtype="uint8", name="pixels"),
            keras.layers.Rescaling(1.0 / 255),  # Preprocessing inside the export.
            *example_cnn_layers(),  # The examples' small CNN.
            IsoMaxPlusLayer(num_classes=10, name="isomax"),  # replaces Dense(10) + softmax
        ]
    )


def to_uint8(images):
    return np.round(images * 255).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--export-dir", default=None, help="TF Serving model base path")
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    export_dir = args.export_dir or os.path.join(tempfile.mkdtemp(), "fashion")

    keras.utils.set_random_seed(0)
    x_train, y_train = data.load_fashion_mnist("train")
    x_test, y_test = data.load_fashion_mnist("test")
    x_train, y_train = to_uint8(x_train[: args.train_size]), y_train[: args.train_size]
    x_val, x_test, y_test = to_uint8(x_test[:5000]), to_uint8(x_test[5000:]), y_test[5000:]

    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=IsoMaxPlusLoss())
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, verbose=2)

    # 1. Calibrate: accept 95% of held-out in-distribution images.
    threshold = calibrate_threshold(model, x_val, tpr=0.95)
    print(f"calibrated threshold on the minimum distance score: {threshold:.4f}")

    # 2. Export: EXPORT_DIR/<version>/ is what tensorflow_model_server loads.
    path = export_saved_model(model, export_dir, version=args.version, overwrite=True)
    print(f"exported SavedModel: {path}")

    # 3. Serve in-process: only TensorFlow and the SavedModel from here on.
    loaded = tf.saved_model.load(path)
    digits, _ = data.load_dataset("digits", image_shape=(28, 28, 1))
    noise, _ = data.load_dataset("gaussian_noise", image_shape=(28, 28, 1))
    batches = {
        "fashion_mnist (in)": x_test,
        "digits (ood)": to_uint8(digits),
        "gaussian_noise (ood)": to_uint8(noise),
    }

    default = loaded.signatures["serving_default"](inputs=tf.constant(x_test[:5]))
    print("\nserving_default on 5 test images:")
    print("  class_id     ", default["class_id"].numpy(), " labels", y_test[:5])
    print(
        "  probabilities",
        default["probabilities"].numpy().shape,
        "logits",
        default["logits"].numpy().shape,
    )

    print("\nscore signature (is_ood = not score >= threshold):")
    print(f"  {'inputs':<22}{'n':>6}{'mean score':>12}{'flagged OOD':>13}")
    for name, images in batches.items():
        out = loaded.signatures["score"](inputs=tf.constant(images))
        flagged = out["is_ood"].numpy().mean()
        print(f"  {name:<22}{len(images):>6}{out['score'].numpy().mean():>12.3f}{flagged:>12.1%}")

    accuracy = np.mean(
        loaded.signatures["score"](inputs=tf.constant(x_test))["class_id"].numpy() == y_test
    )
    logits = model.predict(x_test, verbose=0)
    served = loaded.signatures["serving_default"](inputs=tf.constant(x_test))["logits"].numpy()
    print(f"\ntest accuracy (served class_id): {accuracy:.4f}")
    print(f"max |served logits - Keras logits|: {np.abs(served - logits).max():.2e}")
    print(
        f"\nServe it:\n  docker run -p 8501:8501 -v {export_dir}:/models/fashion "
        "-e MODEL_NAME=fashion tensorflow/serving"
    )


if __name__ == "__main__":
    main()
