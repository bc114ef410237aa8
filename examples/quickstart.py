"""Quickstart: train a small Fashion-MNIST classifier with IsoMax+ and score OOD inputs.

Runs offline (Fashion-MNIST from Debian's `dataset-fashion-mnist` package,
scikit-learn's digits as out-of-distribution data) in well under a minute:

    python examples/quickstart.py --epochs 2
"""

import argparse

import keras
import numpy as np

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, OODScore, scores
from keras_isomax.app import data
from keras_isomax.app.models import example_cnn_layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20000)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x_train, y_train = data.load_fashion_mnist("train")
    x_test, y_test = data.load_fashion_mnist("test")
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]

    # A small CNN (two conv + pooling blocks, Dense(128, relu) features).
    model = keras.Sequential([keras.Input((28, 28, 1)), *example_cnn_layers()])
    model.add(IsoMaxPlusLayer(num_classes=10))  # replaces Dense(10) + softmax
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=IsoMaxPlusLoss(),
        metrics=["accuracy", OODScore()],
    )
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, validation_split=0.1)

    _, accuracy, _ = model.evaluate(x_test, y_test, verbose=0)
    print(f"\nFashion-MNIST test accuracy: {accuracy:.4f}")

    in_scores = scores.minimum_distance_score(model.predict(x_test, verbose=0)).numpy()
    print("Minimum distance score (higher = more in-distribution), mean:")
    print(f"  {'fashion_mnist (in)':<22}{in_scores.mean():8.3f}")
    for name in ("digits", "gaussian_noise"):
        x_ood, _ = data.load_dataset(name, image_shape=(28, 28, 1))
        ood_scores = scores.minimum_distance_score(model.predict(x_ood, verbose=0)).numpy()
        # Probability that an in-distribution input outscores an OOD one (= AUROC).
        auroc = np.mean(in_scores[:, None] > ood_scores[None, :])
        print(f"  {name + ' (ood)':<22}{ood_scores.mean():8.3f}   AUROC {auroc:.3f}")


if __name__ == "__main__":
    main()
