"""Recorded benchmark results: one JSON file per benchmark under `benchmarks/results/`.

Every benchmark script ends with `write_result(name, payload)`: the file holds the
command, the commit, the date, the machine (CPU model, cores, oneDNN setting, library
versions) and the raw values (per seed, per repetition) the published tables are
computed from. `benchmarks/render.py` renders BENCHMARKS.md and the README's tables
from these files; nobody types a figure.

This module imports no TensorFlow at the top level (workers that must not load it
import it too); `machine_info()` reads TensorFlow's oneDNN switch only when
TensorFlow is already imported or importable.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"

_VERSIONED = ("tensorflow", "keras", "numpy", "jax", "torch", "scikit-learn", "pytorch-ood")


def add_output_arguments(parser, files: str) -> None:
    """`--results-dir` and `--no-results`, as every benchmark takes them."""
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS_DIR),
        help=f"Where the results ({files}) are written. Default: benchmarks/results.",
    )
    parser.add_argument("--no-results", action="store_true", help="Write no result file.")


def cpu_model():
    """The CPU's model name from `/proc/cpuinfo` (or `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags of interest (AVX2, AVX-512, AMX) from `/proc/cpuinfo`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(
                        f for f in flags if f in ("avx2", "avx512f", "amx_tile", "amx_bf16")
                    )
    except OSError:
        pass
    return []


def onednn_setting():
    """`"on"` or `"off"`: whether TensorFlow's oneDNN kernels are used in this process.

    TensorFlow decides at import: `TF_ENABLE_ONEDNN_OPTS` when set, otherwise its
    default for the CPU (on for x86 CPUs with AVX-512, off without). The answer is
    TensorFlow's own (`IsMklEnabled`) when it can be asked, else that rule.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415

        return "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except Exception:  # TensorFlow absent, or the private switch moved.
        pass
    value = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if value is not None:
        return "on" if value.strip().lower() in ("1", "true", "yes", "on") else "off"
    return "on" if "avx512f" in cpu_flags() and platform.machine() == "x86_64" else "off"


def versions():
    """Installed versions of the libraries a result depends on (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_info(onednn=None):
    """The `machine` object of a result: CPU model, cores, oneDNN, versions.

    Args:
        onednn: The oneDNN setting to record (`"on"`/`"off"`), or `None` to read
            this process's. Defaults to `None`.
    """
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "onednn": onednn or onednn_setting(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "versions": versions(),
    }


def _git(*args):
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
    ).stdout.strip()


def git_commit():
    """`HEAD`'s short hash, with `+dirty` when tracked files differ from it."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def command_line(argv=None):
    """The command that produced the result, as a user would type it."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT) if argv else "?"
    return " ".join(["python", script, *argv[1:]])


def write_result(name, payload, *, argv=None, machine=None, path=None):
    """Writes `benchmarks/results/<name>.json` (staged, then moved into place).

    Args:
        name: The result's name (file stem), e.g. `"ood_quality"`.
        payload: The raw values and settings (JSON-serialisable; NumPy scalars
            and arrays are converted).
        argv: The command's arguments. Defaults to `sys.argv`.
        machine: The `machine` object. Defaults to `machine_info()`.
        path: Where to write instead of the default. Defaults to `None`.

    Returns:
        The path written.
    """
    record = {
        "name": name,
        "command": command_line(argv),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine or machine_info(),
        **payload,
    }
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".json.partial")
    staging.write_text(json.dumps(record, indent=1, default=_to_json) + "\n", encoding="utf-8")
    os.replace(staging, target)
    return target


def read_result(name, directory=None):
    """The recorded result `<name>.json` as a dict."""
    path = Path(directory or RESULTS_DIR) / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _to_json(value):
    if hasattr(value, "tolist"):  # NumPy arrays and scalars.
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"Not JSON-serialisable: {type(value).__name__}")
