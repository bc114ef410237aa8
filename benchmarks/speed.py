"""Speed of the IsoMax+ head against a Dense + softmax head, as ratios measured side by side.

Two tables, each measured with TensorFlow's oneDNN kernels on and off (one
worker process per setting: `TF_ENABLE_ONEDNN_OPTS=1` / `=0`; each records the
setting TensorFlow reports), without and with XLA:

1. `head`: the head alone, features in, batch 256, (C, F) in (1,000, 2,048),
   (10,000, 2,048), (100,000, 512). Training step as `fit` runs it (the head
   called with `training=True`; loss, gradients for the head's weights and for
   the features, SGD update) and inference as `predict` runs it
   (`training=False`) + OOD score. Results: `benchmarks/results/speed_head.json`.
2. `step`: the whole training step and inference + score on a ResNet-20
   backbone, batch 64, (C, F) in (10, 128), (100, 512), (1,000, 2,048),
   (10,000, 2,048). Results: `benchmarks/results/speed_resnet20.json`.

Baselines: `Dense(C)` logits + `SparseCategoricalCrossentropy(from_logits=True)`
(what `fit` runs for a Dense + softmax classifier), score = maximum softmax
probability; IsoMax+: `IsoMaxPlusLayer(C)` + `IsoMaxPlusLoss`, score = minimum
distance (the largest logit). Only the library's public layer is timed
(helpers in `_common.py`).

Noise control for a shared machine: one TensorFlow thread and process CPU time
(on a CPU-only machine), compiled `tf.function`s, warmed up, then repetitions
that run every head once in a rotating order (`_common.interleaved`); the JSON
files keep every repetition's time for both heads, so that the paired ratios
(IsoMax+ / Dense per repetition) can be recomputed. Load averages are recorded.
`benchmarks/_render_speed.py` renders the tables from the JSON files.

    python benchmarks/speed.py                  # both tables, oneDNN on and off, XLA off and on
    python benchmarks/speed.py --quick          # smoke test, about 2 minutes, writes nothing

Optional sections: `ablation` (reference heads beside the two, in the head
table), `memory` (peak memory of a backbone step, `speed_memory.json`),
`posthoc` (pytorch-ood's Mahalanobis scoring cost, `speed_posthoc.json`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# On a GPU, TensorFlow would otherwise reserve all its memory in this process,
# leaving none to the measurement subprocesses.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

HEAD_CONFIGS = ((1000, 2048), (10000, 2048), (100000, 512))
STEP_CONFIGS = ((10, 128), (100, 512), (1000, 2048), (10000, 2048))
MODEL_HEADS = ("dense", "isomax")
# The head-alone ablation: reference points (Dense with the IsoMax+ loss; the
# bare matrix product in each orientation) beside the library's layer.
LADDER = ("dense", "dense_isoloss", "mm_only", "mm_rev", "isomax")
ONEDNN_ENV = {"on": "1", "off": "0"}


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

from _common import HEAD_NAMES, load_average, run_worker  # noqa: E402
from _results import add_output_arguments, machine_info, write_result  # noqa: E402

# ------------------------------------------------------ timing worker (TensorFlow)


def _conv_bn(x, filters, kernel=3, strides=1, relu=True):
    import keras

    x = keras.layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if relu else x


def build_backbone(name: str, feature_dim: int, image_size: int = 32) -> Any:
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
    import keras

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


def build_models(
    backbone: str, num_classes: int, feature_dim: int, heads: tuple[str, ...], image_size: int
) -> dict[str, tuple[Any, Any, Any]]:
    """One `(model, loss, score_fn)` per head, all with the same backbone weights."""
    import keras
    from _common import make_head

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


def check_nearest_precision(rng: Any, num_classes: int = 1000, feature_dim: int = 512) -> dict:
    """Relative error of the timed layer's distance to the nearest prototype
    (float32, `training=False` as `predict` calls it, vs the float64 reference),
    400 features at distances 1e-4 .. 1 from a prototype.

    Returns:
        `{band: max relative error}` for the bands [1e-4, 0.05) and [0.05, 1.5).
    """
    import numpy as np
    from _common import reference_distances

    from keras_isomax import IsoMaxPlusLayer

    n = 400
    layer = IsoMaxPlusLayer(num_classes)
    layer.build((None, feature_dim))
    p = layer.prototypes.numpy()
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    radii = 10 ** rng.uniform(-4, 0, size=n)
    direction = rng.normal(size=(n, feature_dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = (pn[rng.integers(0, num_classes, size=n)] + radii[:, None] * direction).astype("float32")
    expected = reference_distances(x, p).min(axis=1)
    bands = {"[1e-4, 0.05)": (1e-4, 0.05), "[0.05, 1.5)": (0.05, 1.5)}
    out = {}
    for training in (True, False):
        got = -np.asarray(layer(x, training=training), np.float64).max(axis=1)  # |s| = T = 1
        rel = np.abs(got - expected) / expected
        out["train" if training else "infer"] = {
            k: float(rel[(expected >= lo) & (expected < hi)].max()) for k, (lo, hi) in bands.items()
        }
    return out


def _measure(fns: dict, reps: int) -> dict:
    """`interleaved` times (per repetition) with the load average around them."""
    from _common import interleaved

    before = load_average()
    times = interleaved(fns, reps)
    return {"times": times, "load": [before, load_average()]}


def _head_section(args, log, jit):
    import keras
    import numpy as np
    import tensorflow as tf
    from _common import head_step_fn

    heads = LADDER if args.ablation else MODEL_HEADS
    entries = []
    for num_classes, feature_dim in args.head_configs:
        log(f"head alone C={num_classes} F={feature_dim} XLA={jit} (load {load_average()})")
        rng = np.random.default_rng(2)
        x = tf.constant(rng.normal(size=(args.head_batch_size, feature_dim)), tf.float32)
        y = tf.constant(rng.integers(0, num_classes, size=args.head_batch_size), tf.int32)
        keras.utils.set_random_seed(0)
        fns = {"train": {}, "infer": {}}
        for kind in heads:
            for mode in fns:
                step, _ = head_step_fn(kind, num_classes, feature_dim, mode=mode, jit=jit)
                fns[mode][kind] = functools.partial(step, x, y)
        # The largest heads take seconds per step: fewer repetitions there.
        reps = args.reps if num_classes * feature_dim <= 3 * 10**7 else max(3, (args.reps + 1) // 2)
        for phase in ("train", "infer"):
            entries.append(
                {
                    "classes": num_classes,
                    "features": feature_dim,
                    "batch_size": args.head_batch_size,
                    "xla": jit,
                    "phase": phase,
                    **_measure(fns[phase], reps),
                }
            )
        keras.utils.clear_session()
    return entries


def _step_section(args, log, jit):
    import keras
    import numpy as np
    import tensorflow as tf
    from _common import infer_fn, train_fn

    entries = []
    for num_classes, feature_dim in args.step_configs:
        log(f"{args.backbone} C={num_classes} F={feature_dim} XLA={jit} (load {load_average()})")
        models = build_models(args.backbone, num_classes, feature_dim, MODEL_HEADS, args.image_size)
        rng = np.random.default_rng(1)
        shape = (args.step_batch_size, args.image_size, args.image_size, 3)
        x = tf.constant(rng.uniform(size=shape), tf.float32)
        y = tf.constant(rng.integers(0, num_classes, size=args.step_batch_size), tf.int32)
        fns = {
            "train": {
                k: functools.partial(train_fn(m, loss, jit), x, y)
                for k, (m, loss, _) in models.items()
            },
            "infer": {
                k: functools.partial(infer_fn(m, s, jit), x) for k, (m, _, s) in models.items()
            },
        }
        for phase in ("train", "infer"):
            entries.append(
                {
                    "classes": num_classes,
                    "features": feature_dim,
                    "batch_size": args.step_batch_size,
                    "xla": jit,
                    "phase": phase,
                    **_measure(fns[phase], args.step_reps),
                }
            )
        keras.utils.clear_session()
    return entries


def _timing_worker(argv):
    """Runs the timing sections in this process (TensorFlow imported here)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--timing-worker", action="store_true")
    parser.add_argument("--config-json", required=True)
    args = argparse.Namespace(**json.loads(parser.parse_args(argv).config_json))
    args.head_configs = [tuple(c) for c in args.head_configs]
    args.step_configs = [tuple(c) for c in args.step_configs]
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    import numpy as np
    import tensorflow as tf
    from _common import library_fingerprint, machine, set_threads
    from _results import onednn_setting

    set_threads(args.threads)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    # "auto": what Keras' fit does, XLA on a GPU and not on a CPU.
    args.jit_modes = [gpu if mode == "auto" else mode for mode in args.jit_modes]
    out = {
        "onednn": onednn_setting(),
        "machine": machine_info(),
        "device": machine(),
        "gpu": gpu,
        "layers_sha1": library_fingerprint()[0],
        "load_start": load_average(),
        "nearest_precision": check_nearest_precision(np.random.default_rng(0)),
        "head": [],
        "step": [],
    }
    log(f"oneDNN {out['onednn']}; {out['device']}")
    for jit in args.jit_modes:
        if "head" in args.sections:
            out["head"] += _head_section(args, log, jit)
        if "step" in args.sections:
            out["step"] += _step_section(args, log, jit)
    out["load_end"] = load_average()
    out["seconds"] = time.time() - started
    return out


# ------------------------------------------------------ memory worker (TensorFlow)


def _memory_worker(argv):
    import numpy as np
    import tensorflow as tf
    from _common import PeakMemory, infer_fn, library_fingerprint, set_threads, sync, train_fn

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
    gpu = bool(tf.config.list_physical_devices("GPU"))
    model, loss_fn, score_fn = build_models(
        args.backbone, args.classes, args.features, (args.head,), args.image_size
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


# ------------------------------------------------------------- orchestration


def _memory_section(args, log):
    results = {}
    for num_classes, feature_dim in args.step_configs:
        for kind in MODEL_HEADS:
            log(f"memory C={num_classes} F={feature_dim} {kind} (load {load_average()})")
            results[f"{num_classes}x{feature_dim}:{kind}"] = run_worker(
                Path(__file__),
                [
                    *("--head", kind, "--classes", num_classes, "--features", feature_dim),
                    *("--batch-size", args.step_batch_size, "--backbone", args.backbone),
                    *("--image-size", args.image_size, "--threads", args.threads),
                ],
            )
    return results


def _posthoc_section(args, log):
    """Scoring cost of pytorch-ood's Mahalanobis detector, in a subprocess.

    torch is imported in a process of its own: importing it into a process
    that already runs TensorFlow crashed here (segfault in libc).
    """
    log(f"posthoc (load {load_average()})")
    return run_worker(
        Path(__file__),
        [
            *("--configs", ",".join(f"{c}x{f}" for c, f in args.head_configs)),
            *("--batch-size", args.head_batch_size, "--reps", args.reps),
            *("--threads", args.threads, "--clock", "cpu"),
        ],
        flag="--posthoc-worker",
        memory=False,
    )


def _parse_configs(parser, text):
    try:
        return [tuple(int(v) for v in c.lower().split("x")) for c in text.split(",")]
    except ValueError:
        parser.error(f"--configs must look like 10x128,1000x2048. Received: {text!r}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections",
        default="head,step",
        help="Comma list of: head, step (alias resnet20), ablation (adds reference heads to the "
        "head table), memory, posthoc. Default: head,step.",
    )
    parser.add_argument(
        "--configs", default=None, help="CxF list for every section, e.g. 10x128,1000x2048."
    )
    parser.add_argument(
        "--head-configs",
        default=",".join(f"{c}x{f}" for c, f in HEAD_CONFIGS),
        help="CxF list of the head table. Default: %(default)s.",
    )
    parser.add_argument(
        "--step-configs",
        default=",".join(f"{c}x{f}" for c, f in STEP_CONFIGS),
        help="CxF list of the backbone table. Default: %(default)s.",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="For every section.")
    parser.add_argument("--head-batch-size", type=int, default=256)
    parser.add_argument("--step-batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet20", choices=("resnet20", "small", "resnet50"))
    parser.add_argument(
        "--reps", type=int, default=None, help="Interleaved repetitions (head). Default: 9."
    )
    parser.add_argument(
        "--step-reps",
        type=int,
        default=None,
        help="Interleaved repetitions (backbone). Default: --reps if given, else 5.",
    )
    parser.add_argument(
        "--jit",
        default="both",
        choices=("both", "off", "on", "auto"),
        help="XLA for both heads: 'both' measures without, then with XLA; 'auto' does what "
        "Keras' fit does (XLA on a GPU, not on a CPU). Default: both.",
    )
    parser.add_argument(
        "--onednn",
        default="both",
        choices=("both", "on", "off", "inherit"),
        help="TensorFlow's oneDNN kernels in the measuring processes: 'both' runs one worker "
        "with TF_ENABLE_ONEDNN_OPTS=1 and one with =0; 'inherit' keeps this environment. "
        "Default: both.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="TensorFlow intra/inter-op threads; 0 = TensorFlow's default. Default: 1 (CPU time "
        "is then a clean measure of work on a shared machine).",
    )
    add_output_arguments(parser, "speed_head.json / speed_resnet20.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke test (about 2 minutes): C = 1,000 head, small backbone, 3 repetitions, "
        "this environment's oneDNN setting, no XLA, no result files.",
    )
    parser.add_argument("--machine", default=None, help="A description stored with the results.")
    parser.add_argument("--markdown", help="Also write the rendered tables to this file.")
    parser.add_argument("--json", help="Also write the raw results to this JSON file.")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    sections = {"step" if s == "resnet20" else s for s in sections}
    unknown = sections - {"head", "step", "ablation", "memory", "posthoc"}
    if unknown:
        parser.error(f"Unknown sections {sorted(unknown)}. Received: --sections={args.sections}")
    if "ablation" in sections:
        sections.add("head")
    args.ablation = "ablation" in sections
    args.sections = sorted(sections)
    args.head_configs = _parse_configs(parser, args.configs or args.head_configs)
    args.step_configs = _parse_configs(parser, args.configs or args.step_configs)
    if args.batch_size:
        args.head_batch_size = args.step_batch_size = args.batch_size
    args.step_reps = args.step_reps or args.reps or 5
    args.reps = args.reps or 9
    if args.quick:
        args.head_configs = args.head_configs if args.configs else [(1000, 2048)]
        args.step_configs = args.step_configs if args.configs else [(10, 128), (1000, 2048)]
        args.backbone = "small"
        args.reps = args.step_reps = 3
        args.onednn = "inherit" if args.onednn == "both" else args.onednn
        args.jit = "off" if args.jit == "both" else args.jit
        args.no_results = True
    return args


def _jit_modes(jit, gpu):
    return {"both": [False, True], "off": [False], "on": [True], "auto": [gpu]}[jit]


def _onednn_settings(choice):
    return {"both": ["on", "off"], "on": ["on"], "off": ["off"], "inherit": [None]}[choice]


def _run_timing(args, log):
    """One timing worker per oneDNN setting; returns their results."""
    runs = []
    for setting in _onednn_settings(args.onednn):
        env = {} if setting is None else {"TF_ENABLE_ONEDNN_OPTS": ONEDNN_ENV[setting]}
        config = {
            "sections": [s for s in args.sections if s in ("head", "step")],
            "ablation": args.ablation,
            "head_configs": args.head_configs,
            "step_configs": args.step_configs,
            "head_batch_size": args.head_batch_size,
            "step_batch_size": args.step_batch_size,
            "image_size": args.image_size,
            "backbone": args.backbone,
            "reps": args.reps,
            "step_reps": args.step_reps,
            "threads": args.threads,
            # The worker knows whether it has a GPU: "auto" is resolved there.
            "jit_modes": _jit_modes(args.jit, gpu=False) if args.jit != "auto" else ["auto"],
        }
        log(f"timing worker, oneDNN {setting or 'as inherited'} (load {load_average()})")
        result = run_worker(
            Path(__file__),
            ["--config-json", json.dumps(config)],
            flag="--timing-worker",
            env=env,
            timeout=4 * 3600,
            stream_stderr=True,
            memory=False,
        )
        result["onednn_requested"] = setting or "inherited"
        runs.append(result)
    return runs


def _write(args, name, payload, machine, log):
    if args.no_results:
        return None
    path = write_result(
        name, payload, machine=machine, path=Path(args.results_dir) / f"{name}.json"
    )
    log(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        print("RESULT " + json.dumps(_memory_worker(argv)), flush=True)
        return
    if "--timing-worker" in argv:
        print("RESULT " + json.dumps(_timing_worker(argv)), flush=True)
        return
    args = parse_args(argv)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    log(f"load average at start: {load_average()}")
    settings = {
        "threads": args.threads,
        "clock": "cpu" if args.threads else "wall",
        "head_batch_size": args.head_batch_size,
        "step_batch_size": args.step_batch_size,
        "reps": args.reps,
        "step_reps": args.step_reps,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "optimizer": "SGD(learning_rate=1e-3, momentum=0.9, nesterov=True)",
        "heads": {k: HEAD_NAMES[k] for k in (LADDER if args.ablation else MODEL_HEADS)},
        "description": args.machine,
    }
    raw = {"settings": settings}
    written = {}
    if "head" in args.sections or "step" in args.sections:
        runs = _run_timing(args, log)
        failed = [r for r in runs if "error" in r]
        for run in failed:
            log(f"worker failed (oneDNN {run['onednn_requested']}): {run['error']}")
        runs = [r for r in runs if "error" not in r]
        if runs:
            gpu = any(r.get("gpu") for r in runs)
            machine = {
                **runs[0]["machine"],
                "onednn": ", ".join(dict.fromkeys(r["onednn"] for r in runs)),
                "device": runs[0]["device"],
            }
            suffix = "_gpu" if gpu else ""
            for section, name in (("head", "speed_head"), ("step", f"speed_{args.backbone}")):
                if section not in args.sections:
                    continue
                payload = {
                    "section": section,
                    "settings": settings,
                    "runs": [
                        {
                            key: run[key]
                            for key in (
                                "onednn_requested",
                                "onednn",
                                "machine",
                                "device",
                                "layers_sha1",
                                "load_start",
                                "load_end",
                                "seconds",
                                "nearest_precision",
                            )
                        }
                        | {"results": run[section]}
                        for run in runs
                    ],
                }
                raw[name] = payload
                written[name + suffix] = _write(args, name + suffix, payload, machine, log)
    if "memory" in args.sections:
        raw["speed_memory"] = {"settings": settings, "results": _memory_section(args, log)}
        written["speed_memory"] = _write(
            args, "speed_memory", raw["speed_memory"], machine_info(), log
        )
    if "posthoc" in args.sections:
        raw["speed_posthoc"] = {"settings": settings, "results": _posthoc_section(args, log)}
        written["speed_posthoc"] = _write(
            args, "speed_posthoc", raw["speed_posthoc"], machine_info(), log
        )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
    report = _report(raw, written, args)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    log(f"load average at end: {load_average()}; total time {time.time() - started:.0f} s")


def _report(raw, written, args):
    """The tables of this run, rendered as `benchmarks/_render_speed.py` renders them."""
    import _render_speed

    blocks = []
    for name in ("speed_head", f"speed_{args.backbone}"):
        if name not in raw:
            continue
        record = {"command": "(this run)", "machine": {}, **raw[name]}
        blocks.append(_render_speed.render_ratio_table(record))
    if "speed_memory" in raw:
        blocks.append("Peak memory of a backbone step (bytes):\n\n```\n")
        blocks[-1] += json.dumps(raw["speed_memory"]["results"], indent=1) + "\n```"
    if "speed_posthoc" in raw:
        blocks.append(
            "Post-hoc scoring cost:\n\n```\n"
            + json.dumps(raw["speed_posthoc"]["results"], indent=1)
            + "\n```"
        )
    files = [str(p) for p in written.values() if p]
    if files:
        blocks.append("Written: " + ", ".join(files))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    main()
