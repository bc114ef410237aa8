"""The OOD quality benchmark's protocol, read from `benchmarks/ood_quality.py --describe`.

The benchmark is run as a program (tests and benchmarks do not import each
other): `--describe` builds the models of the default protocol without
training them and prints the protocol as JSON. These tests check it against
what the benchmark promises (the numbers below are the protocol's, written
independently of the benchmark's code): the backbone's structure, the
optimizer and its cosine schedule, PyTorch-convention weight decay, seeded
initial weights and batches, and that every row is measured on both tasks.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ood_quality.py"


def _describe(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["KERAS_BACKEND"] = "tensorflow"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--describe", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def protocol():
    return _describe()


def test_default_protocol_trains_long_enough(protocol):
    config = protocol["config"]
    assert config["seeds"] >= 3
    assert config["tasks"] == ["far", "near"]
    # 50,000 images x 6 epochs: the measured recipe (SoftMax >= 92 % on seeds 0 and 1).
    assert config["train_size"] == 50000 and config["epochs"] == 6
    assert config["batch_size"] == 128 and config["learning_rate"] == pytest.approx(0.1)
    assert config["finetune_epochs"] == 2
    assert protocol["tasks"]["far"] == ["digits", "photos", "gaussian_noise", "uniform_noise"]
    assert protocol["tasks"]["near"] == ["classes 6-9"]


def test_every_row_on_both_tasks(protocol):
    required = [("SoftMax", s) for s in ("max_probability", "max_logit", "energy", "entropic")]
    required += [("IsoMax+", s) for s in ("minimum_distance", "entropic", "energy", "max_logit")]
    for epochs in (0, 2):
        required.append((f"SoftMax -> replace_head, {epochs} epochs", "minimum_distance"))
    required.append(("SoftMax", "class means"))
    for head in ("SoftMax", "IsoMax+"):
        required += [(head, "Mahalanobis"), (head, "KNN (k=50)"), (head, "ViM (dim=32)")]
    assert set(protocol["rows"]) == {"far", "near"}
    for task, rows in protocol["rows"].items():
        missing = set(required) - {tuple(r) for r in rows}
        assert not missing, f"{task} task lacks {sorted(missing)}"


def test_backbone_is_a_resnet_with_batchnorm_and_pooling(protocol):
    b = protocol["backbone"]
    assert b["depth"] == 8 and b["features"] == 64
    assert b["feature_layer"] == "GlobalAveragePooling2D"
    # ResNet-8: a 3x3 stem + two 3x3 convs in each of 3 basic blocks; 1x1 projections on top.
    assert b["conv_3x3"] == 1 + 2 * 3 == b["depth"] - 1
    assert b["residual_adds"] == 3
    assert b["batchnorm"] == b["conv"]  # BatchNorm after every convolution.
    assert b["conv_regularised"]
    # PyTorch's BatchNorm2d defaults: momentum 0.1 (Keras 0.9), epsilon 1e-5.
    assert b["batchnorm_momentum"] == [pytest.approx(0.9)]
    assert b["batchnorm_epsilon"] == [pytest.approx(1e-5)]
    assert (b["softmax_head"], b["isomax_head"]) == ("Dense", "IsoMaxPlusLayer")


def test_optimizer_is_sgd_nesterov_with_cosine_decay(protocol):
    o = protocol["optimizer"]
    assert o["class"] == "SGD" and o["nesterov"] and o["momentum"] == pytest.approx(0.9)
    assert not o["decoupled_weight_decay"]  # Coupled L2 (kernel regularisers), as in PyTorch.
    steps = protocol["config"]["train_size"] // protocol["config"]["batch_size"]
    total = protocol["config"]["epochs"] * steps
    assert o["steps_per_epoch"] == steps and o["total_steps"] == total
    assert set(o["lr_at_step"]) == {str(s) for s in (0, steps, total // 2, total - 1, total)}
    for step, lr in o["lr_at_step"].items():
        expected = 0.05 * (1 + math.cos(math.pi * int(step) / total))  # 0.1 -> 0, cosine.
        assert lr == pytest.approx(expected, abs=1e-6), step


def test_weight_decay_is_pytorchs_convention(protocol):
    # PyTorch's weight_decay=5e-4 adds 5e-4 * w to the gradient; Keras' L2(l) adds 2 * l * w.
    low, high = protocol["optimizer"]["l2_gradient_over_weight"]
    assert low == pytest.approx(5e-4, rel=1e-5) and high == pytest.approx(5e-4, rel=1e-5)


def test_seeds_fix_initial_weights_and_batches(protocol):
    seeding = protocol["seeding"]
    failed = [name for name, ok in seeding.items() if not ok]
    assert not failed, failed
    assert len(seeding) >= 7


def test_quick_mode_is_small():
    quick = _describe("--quick")["config"]
    assert quick["seeds"] == 1 and quick["epochs"] <= 2 and quick["train_size"] <= 5000
