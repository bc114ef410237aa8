import functools
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


@pytest.fixture
def float64():
    """Lets float64 stay float64 on JAX (whose 64-bit types are off by default)."""
    if keras.backend.backend() == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


@pytest.fixture
def trace():
    """Wraps a function in the backend's tracer: `tf.function` or `jax.jit`.

    Inside, tensors are symbols without values (what `fit` and exports see).
    PyTorch runs every call eagerly (no such symbols): tests using it skip there.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function
    if backend == "jax":
        import jax

        return jax.jit
    pytest.skip(f"{backend} has no traced (value-less) tensors: every call is eager")


@pytest.fixture(autouse=True)
def _restore_keras_globals():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# ------------------------------------------------- TensorFlow's C API (TF Serving's path)


@pytest.fixture(scope="session")
def c_program(tmp_path_factory):
    """Runs a SavedModel signature through TensorFlow's C API, the way TF Serving loads it.

    Builds tests/c_api/run_signature.c against the C API of the TF wheel once;
    returns `run(saved_model_dir, signature, x, tmp_path, dtype=None)` ->
    `(returncode, outputs, log)`.
    """
    import shutil
    import subprocess

    tf = pytest.importorskip("tensorflow")
    tf_dir = os.path.dirname(tf.__file__)
    c_source = os.path.join(os.path.dirname(__file__), "c_api", "run_signature.c")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot build the TensorFlow C API check")
    header = os.path.join(tf_dir, "include", "tensorflow", "c", "c_api.h")
    if not os.path.exists(header):
        pytest.skip(f"TensorFlow C API header not in the tensorflow wheel: {header}")
    for library in ("libtensorflow_cc.so.2", "libtensorflow_framework.so.2"):
        if not os.path.exists(os.path.join(tf_dir, library)):
            pytest.skip(f"{library} not in the tensorflow wheel ({tf_dir})")
    out = str(tmp_path_factory.mktemp("c_api") / "run_signature")
    command = [gcc, "-O1", "-Wall", c_source, "-I", os.path.join(tf_dir, "include")]
    command += ["-L", tf_dir, "-l:libtensorflow_cc.so.2"]
    command += ["-l:libtensorflow_framework.so.2", f"-Wl,-rpath,{tf_dir}"]
    if shutil.which("ld.gold"):
        # GNU ld needs ~45 s to link against the 1 GB libtensorflow_cc; gold ~7 s.
        command.append("-fuse-ld=gold")
    result = subprocess.run(command + ["-o", out], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return functools.partial(_run_c_program, out)


def _run_c_program(program, saved_model_dir, signature, x, tmp_path, dtype=None):
    """Runs a signature through the C API; returns (returncode, outputs, stderr)."""
    inputs, outputs = _signature_tensor_names(saved_model_dir, signature)
    x = np.ascontiguousarray(x)
    data = tmp_path / f"{signature}_input.bin"
    x.tofile(data)
    names = sorted(outputs)
    command = [
        program,
        saved_model_dir,
        inputs["inputs"],
        dtype or x.dtype.name,
        str(data),
        ",".join(str(d) for d in x.shape),
    ] + [outputs[n] for n in names]
    import subprocess

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    parsed = {}
    lines = result.stdout.splitlines()
    by_tensor = {outputs[n]: n for n in names}
    for i, line in enumerate(lines):
        if line.startswith("output "):
            _, tensor, _, ndims, *dims = line.split()
            assert int(ndims) == len(dims)
            values = np.array([float(v) for v in lines[i + 1].split()])
            parsed[by_tensor[tensor]] = values.reshape([int(d) for d in dims])
    return result.returncode, parsed, result.stdout + result.stderr


def _signature_tensor_names(saved_model_dir, signature):
    """Input and output tensor names of a SignatureDef, from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    (meta_graph,) = [m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags]
    sig = meta_graph.signature_def[signature]
    inputs = {k: v.name for k, v in sig.inputs.items()}
    outputs = {k: v.name for k, v in sig.outputs.items()}
    return inputs, outputs


# Test files of TensorFlow-only features (SavedModel export and serving,
# tf.distribute, TFDS data, the CLI and demo, which export SavedModels). Every
# other test file tests a backend-neutral feature and runs on TensorFlow, JAX
# and PyTorch (`make test`); a test inside it that needs TensorFlow itself is
# marked `tensorflow_only` and skips on the other backends.
TENSORFLOW_ONLY_FILES = {
    "test_app_models.py",
    "test_cli.py",
    "test_cli_errors.py",
    "test_data.py",
    "test_distribute.py",
    "test_export.py",
    "test_export_staging.py",
    "test_nonfinite_inputs.py",
    "test_quality_protocol.py",
    "test_serving_load.py",
}

BACKEND = keras.backend.backend()

if BACKEND != "tensorflow":
    # Not even imported: those modules import TensorFlow-only parts at the top.
    collect_ignore = sorted(TENSORFLOW_ONLY_FILES)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend (running on {BACKEND})")
    for item in items:
        if item.path.name not in TENSORFLOW_ONLY_FILES:
            item.add_marker(pytest.mark.backend_neutral)
        if BACKEND != "tensorflow" and item.get_closest_marker("tensorflow_only"):
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend_neutral: in a file of backend-neutral tests (they run on every Keras "
        "backend: make test runs them again with KERAS_BACKEND=jax and =torch)",
    )
    config.addinivalue_line(
        "markers",
        "tensorflow_only: needs the TensorFlow backend itself (skipped on JAX and PyTorch)",
    )
