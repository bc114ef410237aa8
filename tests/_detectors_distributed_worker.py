"""Detector fitting job for tests/test_detectors_distributed.py, one process per call.

Fits KNN, KNN with a bank subset, Mahalanobis, ClassMeans and ViM (all rows for
alpha, and a 100-row alpha sample) on the same model and data under one of:

- `--mode single`: no strategy;
- `--mode mirrored --devices N`: inside `MirroredStrategy(N logical CPUs).scope()`;
- `--mode multiworker`: with `strategy=MultiWorkerMirroredStrategy()` (cluster from
  `TF_CONFIG`).

Writes `fit_<mode>_<task>.npz`: every detector's variables (`<name>/<variable>`),
the model's weights, and the features of all rows computed on one device (so the
test can build float64 references). `--bad nan` puts a NaN row into worker 1's
share (the fit must fail on every worker, none may hang).
"""

import argparse
import json
import os
import sys

NUM_EXAMPLES = 250  # The last global batch (26 rows) splits unevenly.
NUM_FEATURES = 8
WIDTH = 16
NUM_CLASSES = 3
GLOBAL_BATCH = 32
SEED = 7


def make_data():
    import numpy as np

    rng = np.random.default_rng(3)
    centers = rng.normal(scale=2.0, size=(NUM_CLASSES, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, size=NUM_EXAMPLES)
    x = centers[y] + rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES))
    return x.astype("float32"), y.astype("int64")


def build_model():
    import keras

    from keras_isomax import IsoMaxPlusLayer

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((NUM_FEATURES,))
    h = keras.layers.Dense(WIDTH, activation="tanh", name="features")(inputs)
    return keras.Model(inputs, IsoMaxPlusLayer(NUM_CLASSES, name="isomax")(h))


def make_detectors():
    from keras_isomax import detectors

    return {
        "knn": detectors.KNN(k=5, chunk_size=64),
        "knn_subset": detectors.KNN(k=5, max_bank=120, seed=4),
        "mahalanobis": detectors.Mahalanobis(),
        "class_means": detectors.ClassMeans(),
        "vim": detectors.ViM(4),
        "vim_sample": detectors.ViM(4, alpha_samples=100, seed=2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "mirrored", "multiworker"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--bad", choices=["nan"])
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    import tensorflow as tf

    task = 0
    if args.mode == "mirrored":
        from keras_isomax.distribute import configure_logical_cpus

        strategy = tf.distribute.MirroredStrategy(configure_logical_cpus(args.devices))
    elif args.mode == "multiworker":
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = None

    import keras

    x, y = make_data()
    if args.bad == "nan":
        x = x.copy()
        x[-3] = np.nan  # In the last batch: worker 1's share under data sharding.
    model = build_model()
    features = keras.Model(model.inputs, model.get_layer("features").output).predict(x, verbose=0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    arrays = {"features": features, "labels": y}
    arrays.update({f"model/{i}": w for i, w in enumerate(model.get_weights())})
    errors = {}
    for name, det in make_detectors().items():
        try:
            if args.mode == "mirrored":
                with strategy.scope():
                    det.fit(model, data, verbose=0)
            elif args.mode == "multiworker":
                det.fit(model, data, verbose=0, strategy=strategy)
            else:
                det.fit(model, data, verbose=0)
        except Exception as error:  # noqa: BLE001  (recorded for the test)
            errors[name] = f"{type(error).__name__}: {error}"
            continue
        for variable in det.weights:
            arrays[f"{name}/{variable.path.split('/')[-1]}"] = variable.numpy()
    np.savez(os.path.join(args.out, f"fit_{args.mode}_{task}.npz"), **arrays)
    with open(os.path.join(args.out, f"errors_{args.mode}_{task}.json"), "w") as f:
        json.dump(errors, f)


if __name__ == "__main__":
    main()
