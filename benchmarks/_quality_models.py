"""Backbones, optimizer schedule and seeded batches of the OOD quality benchmark.

Kept apart from `ood_quality.py` so that `tests/test_quality_protocol.py` can
check the protocol's pieces (backbone shape, BatchNorm and pooling, the
learning-rate schedule, seeded initial weights and batch order) without
importing pytorch-ood or training anything.

The paper protocol (Macêdo & Ludermir, IsoMax+; the authors' training code):

* backbone: a ResNet of the CIFAR family (He et al., 2016, section 4.2):
  a 3x3 conv stem with 16 filters, three stages of `n` basic blocks with
  16 / 32 / 64 filters (stride 2 between stages, 1x1 projection shortcuts),
  BatchNorm after every convolution, global average pooling; depth `6n + 2`
  (ResNet-8 for n=1, ResNet-20 for n=3, ResNet-32 for n=5). The pooled
  vector (64 values) is the layer named `"features"`, input of either head.
  `depth=34` gives the paper's ResNet-34 (basic blocks 3/4/6/3 of 64 / 128 /
  256 / 512 filters, 3x3 stem; 512 features), for GPU runs;
* optimizer: SGD, learning rate 0.1, momentum 0.9, Nesterov, weight decay
  1e-4 in PyTorch's convention (the L2 gradient `1e-4 * w`, i.e. a Keras
  `L2(5e-5)` kernel regulariser, coupled with momentum as in the paper;
  Keras' own `weight_decay` is decoupled and would be a different recipe);
* schedule: the paper's step decay, learning rate x0.1 at 50%, 66.7% and
  83.3% of training (epochs 150 / 200 / 250 of 300), scaled to the epoch
  count so that a short run keeps the same shape;
* augmentation: random crop of the 28x28 image from the image zero-padded by
  4 pixels on every side, and a random horizontal flip: the authors' CIFAR
  transform (`RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`) at
  Fashion-MNIST's size. A mirrored Fashion-MNIST garment, shoe or bag is the
  same class, so the flip keeps every label;
* BatchNorm with PyTorch's defaults (running-statistics momentum 0.1, i.e.
  Keras `momentum=0.9`; epsilon 1e-5), as in the authors' PyTorch code;
* batch: the paper's is 64 (`PAPER_BATCH_SIZE`); the benchmark's default is
  128, the batch of He et al.'s CIFAR ResNets at the same lr 0.1, which
  halves the CPU time (`--batch-size 64` restores the paper's);
* both heads get the same initial backbone weights (the backbone is built
  first from the seed) and the same batches in the same order (epoch
  permutations and augmentation drawn from a NumPy generator of the seed).
"""

from __future__ import annotations

import keras
import numpy as np

IMAGE_SHAPE = (28, 28, 1)
PAPER_LR = 0.1
PAPER_MOMENTUM = 0.9
PAPER_WEIGHT_DECAY = 1e-4  # PyTorch convention: gradient += 1e-4 * w.
PAPER_BATCH_SIZE = 64
PAPER_DECAY_FRACTIONS = (150 / 300, 200 / 300, 250 / 300)
PAPER_DECAY_FACTOR = 0.1
CROP_PADDING = 4
BACKBONES = ("resnet", "cnn")
RESNET34_BLOCKS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)


# --------------------------------------------------------------- backbones


def _regularizer(weight_decay):
    # d/dw [l2 * w^2] = 2 * l2 * w: PyTorch's weight_decay=wd is L2(wd / 2).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _batch_norm(name):
    # PyTorch's BatchNorm2d defaults, as in the paper: running statistics updated
    # with momentum 0.1 (Keras: momentum=0.9), epsilon 1e-5. Keras' default 0.99
    # leaves the running statistics far from the data after a short run.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _conv_bn(x, filters, strides, name, weight_decay, relu=True):
    x = keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=_regularizer(weight_decay),
        name=f"{name}_conv",
    )(x)
    x = _batch_norm(f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def resnet_backbone(inputs, blocks=(1, 1, 1), widths=(16, 32, 64), weight_decay=1e-4):
    """ResNet of basic blocks with a 3x3 stem, ending in global average pooling.

    `blocks[i]` basic blocks of `widths[i]` filters in stage `i`; stride 2 at
    the start of every stage after the first.
    """
    x = _conv_bn(inputs, widths[0], 1, "stem", weight_decay)
    for stage, (width, blocks_per_stage) in enumerate(zip(widths, blocks, strict=True)):
        for block in range(blocks_per_stage):
            name = f"s{stage}b{block}"
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = _conv_bn(x, width, strides, f"{name}a", weight_decay)
            y = _conv_bn(y, width, 1, f"{name}b", weight_decay, relu=False)
            if strides != 1 or shortcut.shape[-1] != width:
                shortcut = keras.layers.Conv2D(
                    width,
                    1,
                    strides=strides,
                    use_bias=False,
                    kernel_initializer="he_normal",
                    kernel_regularizer=_regularizer(weight_decay),
                    name=f"{name}_proj",
                )(shortcut)
                shortcut = _batch_norm(f"{name}_proj_bn")(shortcut)
            x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
            x = keras.layers.Activation("relu", name=f"{name}_out")(x)
    return keras.layers.GlobalAveragePooling2D(name="features")(x)


def cnn_backbone(inputs):
    """The earlier benchmark's small CNN: two strided convs, `Dense(128, relu)`.

    No BatchNorm and no pooling: kept as a second, clearly labelled backbone
    to measure how much of the comparison depends on the backbone.
    """
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    return keras.layers.Dense(128, activation="relu", name="features")(x)


def build_backbone(backbone, seed, *, depth=8, widths=(16, 32, 64), weight_decay=None):
    """`(inputs, features)` of a backbone whose weights depend only on `seed`."""
    if backbone not in BACKBONES:
        raise ValueError(f"`backbone` must be one of {BACKBONES}. Received: backbone={backbone!r}")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    if backbone == "cnn":
        return inputs, cnn_backbone(inputs)
    wd = PAPER_WEIGHT_DECAY if weight_decay is None else weight_decay
    if depth == 34:  # The paper's ResNet-34 (CIFAR variant: 3x3 stem, no max pooling).
        return inputs, resnet_backbone(inputs, RESNET34_BLOCKS, RESNET34_WIDTHS, wd)
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"`depth` must be 6n + 2 with n >= 1, or 34. Received: depth={depth}")
    n = (depth - 2) // 6
    return inputs, resnet_backbone(inputs, (n,) * len(widths), widths, wd)


def build_model(
    head,
    num_classes,
    seed,
    *,
    backbone="resnet",
    depth=8,
    widths=(16, 32, 64),
    weight_decay=None,
    entropic_scale=10.0,
):
    """The backbone (built first, from `seed`) with a SoftMax or IsoMax+ head.

    The returned model outputs logits and is not compiled (see `compile_model`).
    """
    from keras_isomax import IsoMaxPlusLayer

    inputs, features = build_backbone(
        backbone, seed, depth=depth, widths=widths, weight_decay=weight_decay
    )
    if head == "softmax":
        wd = (PAPER_WEIGHT_DECAY if weight_decay is None else weight_decay) * (backbone != "cnn")
        # Heads in float32 also under a mixed-precision policy (GPU runs).
        logits = keras.layers.Dense(
            num_classes, kernel_regularizer=_regularizer(wd), dtype="float32", name="logits"
        )(features)
    elif head == "isomax":
        logits = IsoMaxPlusLayer(num_classes, dtype="float32", name="isomax")(features)
    else:
        raise ValueError(f"`head` must be 'softmax' or 'isomax'. Received: head={head!r}")
    model = keras.Model(inputs, logits, name=f"{backbone}_{head}")
    return model


# --------------------------------------------------------------- optimizer


def paper_schedule(epochs, steps_per_epoch, lr=PAPER_LR):
    """The paper's step decay (x0.1 at 50 / 66.7 / 83.3 % of training)."""
    total = epochs * steps_per_epoch
    boundaries = [int(round(f * total)) for f in PAPER_DECAY_FRACTIONS]
    values = [lr * PAPER_DECAY_FACTOR**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def compile_model(model, head, *, backbone, epochs, steps_per_epoch, entropic_scale=10.0, lr=None):
    """Compiles with the protocol's optimizer: SGD + Nesterov + step decay for
    the ResNet; the earlier benchmark's Adam 1e-3 for the small CNN."""
    from keras_isomax import IsoMaxPlusLoss

    if backbone == "cnn":
        optimizer = keras.optimizers.Adam(1e-3 if lr is None else lr)
    else:
        optimizer = keras.optimizers.SGD(
            paper_schedule(epochs, steps_per_epoch, PAPER_LR if lr is None else lr),
            momentum=PAPER_MOMENTUM,
            nesterov=True,
        )
    if head == "softmax":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = IsoMaxPlusLoss(entropic_scale=entropic_scale)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] * (head == "softmax"))
    return model


# ----------------------------------------------------------------- batches


def epoch_order(seed, epoch, n):
    """The permutation of the `n` training images for `epoch` (seeded)."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def augment(x, seed, epoch, *, padding=CROP_PADDING, flip=True):
    """Random crop from the zero-padded image and random horizontal flip.

    Draws are a function of `(seed, epoch)` only, so both heads see the same
    augmented images. `x` is `(N, H, W, C)`; returns a new array.
    """
    rng = np.random.default_rng([seed, epoch, 1])
    n, h, w, _ = x.shape
    if padding:
        padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        dy = rng.integers(0, 2 * padding + 1, size=n)
        dx = rng.integers(0, 2 * padding + 1, size=n)
        rows = dy[:, None] + np.arange(h)[None, :]
        cols = dx[:, None] + np.arange(w)[None, :]
        x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flip:
        mirror = rng.random(n) < 0.5
        x = x.copy() if not padding else x
        x[mirror] = x[mirror, :, ::-1]
    return x


def epoch_batches(x, y, seed, epoch, *, augmentation=True):
    """The epoch's training arrays in batch order (fit them with `shuffle=False`)."""
    order = epoch_order(seed, epoch, len(x))
    xs, ys = x[order], y[order]
    if augmentation:
        xs = augment(xs, seed, epoch)
    return xs, ys


def train(model, x, y, *, epochs, seed, batch_size=128, augmentation=True):
    """Trains epoch by epoch on the seeded batches; returns the wall time (s)."""
    import time

    keras.utils.set_random_seed(seed + 1000)  # Dropout-free, but keep Keras' RNG fixed.
    start = time.perf_counter()
    for epoch in range(epochs):
        xs, ys = epoch_batches(x, y, seed, epoch, augmentation=augmentation)
        model.fit(xs, ys, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start
