"""Backbones, training recipe and seeded batches of the OOD quality benchmarks.

Shared by `ood_quality.py` (TensorFlow, 2 CPU cores) and `gpu_quality_jax.py`
(Keras' JAX backend on a GPU): this module imports Keras and NumPy only, so it
loads on a machine without TensorFlow.

The recipe (the same for both heads; chosen for the SoftMax baseline's
accuracy and the CPU time, never for an OOD figure):

* backbone: a ResNet of basic blocks with BatchNorm after every convolution
  and global average pooling. The CPU default is the CIFAR family's smallest
  (He et al., 2016, section 4.2): a 3x3 stem of 16 filters and three stages of
  one basic block with 16 / 32 / 64 filters (stride 2 between stages, 1x1
  projection shortcuts), i.e. ResNet-8, 64 features. `depth=18` / `depth=34`
  give the ImageNet-size ResNet-18 / ResNet-34 (stages of 2/2/2/2 or 3/4/6/3
  blocks of 64-512 filters, 3x3 stem without max pooling, 512 features) for a
  GPU. The pooled vector is the layer named `"features"`, input of either
  head;
* optimizer: SGD, learning rate 0.1, Nesterov momentum 0.9, cosine decay to
  zero over the whole run (one `fit` call), batch 128;
* weight decay 5e-4 in PyTorch's convention (the gradient gets `5e-4 * w`, a
  Keras `L2(2.5e-4)` kernel regulariser, coupled with momentum) on every
  convolution and on the SoftMax head's kernel; the IsoMax+ prototypes get
  none (the layer has no regulariser argument);
* BatchNorm with PyTorch's defaults (running-statistics momentum 0.1, i.e.
  Keras `momentum=0.9`; epsilon 1e-5);
* both heads of a seed get the same initial backbone weights (the backbone is
  built first from the seed) and the same batches in the same order: the
  batch indices of every epoch are drawn from a NumPy generator of the seed
  before training (`batch_indices`), and the optional augmentation (random
  horizontal flip, `augment_flags`) is drawn the same way.
"""

from __future__ import annotations

import keras
import numpy as np

IMAGE_SHAPE = (28, 28, 1)
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4  # PyTorch convention: gradient += 5e-4 * w.
BATCH_SIZE = 128
CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
IMAGENET_WIDTHS = (64, 128, 256, 512)
HEADS = ("softmax", "isomax")


# --------------------------------------------------------------- backbones


def _regularizer(weight_decay: float):
    # d/dw [l2 * w^2] = 2 * l2 * w: PyTorch's weight_decay=wd is L2(wd / 2).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _batch_norm(name: str):
    # PyTorch's BatchNorm2d defaults: running statistics updated with momentum
    # 0.1 (Keras: momentum=0.9), epsilon 1e-5.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _conv(filters, kernel_size, strides, name, weight_decay, padding="valid"):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=_regularizer(weight_decay),
        name=name,
    )


def _conv_bn(x, filters, strides, name, weight_decay, relu=True):
    x = _conv(filters, 3, strides, f"{name}_conv", weight_decay, padding="same")(x)
    x = _batch_norm(f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def resnet_backbone(inputs, blocks, widths, weight_decay=WEIGHT_DECAY):
    """ResNet of basic blocks with a 3x3 stem, ending in global average pooling.

    Args:
        inputs: The image input tensor.
        blocks: Basic blocks per stage.
        widths: Filters per stage; stride 2 at the start of every stage after
            the first.
        weight_decay: PyTorch-convention weight decay of the convolutions.
            Defaults to `WEIGHT_DECAY`.

    Returns:
        The pooled feature tensor (layer name `"features"`).
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
                shortcut = _conv(width, 1, strides, f"{name}_proj", weight_decay)(shortcut)
                shortcut = _batch_norm(f"{name}_proj_bn")(shortcut)
            x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
            x = keras.layers.Activation("relu", name=f"{name}_out")(x)
    return keras.layers.GlobalAveragePooling2D(name="features")(x)


def stages_of(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(blocks, widths)` of a ResNet depth: `6n + 2` (CIFAR family), 18 or 34.

    Raises:
        ValueError: For any other depth.
    """
    if depth in IMAGENET_BLOCKS:
        return IMAGENET_BLOCKS[depth], IMAGENET_WIDTHS
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2 with n >= 1, 18 or 34. Received: depth={depth}")
    n = (depth - 2) // 6
    return (n,) * len(CIFAR_WIDTHS), CIFAR_WIDTHS


def build_model(
    head: str,
    num_classes: int,
    seed: int,
    *,
    depth: int = 8,
    weight_decay: float = WEIGHT_DECAY,
    image_shape: tuple[int, ...] = IMAGE_SHAPE,
) -> keras.Model:
    """The backbone (built first, from `seed`) with a SoftMax or IsoMax+ head.

    Args:
        head: `"softmax"` (`Dense` logits, layer `"logits"`) or `"isomax"`
            (`IsoMaxPlusLayer`, layer `"isomax"`).
        num_classes: Number of classes.
        seed: Seed of the initial weights (the backbone's depend on it only).
        depth: ResNet depth (see `stages_of`). Defaults to `8`.
        weight_decay: PyTorch-convention weight decay. Defaults to `WEIGHT_DECAY`.
        image_shape: Input shape. Defaults to `IMAGE_SHAPE`.

    Returns:
        An uncompiled model whose output is the logits (float32 also under a
        mixed-precision policy).

    Raises:
        ValueError: For an unknown head or depth.
    """
    from keras_isomax import IsoMaxPlusLayer

    if head not in HEADS:
        raise ValueError(f"`head` must be one of {HEADS}. Received: head={head!r}")
    blocks, widths = stages_of(depth)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(image_shape, name="image")
    features = resnet_backbone(inputs, blocks, widths, weight_decay)
    if head == "softmax":
        logits = keras.layers.Dense(
            num_classes,
            kernel_regularizer=_regularizer(weight_decay),
            dtype="float32",
            name="logits",
        )(features)
    else:
        logits = IsoMaxPlusLayer(num_classes, dtype="float32", name="isomax")(features)
    return keras.Model(inputs, logits, name=f"resnet{depth}_{head}")


def head_model(model: keras.Model) -> keras.Model:
    """A model from the features to the logits with a copy of `model`'s trained head.

    The copy (same config, same weights) computes the same logits as the whole
    model's head, so features computed once serve every score and detector.
    (A copy, not the layer itself: the library's detectors want a head layer
    that is used once.)
    """
    head = model.layers[-1]
    copy = type(head).from_config(head.get_config())
    inputs = keras.Input((int(model.get_layer("features").output.shape[-1]),), name="features")
    outputs = copy(inputs)
    copy.set_weights(head.get_weights())
    return keras.Model(inputs, outputs, name=f"{model.name}_head")


def feature_model(model: keras.Model) -> keras.Model:
    """The model from the image to the pooled features (shares the weights)."""
    return keras.Model(model.inputs, model.get_layer("features").output)


# --------------------------------------------------------------- optimizer


def cosine_schedule(epochs: int, steps_per_epoch: int, lr: float = LEARNING_RATE):
    """Cosine decay from `lr` to zero over `epochs * steps_per_epoch` steps."""
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps_per_epoch)


def compile_model(
    model: keras.Model,
    head: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float = LEARNING_RATE,
    entropic_scale: float = 10.0,
    jit_compile="auto",
) -> keras.Model:
    """Compiles with SGD + Nesterov 0.9 + cosine decay and the head's loss."""
    from keras_isomax import IsoMaxPlusLoss

    optimizer = keras.optimizers.SGD(
        cosine_schedule(epochs, steps_per_epoch, lr), momentum=MOMENTUM, nesterov=True
    )
    if head == "softmax":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = IsoMaxPlusLoss(entropic_scale=entropic_scale)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile)
    return model


# ----------------------------------------------------------------- batches


def batch_indices(n: int, seed: int, epochs: int, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Training batches of every epoch: `(epochs * (n // batch_size), batch_size)` indices.

    Each epoch is a fresh permutation of the `n` images drawn from
    `(seed, epoch)`; its last `n % batch_size` images are left out (a different
    few every epoch), so every batch is full.
    """
    steps = n // batch_size
    if steps < 1:
        raise ValueError(
            f"`batch_size` must not exceed the {n} training images. Received: "
            f"batch_size={batch_size}"
        )
    orders = [
        np.random.default_rng([seed, epoch, 0]).permutation(n)[: steps * batch_size]
        for epoch in range(epochs)
    ]
    return np.stack(orders).reshape(epochs * steps, batch_size)


def augment_flags(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded random horizontal flips, one boolean per image of every batch."""
    return np.random.default_rng([seed, 0, 1]).random(shape) < 0.5


def crop_offsets(shape: tuple[int, int], seed: int, padding: int) -> np.ndarray:
    """Seeded random-crop offsets `(..., 2)` in `[0, 2 * padding]`, one pair per image."""
    return np.random.default_rng([seed, 0, 2]).integers(0, 2 * padding + 1, size=(*shape, 2))


def numpy_batch(x, y, indices, flips=None, offsets=None, padding=0):
    """One training batch as NumPy arrays.

    `flips` mirror the image's width axis; `offsets` (with `padding`) take a
    random crop of the image zero-padded by `padding` pixels on every side.
    """
    xb = x[indices]
    if offsets is not None and padding:
        n, h, w, _ = xb.shape
        padded = np.pad(xb, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        rows = offsets[:, :1] + np.arange(h)[None, :]
        cols = offsets[:, 1:] + np.arange(w)[None, :]
        xb = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flips is not None and flips.any():
        xb = xb.copy()
        xb[flips] = xb[flips, :, ::-1]
    return xb, y[indices]


def train(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
    flip: bool = False,
    crop_padding: int = 0,
    tf_data: bool = False,
) -> dict[str, list[float]]:
    """Trains with one `fit` call over the seeded batches.

    With `tf_data`, the batches come from a tf.data pipeline (`tf_dataset`,
    TensorFlow only, no crops); otherwise from NumPy (any backend), where
    `crop_padding` adds a seeded random crop of the zero-padded image. Both
    give the same seeded batches and flips.

    Returns:
        `{"epoch_s": wall seconds per epoch, "epoch_cpu_s": process CPU seconds per epoch}`.
    """
    if tf_data and crop_padding:
        raise ValueError(f"tf_data has no random crops. Received: crop_padding={crop_padding}")
    indices = batch_indices(len(x), seed, epochs, batch_size)
    flips = augment_flags(indices.shape, seed) if flip else None
    offsets = crop_offsets(indices.shape, seed, crop_padding) if crop_padding else None

    def batches():
        for i, batch in enumerate(indices):
            yield numpy_batch(
                x,
                y,
                batch,
                None if flips is None else flips[i],
                None if offsets is None else offsets[i],
                crop_padding,
            )

    timer = EpochTimes()
    keras.utils.set_random_seed(seed + 1000)
    model.fit(
        tf_dataset(x, y, indices, flips) if tf_data else batches(),
        epochs=epochs,
        steps_per_epoch=len(indices) // epochs,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    return {"epoch_s": timer.seconds, "epoch_cpu_s": timer.cpu_seconds}


def tf_dataset(x, y, indices, flips=None):
    """A `tf.data.Dataset` of the batches `indices` (one `fit` call, no retracing).

    The images stay in memory as one tensor; each batch is gathered (and
    mirrored where `flips` says) on the fly. TensorFlow only.
    """
    import tensorflow as tf

    images, labels = tf.constant(x), tf.constant(y)
    if flips is None:
        flips = np.zeros(indices.shape, bool)
    data = tf.data.Dataset.from_tensor_slices((indices, flips))

    def gather(index, flip):
        xb = tf.gather(images, index)
        xb = tf.where(flip[:, None, None, None], tf.reverse(xb, axis=[2]), xb)
        return xb, tf.gather(labels, index)

    return data.map(gather, num_parallel_calls=1, deterministic=True).prefetch(2)


class EpochTimes(keras.callbacks.Callback):
    """Records the wall time (`seconds`) and process CPU time (`cpu_seconds`) of every epoch."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        import time

        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        import time

        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])
