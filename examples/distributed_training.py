"""Train an IsoMax+ classifier on one device, on N devices, or on N machines.

The model code is the same in every case: build and compile it inside
`strategy.scope()`, then call `model.fit`. Only the strategy changes.

    # One device (the default strategy).
    python examples/distributed_training.py

    # MirroredStrategy over N local devices: N GPUs when there are that many,
    # else N logical CPU devices (to try it out on a laptop).
    python examples/distributed_training.py --devices 2

    # MultiWorkerMirroredStrategy: run this on every machine, each with its own
    # TF_CONFIG (same "cluster", its own "task" index; worker 0 is the chief).
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/distributed_training.py --backup-dir /shared/backup

    # The same two-worker job on this machine (starts the workers for you).
    python examples/distributed_training.py --local-workers 2

`--batch-size` is the global batch: each of the R replicas gets 1/R of it.
With `--backup-dir`, `keras.callbacks.BackupAndRestore` saves the training
state after every epoch; restart the whole job after a failure and it resumes
from the last completed epoch.

Data: Fashion-MNIST (offline from Debian's `dataset-fashion-mnist`, else
downloaded by TensorFlow Datasets); Gaussian noise images serve as OOD inputs.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1, help="local replicas (MirroredStrategy)")
    p.add_argument(
        "--local-workers",
        type=int,
        default=0,
        help="start this many MultiWorkerMirroredStrategy workers on localhost",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--train-size", type=int, default=None, help="use the first N examples")
    p.add_argument("--backup-dir", default=None, help="BackupAndRestore directory")
    p.add_argument("--output", default="isomax_distributed.keras", help="saved model path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_strategy(num_devices):
    """The strategy for this process; call before any TensorFlow op runs."""
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        # One process per worker; the cluster comes from TF_CONFIG.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if num_devices > 1:
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) >= num_devices:
            devices = [f"/gpu:{i}" for i in range(num_devices)]
        else:
            from keras_isomax.distribute import configure_logical_cpus

            devices = configure_logical_cpus(num_devices)
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()  # The default: one device.


def build_model(num_classes, input_shape):
    import keras

    from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, OODScore

    model = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            IsoMaxPlusLayer(num_classes),  # Instead of Dense(num_classes) + softmax.
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=IsoMaxPlusLoss(),  # Instead of sparse categorical cross-entropy.
        metrics=[OODScore()],  # Mean minimum distance score, across all replicas.
    )
    return model


def make_dataset(x, y, batch_size, seed, shuffle):
    """A tf.data pipeline with AUTO->DATA sharding made explicit.

    Every worker builds the same pipeline; under MultiWorkerMirroredStrategy
    DATA sharding gives each worker its own part of every global batch. Never
    set `AutoShardPolicy.OFF` here: every worker would then read all the data
    and each epoch would train on every example once per worker.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # drop_remainder keeps the shapes static (XLA, TPUs) and the split even.
    ds = ds.batch(batch_size, drop_remainder=shuffle).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def train(args):
    strategy = make_strategy(args.devices)  # Before any other TensorFlow use.
    import keras
    import numpy as np

    import keras_isomax
    from keras_isomax import distribute as kd
    from keras_isomax import scores
    from keras_isomax.app import data

    # `import keras_isomax` applies the fix for keras-team/keras#20585 (Keras
    # 3.5-3.15: `fit` fails under MultiWorkerMirroredStrategy); calling it again
    # is a no-op, and on unaffected Keras versions it does nothing.
    kd.enable_multi_worker_fit()
    task = kd.task_info()
    chief = task["is_chief"]
    keras.utils.set_random_seed(args.seed)

    x, y = data.load_dataset("fashion_mnist", split="train", n=args.train_size, seed=args.seed)
    x_test, y_test = data.load_dataset("fashion_mnist", split="test", n=2000, seed=args.seed)
    x_ood, _ = data.load_dataset("gaussian_noise", n=2000, image_shape=x.shape[1:])
    if chief:
        print(
            f"keras_isomax {keras_isomax.__version__}, {type(strategy).__name__}: "
            f"{strategy.num_replicas_in_sync} replica(s), worker "
            f"{task['task_index']} of {task['num_workers']}; global batch "
            f"{args.batch_size} = {strategy.num_replicas_in_sync} x "
            f"{args.batch_size // strategy.num_replicas_in_sync}",
            flush=True,
        )

    with strategy.scope():
        model = build_model(num_classes=int(y.max()) + 1, input_shape=x.shape[1:])

    callbacks = []
    if args.backup_dir:
        # One sub-directory per worker: Keras 3 writes the backup from every
        # worker, and a shared HDF5 file cannot be written by two at once.
        callbacks.append(keras.callbacks.BackupAndRestore(kd.worker_backup_dir(args.backup_dir)))
    model.fit(
        make_dataset(x, y, args.batch_size, args.seed, shuffle=True),
        epochs=args.epochs,
        callbacks=callbacks,
        shuffle=False,  # The tf.data pipeline shuffles.
        verbose=2 if chief else 0,
    )

    # As in TensorFlow's multi-worker tutorial, every worker saves; only the
    # chief's file is kept.
    path = args.output if chief else os.path.join(tempfile.mkdtemp(), "model.keras")
    model.save(path)

    if chief:
        # The saved file loads like any other model, with no strategy (the
        # trained model itself would run `predict` on all workers together).
        trained = keras.saving.load_model(path)
        logits = trained.predict(x_test, batch_size=args.batch_size, verbose=0)
        accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
        s_in = np.asarray(scores.minimum_distance_score(logits))
        s_out = np.asarray(
            scores.minimum_distance_score(
                trained.predict(x_ood, batch_size=args.batch_size, verbose=0)
            )
        )
        # TNR at TPR 95%: share of OOD inputs below the 5th percentile of ID scores.
        tnr = float(np.mean(s_out < np.percentile(s_in, 5)))
        print(
            f"test accuracy {accuracy:.4f}; mean minimum distance score: "
            f"Fashion-MNIST {s_in.mean():.3f}, Gaussian noise {s_out.mean():.3f}; "
            f"TNR@TPR95 (noise) {tnr:.3f}; saved {path}",
            flush=True,
        )


def launch_local_workers(args, argv):
    """Starts `args.local_workers` copies of this script with TF_CONFIG set."""
    socks = [socket.socket() for _ in range(args.local_workers)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    child_argv = []
    skip = False
    for a in argv:  # Drop --local-workers N / --local-workers=N.
        if skip:
            skip = False
        elif a == "--local-workers":
            skip = True
        elif not a.startswith("--local-workers="):
            child_argv.append(a)
    procs = []
    try:
        for i in range(args.local_workers):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}}
            )
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            out = None if i == 0 else subprocess.DEVNULL  # The chief prints.
            procs.append(
                subprocess.Popen([sys.executable, __file__, *child_argv], env=env, stdout=out)
            )
        return max(p.wait() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_workers:
        sys.exit(launch_local_workers(args, argv))
    train(args)


if __name__ == "__main__":
    main()
