"""Training job for tests/test_distribute.py, one process per call.

Trains the same small IsoMax+ model on the same data under one of:

- `--mode single`: no strategy (the default one-device strategy);
- `--mode mirrored --devices N`: `MirroredStrategy` over N logical CPUs;
- `--mode multiworker`: `MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`.

Writes `result_<mode>_<task>.npz` (per-epoch logs, final weights, `evaluate`
results and `predict` outputs under the strategy) and
`model_<mode>_<task>.keras` to `--out`, and appends one JSON line per epoch
event to `events_<task>.jsonl` (flushed at once, so it survives SIGKILL).

Test-only knobs: `--canary` (first fit a plain Dense + softmax model with
Keras' own code, before keras_isomax is imported, and record in
`canary_<task>.json` whether keras-team/keras#20585 still breaks it),
`--backup-dir` (`keras.callbacks.BackupAndRestore` in a per-worker directory),
`--pause-at-epoch K` (after two batches of epoch K, worker `--pause-task`
writes `paused_<task>` and sleeps, to be killed by the test),
`--shard-probe` (record in `shards_<task>.json` which examples each worker
reads under AUTO, DATA and OFF sharding).

The model, data and training settings are fixed here so that every mode sees
identical inputs; `train()` is also imported by the tests for the single-device
reference.
"""

import argparse
import json
import os
import sys
import time

NUM_EXAMPLES = 256
NUM_FEATURES = 8
NUM_CLASSES = 3
GLOBAL_BATCH = 32  # 8 steps per epoch; divisible by every replica count used.
EPOCHS = 4
SEED = 1234


def make_data():
    """Three Gaussian blobs; float32 features (N, F), int64 labels (N,)."""
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=2.0, size=(NUM_CLASSES, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, size=NUM_EXAMPLES)
    x = centers[y] + rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES))
    return x.astype("float32"), y.astype("int64")


def make_dataset(x, y, shard_policy=None):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    if shard_policy is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = shard_policy
        ds = ds.with_options(options)
    return ds


def build_model(plain_keras=False, jit_compile="auto"):
    """Dense backbone + IsoMax+ head (or Dense + softmax with `plain_keras`)."""
    import keras

    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((NUM_FEATURES,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    if plain_keras:
        outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(h)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
        return model
    from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, OODScore

    outputs = IsoMaxPlusLayer(NUM_CLASSES)(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=IsoMaxPlusLoss(),
        metrics=[OODScore()],
        jit_compile=jit_compile,
    )
    return model


class EpochLog:
    """Keras callback factory: appends epoch events to a JSON-lines file."""

    @staticmethod
    def make(path, pause_at_epoch=None, pause_marker=None):
        import keras

        class _EpochLog(keras.callbacks.Callback):
            def _write(self, **record):
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

            def on_train_begin(self, logs=None):
                self._write(event="train_begin", pid=os.getpid())
                self._epoch = None

            def on_epoch_begin(self, epoch, logs=None):
                self._epoch = epoch
                self._write(event="epoch_begin", epoch=epoch)

            def on_train_batch_end(self, batch, logs=None):
                if self._epoch == pause_at_epoch and batch == 1:
                    with open(pause_marker, "w") as f:
                        f.write(str(os.getpid()))
                    time.sleep(600)  # Killed here by the test.

            def on_epoch_end(self, epoch, logs=None):
                self._write(
                    event="epoch_end",
                    epoch=epoch,
                    logs={k: float(v) for k, v in (logs or {}).items()},
                )

            def on_train_end(self, logs=None):
                self._write(event="train_end")

        return _EpochLog()


def train(strategy=None, epochs=EPOCHS, callbacks=(), plain_keras=False, jit_compile="auto"):
    """Builds, compiles and fits the model in `strategy.scope()`.

    Returns:
        (model, history.history)
    """
    import contextlib

    x, y = make_data()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = build_model(plain_keras=plain_keras, jit_compile=jit_compile)
    history = model.fit(
        make_dataset(x, y), epochs=epochs, callbacks=list(callbacks), shuffle=False, verbose=0
    )
    return model, history.history


def canary(strategy, out, task):
    """Fits a plain Keras model with Keras' own code; records what happens."""
    if "keras_isomax" in sys.modules:
        raise RuntimeError("The canary must run before keras_isomax is imported.")
    try:
        train(strategy, epochs=1, plain_keras=True)
        record = {"failed": False}
    except Exception as e:  # noqa: BLE001  (any failure is the finding)
        record = {"failed": True, "type": type(e).__name__, "message": str(e)[:2000]}
    with open(os.path.join(out, f"canary_{task}.json"), "w") as f:
        json.dump(record, f)


def shard_probe(strategy, out, task):
    """Records the example ids this worker reads under each shard policy."""
    import numpy as np
    import tensorflow as tf

    ids = np.arange(NUM_EXAMPLES, dtype="int64")
    x = np.stack([ids] * NUM_FEATURES, axis=1).astype("float32")
    seen = {}
    for name in ("AUTO", "DATA", "OFF"):
        policy = getattr(tf.data.experimental.AutoShardPolicy, name)
        dist = strategy.experimental_distribute_dataset(make_dataset(x, ids, shard_policy=policy))
        got = []
        for _, batch_ids in dist:
            for v in strategy.experimental_local_results(batch_ids):
                got.extend(int(i) for i in v.numpy())
        seen[name] = got
    with open(os.path.join(out, f"shards_{task}.json"), "w") as f:
        json.dump(seen, f)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "mirrored", "multiworker"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--canary", action="store_true")
    parser.add_argument("--backup-dir")
    parser.add_argument("--pause-at-epoch", type=int)
    parser.add_argument("--pause-task", type=int, default=1)
    parser.add_argument("--shard-probe", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    import tensorflow as tf

    task = 0
    if args.mode == "mirrored":
        from keras_isomax.distribute import configure_logical_cpus

        devices = configure_logical_cpus(args.devices)
        strategy = tf.distribute.MirroredStrategy(devices)
    elif args.mode == "multiworker":
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = None
    if args.canary:
        canary(strategy, args.out, task)

    import keras

    import keras_isomax  # noqa: F401
    from keras_isomax.distribute import enable_multi_worker_fit

    enable_multi_worker_fit()  # A no-op if `import keras_isomax` applied it.

    if args.shard_probe:
        shard_probe(strategy, args.out, task)

    callbacks = [
        EpochLog.make(
            os.path.join(args.out, f"events_{task}.jsonl"),
            pause_at_epoch=(args.pause_at_epoch if task == args.pause_task else None),
            pause_marker=os.path.join(args.out, f"paused_{task}"),
        )
    ]
    if args.backup_dir:
        from keras_isomax.distribute import worker_backup_dir

        backup_dir = worker_backup_dir(args.backup_dir)
        callbacks.insert(0, keras.callbacks.BackupAndRestore(backup_dir))
    model, history = train(strategy, args.epochs, callbacks=callbacks)
    # evaluate and predict under the same strategy (all workers take part).
    x, y = make_data()
    evaluation = model.evaluate(make_dataset(x, y), return_dict=True, verbose=0)
    predictions = model.predict(x, batch_size=GLOBAL_BATCH, verbose=0)
    model.save(os.path.join(args.out, f"model_{args.mode}_{task}.keras"))
    arrays = {f"history_{k}": np.asarray(v) for k, v in history.items()}
    arrays.update({f"evaluate_{k}": np.asarray(v) for k, v in evaluation.items()})
    arrays["predictions"] = predictions
    arrays.update({f"weight_{i}": w for i, w in enumerate(model.get_weights())})
    np.savez(os.path.join(args.out, f"result_{args.mode}_{task}.npz"), **arrays)


if __name__ == "__main__":
    main()
