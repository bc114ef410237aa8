"""Quickstart: train a small Fashion-MNIST classifier with IsoMax+ and evaluate OOD detection.

Runs offline (Fashion-MNIST from Debian's `dataset-fashion-mnist` package; handwritten
digits from scikit-learn and Gaussian noise as out-of-distribution data) in well under a
minute:

    python examples/quickstart.py --epochs 2
"""

import argparse

import keras

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, evaluate_ood
from keras_isomax.app import data
from keras_isomax.app.models import example_cnn_layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20000)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x_train, y_train = data.load_dataset("fashion_mnist", "train", n=args.train_size)
    x_test, y_test = data.load_dataset("fashion_mnist", "test")
    ood = {name: data.load_dataset(name)[0] for name in ("digits", "gaussian_noise")}

    # A small CNN (two conv + pooling blocks, Dense(128, relu) features).
    model = keras.Sequential([keras.Input((28, 28, 1)), *example_cnn_layers()])
    model.add(IsoMaxPlusLayer(num_classes=10))  # replaces Dense(10) + softmax
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=IsoMaxPlusLoss(), metrics=["accuracy"]
    )
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, validation_split=0.1)

    # Exact AUROC, AUPR, TNR at 95% TPR and detection accuracy of the minimum distance
    # score (in-distribution = positive class), plus the test accuracy.
    print(evaluate_ood(model, (x_test, y_test), ood, score=["minimum_distance", "entropic"]))


if __name__ == "__main__":
    main()
