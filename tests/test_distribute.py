"""IsoMax+ under tf.distribute: parity, the Keras multi-worker fix, resume, XLA.

Logical CPU devices must be configured before TensorFlow initializes and
multi-worker training needs one process per worker, so those tests run
`tests/_distribute_worker.py` in subprocesses (marked `slow`; deselect with
`-m "not slow"`). Every job's processes are killed and its ports checked free
when the job ends, also when a test fails. Run with `-s` to see the parity
numbers.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import _distribute_worker as worker
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_isomax import IsoMaxPlusLayer, IsoMaxPlusLoss
from keras_isomax import distribute as kd

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distribute_worker.py")
TOL = 1e-5
# One job takes ~15-25 s on 2 idle cores; the limit only bounds a hung job.
JOB_TIMEOUT = 300
# Symptoms of keras-team/keras#20585 in Keras 3.15.1 (first and second bug).
KNOWN_SYMPTOMS = ("PerReplica", "Invalid reduction dimension 0")


# ---------------------------------------------------------------------------
# Process harness
# ---------------------------------------------------------------------------


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port):
    """Whether some process listens on `port` (IPv4 or IPv6)."""
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        found = True
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    if found:
        return False
    with socket.socket() as s:  # Not Linux: try to bind.
        try:
            s.bind(("localhost", port))
        except OSError:
            return True
    return False


class Job:
    """Worker processes of one training job; `close()` always cleans up."""

    def __init__(self, out, args=(), num_workers=2, mode="multiworker"):
        self.out = str(out)
        os.makedirs(self.out, exist_ok=True)
        self.ports = _free_ports(num_workers) if mode == "multiworker" else []
        self.procs = []
        for task in range(num_workers):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
            env.pop("TF_CONFIG", None)
            if mode == "multiworker":
                env["TF_CONFIG"] = json.dumps(
                    {
                        "cluster": {"worker": [f"localhost:{p}" for p in self.ports]},
                        "task": {"type": "worker", "index": task},
                    }
                )
            log = open(os.path.join(self.out, f"log_{task}.txt"), "w")
            cmd = [sys.executable, WORKER, "--mode", mode, "--out", self.out, *args]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()

    def log(self, task):
        with open(os.path.join(self.out, f"log_{task}.txt")) as f:
            return f.read()

    def _fail(self, what):
        logs = "\n".join(
            f"--- worker {i} (rc={p.poll()}) ---\n{self.log(i)[-3000:]}"
            for i, p in enumerate(self.procs)
        )
        pytest.fail(f"{what}\n{logs}")

    def wait(self, timeout=JOB_TIMEOUT):
        """Waits for all workers; fails (with their logs) on error or timeout."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0) for p in self.procs):
                self._fail("A worker failed.")
            if time.monotonic() > deadline:
                self._fail(f"Job did not finish in {timeout} s.")
            time.sleep(0.2)
        if any(p.returncode != 0 for p in self.procs):
            self._fail("A worker failed.")

    def wait_for_file(self, name, timeout=JOB_TIMEOUT):
        path = os.path.join(self.out, name)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if any(p.poll() is not None for p in self.procs):
                self._fail(f"A worker exited before writing {name}.")
            if time.monotonic() > deadline:
                self._fail(f"No {name} after {timeout} s.")
            time.sleep(0.1)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_listening(port) for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ports still in use after the job: {self.ports}")
            time.sleep(0.1)


@contextlib.contextmanager
def job(out, args=(), **kwargs):
    j = Job(out, args, **kwargs)
    try:
        yield j
    finally:
        j.close()


def _load(out, mode, task=0):
    r = np.load(os.path.join(out, f"result_{mode}_{task}.npz"))
    history = {k[len("history_") :]: r[k] for k in r.files if k.startswith("history_")}
    weights = [r[f"weight_{i}"] for i in range(sum(k.startswith("weight_") for k in r.files))]
    return history, weights


def _evaluate_predict_diffs(out, mode, task, reference_model):
    """Max |diff| of `evaluate` results and of `predict` outputs computed under
    the strategy vs. the single-device model."""
    r = np.load(os.path.join(out, f"result_{mode}_{task}.npz"))
    x, y = worker.make_data()
    want = reference_model.evaluate(worker.make_dataset(x, y), return_dict=True, verbose=0)
    assert {f"evaluate_{k}" for k in want} <= set(r.files)
    evaluation = max(abs(float(r[f"evaluate_{k}"]) - want[k]) for k in want)
    predictions = r["predictions"]
    assert predictions.shape == (worker.NUM_EXAMPLES, worker.NUM_CLASSES)
    prediction = float(np.max(np.abs(predictions - reference_model.predict(x, verbose=0))))
    return evaluation, prediction


def _events(out, task):
    with open(os.path.join(out, f"events_{task}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _max_diffs(run, ref):
    """(max |loss diff|, max |OOD score diff|, max |weight diff|) of two runs."""
    (h, w), (h_ref, w_ref) = run, ref
    assert set(h) == set(h_ref)
    assert [x.shape for x in w] == [x.shape for x in w_ref]
    loss = float(np.max(np.abs(np.asarray(h["loss"]) - h_ref["loss"])))
    score = float(
        np.max(np.abs(np.asarray(h["minimum_distance_score"]) - h_ref["minimum_distance_score"]))
    )
    weight = max(float(np.max(np.abs(a - b))) for a, b in zip(w, w_ref, strict=True))
    return loss, score, weight


# ---------------------------------------------------------------------------
# Shared runs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_run():
    """Single-device reference (in this process): (history, weights, model)."""
    model, history = worker.train(None)
    return (
        {k: np.asarray(v) for k, v in history.items()},
        [np.asarray(w) for w in model.get_weights()],
        model,
    )


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    start = time.monotonic()
    with job(out, ["--devices", "2"], num_workers=1, mode="mirrored") as j:
        j.wait()
    print(f"\n[mirrored] job took {time.monotonic() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def multiworker_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    start = time.monotonic()
    with job(out, ["--canary", "--shard-probe"]) as j:
        j.wait()
    print(f"\n[multiworker] job took {time.monotonic() - start:.1f} s")
    return out


# ---------------------------------------------------------------------------
# The version-gated Keras fix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, needed",
    [
        ("3.4.1", False),
        ("3.5.0", True),
        ("3.9.2", True),
        ("3.10.0", True),  # A string comparison would put "3.10" below "3.5".
        ("3.15.1", True),
        ("3.16.0.dev2026", True),  # Pre-releases of 3.16 count as affected.
        ("3.16.0", False),
        ("4.0.0", False),
    ],
)
def test_fix_needed_compares_parsed_versions(monkeypatch, version, needed):
    monkeypatch.setattr(keras, "version", lambda: version)
    assert kd.multi_worker_fit_fix_needed() is needed


def test_enable_is_idempotent_and_disable_restores(monkeypatch):
    trainer_cls, module = kd._trainer_class_and_module()
    was_enabled = kd.multi_worker_fit_fix_enabled()
    kd.disable_multi_worker_fit()
    original_build = trainer_cls.__dict__["_maybe_symbolic_build"]
    original_reduce = module.reduce_per_replica
    try:
        assert kd.enable_multi_worker_fit() is kd.multi_worker_fit_fix_needed()
        if kd.multi_worker_fit_fix_needed():
            patched = module.reduce_per_replica
            assert patched is not original_reduce
            assert patched.__wrapped__ is original_reduce
            assert trainer_cls._maybe_symbolic_build.__wrapped__ is original_build
            assert kd.enable_multi_worker_fit() is True  # Again: no double wrap.
            assert module.reduce_per_replica is patched
            assert kd.disable_multi_worker_fit() is True
        assert trainer_cls.__dict__["_maybe_symbolic_build"] is original_build
        assert module.reduce_per_replica is original_reduce
        assert kd.disable_multi_worker_fit() is False
        # Outside the affected range nothing is patched.
        monkeypatch.setattr(keras, "version", lambda: "3.16.0")
        assert kd.enable_multi_worker_fit() is False
        assert module.reduce_per_replica is original_reduce
    finally:
        monkeypatch.undo()
        if was_enabled:
            kd.enable_multi_worker_fit()


def test_fix_defers_to_keras_outside_multi_worker(single_run):
    """With the fix on, one-device MirroredStrategy and no strategy train the
    same as Keras' own code (the single-device reference)."""
    if not kd.multi_worker_fit_fix_needed():
        pytest.skip("The installed Keras does not need the fix.")
    was_enabled = kd.multi_worker_fit_fix_enabled()
    kd.enable_multi_worker_fit()
    try:
        _, module = kd._trainer_class_and_module()
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        values = {"loss": tf.constant(1.5), "v": tf.constant([1.0, 2.0])}
        for reduction in ("auto", "mean", "sum", "first", "concat"):
            got = module.reduce_per_replica(values, strategy, reduction)
            want = module.reduce_per_replica.__wrapped__(values, strategy, reduction)
            tf.nest.map_structure(np.testing.assert_array_equal, got, want)
        model, history = worker.train(strategy)
        ref_history, ref_weights, _ = single_run
        diffs = _max_diffs(
            ({k: np.asarray(v) for k, v in history.items()}, model.get_weights()),
            (ref_history, ref_weights),
        )
        assert max(diffs) <= TOL, diffs
    finally:
        if not was_enabled:
            kd.disable_multi_worker_fit()


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def test_configure_logical_cpus_validates_and_explains():
    with pytest.raises(TypeError, match="Received: num_devices='2'"):
        kd.configure_logical_cpus("2")
    with pytest.raises(ValueError, match="Received: num_devices=0"):
        kd.configure_logical_cpus(0)
    tf.constant(0.0)  # TensorFlow is initialized (one logical CPU) by now.
    assert len(kd.configure_logical_cpus(1)) == 1
    with pytest.raises(RuntimeError, match="before any TensorFlow op"):
        kd.configure_logical_cpus(2)


def test_task_info_and_worker_backup_dir(tmp_path):
    cluster = {"worker": ["h1:2222", "h2:2222"]}
    info = kd.task_info({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    assert info == {"task_type": "worker", "task_index": 1, "num_workers": 2, "is_chief": False}
    assert kd.task_info(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))[
        "is_chief"
    ]
    with_chief = {"cluster": {"chief": ["c:1"], **cluster}, "task": {"type": "worker", "index": 0}}
    assert kd.task_info(with_chief)["is_chief"] is False
    assert kd.task_info(with_chief)["num_workers"] == 3
    assert kd.task_info("")["num_workers"] == 1
    with pytest.raises(ValueError, match="not valid JSON"):
        kd.task_info("{bad")
    with pytest.raises(ValueError, match="Received: tf_config="):
        kd.task_info({"cluster": cluster})
    base = str(tmp_path / "backup")
    assert kd.worker_backup_dir(base, tf_config="") == base
    assert kd.worker_backup_dir(
        base, {"cluster": cluster, "task": {"type": "worker", "index": 1}}
    ) == os.path.join(base, "worker-1")
    with pytest.raises(TypeError, match="Received: backup_dir=3"):
        kd.worker_backup_dir(3)


# ---------------------------------------------------------------------------
# TPU readiness: XLA, static shapes, no host code, bfloat16
# ---------------------------------------------------------------------------

_HOST_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def _check_graph_for_tpu(concrete_fn):
    """No host-side Python ops; every data tensor has a static shape.

    Data tensors are the floating-point and boolean ones; integer shape
    computations (e.g. `BroadcastGradientArgs` in gradients) are constant-folded
    by XLA when the inputs have static shapes.
    """
    ops = concrete_fn.graph.get_operations()
    assert not [op.type for op in ops if op.type in _HOST_OPS]
    dynamic = [
        (op.name, t.shape)
        for op in ops
        for t in op.outputs
        if (t.dtype.is_floating or t.dtype == tf.bool) and not t.shape.is_fully_defined()
    ]
    assert not dynamic, dynamic[:10]


def test_train_step_compiles_with_xla(single_run):
    ref_history, ref_weights, _ = single_run
    model, history = worker.train(None, jit_compile=True)
    assert model.jit_compile is True
    diffs = _max_diffs(
        ({k: np.asarray(v) for k, v in history.items()}, model.get_weights()),
        (ref_history, ref_weights),
    )
    print(f"\n[xla] max |loss diff| {diffs[0]:.2e}, |weight diff| {diffs[2]:.2e}")
    assert max(diffs) <= TOL, diffs

    # A hand-written step with static shapes, as TPUStrategy traces it.
    x, y = worker.make_data()
    x, y = x[: worker.GLOBAL_BATCH], y[: worker.GLOBAL_BATCH]
    loss_fn = IsoMaxPlusLoss()
    spec = (
        tf.TensorSpec(x.shape, tf.float32),
        tf.TensorSpec(y.shape, tf.int64),
    )

    @tf.function(jit_compile=True, input_signature=spec)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)
        return loss

    hlo = train_step.experimental_get_compiler_ir(x, y)(stage="hlo")
    assert "HloModule" in hlo
    _check_graph_for_tpu(train_step.get_concrete_function())
    assert np.isfinite(float(train_step(x, y)))


def test_export_functions_compile_with_xla(single_run):
    """What the exported signatures compute compiles with XLA, with a static batch
    (as on TPUs: no host ops, static shapes) and with a dynamic one."""
    from keras_isomax.export import serving_function

    _, _, model = single_run
    x, _ = worker.make_data()
    x = x[: worker.GLOBAL_BATCH]
    logits = model.predict(x, verbose=0)

    fn = serving_function(model, threshold=-0.5)
    want = fn(tf.constant(x))
    for batch in (worker.GLOBAL_BATCH, None):
        spec = [tf.TensorSpec((batch, worker.NUM_FEATURES), tf.float32)]
        xla = tf.function(fn, jit_compile=True, input_signature=spec)
        got = xla(tf.constant(x))
        assert set(got) == set(want)
        for key in got:
            np.testing.assert_allclose(got[key], want[key], atol=TOL, err_msg=key)
        assert "HloModule" in xla.experimental_get_compiler_ir(x)(stage="hlo")
        if batch is not None:
            _check_graph_for_tpu(xla.get_concrete_function())
    np.testing.assert_allclose(got["score"], logits.max(-1), atol=TOL)
    np.testing.assert_array_equal(got["is_ood"], logits.max(-1) < -0.5)
    np.testing.assert_allclose(got["logits"], logits, atol=TOL)


def test_mixed_bfloat16_trains_with_xla(single_run):
    ref_history, _, _ = single_run
    keras.config.set_dtype_policy("mixed_bfloat16")  # Restored by conftest.
    model, history = worker.train(None, jit_compile=True)
    dense = model.layers[1]
    assert dense.compute_dtype == "bfloat16" and dense.kernel.dtype == "float32"
    head = model.layers[-1]
    assert head.compute_dtype == "float32"  # IsoMax+ distances stay in float32.
    x, _ = worker.make_data()
    assert model(x[:4]).dtype == "float32"
    loss = np.asarray(history["loss"])
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    # bfloat16 keeps ~3 significant digits: close to float32, not equal.
    np.testing.assert_allclose(loss, ref_history["loss"], rtol=0.2, atol=0.02)
    step = tf.function(
        lambda x: model(x, training=False),
        jit_compile=True,
        input_signature=[tf.TensorSpec((32, worker.NUM_FEATURES), tf.float32)],
    )
    assert "bf16" in step.experimental_get_compiler_ir(x[:32])(stage="hlo")


# ---------------------------------------------------------------------------
# .keras save / load (and export, once keras_isomax.export exists)
# ---------------------------------------------------------------------------


def _check_saved_model_file(path, weights, reference_model):
    """Loads a `.keras` file: same weights, logits and evaluation (OODScore)."""
    x, y = worker.make_data()
    loaded = keras.saving.load_model(path)
    for a, b in zip(loaded.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(loaded.layers[-1], IsoMaxPlusLayer)
    assert isinstance(loaded.loss, IsoMaxPlusLoss)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), reference_model.predict(x, verbose=0), atol=TOL
    )
    got = loaded.evaluate(x, y, batch_size=worker.GLOBAL_BATCH, verbose=0, return_dict=True)
    want = reference_model.evaluate(
        x, y, batch_size=worker.GLOBAL_BATCH, verbose=0, return_dict=True
    )
    assert set(got) == set(want) == {"loss", "minimum_distance_score"}
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=TOL)
    return loaded


def _check_export(model, tmp_path):
    """Exports with keras_isomax.export and serves it through TensorFlow."""
    from keras_isomax.export import export_saved_model

    x, _ = worker.make_data()
    logits = model.predict(x, verbose=0)
    path = export_saved_model(model, str(tmp_path / "exported"), threshold=-0.5)
    served = tf.saved_model.load(path)
    out = served.signatures["serving_default"](inputs=tf.constant(x))
    np.testing.assert_allclose(out["logits"], logits, atol=TOL)
    out = served.signatures["score"](inputs=tf.constant(x))
    np.testing.assert_allclose(out["score"], logits.max(-1), atol=TOL)
    np.testing.assert_array_equal(out["is_ood"], logits.max(-1) < -0.5)


def test_single_device_model_saves_and_exports(single_run, tmp_path):
    _, weights, model = single_run
    path = str(tmp_path / "single.keras")
    model.save(path)
    loaded = _check_saved_model_file(path, weights, model)
    _check_export(loaded, tmp_path)


# ---------------------------------------------------------------------------
# MirroredStrategy over 2 logical CPUs (subprocess)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mirrored_matches_single_device(mirrored_run, single_run, tmp_path):
    ref_history, ref_weights, ref_model = single_run
    run = _load(mirrored_run, "mirrored")
    loss, score, weight = _max_diffs(run, (ref_history, ref_weights))
    print(
        f"\n[mirrored, 2 logical CPUs] max |loss diff| {loss:.2e}, "
        f"|OODScore diff| {score:.2e}, |weight diff| {weight:.2e}"
    )
    assert loss <= TOL and score <= TOL and weight <= TOL
    evaluation, prediction = _evaluate_predict_diffs(mirrored_run, "mirrored", 0, ref_model)
    print(f"  evaluate() max |diff| {evaluation:.2e}, predict() max |diff| {prediction:.2e}")
    assert evaluation <= TOL and prediction <= TOL
    loaded = _check_saved_model_file(
        os.path.join(mirrored_run, "model_mirrored_0.keras"), run[1], ref_model
    )
    _check_export(loaded, tmp_path)


# ---------------------------------------------------------------------------
# MultiWorkerMirroredStrategy, two worker processes on localhost
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_plain_keras_multi_worker_fit_is_still_broken(multiworker_run):
    """Canary for keras-team/keras#20585.

    Fails once the installed Keras trains a plain Dense + softmax model under
    MultiWorkerMirroredStrategy by itself: then delete `enable_multi_worker_fit`
    (or cap `AFFECTED_KERAS_VERSIONS` below that Keras version) and this test.
    """
    for task in (0, 1):
        with open(os.path.join(multiworker_run, f"canary_{task}.json")) as f:
            canary = json.load(f)
        if not canary["failed"]:
            pytest.fail(
                f"Keras {keras.version()} now runs `model.fit` under "
                "MultiWorkerMirroredStrategy without keras_isomax's fix "
                "(keras-team/keras#20585 is fixed): set the upper bound of "
                "keras_isomax.distribute.AFFECTED_KERAS_VERSIONS to this "
                "version and drop the fix once older versions are unsupported."
            )
        assert any(s in canary["message"] for s in KNOWN_SYMPTOMS), (
            "Plain Keras multi-worker fit now fails differently; re-check "
            f"keras_isomax.distribute's fix. {canary['type']}: {canary['message']}"
        )
        first_line = canary["message"].splitlines()[0][:80]
        print(f"\n[canary worker {task}] plain Keras: {canary['type']}: {first_line}")


@pytest.mark.slow
def test_multi_worker_matches_single_device(multiworker_run, single_run, tmp_path):
    ref_history, ref_weights, ref_model = single_run
    for task in (0, 1):
        run = _load(multiworker_run, "multiworker", task)
        loss, score, weight = _max_diffs(run, (ref_history, ref_weights))
        print(
            f"\n[multi-worker, worker {task} of 2] max |loss diff| {loss:.2e}, "
            f"|OODScore diff| {score:.2e}, |weight diff| {weight:.2e}"
        )
        assert loss <= TOL and score <= TOL and weight <= TOL
        evaluation, prediction = _evaluate_predict_diffs(
            multiworker_run, "multiworker", task, ref_model
        )
        print(f"  evaluate() max |diff| {evaluation:.2e}, predict() max |diff| {prediction:.2e}")
        assert evaluation <= TOL and prediction <= TOL
        loaded = _check_saved_model_file(
            os.path.join(multiworker_run, f"model_multiworker_{task}.keras"),
            run[1],
            ref_model,
        )
    _check_export(loaded, tmp_path)


@pytest.mark.slow
def test_auto_and_data_sharding_split_examples_off_duplicates(multiworker_run):
    shards = []
    for task in (0, 1):
        with open(os.path.join(multiworker_run, f"shards_{task}.json")) as f:
            shards.append(json.load(f))
    everything = list(range(worker.NUM_EXAMPLES))
    for policy in ("AUTO", "DATA"):
        a, b = (set(s[policy]) for s in shards)
        assert len(shards[0][policy]) == len(shards[1][policy]) == len(everything) // 2
        assert not a & b and sorted(a | b) == everything, policy
    # OFF: every worker reads the whole data set: each example twice per epoch.
    assert sorted(shards[0]["OFF"]) == sorted(shards[1]["OFF"]) == everything


@pytest.mark.slow
def test_multi_worker_resumes_after_sigkill(multiworker_run, tmp_path):
    """Worker 1 is SIGKILLed in the middle of epoch 2; the restarted job resumes
    at epoch 2 from BackupAndRestore and ends with the uninterrupted weights."""
    backup = str(tmp_path / "backup")
    run1, run2 = str(tmp_path / "run1"), str(tmp_path / "run2")
    kill_epoch = 2
    start = time.monotonic()
    with job(run1, ["--backup-dir", backup, "--pause-at-epoch", str(kill_epoch)]) as j:
        j.wait_for_file("paused_1")  # Worker 1 is inside epoch 2, batch 1.
        os.kill(j.procs[1].pid, signal.SIGKILL)
        j.procs[1].wait(timeout=30)
        assert j.procs[1].returncode == -signal.SIGKILL
        # Worker 0 is blocked in an all-reduce; TensorFlow's coordination
        # service notices the missing heartbeats and aborts it (~10-15 s).
        # A cluster manager would do the same; give it a minute.
        try:
            j.procs[0].wait(timeout=60)
            survivor = f"exited by itself, rc={j.procs[0].returncode}"
        except subprocess.TimeoutExpired:
            survivor = "still blocked after 60 s; killed"
    first_run_s = time.monotonic() - start
    for task in (0, 1):
        ended = [e["epoch"] for e in _events(run1, task) if e["event"] == "epoch_end"]
        assert ended == list(range(kill_epoch)), ended
        with open(
            os.path.join(kd.worker_backup_dir(backup, _tf_config(task)), "training_metadata.json")
        ) as f:
            assert json.load(f)["epoch"] == kill_epoch

    with job(run2, ["--backup-dir", backup]) as j:
        j.wait()
    total_s = time.monotonic() - start
    uninterrupted = _load(multiworker_run, "multiworker")
    for task in (0, 1):
        events = _events(run2, task)
        begun = [e["epoch"] for e in events if e["event"] == "epoch_begin"]
        ended = [e["epoch"] for e in events if e["event"] == "epoch_end"]
        assert begun == ended == list(range(kill_epoch, worker.EPOCHS)), events
        history, weights = _load(run2, "multiworker", task)
        # The resumed epochs log the same losses as the uninterrupted run.
        np.testing.assert_allclose(history["loss"], uninterrupted[0]["loss"][kill_epoch:], atol=TOL)
        weight = max(
            float(np.max(np.abs(a - b))) for a, b in zip(weights, uninterrupted[1], strict=True)
        )
        assert weight <= TOL
        print(
            f"\n[resume, worker {task}] run 1 ended epochs "
            f"{list(range(kill_epoch))}, worker 1 SIGKILLed in epoch {kill_epoch} "
            f"(worker 0 {survivor}); run 2 ran epochs {ended}; "
            f"max |weight diff| vs uninterrupted {weight:.2e}; "
            f"run 1 {first_run_s:.0f} s, total {total_s:.0f} s"
        )
    assert not os.listdir(backup)  # BackupAndRestore removed its backups.


def _tf_config(task):
    return {
        "cluster": {"worker": ["localhost:1", "localhost:2"]},
        "task": {"type": "worker", "index": task},
    }


# ---------------------------------------------------------------------------
# The example script
# ---------------------------------------------------------------------------

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "distributed_training.py",
)


@pytest.mark.slow
def test_example_runs_two_local_workers(tmp_path):
    from keras_isomax.app import data

    if not os.path.isdir(data.DEFAULT_FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST is not installed offline (dataset-fashion-mnist).")
    output = str(tmp_path / "model.keras")
    cmd = [
        sys.executable, EXAMPLE, "--local-workers", "2", "--epochs", "1",
        "--train-size", "1024", "--batch-size", "128", "--output", output,
        "--backup-dir", str(tmp_path / "backup"),
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # The launcher and its workers.
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:]
    assert "CollectiveAllReduceStrategy: 2 replica(s), worker 0 of 2" in stdout, stdout
    assert "test accuracy" in stdout, stdout
    loaded = keras.saving.load_model(output)
    assert isinstance(loaded.layers[-1], IsoMaxPlusLayer)
