"""The documentation works: the site builds, every Python block runs, the examples run.

- `mkdocs build --strict` succeeds (no warning: no broken link, anchor, include or
  docstring reference) and its API reference lists every public name.
- Every fenced `python` block of README.md and docs/ runs. The blocks of one page
  run in order in one namespace (a page is a tutorial), in a fresh working
  directory. HTML comments steer a page's run; readers never see them:

      <!-- docs-test: setup
      x_train, y_train = ...      (hidden code, run before the next block)
      -->
      <!-- docs-test: skip REASON -->                 (the next python block is not run)
      <!-- docs-test: tf-serving NAME=PATH -->        (a stand-in TF Serving, below)
      <!-- docs-test: fresh-process -->               (the next block runs alone, in a new
                                                      Python process: self-contained code)
      <!-- docs-test: subprocess KEY=VALUE ... -->    (the page runs in a fresh process
                                                      with that environment)

  A skipped block is its own test, skipped with its reason, so the reasons show in
  the test summary.
- `examples/quickstart.py` and `examples/trained_classifier.py` run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_isomax

# The docs run TensorFlow-only features (SavedModel export, TF Serving requests).
pytestmark = pytest.mark.tensorflow_only

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLES = ROOT / "examples"

# The public modules whose names the API reference must list (besides keras_isomax.__all__).
PUBLIC_MODULES = (
    "layers",
    "losses",
    "metrics",
    "scores",
    "detectors",
    "callbacks",
    "calibration",
    "evaluation",
    "detection_metrics",
    "head",
    "export",
    "edge",
    "distribute",
    "plots",
    "testing",
)


# ----------------------------------------------------------------- page parsing


@dataclasses.dataclass
class Step:
    """A piece of a page's code: a visible block or hidden setup code."""

    code: str
    line: int  # 1-based line of the code's first line in the page.
    hidden: bool = False
    skip: str | None = None
    serve: tuple[str, str] | None = None  # (model name, base path) for tf-serving.
    fresh: bool = False  # Run alone in a new Python process.


@dataclasses.dataclass
class Page:
    path: Path
    steps: list[Step]
    env: dict[str, str] | None = None  # Set: run in a fresh process with this environment.

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


DIRECTIVE = re.compile(r"^<!-- docs-test: ([a-z-]+)(.*)$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def parse_page(path: Path) -> Page:
    """The page's Python steps and directives.

    Raises:
        ValueError: On an unknown or dangling directive, or an unclosed block.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    steps, env, pending = [], None, {}
    i = 0
    where = path.relative_to(ROOT).as_posix()
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        if directive:
            kind, rest = directive.group(1), directive.group(2).strip()
            if kind == "setup":
                end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
                if rest or end is None:
                    raise ValueError(f"{where}:{i + 1}: a setup comment ends on its own '-->' line")
                code = textwrap.dedent("\n".join(lines[i + 1 : end]))
                steps.append(Step(code, i + 2, hidden=True))
                i = end + 1
                continue
            if not rest.endswith("-->"):
                raise ValueError(f"{where}:{i + 1}: a one-line directive ends with '-->'")
            rest = rest[:-3].strip()
            if kind == "skip" and rest:
                pending["skip"] = rest
            elif kind == "tf-serving" and re.fullmatch(r"\w+=\S+", rest):
                pending["serve"] = tuple(rest.split("=", 1))
            elif kind == "fresh-process" and not rest:
                pending["fresh"] = True
            elif kind == "subprocess":
                env = dict(item.split("=", 1) for item in rest.split())
            else:
                raise ValueError(f"{where}:{i + 1}: unknown docs-test directive {line!r}")
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            indent, marker = fence.group("indent"), fence.group("fence")
            info = fence.group("info").strip().split()
            end = next(
                (
                    j
                    for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(marker) and not lines[j].strip().strip(marker[0])
                ),
                None,
            )
            if end is None:
                raise ValueError(f"{where}:{i + 1}: unclosed code block")
            language = info[0] if info else ""
            if language == "python":
                body = [
                    text[len(indent) :] if text.startswith(indent) else text
                    for text in lines[i + 1 : end]
                ]
                steps.append(Step("\n".join(body), i + 2, **pending))
                pending = {}
            elif pending:
                raise ValueError(
                    f"{where}:{i + 1}: directive {pending} precedes a non-python block"
                )
            i = end + 1
            continue
        i += 1
    if pending:
        raise ValueError(f"{where}: directive {pending} after the last block")
    return Page(path, steps, env)


PARSED = [parse_page(path) for path in PAGES]
RUNNABLE = [page for page in PARSED if any(not s.skip for s in page.steps)]
SKIPPED = [(page, step) for page in PARSED for step in page.steps if step.skip]


# ------------------------------------------------------- a stand-in TF Serving


def _latest_saved_model(base_path):
    """The highest version under a TF Serving model base path, loaded."""
    import tensorflow as tf

    versions = [int(v) for v in os.listdir(base_path) if v.isdigit()]
    return tf.saved_model.load(os.path.join(base_path, str(max(versions))))


class StandInServing:
    """A stand-in for `tensorflow_model_server` serving one SavedModel on localhost.

    Loads the highest version under `base_path`, as `--model_base_path` does, and
    answers TF Serving's REST predict API (`POST /v1/models/NAME:predict`, row
    `instances` and columnar `inputs` formats) on port 8501 and its gRPC `Predict`
    on port 8500, running the signature the request names. Not TF Serving itself:
    it checks that a documented request names a model, a signature, an input and
    outputs that the export has, and that the client code runs.
    """

    def __init__(self, name, base_path, rest_port=8501, grpc_port=8500):
        self.model = _latest_saved_model(base_path)
        self.name = name
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                try:
                    status, reply = 200, outer.predict(self.path, json.loads(self._body()))
                except Exception as error:  # TF Serving answers {"error": ...}.
                    status, reply = 400, {"error": str(error)}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return self.rfile.read(int(self.headers["Content-Length"]))

            def log_message(self, *args):
                pass

        self.rest = ThreadingHTTPServer(("localhost", rest_port), Handler)
        self.thread = threading.Thread(target=self.rest.serve_forever, daemon=True)
        self.grpc = self._grpc_server(grpc_port)

    def _signature(self, name):
        return self.model.signatures[name or "serving_default"]

    def predict(self, path, body):
        """The REST predict API."""
        import tensorflow as tf

        if path != f"/v1/models/{self.name}:predict":
            raise ValueError(f"Servable not found for request: {path}")
        signature = self._signature(body.get("signature_name"))
        ((key, spec),) = signature.structured_input_signature[1].items()
        columnar = "inputs" in body
        values = body["inputs"] if columnar else body["instances"]
        if columnar and isinstance(values, dict):
            values = values[key]
        outputs = signature(**{key: tf.constant(np.asarray(values, spec.dtype.as_numpy_dtype))})
        outputs = {k: v.numpy() for k, v in outputs.items()}
        if columnar:
            return {"outputs": {k: v.tolist() for k, v in outputs.items()}}
        rows = len(next(iter(outputs.values())))
        return {
            "predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(rows)]
        }

    def _grpc_server(self, port):
        """gRPC `PredictionService.Predict`, when the client package is installed."""
        try:
            import grpc
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        except ImportError:
            return None
        import tensorflow as tf

        outer = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                if request.model_spec.name != outer.name:
                    context.abort(grpc.StatusCode.NOT_FOUND, "Servable not found")
                signature = outer._signature(request.model_spec.signature_name)
                feeds = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                response = predict_pb2.PredictResponse()
                for key, value in signature(**feeds).items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
                return response

        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
        if server.add_insecure_port(f"localhost:{port}") == 0:
            raise OSError(f"cannot listen on localhost:{port}")
        return server

    def __enter__(self):
        self.thread.start()
        if self.grpc is not None:
            self.grpc.start()
        return self

    def __exit__(self, *exc):
        self.rest.shutdown()
        self.rest.server_close()
        if self.grpc is not None:
            self.grpc.stop(grace=None)


# ------------------------------------------------------------------- the pages


def _run_python(page, source, env=None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-5000:]}"


def run_step(page, step, namespace):
    code = compile("\n" * (step.line - 1) + step.code, str(page.path), "exec")
    if step.fresh:
        source = "\n" * (step.line - 1) + step.code
        _run_python(page, f"exec(compile({source!r}, {str(page.path)!r}, 'exec'))")
        return
    if step.serve is None:
        exec(code, namespace)
        return
    name, base_path = step.serve
    try:
        server = StandInServing(name, base_path)
    except OSError as error:  # Port 8501 or 8500 taken by another process.
        pytest.fail(f"{page.name}:{step.line}: the stand-in server cannot listen: {error}")
    with server:
        exec(code, namespace)


def _subprocess_script(page):
    """One Python program that runs the page's steps in order, as `exec` would."""
    parts = ["import sys"]
    for step in page.steps:
        if step.skip:
            continue
        if step.serve or step.fresh:
            raise ValueError(
                f"{page.name}: tf-serving and fresh-process blocks run in-process only"
            )
        source = "\n" * (step.line - 1) + step.code
        parts.append(f"exec(compile({source!r}, {str(page.path)!r}, 'exec'))")
    return "\n".join(parts)


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if page.env is not None:
        backend = page.env.get("KERAS_BACKEND")
        if backend and importlib.util.find_spec(backend) is None:
            pytest.skip(f"{page.name} runs on {backend}, which is not installed")
        _run_python(page, _subprocess_script(page), page.env)
        return
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    namespace = {"__name__": "__docs__"}
    for step in page.steps:
        if not step.skip:
            run_step(page, step, namespace)


@pytest.mark.parametrize(
    "page, step", SKIPPED, ids=[f"{page.name}:{step.line}" for page, step in SKIPPED]
)
def test_marked_block(page, step):
    pytest.skip(f"{page.name}, block at line {step.line}: {step.skip}")


def test_directives_are_understood():
    """Every page parses (no unknown docs-test directive) and has something to run."""
    assert len(PARSED) == len(PAGES)
    assert RUNNABLE, "no runnable Python block found"


# ---------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="MkDocs is in the [docs] and [test] extras")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out, result


def test_site_builds_strict(site):
    _, result = site
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, "\n".join(warnings)


def _inventory(site_dir):
    """Object names in the site's Sphinx inventory (objects.inv)."""
    data = (site_dir / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines()}


def _public_names(module):
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", None) == module.__name__
    ]


def test_api_reference_lists_every_public_name(site):
    site_dir, result = site
    assert result.returncode == 0, result.stdout + result.stderr
    documented = _inventory(site_dir)
    expected = [f"keras_isomax.{name}" for name in keras_isomax.__all__]
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(f"keras_isomax.{module_name}")
        expected.append(module.__name__)
        expected += [f"{module.__name__}.{name}" for name in _public_names(module)]
    missing = [name for name in expected if name not in documented]
    assert not missing, f"not in the API reference: {missing}"


# ------------------------------------------------------------------- examples


def _run_example(name, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.slow
def test_quickstart_example_runs():
    out = _run_example("quickstart.py", "--epochs", "1", "--train-size", "2000")
    assert "AUROC" in out, out


@pytest.mark.slow
def test_trained_classifier_example_runs(tmp_path):
    out = _run_example("trained_classifier.py", "--export-dir", str(tmp_path / "fashion"))
    assert "Mean AUROC over the OOD sets" in out, out
    for route in ("replace_head", "softmax + knn"):
        assert f"{route} (" in out, out
    assert (tmp_path / "fashion_isomax" / "1" / "saved_model.pb").exists()
    assert (tmp_path / "fashion_knn" / "1" / "saved_model.pb").exists()
