"""Converged, paper-length OOD quality run on a GPU with Keras' JAX backend (no TensorFlow).

The device machine has JAX with CUDA but no TensorFlow and no network, so this
script uses only Keras on JAX, NumPy batching and the library's public API
(`import keras_isomax` loads no TensorFlow on JAX). It runs the rows of
`benchmarks/ood_quality.py` (same code: `run_task`) with a larger model and a
longer training:

* ResNet-18 (stages of 2/2/2/2 basic blocks of 64-512 filters, 3x3 stem, no max
  pooling, BatchNorm, global average pooling, 512 features), `--depth 34` for
  ResNet-34;
* all 60,000 Fashion-MNIST training images, 30 epochs, batch 256, SGD lr 0.2
  (0.1 per 128 images), Nesterov 0.9, cosine decay, weight decay 5e-4, random
  crop (4-pixel zero padding) + horizontal flip drawn from the seed,
  mixed_bfloat16 backbone on a GPU (heads in float32);
* both heads, far task then near task, 1 seed by default; no validation split
  (all 60,000 images train), hence no calibration rows.

Data travel as the prepared `.npz` (`python benchmarks/ood_quality.py
--prepare-npz benchmarks/data/fmnist_ood.npz`, 36 MiB). A time budget guards
the device time: the near task is skipped when the far task's measured time
says it would not fit, and the JSON (`benchmarks/results/gpu_quality.json`) is
rewritten after every task, so a run stopped from outside keeps what finished.

    KERAS_BACKEND=jax python benchmarks/gpu_quality_jax.py --data benchmarks/data/fmnist_ood.npz
    # CPU smoke test of the same code (a few steps, a small ResNet):
    KERAS_BACKEND=jax python benchmarks/gpu_quality_jax.py --data D.npz --depth 8 --epochs 1 \\
        --train-size 512 --test-size 256 --ood-size 128 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

# The protocol: ood_quality.py's DEFAULTS with these changes.
GPU_CHANGES = {
    "seeds": 1,
    "depth": 18,
    "epochs": 30,
    "train_size": None,  # All 60,000 (no validation split).
    "val_size": 0,
    "batch_size": 256,
    "learning_rate": 0.2,  # 0.1 per 128 images (linear scaling).
    "weight_decay": 5e-4,
    "flip": True,
    "crop_padding": 4,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the .npz of ood_quality.py --prepare-npz")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--finetune-epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--ood-size", type=int)
    parser.add_argument("--tasks", help="comma-separated: far, near")
    parser.add_argument("--float32", action="store_true", help="no mixed precision")
    parser.add_argument("--output", help="result JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import _quality_models as qm
    import jax
    import keras
    import numpy as np
    import ood_quality as oq
    from _results import machine_info, write_result

    config = oq.override_config(
        {**oq.DEFAULTS, **GPU_CHANGES}, args, oq.PROTOCOL_OPTIONS + ("batch_size",)
    )
    platform = jax.devices()[0].platform
    # Models of the same structure (the probe and the far SoftMax model) compile once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(_HERE, "data", "jax_cache"))
    mixed = platform == "gpu" and not args.float32
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    trainer = functools.partial(qm.train, crop_padding=config["crop_padding"])

    data = oq.load_data(config, npz=args.data)
    log(
        f"JAX {jax.__version__} on {jax.devices()}; Keras {keras.__version__}; "
        f"train {len(data['far']['train'][0])} images"
    )
    device = f"{len(jax.devices())} x {getattr(jax.devices()[0], 'device_kind', platform)}"
    features = 64 if config["depth"] not in qm.IMAGENET_BLOCKS else qm.IMAGENET_WIDTHS[-1]
    protocol = {
        **config,
        "features": features,
        "train_images": len(data["far"]["train"][0]),
        "augmentation": f"random crop ({config['crop_padding']}-pixel padding) + horizontal flip",
        "precision": "mixed_bfloat16 backbone, float32 heads" if mixed else "float32",
        "finetune_lr": oq.FINETUNE_LR,
        "knn_k": oq.KNN_K,
        "class_means": "keras_isomax.detectors.ClassMeans"
        if hasattr(oq.det_lib, "ClassMeans")
        else "replace_head at 0 epochs (same score; no detectors.ClassMeans)",
        "far_sets": list(oq.FAR_SETS),
        "near_set": oq.NEAR_SET,
        "metrics": list(oq.METRICS),
        "budget_s": args.budget,
    }
    runs, skipped, task_seconds = [], [], {}

    def save():
        far = [r for r in runs if r["task"] == "far"]
        write_result(
            "gpu_quality",
            {
                "protocol": protocol,
                "wall_time_s": time.perf_counter() - start,
                "skipped": skipped,
                "task_seconds": task_seconds,
                "summary": {
                    "seeds": sorted({r["seed"] for r in far}),
                    "softmax_accuracy": [100 * r["training"]["softmax"]["accuracy"] for r in far],
                    "isomax_accuracy": [100 * r["training"]["isomax"]["accuracy"] for r in far],
                },
                "runs": runs,
            },
            machine={**machine_info(onednn="n/a (JAX)"), "device": device},
            path=args.output,
        )

    # Probe: the training step's time on this device, to plan before spending the budget.
    x_far, y_far = data["far"]["train"]
    steps = len(x_far) // config["batch_size"]
    probe = qm.build_model("softmax", 10, 0, depth=config["depth"])
    qm.compile_model(probe, "softmax", epochs=1, steps_per_epoch=steps)
    few = qm.batch_indices(len(x_far), 0, 1, config["batch_size"])[:40]
    warm = max(1, min(8, len(few) // 2))  # Compiles; then the timed steps.
    xs, ys = x_far[few[:warm].ravel()], y_far[few[:warm].ravel()]
    compile_start = time.perf_counter()
    probe.fit(xs, ys, batch_size=config["batch_size"], epochs=1, shuffle=False, verbose=0)
    compile_s = time.perf_counter() - compile_start
    xs, ys = x_far[few[warm:].ravel()], y_far[few[warm:].ravel()]
    probe_start = time.perf_counter()
    probe.fit(xs, ys, batch_size=config["batch_size"], epochs=1, shuffle=False, verbose=0)
    step_s = (time.perf_counter() - probe_start) / (len(few) - warm)
    del probe
    compile_s = max(0.0, compile_s - warm * step_s)
    # Both heads from scratch and the fine-tune, a quarter more for scoring, and about
    # six compilations (three trainings, three feature extractors).
    far_s = 1.25 * step_s * steps * (2 * config["epochs"] + config["finetune_epochs"])
    far_s += 6 * compile_s
    protocol["probe_step_s"] = step_s
    protocol["probe_compile_s"] = compile_s
    protocol["far_task_estimate_s"] = far_s
    log(
        f"probe: {1e3 * step_s:.1f} ms per step, {compile_s:.0f} s to compile; far task "
        f"estimated at {far_s:.0f} s"
    )
    if far_s > args.budget - (time.perf_counter() - start):
        skipped.append(
            f"everything (far task estimated at {far_s:.0f} s, budget {args.budget:.0f} s)"
        )
        log(
            "the far task does not fit the budget: nothing trained (use a smaller --depth or budget)"
        )
        save()
        return 1

    for seed in range(config["seeds"]):
        for task in config["tasks"]:
            images = len(data[task]["train"][0])
            if task_seconds:  # Estimate from the slowest finished task, per training image.
                per_image = max(s / n for s, n in task_seconds.values())
                needed = 1.15 * per_image * images
                left = args.budget - (time.perf_counter() - start)
                if needed > left:
                    skipped.append(f"seed {seed} {task} (needs ~{needed:.0f} s, {left:.0f} s left)")
                    log(f"skipping seed {seed} {task}: ~{needed:.0f} s needed, {left:.0f} s left")
                    continue
            task_start = time.perf_counter()
            runs.append(oq.run_task(task, data[task], seed, config, None, log, trainer=trainer))
            task_seconds[f"{seed} {task}"] = (time.perf_counter() - task_start, images)
            save()
    if not runs:
        save()
    log(f"done; wrote the result ({len(runs)} task runs, skipped {skipped or 'none'})")
    accuracy = [r["training"]["softmax"]["accuracy"] for r in runs if r["task"] == "far"]
    if accuracy:
        log(f"far-task SoftMax accuracy {100 * float(np.mean(accuracy)):.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
