"""The package's layout: what `import keras_isomax` pulls in, its import graph."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = Path(ROOT) / "keras_isomax"

HEAVY = ("sklearn", "skimage", "matplotlib", "tensorflow_datasets")

_BASELINE = """
import json, sys
import keras
if keras.backend.backend() == "tensorflow":
    import tensorflow
print(json.dumps({name: name in sys.modules for name in %r}))
"""

_PROBE = """
import json, sys
import keras_isomax
imported = {name: name in sys.modules for name in %r}
print(json.dumps({"imported": imported, "app": "keras_isomax.app" in sys.modules}))
"""


def _run(code, **env):
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
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


def test_jax_backend_imports_no_tensorflow():
    code = "import json, sys, keras_isomax\nprint(json.dumps('tensorflow' in sys.modules))"
    assert _run(code, KERAS_BACKEND="jax") is False


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """`(imported module, imported names)` of every keras_isomax import in a file,
    at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    # Imports under `if TYPE_CHECKING:` never run: annotations only, not a dependency.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("keras_isomax")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # Relative imports (none today; resolved for safety).
                base = (package or _module_name(path)).split(".")
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            if module.startswith("keras_isomax"):
                found.append((module, [a.name for a in node.names]))
    return found


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(path):
            targets = [module]
            # `from keras_isomax import detectors` imports the submodule.
            targets += [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return modules, edges


def test_package_has_no_import_cycle():
    _, edges = _graph()
    # A module imports its package's __init__ implicitly: parents are not edges.
    for name in edges:
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_imports_another_modules_private_name():
    modules, _ = _graph()
    offenders = []
    for name, path in modules.items():
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and f"{module}.{n}" not in modules]
            if private and module != name:
                offenders.append(f"{name}: from {module} import {', '.join(private)}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {
            (a.asname or a.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_isomax")
            for a in node.names
            if f"{node.module}.{a.name}" in modules
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_tests_use_the_public_api():
    """No test imports a private name of the package or another test file."""
    offenders = []
    tests = Path(ROOT) / "tests"
    test_files = {p.stem for p in tests.glob("test_*.py")}
    for path in sorted(tests.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [a.name for a in node.names]
                if module.startswith("keras_isomax") and (
                    any(part.startswith("_") for part in module.split("."))
                    or any(n.startswith("_") for n in names)
                ):
                    offenders.append(f"{path.name}:{node.lineno}: from {module} import {names}")
                if module.split(".")[0] in test_files or module.startswith("benchmarks"):
                    offenders.append(f"{path.name}:{node.lineno}: from {module}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    private = any(p.startswith("_") for p in alias.name.split(".")[1:])
                    if (
                        top in test_files
                        or top == "benchmarks"
                        or (top == "keras_isomax" and private)
                    ):
                        offenders.append(f"{path.name}:{node.lineno}: import {alias.name}")
    assert offenders == []
