"""Every example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import keras
import pytest

import keras_isomax

# The app (demo, CLI, data sets) is not the library; `__main__` runs the CLI on import.
SKIP = ("keras_isomax.app", "keras_isomax.__main__")
# Examples of TensorFlow-only features (they raise a clear error on other backends).
TENSORFLOW_EXAMPLES = {
    "keras_isomax.export.export_saved_model",
    "keras_isomax.edge.export_litert",
}


def _modules():
    names = ["keras_isomax"]
    for info in pkgutil.walk_packages(keras_isomax.__path__, "keras_isomax."):
        if not info.name.startswith(SKIP):
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, capsys):
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"{name} does not import on {keras.backend.backend()}: {error}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    tests = [t for t in finder.find(module, name, globs={}) if t.examples]
    if keras.backend.backend() != "tensorflow":
        tests = [t for t in tests if t.name not in TENSORFLOW_EXAMPLES]
    failures = []
    for test in tests:
        keras.utils.set_random_seed(0)
        result = runner.run(test, out=failures.append)
        if result.failed:
            failures.append(f"--- {test.name} failed")
    assert not failures, "".join(failures)
