"""The OOD quality benchmark's protocol pieces (benchmarks/_quality_models.py).

No training to convergence: the backbone's structure, the documented learning
rate schedule, and that seeds reproduce initial weights and batch order.
"""

import os
import sys

import keras
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import _quality_models as qm  # noqa: E402

from keras_isomax import IsoMaxPlusLayer  # noqa: E402


def _layers_of(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


@pytest.mark.parametrize("depth, blocks", [(8, 1), (20, 3)])
def test_resnet_backbone_structure(depth, blocks):
    model = qm.build_model("softmax", 10, seed=0, depth=depth)
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    assert model(x).shape == (3, 10)
    features = model.get_layer("features")
    assert isinstance(features, keras.layers.GlobalAveragePooling2D)
    assert tuple(features.output.shape) == (None, 64)
    convs = [c for c in _layers_of(model, keras.layers.Conv2D) if c.kernel_size == (3, 3)]
    # Stem + two 3x3 convs per basic block; depth = 3x3 convs + the classifier.
    assert len(convs) == 1 + 2 * 3 * blocks == depth - 1
    # BatchNorm after every convolution (3x3 and 1x1 projections).
    assert len(_layers_of(model, keras.layers.BatchNormalization)) == len(
        _layers_of(model, keras.layers.Conv2D)
    )
    assert all(c.kernel_regularizer is not None for c in convs)
    # PyTorch's BatchNorm defaults (the paper's): momentum 0.1 == Keras 0.9.
    bns = _layers_of(model, keras.layers.BatchNormalization)
    assert all(b.momentum == pytest.approx(0.9) and b.epsilon == pytest.approx(1e-5) for b in bns)
    assert len(_layers_of(model, keras.layers.Add)) == 3 * blocks


def test_isomax_head_and_cnn_backbone():
    model = qm.build_model("isomax", 6, seed=0)
    assert isinstance(model.layers[-1], IsoMaxPlusLayer)
    assert model.layers[-1].input.shape[-1] == 64
    cnn = qm.build_model("isomax", 10, seed=0, backbone="cnn")
    assert isinstance(cnn.get_layer("features"), keras.layers.Dense)
    assert not _layers_of(cnn, keras.layers.BatchNormalization)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Received: backbone='vgg'"):
        qm.build_model("softmax", 10, 0, backbone="vgg")
    with pytest.raises(ValueError, match="Received: depth=10"):
        qm.build_model("softmax", 10, 0, depth=10)
    with pytest.raises(ValueError, match="Received: head='dense'"):
        qm.build_model("dense", 10, 0)


def test_schedule_is_the_papers_step_decay():
    epochs, steps = 12, 10  # 120 steps: boundaries at 60, 80, 100.
    schedule = qm.paper_schedule(epochs, steps)
    expected = {0: 0.1, 59: 0.1, 61: 0.01, 79: 0.01, 81: 0.001, 99: 0.001, 101: 1e-4, 119: 1e-4}
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)
    model = qm.build_model("softmax", 10, 0)
    qm.compile_model(model, "softmax", backbone="resnet", epochs=epochs, steps_per_epoch=steps)
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.nesterov and optimizer.momentum == pytest.approx(0.9)
    # Weight decay is the coupled L2 of the paper (kernel regulariser), not Keras' decoupled one.
    assert not optimizer.weight_decay
    conv = model.get_layer("stem_conv")
    assert conv.kernel_regularizer.get_config()["l2"] == pytest.approx(qm.PAPER_WEIGHT_DECAY / 2)


def test_l2_regulariser_gradient_matches_pytorch_weight_decay():
    # PyTorch weight_decay=wd adds wd * w to the gradient.
    w = np.random.default_rng(1).normal(size=(5, 3))
    reg = qm._regularizer(qm.PAPER_WEIGHT_DECAY)
    import tensorflow as tf

    v = tf.Variable(w)
    with tf.GradientTape() as tape:
        penalty = reg(v)
    np.testing.assert_allclose(tape.gradient(penalty, v).numpy(), qm.PAPER_WEIGHT_DECAY * w)


def test_both_heads_share_the_initial_backbone_and_seeds_reproduce():
    def backbone_weights(model):
        head = model.layers[-1]  # The Dense "logits" or the IsoMaxPlusLayer.
        return [w.numpy() for layer in model.layers if layer is not head for w in layer.weights]

    soft = backbone_weights(qm.build_model("softmax", 10, seed=3))
    iso = backbone_weights(qm.build_model("isomax", 10, seed=3))
    again = backbone_weights(qm.build_model("softmax", 10, seed=3))
    other = backbone_weights(qm.build_model("softmax", 10, seed=4))
    assert len(soft) == len(iso) > 10
    for a, b, c in zip(soft, iso, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert any(not np.array_equal(a, d) for a, d in zip(soft, other, strict=True))


def test_batch_order_and_augmentation_are_seeded():
    rng = np.random.default_rng(0)
    x = rng.random((50, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 50)
    a = qm.epoch_batches(x, y, seed=1, epoch=0)
    b = qm.epoch_batches(x, y, seed=1, epoch=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = qm.epoch_batches(x, y, seed=1, epoch=1)
    d = qm.epoch_batches(x, y, seed=2, epoch=0)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[1], d[1])
    order = qm.epoch_order(1, 0, 50)
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
    np.testing.assert_array_equal(a[1], y[order])


def test_augmentation_is_a_padded_crop_or_its_mirror():
    rng = np.random.default_rng(5)
    x = rng.random((40, 28, 28, 1), dtype=np.float32) + 0.5  # Never zero: padding is visible.
    out = qm.augment(x, seed=0, epoch=0)
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for i in range(len(x)):
        windows = [
            (padded[i, dy : dy + 28, dx : dx + 28], flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
        ]
        matches = [flip for w, flip in windows if np.array_equal(out[i], w[:, ::-1] if flip else w)]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0]
    assert 0 < flips < len(x)  # Both flipped and unflipped images occur.
    np.testing.assert_array_equal(out, qm.augment(x, seed=0, epoch=0))
    np.testing.assert_array_equal(qm.augment(x, 0, 0, padding=0, flip=False), x)


def test_resnet34_for_gpu_runs():
    model = qm.build_model("isomax", 10, seed=0, depth=34)
    assert tuple(model.get_layer("features").output.shape) == (None, 512)
    blocks = len(_layers_of(model, keras.layers.Add))
    assert blocks == sum(qm.RESNET34_BLOCKS) == 16
    # Heads stay float32 under a mixed-precision policy.
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
