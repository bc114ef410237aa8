"""Speed and memory of the IsoMax+ head against a Dense + softmax head.

Everything is measured side by side in one run, as ratios IsoMax+ / Dense on
the same backbone, batch and device:

1. Whole training step (forward, backward, SGD update) and inference + OOD
   score (IsoMax+: logits -> minimum distance score; Dense: logits -> maximum
   softmax probability) on a CNN backbone, for (C, F) in
   {(10, 128), (100, 512), (1000, 2048), (10000, 2048)}.
2. The head alone (features in), with an ablation ladder that says what each
   part of `IsoMaxPlusLayer` costs, and a prototype alternative implementation
   (`FusedIsoMaxPlusLayer`, below) measured beside it.
3. Peak memory of a training step per configuration and head (each in its own
   subprocess; see `head_memory.py` for the method).
4. The issue's large-head check: B=256, C=10,000, F=2,048 forward + backward,
   against the B*C*F*4 bytes (21 GB) of a naive implementation.
5. The scoring cost of a post-hoc detector on the same features: pytorch-ood's
   Mahalanobis detector, when installed.

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
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# On a GPU, TensorFlow would otherwise reserve all its memory in this process,
# leaving none to the measurement subprocesses.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def interleaved(fns, reps, warmup=2, min_seconds=0.05, sync=None):
    """Times callables side by side.

    Each callable is warmed up, then every repetition times each once, in an
    order rotated (and reversed every other repetition) between repetitions.
    Calls faster than `min_seconds` are repeated in a loop and averaged (the
    same count for all callables, so ratios compare like with like). Both the
    wall-clock time and the process's CPU time (all threads) are recorded.

    `sync(output)` waits for a call's results (default: `_sync`, TensorFlow's).

    Returns:
        `{name: {"wall": [...], "cpu": [...]}}`, seconds per call, one value
        per repetition.
    """
    sync = sync or _sync
    names = list(fns)
    first = {}
    for name in names:
        for _ in range(warmup):
            start = time.perf_counter()
            sync(fns[name]())
            first[name] = time.perf_counter() - start
    inner = max(1, math.ceil(min_seconds / max(min(first.values()), 1e-6)))
    times = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        if rep % 2:
            order = order[::-1]
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                out = fns[name]()
            sync(out)
            times[name]["cpu"].append((time.process_time() - cpu) / inner)
            times[name]["wall"].append((time.perf_counter() - wall) / inner)
    return times


def _posthoc_worker(argv):
    """Times pytorch-ood's Mahalanobis scoring (run without TensorFlow loaded)."""
    import numpy as np

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
                sync=lambda out: None,  # torch on the CPU returns finished tensors.
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
from keras import ops  # noqa: E402

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss, scores  # noqa: E402
from keras_isomax.layers import _safe_sqrt, l2_normalize, pairwise_distances  # noqa: E402

CONFIGS = ((10, 128), (100, 512), (1000, 2048), (10000, 2048))
MODEL_HEADS = ("dense", "isomax", "isomax_proto")
HEAD_NAMES = {
    "dense": "Dense + softmax",
    "dense_isoloss": "Dense + IsoMax+ loss",
    "mm_only": "x @ P^T (no normalisation)",
    "mm_rev": "(P @ x^T)^T (no normalisation)",
    "mm_norm": "normalised x @ P^T",
    "isomax_k0": "IsoMaxPlusLayer, exact_neighbors=0",
    "isomax": "IsoMaxPlusLayer (library, k=8)",
    "isomax_scatter": "library, one_hot -> scatter_update",
    "proto_k0": "prototype, k=0",
    "isomax_proto": "prototype (fused), k=8",
    "proto_st": "prototype, straight-through grad",
    "naive": "naive exact differences (B, C, F)",
}
LADDER = (
    "dense",
    "dense_isoloss",
    "mm_only",
    "mm_rev",
    "mm_norm",
    "isomax_k0",
    "isomax",
    "isomax_scatter",
    "proto_k0",
    "isomax_proto",
    "proto_st",
)
_EPS = 1e-12


# ------------------------------------------------- prototype implementation


@ops.custom_gradient
def squared_row_norms(p):
    """`sum(p**2, axis=-1)` of a (C, F) matrix without a (C, F) temporary.

    The forward pass is an `einsum` (TensorFlow runs it as a batched product,
    reading `p` once); the gradient is `2 p * upstream` (one (C, F) product,
    where autodiff through `einsum` builds two and adds them).
    """
    value = ops.einsum("cf,cf->c", p, p)

    def grad(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        return 2.0 * p * ops.expand_dims(upstream, -1)

    return value, grad


def fused_isomax_distances(features, prototypes, exact_neighbors=8, gradient="exact"):
    """IsoMax+ distances between normalised features and normalised prototypes.

    Same values and (up to float32 rounding) the same gradients as the
    library's `pairwise_distances(l2_normalize(x), l2_normalize(p), k)`, with
    fewer full passes over the (C, F) prototypes and no (B, k, C) tensor:

    - the prototypes are never normalised as a (C, F) tensor: the matrix
      product uses the raw prototypes and the (C,) inverse norms scale its
      (B, C) result (fewer (C, F) temporaries, forward and backward);
    - the product is computed as `(P @ x^T)^T`: TensorFlow's CPU kernel for
      `x @ P^T` (`transpose_b`, what `ops.matmul(x, ops.transpose(p))`
      becomes) is about 2x slower than `x @ W` at C=10,000, F=2,048;
    - the squared norms of the prototypes come from `squared_row_norms` (no
      (C, F) temporary in the forward pass);
    - the exact distances of the `exact_neighbors` nearest prototypes are
      written into the (B, C) result with one `scatter_update` of B*k values
      instead of a (B, k, C) one-hot product and sum.

    Args:
        features: Tensor `(..., F)`, not normalised.
        prototypes: Tensor `(C, F)`, not normalised.
        exact_neighbors: Number of nearest prototypes recomputed exactly.
            Defaults to `8`.
        gradient: `"exact"`: gradients flow through the exact recomputation,
            as in the library. `"straight_through"`: the exact values replace
            the expansion's in the forward pass only; gradients come from the
            expansion (cheaper, but imprecise near zero distance: measured in
            the report, rejected). Defaults to `"exact"`.

    Returns:
        Tensor `(..., C)` of distances.
    """
    num_classes, feature_dim = prototypes.shape
    lead_shape = ops.shape(features)[:-1]
    x = features if len(features.shape) == 2 else ops.reshape(features, (-1, feature_dim))
    x_sq = ops.sum(ops.square(x), axis=-1, keepdims=True)  # (N, 1)
    x_inv = ops.rsqrt(ops.maximum(x_sq, _EPS * _EPS))
    xn = x * x_inv  # (N, F)
    p_sq = squared_row_norms(ops.convert_to_tensor(prototypes))  # (C,)
    p_inv = ops.rsqrt(ops.maximum(p_sq, _EPS * _EPS))
    dots = ops.transpose(ops.matmul(prototypes, ops.transpose(xn)))  # (N, C)
    # ||xn||^2 + ||pn||^2 - 2 xn.pn, with ||xn||^2 = x_sq / max(x_sq, eps^2) (1 or 0).
    squared = ops.maximum(
        x_sq * ops.square(x_inv) + p_sq * ops.square(p_inv) - 2.0 * dots * p_inv, 0.0
    )
    k = min(int(exact_neighbors), num_classes)
    if k > 0:
        _, nearest = ops.top_k(-squared, k=k, sorted=False)  # (N, k)
        rows, row_inv, xk = prototypes, p_inv, xn
        if gradient == "straight_through":
            rows, row_inv, xk = (ops.stop_gradient(t) for t in (rows, row_inv, xk))
        rows = ops.take(rows, nearest, axis=0) * ops.expand_dims(
            ops.take(row_inv, nearest, axis=0), -1
        )  # (N, k, F), normalised
        exact = ops.sum(ops.square(ops.expand_dims(xk, 1) - rows), axis=-1)  # (N, k)
        row_ids = ops.broadcast_to(
            ops.expand_dims(ops.arange(ops.shape(x)[0], dtype=nearest.dtype), 1),
            ops.shape(nearest),
        )
        indices = ops.reshape(ops.stack([row_ids, nearest], axis=-1), (-1, 2))
        corrected = ops.scatter_update(squared, indices, ops.reshape(exact, (-1,)))
        if gradient == "straight_through":
            squared = squared + ops.stop_gradient(corrected - squared)
        else:
            squared = corrected
    distances = _safe_sqrt(squared)
    if len(features.shape) == 2:
        return distances
    return ops.reshape(distances, (*lead_shape, num_classes))


class FusedIsoMaxPlusLayer(IsoMaxPlusLayer):
    """`IsoMaxPlusLayer` computing its distances with `fused_isomax_distances`."""

    def __init__(self, num_classes, gradient="exact", **kwargs):
        super().__init__(num_classes, **kwargs)
        self.gradient = gradient

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        p = ops.cast(self.prototypes, self.compute_dtype)
        distances = fused_isomax_distances(x, p, self.exact_neighbors, self.gradient)
        scale = ops.abs(ops.cast(self.distance_scale, self.compute_dtype))
        return -(scale / ops.cast(self.temperature, self.compute_dtype)) * distances


class _LadderHead(keras.layers.Layer):
    """A (C, F) prototype matrix with a given logits function (for the ablation)."""

    def __init__(self, num_classes, logits_fn, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.logits_fn = logits_fn

    def build(self, input_shape):
        self.prototypes = self.add_weight(
            name="prototypes",
            shape=(self.num_classes, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
        )

    def call(self, x):
        return self.logits_fn(x, self.prototypes)


def _naive_logits(x, p):
    """The authors' formulation: exact differences through a (B, C, F) tensor."""
    diff = ops.expand_dims(l2_normalize(x), 1) - ops.expand_dims(l2_normalize(p), 0)
    return -_safe_sqrt(ops.sum(ops.square(diff), axis=-1))


def _scatter_library_logits(x, p, k=8):
    """The library's math with the one-hot scatter replaced by `scatter_update`."""
    xn, pn = l2_normalize(x), l2_normalize(p)
    cross = ops.matmul(xn, ops.transpose(pn))
    squared = ops.maximum(
        ops.sum(ops.square(xn), -1, keepdims=True) + ops.sum(ops.square(pn), -1) - 2.0 * cross,
        0.0,
    )
    k = min(k, p.shape[0])
    _, nearest = ops.top_k(-squared, k=k, sorted=False)
    exact = ops.sum(ops.square(ops.expand_dims(xn, 1) - ops.take(pn, nearest, axis=0)), -1)
    rows = ops.broadcast_to(
        ops.expand_dims(ops.arange(ops.shape(x)[0], dtype=nearest.dtype), 1), ops.shape(nearest)
    )
    indices = ops.reshape(ops.stack([rows, nearest], -1), (-1, 2))
    return -_safe_sqrt(ops.scatter_update(squared, indices, ops.reshape(exact, (-1,))))


def make_head(kind, num_classes):
    """Returns `(layer, loss_fn, score_fn)` for a head kind."""
    isomax_loss = IsoMaxPlusLoss()
    if kind in ("dense", "dense_isoloss"):
        loss = (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            if kind == "dense"
            else isomax_loss
        )
        return keras.layers.Dense(num_classes, name="head"), loss, scores.max_probability_score
    if kind == "isomax":
        layer = IsoMaxPlusLayer(num_classes, name="head")
    elif kind == "isomax_k0":
        layer = IsoMaxPlusLayer(num_classes, exact_neighbors=0, name="head")
    elif kind == "isomax_proto":
        layer = FusedIsoMaxPlusLayer(num_classes, name="head")
    elif kind == "proto_k0":
        layer = FusedIsoMaxPlusLayer(num_classes, exact_neighbors=0, name="head")
    elif kind == "proto_st":
        layer = FusedIsoMaxPlusLayer(num_classes, gradient="straight_through", name="head")
    else:
        fn = {
            "mm_only": lambda x, p: -ops.matmul(x, ops.transpose(p)),
            "mm_rev": lambda x, p: -ops.transpose(ops.matmul(p, ops.transpose(x))),
            "mm_norm": lambda x, p: -ops.matmul(l2_normalize(x), ops.transpose(l2_normalize(p))),
            "isomax_scatter": _scatter_library_logits,
            "naive": _naive_logits,
        }[kind]
        layer = _LadderHead(num_classes, fn, name="head")
    return layer, isomax_loss, scores.minimum_distance_score


def _optimizer():
    # The paper's optimizer (SGD, Nesterov momentum 0.9); a small learning rate
    # keeps the random-data benchmark numerically steady over many steps.
    return keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9, nesterov=True)


def _train_fn(model, loss_fn, jit):
    optimizer = _optimizer()
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def _infer_fn(model, score_fn, jit):
    @tf.function(jit_compile=jit)
    def infer(x):
        return score_fn(model(x, training=False))

    return infer


def head_step_fn(kind, num_classes, feature_dim, train=True, jit=False):
    """The head alone on features `x` `(B, F)`.

    Training: loss, gradients for the head's weights and for `x` (what the
    backbone's backward pass would receive), SGD update of the head. Inference:
    logits -> OOD score.

    Returns:
        `(fn, layer)`; `fn(x, y)` runs one step.
    """
    layer, loss_fn, score_fn = make_head(kind, num_classes)
    layer.build((None, feature_dim))
    if not train:

        @tf.function(jit_compile=jit)
        def infer(x, y):
            return score_fn(layer(x))

        return infer, layer
    optimizer = _optimizer()
    optimizer.build(layer.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(y, layer(x))
        grads = tape.gradient(loss, [x, *layer.trainable_variables])
        optimizer.apply(grads[1:], layer.trainable_variables)
        return loss, tf.reduce_sum(grads[0])

    return step, layer


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


def _sync(out):
    for t in tf.nest.flatten(out):
        np.asarray(t)
    if _gpu_available() and hasattr(tf.test.experimental, "sync_devices"):
        tf.test.experimental.sync_devices()


def summarize(times, clock, baseline="dense"):
    """Medians (ms) and paired ratios against `baseline`, for the `clock` given.

    The wall-clock ratio is always included as `wall_ratio`.
    """
    out = {}
    for name, clocks in times.items():
        values = np.asarray(clocks[clock])
        ratios = values / np.asarray(times[baseline][clock])
        wall_ratios = np.asarray(clocks["wall"]) / np.asarray(times[baseline]["wall"])
        out[name] = {
            "median_ms": float(np.median(values) * 1e3),
            "wall_median_ms": float(np.median(clocks["wall"]) * 1e3),
            "ratio": float(np.median(ratios)),
            "ratio_q25": float(np.percentile(ratios, 25)),
            "ratio_q75": float(np.percentile(ratios, 75)),
            "wall_ratio": float(np.median(wall_ratios)),
            "reps": len(values),
        }
    return out


def _max_abs_diff(a, b):
    a = np.asarray(tf.convert_to_tensor(a))
    return float(np.abs(a - np.asarray(tf.convert_to_tensor(b))).max())


def check_layers_agree(rng, num_classes=1000, feature_dim=256, batch=64):
    """Max |difference| of logits and gradients: prototype layer vs library layer.

    Same weights; features partly close to prototypes. Computed through the
    layers (Keras variables), as in training.
    """
    p = rng.normal(size=(num_classes, feature_dim)).astype("float32")
    pn = p[:16] / np.linalg.norm(p[:16], axis=1, keepdims=True)
    x = np.concatenate(
        [rng.normal(size=(batch, feature_dim)), pn + 1e-4 * rng.normal(size=pn.shape)]
    )
    x = tf.constant(x, tf.float32)
    weights = tf.constant(rng.normal(size=(len(x), num_classes)), tf.float32)
    results = []
    for cls in (IsoMaxPlusLayer, FusedIsoMaxPlusLayer):
        layer = cls(num_classes)
        layer.build((None, feature_dim))
        layer.prototypes.assign(p)
        layer.distance_scale.assign(1.7)
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = layer(x)
            objective = tf.reduce_sum(logits * weights)
        grads = tape.gradient(objective, [x, *layer.trainable_variables])
        results.append([logits, *grads])
    return {
        name: _max_abs_diff(a, b)
        for name, a, b in zip(("logits", "grad_x", "grad_p", "grad_s"), *results)
    }


def check_precision(rng, num_classes=50, feature_dim=256, n=400):
    """float32 logits and gradients of each implementation against float64.

    Features are placed at distances 1e-5 .. 1 from random prototypes (where the
    exact recomputation matters). The float64 reference is the naive
    exact-difference formula (a different code path from all of them).

    Returns:
        `{implementation: {quantity: (max, median) relative error}}`; the
        error of a gradient is measured per row (|g - g_ref| / |g_ref|), that
        of the logits per element.
    """
    p = rng.normal(size=(num_classes, feature_dim))
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    targets = rng.integers(0, num_classes, size=n)
    radii = 10 ** rng.uniform(-5, 0, size=n)
    direction = rng.normal(size=(n, feature_dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    x = pn[targets] + radii[:, None] * direction
    weights = rng.normal(size=(n, num_classes))

    def run(fn, dtype):
        xv, pv = tf.constant(x, dtype), tf.constant(p, dtype)
        with tf.GradientTape() as tape:
            tape.watch([xv, pv])
            logits = fn(xv, pv)
            objective = tf.reduce_sum(logits * tf.constant(weights, dtype))
        gx, gp = tape.gradient(objective, [xv, pv])
        return [np.asarray(tf.convert_to_tensor(t), np.float64) for t in (logits, gx, gp)]

    reference = run(_naive_logits, tf.float64)
    implementations = {
        "isomax": lambda a, b: -pairwise_distances(l2_normalize(a), l2_normalize(b)),
        "isomax_proto": lambda a, b: -fused_isomax_distances(a, b),
        "proto_st": lambda a, b: -fused_isomax_distances(a, b, gradient="straight_through"),
        "isomax_k0": lambda a, b: -pairwise_distances(l2_normalize(a), l2_normalize(b), 0),
    }
    results = {}
    for name, fn in implementations.items():
        got = run(fn, tf.float32)
        errors = {}
        for label, g, r in zip(("logits", "grad_x", "grad_p"), got, reference):
            if label == "logits":
                rel = np.abs(g - r) / np.maximum(np.abs(r), 1e-30)
            else:
                rel = np.linalg.norm(g - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)
            errors[label] = (float(rel.max()), float(np.median(rel)))
        results[name] = errors
    return results


# -------------------------------------------------------------- sections


def _load():
    try:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def whole_step_section(args, log, jit):
    results = {}
    for num_classes, feature_dim in args.configs:
        log(f"whole step C={num_classes} F={feature_dim} jit={jit} (load {_load()})")
        models = build_models(args.backbone, num_classes, feature_dim, MODEL_HEADS, args.image_size)
        rng = np.random.default_rng(1)
        x = tf.constant(
            rng.uniform(size=(args.batch_size, args.image_size, args.image_size, 3)), tf.float32
        )
        y = tf.constant(rng.integers(0, num_classes, size=args.batch_size), tf.int32)
        train = {
            k: functools.partial(_train_fn(m, loss, jit), x, y)
            for k, (m, loss, _) in models.items()
        }
        infer = {k: functools.partial(_infer_fn(m, s, jit), x) for k, (m, _, s) in models.items()}
        load = _load()
        results[(num_classes, feature_dim)] = {
            "train": summarize(interleaved(train, args.reps), args.clock),
            "infer": summarize(interleaved(infer, args.reps), args.clock),
            "load": f"{load} / {_load()}",
        }
        keras.utils.clear_session()
    return results


def head_section(args, log, heads, jit):
    results = {}
    for num_classes, feature_dim in args.configs:
        log(f"head alone C={num_classes} F={feature_dim} jit={jit} (load {_load()})")
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
        load = _load()
        results[(num_classes, feature_dim)] = {
            "train": summarize(interleaved(train, reps), args.clock),
            "infer": summarize(interleaved(infer, reps), args.clock),
            "load": f"{load} / {_load()}",
        }
        keras.utils.clear_session()
    return results


def memory_section(args, log):
    from head_memory import run_worker

    results = {}
    for num_classes, feature_dim in args.configs:
        for kind in MODEL_HEADS:
            log(f"memory C={num_classes} F={feature_dim} {kind} (load {_load()})")
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
    from head_memory import PeakMemory

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
    _set_threads(args.threads)
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
    train = _train_fn(model, loss_fn, False)
    infer = _infer_fn(model, score_fn, False)
    out = {"params": int(model.count_params())}
    for name, fn in (("train", lambda: train(x, y)), ("infer", lambda: infer(x))):
        _sync(fn())
        _sync(fn())
        with PeakMemory(gpu) as mem:
            _sync(fn())
        out[name + "_peak_bytes"] = mem.peak_bytes
        out["method"] = mem.method
    return out


def posthoc_section(args, log):
    """Scoring cost of pytorch-ood's Mahalanobis detector, in a subprocess.

    torch is imported in a process of its own: importing it into a process
    that already runs TensorFlow crashed here (segfault in libc).
    """
    from head_memory import run_worker

    log(f"posthoc (load {_load()})")
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


def format_precision(results):
    lines = [
        "| implementation | logits rel. err. max / median | grad x max / median |"
        " grad prototypes max / median |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, e in results.items():
        cells = " | ".join(f"{e[q][0]:.1e} / {e[q][1]:.1e}" for q in ("logits", "grad_x", "grad_p"))
        lines.append(f"| {HEAD_NAMES[name]} | {cells} |")
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
        lines += [
            "",
            f"Measured as: {method}, during one step after two warm-up steps, each case in "
            "its own process (see benchmarks/head_memory.py), without XLA.",
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


def _machine():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    return f"{os.cpu_count()}-core CPU, no GPU"


def _set_threads(threads):
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


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
        help="Comma list of: step,head,ablation,memory,large,posthoc. Default: all "
        "(--quick: step,head).",
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
    args.sections = (args.sections or "step,head,ablation,memory,large,posthoc").split(",")
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
    _set_threads(args.threads)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    clock_name = "process CPU time (all threads)" if args.clock == "cpu" else "wall-clock time"
    other = "wall-clock" if args.clock == "cpu" else "CPU-time"
    header = [
        "# keras-isomax speed and memory benchmark",
        "",
        f"- Command: `python benchmarks/speed.py {' '.join(argv)}`",
        f"- Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {args.machine or _machine()}; {platform.machine()}; TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}, Python {platform.python_version()}",
        f"- Backbone: {args.backbone} on {args.image_size}x{args.image_size}x3 images; batch "
        f"{args.batch_size}; {args.reps} interleaved repetitions; TensorFlow threads: "
        f"{args.threads or 'default'}; optimizer SGD (Nesterov momentum 0.9)",
        f"- Times: {clock_name}, median over repetitions",
        f"- Load average (1/5/15 min) at start: {_load()}",
        "",
        "Ratio columns: IsoMax+ / Dense, the median of the per-repetition ratios "
        f"[interquartile range] ({other} ratio). Dense + softmax is the baseline "
        "(`Dense(C)` logits, sparse softmax cross-entropy; score: max softmax probability).",
    ]
    raw = {"args": {k: v for k, v in vars(args).items()}}
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
    precision = check_precision(np.random.default_rng(0))
    raw["precision"] = precision
    agree = check_layers_agree(np.random.default_rng(1))
    raw["layers_agree"] = agree
    emit(
        "## Precision of the implementations (float32 vs float64, near-zero distances)",
        "",
        "Features at distances 1e-5 .. 1 from random prototypes (C=50, F=256); reference: "
        "the exact-difference formula in float64; gradient errors per row.",
        "",
        format_precision(precision),
        "",
        "The prototype layer against the library layer on the same weights (C=1,000, "
        "F=256, 80 examples), largest |difference|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in agree.items())
        + ".",
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
        raw["memory"] = {f"{c}x{f}:{k}": v for (c, f, k), v in r.items()}
        emit("## Peak memory of a step on the backbone", "", format_memory(r, args))
    if "large" in args.sections:
        from head_memory import format_large_head, large_head_check

        log(f"large head check (load {_load()})")
        r = large_head_check(threads=args.threads)
        raw["large"] = r
        emit("## Large head: B=256, C=10,000, F=2,048", "", format_large_head(r))
    if "posthoc" in args.sections:
        r = posthoc_section(args, log)
        raw["posthoc"] = {
            **{k: v for k, v in r.items() if k != "configs"},
            "configs": {f"{c}x{f}": v for (c, f), v in r.get("configs", {}).items()},
        }
        emit("## Post-hoc detector scoring cost", "", format_posthoc(r, head_results, args.clock))
    emit(f"Load average at end: {_load()}; total time {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
