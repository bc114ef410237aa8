import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _restore_keras_globals():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# Test files whose tests run on every Keras backend (the others still use TF
# tensors in the tests themselves, e.g. `.numpy()`, or TF-only features:
# SavedModel export, tf.distribute, tf.data/TFDS, the CLI). Tests inside them
# that need TensorFlow skip themselves on other backends.
BACKEND_NEUTRAL_FILES = {
    "test_backends.py",  # layer, loss, scores, metric, calibration, evaluation, head, .keras
    "test_detection_metrics.py",
    "test_metrics.py",
    "test_edge_export.py",
}


if keras.backend.backend() != "tensorflow":
    # Not even imported: those modules import TensorFlow-only parts at the top.
    collect_ignore = sorted(
        name
        for name in os.listdir(os.path.dirname(__file__))
        if name.startswith("test_") and name.endswith(".py") and name not in BACKEND_NEUTRAL_FILES
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in BACKEND_NEUTRAL_FILES:
            item.add_marker(pytest.mark.backend_neutral)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend_neutral: runs on every Keras backend (make test runs these again "
        "with KERAS_BACKEND=jax and KERAS_BACKEND=torch)",
    )
