"""TensorFlow-only writing: the SavedModel for TF Serving, and LiteRT conversion.

Imported only on the TensorFlow backend, by `export.export_saved_model` and
`edge.export_litert` (after their backend check). What the graphs compute is
`_served_outputs.Served`; this module traces it into signatures and writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from keras_isomax import _served_outputs

# What TensorFlow writes into a SavedModel directory. `overwrite=True`
# replaces a directory holding these entries only (`assets.extra`, where TF
# Serving's warm-up requests go, is written by users, not by TensorFlow).
SAVED_MODEL_ENTRIES = frozenset(
    {"saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "variables", "assets"}
)


def write_saved_model(
    served: _served_outputs.Served,
    target: str,
    *,
    input_name: str,
    shape: tuple[Any, ...],
    dtype: str,
    jit_compile: bool,
    overwrite: bool,
    verbose: bool,
) -> str:
    """Writes the SavedModel of `served` to `target` (staged, then renamed in).

    Args:
        served: A `_served_outputs.Served`.
        target: The SavedModel directory (a local path or a `scheme://` URL).
        input_name: The signatures' input name.
        shape: The input shape, batch first (`None`).
        dtype: The input dtype.
        jit_compile: Whether the signatures compile with XLA.
        overwrite: Whether an existing SavedModel at `target` is replaced.
        verbose: Whether `write_out` prints the endpoints.

    Returns:
        `target`.
    """
    remote = "://" in target
    if not remote:
        target = os.path.abspath(target)
    check_target(target, overwrite)
    spec = tf.TensorSpec(shape, tf.as_dtype(dtype), name=input_name)
    # The IsoMax+ heads' normalised prototypes are computed once, here: the
    # signatures (traced in `add_endpoint`) capture them, so they are saved with
    # the model (once: not as a tracked Keras variable, whose checkpoint would
    # hold its value twice), and do a Dense head's product on them.
    with served.snapshots():
        archive = _archive(
            served,
            spec,
            _served_outputs.SAVED_MODEL_SIGNATURES,
            jit_compile=jit_compile,
            check_shape=True,
        )
        if remote:
            return _write_remote(archive, target, verbose)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        # A sibling of the target (same file system, so the renames are atomic)
        # whose name TF Serving ignores (it loads all-digit names only). os.mkdir
        # honours the umask; tempfile.mkdtemp would make it 0700.
        staging = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
        os.mkdir(staging)
        try:
            archive.write_out(staging, verbose=verbose)
            check_target(target, overwrite)  # Unchanged while we wrote?
            _swap_in(staging, target)
        finally:
            if os.path.lexists(staging):
                shutil.rmtree(staging, ignore_errors=True)  # Ours: the staged copy.
        return target


def litert_flatbuffer(
    served: _served_outputs.Served, shape: tuple[Any, ...], dtype: str, model_name: str
) -> bytes:
    """The LiteRT flatbuffer of `served` (builtin operators only), in memory.

    Keras' own LiteRT route (ExportArchive -> SavedModel -> converter), with
    one signature named `score`.

    Raises:
        ValueError: If the converter fails (an op LiteRT builtins lack).
    """
    spec = tf.TensorSpec(shape, tf.as_dtype(dtype), name="inputs")
    with tempfile.TemporaryDirectory(prefix="keras-isomax-litert-") as staging:
        with served.snapshots():  # Traced with the prototypes normalised once.
            archive = _archive(served, spec, _served_outputs.LITERT_SIGNATURES)
            archive.write_out(staging, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            staging, signature_keys=list(_served_outputs.LITERT_SIGNATURES)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return converter.convert()
        except Exception as error:  # The converter raises ConverterError and others.
            message = f"{type(error).__name__}: {error}".strip()[:600]
            raise ValueError(
                "The model cannot be converted to LiteRT with builtin operators "
                "only (a layer in the backbone uses a TensorFlow op that LiteRT "
                "lacks; replace that layer, or export with `export_onnx` or "
                f"`export_saved_model`). Converter message: {message}. "
                f"Received: model={model_name}"
            ) from error


def _archive(
    served: _served_outputs.Served,
    spec: Any,
    signatures: Mapping[str, Sequence[str]],
    *,
    jit_compile: bool = False,
    check_shape: bool = False,
) -> Any:
    """An `ExportArchive` with one endpoint per `{name: output names}` entry."""

    def compute(inputs: Any) -> dict[str, Any]:
        if check_shape:
            # Serving runtimes feed the graph directly: check the shape there,
            # with a clear message, instead of failing deep inside the model.
            inputs = tf.ensure_shape(inputs, spec.shape)
        return served(inputs)

    if jit_compile:
        compute = tf.function(compute, jit_compile=True)
    archive = keras.export.ExportArchive()
    archive.track(served.model)
    if served.detector is not None:
        archive.track(served.detector)  # Its fitted state and `threshold` variable.
    for name, names in signatures.items():
        archive.add_endpoint(name, _endpoint(compute, names), input_signature=[spec])
    return archive


def _endpoint(
    compute: Callable[[Any], dict[str, Any]], names: Sequence[str]
) -> Callable[[Any], dict[str, Any]]:
    def endpoint(inputs: Any) -> dict[str, Any]:
        outputs = compute(inputs)
        return {key: outputs[key] for key in names}

    return endpoint


def _swap_in(staging: str, target: str) -> None:
    """Renames `staging` to `target`; an old target is removed only afterwards."""
    aside = None
    if os.path.lexists(target):
        aside = os.path.join(
            os.path.dirname(target), f".{os.path.basename(target)}.old-{uuid.uuid4().hex}"
        )
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)  # Put the previous model back.
        raise
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as error:
            warnings.warn(
                f"The new SavedModel is in place at {target!r}, but the previous one, "
                f"moved to {aside!r}, could not be deleted: {error}",
                stacklevel=4,
            )


def _write_remote(archive: Any, target: str, verbose: bool) -> str:
    """Writes to a remote file system (no atomic rename): stage, then copy over."""
    staging = f"{target.rstrip('/')}.tmp-{uuid.uuid4().hex}"
    try:
        archive.write_out(staging, verbose=verbose)
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)  # Checked: empty, or only a SavedModel.
        tf.io.gfile.rename(staging, target)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return target


def check_target(target: str, overwrite: bool) -> None:
    """Refuses targets that are files, foreign directories or the working directory."""
    if not tf.io.gfile.exists(target):
        return
    if not tf.io.gfile.isdir(target):
        raise FileExistsError(
            f"The export target exists and is not a directory. Received: export path {target!r}"
        )
    entries = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(target))
    if not entries:
        return
    is_saved_model = "saved_model.pb" in entries or "saved_model.pbtxt" in entries
    foreign = [name for name in entries if name not in SAVED_MODEL_ENTRIES]
    if not is_saved_model or foreign:
        shown = foreign if is_saved_model else entries
        listing = ", ".join(repr(name) for name in shown[:10])
        if len(shown) > 10:
            listing += f" and {len(shown) - 10} more"
        raise FileExistsError(
            f"The export target {target!r} holds "
            + ("files that are not part of a SavedModel" if is_saved_model else "no SavedModel")
            + f" ({listing}); it is never replaced, even with overwrite=True. Choose an "
            "empty or new directory. Received: overwrite="
            f"{overwrite}"
        )
    if not overwrite:
        raise FileExistsError(
            f"The export target {target!r} holds a SavedModel; pass overwrite=True to "
            f"replace it. Received: overwrite={overwrite}"
        )
    if "://" not in target:
        cwd = os.path.realpath(os.getcwd())
        real = os.path.realpath(target)
        if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
            raise FileExistsError(
                f"The export target {target!r} is the working directory (or holds it); "
                "it is never replaced. Choose another directory. "
                f"Received: export path {target!r}"
            )
