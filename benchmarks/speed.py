"""Speed and memory of the IsoMax+ head against a Dense + softmax head.

Everything is measured side by side in one run, as ratios IsoMax+ / Dense on
the same backbone, batch and device:

1. Whole training step (forward, backward, SGD update) and inference + OOD
   score (IsoMax+: logits -> minimum distance score; Dense: logits -> maximum
   softmax probability) on a CNN backbone, for (C, F) in
   {(10, 128), (100, 512), (1000, 2048), (10000, 2048)}.
2. The head alone (features in), B=256 by default for the issue's configs,
   with an ablation ladder of reference points (Dense with the IsoMax+ loss,
   the bare matrix product) beside the library's `IsoMaxPlusLayer`.
3. Peak memory of a training step per configuration and head (each in its own
   subprocess; see `head_memory.py` for the method and the B=256, C=10,000,
   F=2,048 large-head check).
4. The scoring cost of a post-hoc detector on the same features: pytorch-ood's
   Mahalanobis detector, when installed.

Only the library's public layer is timed (helpers in `_common.py`).

Noise control for a shared machine: all functions are compiled `tf.function`s
(`--jit` adds XLA), warmed up, then measured interleaved (each repetition runs
every head once, in a rotating order), many times; tables give medians and the
median of the per-repetition ratios (paired, so slow phases of the machine
cancel) with its interquartile range. Load averages are printed.

    python benchmarks/speed.py --quick               # about 2 minutes
    python benchmarks/speed.py --markdown out.md     # the full run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# On a GPU, TensorFlow would otherwise reserve all its memory in this process,
# leaving none to the measurement subprocesses.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def _posthoc_worker(argv):
    """Times pytorch-ood's Mahalanobis scoring (run without TensorFlow loaded)."""
    import numpy as np
    from _common import interleaved

    try:
        import pytorch_ood
        import torch
        from pytorch_ood.detector import Mahalanobis
    except ImportError as error:
        return {"error": f"pytorch-ood is not installed ({error}); `pip install pytorch-ood`"}
    parser = argparse.ArgumentParser()
    parser.add_argument("--posthoc-worker", action="store_true")
    parser.add_argument("--configs", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--reps", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count())
    results = {"version": pytorch_ood.__version__, "torch": torch.__version__, "configs": {}}
    rng = np.random.default_rng(3)
    max_classes = 20  # pytorch-ood loops over the classes in Python; time a subset.
    for config in args.configs.split(","):
        num_classes, feature_dim = (int(v) for v in config.split("x"))
        z = torch.from_numpy(rng.normal(size=(args.batch_size, feature_dim)).astype("float32"))
        measured = min(num_classes, max_classes)
        # Fitting needs a training set's features; the scoring cost depends only
        # on the shapes, so the fitted statistics are set directly.
        a = rng.normal(size=(feature_dim, feature_dim)) / np.sqrt(feature_dim)
        precision = torch.from_numpy((a @ a.T + np.eye(feature_dim)).astype("float32"))
        mu = torch.from_numpy(rng.normal(size=(num_classes, feature_dim)).astype("float32"))
        detector = Mahalanobis(None)
        detector.mu = mu[:measured].clone()
        detector.precision = precision
        mu_sq = (mu @ precision * mu).sum(1)

        def efficient(z=z, mu=mu, precision=precision, mu_sq=mu_sq):
            # The same scores with one (B,F)x(F,F) and one (B,F)x(F,C) product.
            zp = z @ precision
            squared = (zp * z).sum(1, keepdim=True) - 2.0 * zp @ mu.T + mu_sq
            return -(-0.5 * squared).max(dim=1).values

        with torch.no_grad():
            check = detector.predict_features(z)
            reference = efficient(mu=mu[:measured], mu_sq=mu_sq[:measured])
            times = interleaved(
                {
                    "pytorch_ood": functools.partial(detector.predict_features, z),
                    "efficient": efficient,
                },
                max(3, args.reps // 3),
                min_seconds=0.02,
                sync_fn=lambda out: None,  # torch on the CPU returns finished tensors.
            )
        per_class = float(np.median(times["pytorch_ood"][args.clock])) / measured
        results["configs"][config] = {
            "pytorch_ood_ms": per_class * num_classes * 1e3,
            "pytorch_ood_measured_classes": measured,
            "efficient_ms": float(np.median(times["efficient"][args.clock])) * 1e3,
            "efficient_vs_pytorch_ood_rel_diff": float(
                (check - reference).abs().max() / reference.abs().max()
            ),
        }
    return results


if __name__ == "__main__" and "--posthoc-worker" in sys.argv:
    print("RESULT " + json.dumps(_posthoc_worker(sys.argv[1:])), flush=True)
    sys.exit(0)

try:
    import keras_isomax  # noqa: F401
except ImportError:  # Running from a source checkout without installing.
    sys.path.insert(0, str(_HERE.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import (  # noqa: E402
    HEAD_NAMES,
    PeakMemory,
    head_step_fn,
    infer_fn,
    interleaved,
    library_fingerprint,
    load_average,
    machine,
    make_head,
    reference_distances,
    run_worker,
    set_threads,
    summarize,
    sync,
    train_fn,
)

from keras_isomax import IsoMaxPlusLayer  # noqa: E402

CONFIGS = ((10, 128), (100, 512), (1000, 2048), (10000, 2048))
MODEL_HEADS = ("dense", "isomax")
# The head-alone ablation: reference points (Dense with the IsoMax+ loss; the
# bare matrix product in each orientation) beside the library's layer.
LADDER = ("dense", "dense_isoloss", "mm_only", "mm_rev", "isomax")


# ------------------------------------------------------------- backbones


def _conv_bn(x, filters, kernel=3, strides=1, relu=True):
    x = keras.layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if relu else x


def build_backbone(name, feature_dim, image_size=32):
    """A CNN from images `(image_size, image_size, 3)` to features `(F,)`.

    - `"resnet20"`: the CIFAR ResNet-20 (He et al. 2016: 3 stages of 3 basic
      blocks, 16/32/64 channels) widened to F channels by a final 1x1
      convolution + BN + ReLU (as ResNet-50's last expansion), then global
      average pooling. 0.27M parameters + 64*F.
    - `"small"`: three stride-2 3x3 convolutions (16, 32, 64 channels), the
      same 1x1 widening and pooling. For `--quick`.
    - `"resnet50"`: `keras.applications.ResNet50(weights=None)` without top
      (2048 channels; a 1x1 convolution maps them to F when F differs).
    """
    inputs = keras.Input((image_size, image_size, 3))
    if name == "resnet50":
        base = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(image_size, image_size, 3)
        )
        x = base(inputs)
        channels = 2048
    elif name == "resnet20":
        x = _conv_bn(inputs, 16)
        for stage, width in enumerate((16, 32, 64)):
            for block in range(3):
                strides = 2 if stage > 0 and block == 0 else 1
                shortcut = x
                if strides != 1 or x.shape[-1] != width:
                    shortcut = _conv_bn(x, width, 1, strides, relu=False)
                y = _conv_bn(x, width, 3, strides)
                y = _conv_bn(y, width, 3, 1, relu=False)
                x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
        channels = 64
    elif name == "small":
        x = inputs
        for width in (16, 32, 64):
            x = _conv_bn(x, width, 3, 2)
        channels = 64
    else:
        raise ValueError(
            f"`backbone` must be 'resnet20', 'small' or 'resnet50'. Received: backbone={name!r}"
        )
    if channels != feature_dim:
        x = _conv_bn(x, feature_dim, 1, 1)
    features = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, features, name=f"{name}_f{feature_dim}")


def build_models(backbone, num_classes, feature_dim, heads, image_size):
    """One model per head, all with the same backbone weights."""
    keras.utils.set_random_seed(0)
    reference = build_backbone(backbone, feature_dim, image_size)
    weights = reference.get_weights()
    models = {}
    for kind in heads:
        body = build_backbone(backbone, feature_dim, image_size)
        body.set_weights(weights)
        layer, loss_fn, score_fn = make_head(kind, num_classes)
        model = keras.Model(body.input, layer(body.output))
        models[kind] = (model, loss_fn, score_fn)
    return models


# ---------------------------------------------------------------- timing


def _gpu_available():
    return bool(tf.config.list_physical_devices("GPU"))


def check_nearest_precision(rng, num_classes=1000, feature_dim=512, n=400):
    """Relative error of the layer's distance to the nearest prototype (float32
    vs the float64 reference), features at distances 1e-4 .. 1 from a prototype.

    Returns:
        `{band: max relative error}` for the bands [1e-4, 0.05) and [0.05, 1.5).
    """
    layer = IsoMaxPlusLayer(num_classes)
    layer.build((None, feature_dim))
    p = layer.prototypes.numpy()
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    radii = 10 ** rng.uniform(-4, 0, size=n)
    direction = rng.normal(size=(n, feature_dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = (pn[rng.integers(0, num_classes, size=n)] + radii[:, None] * direction).astype("float32")
    expected = reference_distances(x, p).min(axis=1)
    got = -np.asarray(layer(x), np.float64).max(axis=1)  # scale 1, temperature 1
    rel = np.abs(got - expected) / expected
    bands = {"[1e-4, 0.05)": (1e-4, 0.05), "[0.05, 1.5)": (0.05, 1.5)}
    return {
        k: float(rel[(expected >= lo) & (expected < hi)].max()) for k, (lo, hi) in bands.items()
    }


# -------------------------------------------------------------- sections


def whole_step_section(args, log, jit):
    results = {}
    for num_classes, feature_dim in args.configs:
        log(f"whole step C={num_classes} F={feature_dim} jit={jit} (load {load_average()})")
        models = build_models(args.backbone, num_classes, feature_dim, MODEL_HEADS, args.image_size)
        rng = np.random.default_rng(1)
        x = tf.constant(
            rng.uniform(size=(args.batch_size, args.image_size, args.image_size, 3)), tf.float32
        )
        y = tf.constant(rng.integers(0, num_classes, size=args.batch_size), tf.int32)
        train = {
            k: functools.partial(train_fn(m, loss, jit), x, y) for k, (m, loss, _) in models.items()
        }
        infer = {k: functools.partial(infer_fn(m, s, jit), x) for k, (m, _, s) in models.items()}
        load = load_average()
        results[(num_classes, feature_dim)] = {
            "train": summarize(interleaved(train, args.reps), args.clock),
            "infer": summarize(interleaved(infer, args.reps), args.clock),
            "load": f"{load} / {load_average()}",
        }
        keras.utils.clear_session()
    return results


def head_section(args, log, heads, jit):
    results = {}
    for num_classes, feature_dim in args.configs:
        log(f"head alone C={num_classes} F={feature_dim} jit={jit} (load {load_average()})")
        rng = np.random.default_rng(2)
        x = tf.constant(rng.normal(size=(args.batch_size, feature_dim)), tf.float32)
        y = tf.constant(rng.integers(0, num_classes, size=args.batch_size), tf.int32)
        keras.utils.set_random_seed(0)
        train, infer = {}, {}
        for kind in heads:
            step, _ = head_step_fn(kind, num_classes, feature_dim, train=True, jit=jit)
            train[kind] = functools.partial(step, x, y)
            fwd, _ = head_step_fn(kind, num_classes, feature_dim, train=False, jit=jit)
            infer[kind] = functools.partial(fwd, x, y)
        reps = args.reps if num_classes * feature_dim < 10**7 else max(3, (args.reps + 1) // 2)
        load = load_average()
        results[(num_classes, feature_dim)] = {
            "train": summarize(interleaved(train, reps), args.clock),
            "infer": summarize(interleaved(infer, reps), args.clock),
            "load": f"{load} / {load_average()}",
        }
        keras.utils.clear_session()
    return results


def memory_section(args, log):
    results = {}
    for num_classes, feature_dim in args.configs:
        for kind in MODEL_HEADS:
            log(f"memory C={num_classes} F={feature_dim} {kind} (load {load_average()})")
            results[(num_classes, feature_dim, kind)] = run_worker(
                Path(__file__),
                [
                    "--head",
                    kind,
                    "--classes",
                    num_classes,
                    "--features",
                    feature_dim,
                    "--batch-size",
                    args.batch_size,
                    "--backbone",
                    args.backbone,
                    "--image-size",
                    args.image_size,
                    "--threads",
                    args.threads,
                ],
            )
    return results


def _memory_worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--head", required=True)
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    gpu = _gpu_available()
    model, loss_fn, score_fn = build_models(
        args.backbone, args.classes, args.features, [args.head], args.image_size
    )[args.head]
    rng = np.random.default_rng(1)
    x = tf.constant(
        rng.uniform(size=(args.batch_size, args.image_size, args.image_size, 3)), tf.float32
    )
    y = tf.constant(rng.integers(0, args.classes, size=args.batch_size), tf.int32)
    # Without XLA: XLA on the CPU preallocates differently, and the question
    # here is what the tensors of the step need.
    train = train_fn(model, loss_fn, False)
    infer = infer_fn(model, score_fn, False)
    out = {"params": int(model.count_params()), "layers_sha1": library_fingerprint()[0]}
    for name, fn in (("train", lambda: train(x, y)), ("infer", lambda: infer(x))):
        sync(fn())
        sync(fn())
        with PeakMemory(gpu) as mem:
            sync(fn())
        out[name + "_peak_bytes"] = mem.peak_bytes
        out["method"] = mem.method
    return out


def posthoc_section(args, log):
    """Scoring cost of pytorch-ood's Mahalanobis detector, in a subprocess.

    torch is imported in a process of its own: importing it into a process
    that already runs TensorFlow crashed here (segfault in libc).
    """
    log(f"posthoc (load {load_average()})")
    configs = ",".join(f"{c}x{f}" for c, f in args.configs)
    result = run_worker(
        Path(__file__),
        [
            "--configs",
            configs,
            "--batch-size",
            args.batch_size,
            "--reps",
            args.reps,
            "--threads",
            args.threads,
            "--clock",
            args.clock,
        ],
        flag="--posthoc-worker",
    )
    if "configs" in result:
        result["configs"] = {
            tuple(int(v) for v in key.split("x")): value for key, value in result["configs"].items()
        }
    return result


# ---------------------------------------------------------------- output


def _fmt_ratio(s):
    return f"{s['ratio']:.2f} [{s['ratio_q25']:.2f}, {s['ratio_q75']:.2f}] ({s['wall_ratio']:.2f})"


def format_ratio_table(results, heads, kind, clock):
    unit = "CPU ms" if clock == "cpu" else "ms"
    cells = []
    for h in heads:
        cells.append(f"{HEAD_NAMES[h]} {unit}")
        if h != "dense":
            cells.append("ratio")
    lines = ["| C | F | " + " | ".join(cells) + " | load before / after |"]
    lines.append("|" + " ---: |" * (len(cells) + 3))
    for (num_classes, feature_dim), r in results.items():
        s = r[kind]
        row = []
        for h in heads:
            row.append(f"{s[h]['median_ms']:.1f}")
            if h != "dense":
                row.append(_fmt_ratio(s[h]))
        lines.append(
            f"| {num_classes:,} | {feature_dim:,} | " + " | ".join(row) + f" | {r['load']} |"
        )
    return "\n".join(lines)


def format_memory(results, args):
    lines = [
        "| C | F | head | params | train-step peak | ratio | inference peak | ratio |"
        " B*C*4 | C*F*4 |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    method = None
    mib = 1024**2
    for (num_classes, feature_dim, kind), r in results.items():
        if "error" in r:
            lines.append(f"| {num_classes} | {feature_dim} | {kind} | failed: {r['error']} |")
            continue
        method = r.get("method", method)
        base = results.get((num_classes, feature_dim, "dense"), {})

        def ratio(key, r=r, base=base):
            if not base.get(key) or r.get(key) is None:
                return "n/a"
            return f"{r[key] / base[key]:.2f}"

        def size(value):
            return "n/a" if value is None else f"{value / mib:,.1f} MiB"

        lines.append(
            f"| {num_classes:,} | {feature_dim:,} | {HEAD_NAMES[kind]} | {r['params']:,} | "
            f"{size(r['train_peak_bytes'])} | {ratio('train_peak_bytes')} | "
            f"{size(r['infer_peak_bytes'])} | {ratio('infer_peak_bytes')} | "
            f"{args.batch_size * num_classes * 4 / mib:,.2f} MiB | "
            f"{num_classes * feature_dim * 4 / mib:,.1f} MiB |"
        )
    if method:
        shas = sorted({r["layers_sha1"] for r in results.values() if "layers_sha1" in r})
        lines += [
            "",
            f"Measured as: {method}, during one step after two warm-up steps, each case in "
            "its own process (see benchmarks/head_memory.py), without XLA; layers.py sha1 "
            f"{', '.join(shas)}.",
        ]
    return "\n".join(lines)


def format_posthoc(results, head_results, clock):
    if "error" in results:
        return f"Not measured: {results['error']}."
    unit = "CPU ms" if clock == "cpu" else "ms"
    lines = [
        f"pytorch-ood {results['version']} (torch {results['torch']}): "
        "`Mahalanobis.predict_features` on one batch of features (it loops over the "
        "classes in Python: timed on at most 20 classes and scaled to C, the loop being "
        "linear in C), and the same scores computed with two matrix products "
        "(`efficient`, ours), beside the IsoMax+ and Dense heads' own inference + score "
        "(head alone, table above). The Mahalanobis cost comes on top of the "
        "classifier's forward pass; the IsoMax+ score is the max of logits the head "
        "already computes.",
        "",
        f"| C | F | IsoMax+ head + MDS {unit} | Dense head + MSP {unit} | "
        f"Mahalanobis, pytorch-ood {unit} | Mahalanobis, two matmuls {unit} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (num_classes, feature_dim), r in results["configs"].items():
        head = head_results.get((num_classes, feature_dim), {}).get("infer", {})
        iso = head.get("isomax", {}).get("median_ms")
        dense = head.get("dense", {}).get("median_ms")
        scaled = r["pytorch_ood_measured_classes"] < num_classes
        note = f" (x{num_classes // r['pytorch_ood_measured_classes']})" if scaled else ""
        lines.append(
            f"| {num_classes:,} | {feature_dim:,} | "
            f"{'n/a' if iso is None else f'{iso:.2f}'} | "
            f"{'n/a' if dense is None else f'{dense:.2f}'} | "
            f"{r['pytorch_ood_ms']:,.1f}{note} | {r['efficient_ms']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="About 2 minutes: small backbone, 3 configurations, few repetitions, "
        "whole-step and head-alone sections only.",
    )
    parser.add_argument("--configs", default=None, help="Comma list of CxF, e.g. 10x128,1000x2048.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default=None, choices=("resnet20", "small", "resnet50"))
    parser.add_argument("--reps", type=int, default=None, help="Interleaved repetitions.")
    parser.add_argument(
        "--jit",
        default="auto",
        choices=("auto", "on", "off", "both"),
        help="XLA for both heads: 'auto' does what Keras' model.fit does (XLA on a GPU, "
        "not on a CPU-only machine); 'both' measures both, Keras' choice first. "
        "Default: auto.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="TensorFlow intra/inter-op threads; 0 = TensorFlow's default. Default: 1 on a "
        "CPU-only machine (CPU time is then a clean measure of work on a shared machine), "
        "0 with a GPU.",
    )
    parser.add_argument(
        "--clock",
        default=None,
        choices=("cpu", "wall"),
        help="Time reported in the tables; the other clock's ratio is shown in parentheses. "
        "Default: 'cpu' (process CPU time) on a CPU-only machine, 'wall' with a GPU.",
    )
    parser.add_argument(
        "--sections",
        default=None,
        help="Comma list of: step,head,ablation,memory,posthoc. Default: all "
        "(--quick: step,head). The B=256, C=10,000 memory check is "
        "benchmarks/head_memory.py.",
    )
    parser.add_argument("--machine", default=None, help="Machine description for the report.")
    parser.add_argument("--markdown", help="Also write the report to this Markdown file.")
    parser.add_argument("--json", help="Write the raw results to this JSON file.")
    args = parser.parse_args(argv)
    if args.configs:
        try:
            args.configs = [
                tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")
            ]
        except ValueError:
            parser.error(f"--configs must look like 10x128,1000x2048; got {args.configs!r}")
    elif args.quick:
        args.configs = [(10, 128), (100, 512), (1000, 2048)]
    else:
        args.configs = list(CONFIGS)
    gpu = _gpu_available()
    if args.quick:
        args.backbone = args.backbone or "small"
        args.reps = args.reps or 5
        args.sections = args.sections or "step,head"
    args.backbone = args.backbone or "resnet20"
    args.reps = args.reps or 15
    args.sections = (args.sections or "step,head,ablation,memory,posthoc").split(",")
    if args.threads is None:
        args.threads = 0 if gpu else 1
    args.clock = args.clock or ("wall" if gpu else "cpu")
    args.jit_modes = {
        "auto": [gpu],
        "on": [True],
        "off": [False],
        "both": [gpu, not gpu],  # What Keras' model.fit does here first.
    }[args.jit]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        print("RESULT " + json.dumps(_memory_worker(argv)), flush=True)
        return
    args = parse_args(argv)
    set_threads(args.threads)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    fingerprint, commit = library_fingerprint()
    clock_name = "process CPU time (all threads)" if args.clock == "cpu" else "wall-clock time"
    other = "wall-clock" if args.clock == "cpu" else "CPU-time"
    header = [
        "# keras-isomax speed and memory benchmark",
        "",
        f"- Command: `python benchmarks/speed.py {' '.join(argv)}`",
        f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {args.machine or machine()}; {platform.machine()}; TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}",
        f"- Backbone: {args.backbone} on {args.image_size}x{args.image_size}x3 images; batch "
        f"{args.batch_size}; {args.reps} interleaved repetitions; TensorFlow threads: "
        f"{args.threads or 'default'}; optimizer SGD (Nesterov momentum 0.9)",
        f"- Times: {clock_name}, median over repetitions",
        f"- Library: keras_isomax/layers.py sha1 {fingerprint}"
        + (f" (last commit touching keras_isomax: {commit})" if commit else ""),
        f"- Load average (1/5/15 min) at start: {load_average()}",
        "",
        "Ratio columns: IsoMax+ / Dense, the median of the per-repetition ratios "
        f"[interquartile range] ({other} ratio). Dense + softmax is the baseline "
        "(`Dense(C)` logits, sparse softmax cross-entropy; score: max softmax probability).",
    ]
    raw = {"args": {k: v for k, v in vars(args).items()}, "layers_sha1": fingerprint}
    report = ["\n".join(header)]

    def emit(*lines):
        """Prints a finished section at once (and rewrites the output files), so
        that a run stopped by a time limit keeps what it measured."""
        block = "\n".join(lines)
        report.append(block)
        print(block + "\n", flush=True)
        if args.markdown:
            Path(args.markdown).write_text("\n\n".join(report) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(raw, indent=2, default=str))

    print(report[0] + "\n", flush=True)
    head_results = {}
    precision = check_nearest_precision(np.random.default_rng(0))
    raw["nearest_precision"] = precision
    emit(
        "Exactness check of the layer timed here: relative error of the distance to the "
        "nearest prototype (float32 vs float64; C=1,000, F=512, 400 features at distances "
        "1e-4 .. 1 from a prototype), max per band: "
        + ", ".join(f"{k} {v:.1e}" for k, v in precision.items())
        + "."
    )
    for jit in args.jit_modes:
        tag = "XLA" if jit else "no XLA"
        if "step" in args.sections:
            r = whole_step_section(args, log, jit)
            raw[f"step_{tag}"] = {f"{c}x{f}": v for (c, f), v in r.items()}
            emit(
                f"## Whole training step on the backbone ({tag})",
                "",
                "Forward, backward and SGD update of backbone + head.",
                "",
                format_ratio_table(r, MODEL_HEADS, "train", args.clock),
            )
            emit(
                f"## Inference + OOD score on the backbone ({tag})",
                "",
                "Dense: max softmax probability; IsoMax+: minimum distance score (max logit).",
                "",
                format_ratio_table(r, MODEL_HEADS, "infer", args.clock),
            )
        if "head" in args.sections or "ablation" in args.sections:
            heads = LADDER if "ablation" in args.sections else MODEL_HEADS
            r = head_section(args, log, heads, jit)
            if not jit or not head_results:
                head_results = r
            raw[f"head_{tag}"] = {f"{c}x{f}": v for (c, f), v in r.items()}
            emit(
                f"## The head alone, features in: training step ({tag})",
                "",
                "Loss, gradients for the head's weights and for the features, SGD update.",
                "",
                format_ratio_table(r, heads, "train", args.clock),
            )
            emit(
                f"## The head alone: inference + score ({tag})",
                "",
                format_ratio_table(r, heads, "infer", args.clock),
            )
    if "memory" in args.sections:
        r = memory_section(args, log)
        seen = {v.get("layers_sha1") for v in r.values() if "layers_sha1" in v}
        if seen - {fingerprint}:
            warnings.warn(
                f"layers.py changed during the run: the memory workers saw {sorted(seen)}, "
                f"the timing sections {fingerprint}",
                stacklevel=1,
            )
        raw["memory"] = {f"{c}x{f}:{k}": v for (c, f, k), v in r.items()}
        emit("## Peak memory of a step on the backbone", "", format_memory(r, args))
    if "posthoc" in args.sections:
        r = posthoc_section(args, log)
        raw["posthoc"] = {
            **{k: v for k, v in r.items() if k != "configs"},
            "configs": {f"{c}x{f}": v for (c, f), v in r.get("configs", {}).items()},
        }
        emit("## Post-hoc detector scoring cost", "", format_posthoc(r, head_results, args.clock))
    emit(f"Load average at end: {load_average()}; total time {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
