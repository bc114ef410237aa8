"""The exported `score` signature under concurrent load.

8 threads x 500 requests in one process, batch sizes 1-64, some requests with a
NaN or Inf input: no error, no answer lost, every answer equal (to the bit) to a
sequential run of the same request in the same process. Then the same requests
through TensorFlow's C API (TF Serving's load path): 8 threads on one session
against one thread, byte for byte.
"""

import threading

import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_isomax import IsoMaxPlusLayer, calibrate_threshold, export_saved_model  # noqa: E402
from keras_isomax.export import SCORE_OUTPUTS  # noqa: E402

THREADS, PER_THREAD = 8, 500
FEATURES, CLASSES = 12, 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16),
            IsoMaxPlusLayer(CLASSES),
        ]
    )
    rng = np.random.default_rng(3)
    calibrate_threshold(model, rng.normal(size=(256, FEATURES)).astype("float32"), tpr=0.8)
    path = export_saved_model(model, tmp_path_factory.mktemp("load") / "model")
    requests, broken = [], []
    for i, batch in enumerate(rng.integers(1, 65, THREADS * PER_THREAD)):
        x = rng.normal(scale=2.0, size=(batch, FEATURES)).astype("float32")
        row = -1
        if i % 7 == 0:  # One example of every 7th request holds NaN or +-Inf.
            row = int(rng.integers(batch))
            x[row, rng.integers(FEATURES)] = (np.nan, np.inf, -np.inf)[i % 3]
        requests.append(x)
        broken.append(row)
    loaded = tf.saved_model.load(path)  # Kept referenced while its signature is called.
    score = loaded.signatures["score"]
    sequential = [_answer(score, x) for x in requests]
    return {
        "path": path,
        "loaded": loaded,
        "requests": requests,
        "broken": broken,
        "sequential": sequential,
    }


def _answer(signature, x):
    return {key: value.numpy() for key, value in signature(inputs=tf.constant(x)).items()}


def _concatenated(answers):
    return {key: np.concatenate([a[key] for a in answers]) for key in SCORE_OUTPUTS}


def test_sequential_answers_follow_the_served_rules(served):
    """Precondition: the answers compared below are the served outputs."""
    answers = _concatenated(served["sequential"])
    assert 0 < answers["is_ood"].sum() < len(answers["is_ood"])  # Both decisions occur.
    for x, row, answer in zip(served["requests"], served["broken"], served["sequential"]):
        assert answer["score"].shape == (len(x),)
        assert answer["probabilities"].shape == (len(x), CLASSES)
        if row >= 0:
            assert np.isnan(answer["score"][row]) and answer["is_ood"][row]
            assert answer["class_id"][row] == -1
        assert np.isfinite(answer["score"][np.arange(len(x)) != row]).all()


def test_eight_threads_get_the_sequential_answers(served):
    score = served["loaded"].signatures["score"]
    requests = served["requests"]
    answers = [None] * len(requests)
    errors = []
    start = threading.Barrier(THREADS)

    def worker(first):
        start.wait()  # All threads call at once.
        try:
            for i in range(first, len(requests), THREADS):
                answers[i] = _answer(score, requests[i])
        except Exception as error:  # Reported below, with the request.
            errors.append((i, repr(error)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sum(answer is not None for answer in answers) == len(requests)  # None lost.
    for x, answer in zip(requests, answers):
        assert set(answer) == set(SCORE_OUTPUTS) and len(answer["score"]) == len(x)
    got, want = _concatenated(answers), _concatenated(served["sequential"])
    for key in SCORE_OUTPUTS:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # NaN == NaN here.


def test_c_api_eight_threads_on_one_session(served, c_program, tmp_path, monkeypatch):
    """TF Serving's load path: the C API runs the requests on one thread, then on 8
    threads at once on the same session, and compares the answers byte for byte."""
    requests = served["requests"]
    batches = tmp_path / "batches.bin"
    np.array([len(x) for x in requests], np.int32).tofile(batches)
    monkeypatch.setenv("RUN_SIGNATURE_BATCHES", str(batches))
    monkeypatch.setenv("RUN_SIGNATURE_THREADS", str(THREADS))
    code, outputs, log = c_program(served["path"], "score", np.concatenate(requests), tmp_path)
    assert code == 0, log[-3000:]
    n = len(requests)
    (line,) = [line for line in log.splitlines() if line.startswith("load: ")]
    assert (
        line == f"load: {n} requests on {THREADS} threads, {n} answered, 0 differ from one thread"
    )
    # The C API serves what Python serves (printed with 9 significant digits).
    python = _concatenated(served["sequential"])
    assert set(outputs) == set(SCORE_OUTPUTS)
    for key in ("is_ood", "class_id"):
        np.testing.assert_array_equal(outputs[key], python[key], err_msg=key)
    for key in ("score", "threshold", "probabilities"):
        np.testing.assert_allclose(outputs[key], python[key], rtol=0, atol=1e-6, err_msg=key)
