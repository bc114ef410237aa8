"""The package's layout: what `import keras_isomax` pulls in, deprecated module paths."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = ("sklearn", "skimage", "matplotlib", "tensorflow_datasets")

_BASELINE = """
import json, sys
import keras
if keras.backend.backend() == "tensorflow":
    import tensorflow
print(json.dumps({name: name in sys.modules for name in %r}))
"""

_PROBE = """
import json, sys, warnings
import keras_isomax
imported = {name: name in sys.modules for name in %r}
app_loaded = "keras_isomax.app" in sys.modules
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import keras_isomax.data, keras_isomax.demo
    from keras_isomax.app import data, demo
    moved = [keras_isomax.data is data, keras_isomax.demo is demo]
    warned = sorted(
        str(w.message).split("`")[1] for w in caught if w.category is DeprecationWarning
        and "moved to `keras_isomax.app." in str(w.message)
    )
print(json.dumps({"imported": imported, "app": app_loaded, "moved": moved, "warned": warned}))
"""


def _run(code):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_keeps_heavy_optional_dependencies_and_the_app_out():
    # Keras itself may import some of them (Keras 3.15 imports scikit-learn and
    # matplotlib here); the package must add none.
    baseline = _run(_BASELINE % (HEAVY,))
    result = _run(_PROBE % (HEAVY,))
    added = [name for name in HEAVY if result["imported"][name] and not baseline[name]]
    assert added == []
    assert result["app"] is False
    assert result["moved"] == [True, True]
    assert result["warned"] == ["keras_isomax.data", "keras_isomax.demo"]
