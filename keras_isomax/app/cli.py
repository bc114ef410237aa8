"""Runs the commands of `keras-isomax` (also `python -m keras_isomax`).

The parser, the checks that need no Keras and the entry point live in the
dependency-free top-level module `keras_isomax_cli`; `run` here executes a
parsed command. A mistake (a file Keras cannot load, a bad data set name, an
existing export, a SoftMax model given to an IsoMax+-only command) prints one
line on stderr in the command line's own words and returns 2; `--debug` raises
it with its traceback instead. Library warnings are printed as one line each
(`keras-isomax COMMAND: warning: ...`), without a source line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from keras_isomax_cli import CommandLineError, ModelFileError, report_error

__all__ = ["CommandLineError", "ModelFileError", "run"]

# Python spellings in library messages and the command line's words for them.
_FLAG_WORDS = (
    ("pass overwrite=True", "pass --overwrite"),
    ("even with overwrite=True", "even with --overwrite"),
    (" Received: overwrite=False", ""),
    (" Received: overwrite=True", ""),
)


def run(args: argparse.Namespace) -> int:
    """Runs a parsed command (`keras_isomax_cli.parse_args`).

    Args:
        args: The parsed command line.

    Returns:
        The exit status: 0, 2 for an error, 130 when interrupted.

    Raises:
        Exception: Any error, with its traceback, when `args.debug` is set.
    """
    debug = bool(getattr(args, "debug", False))
    if not debug:
        _quiet_python_logging()
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _one_line_warning(args.command)
        try:
            if args.command == "demo":
                from keras_isomax.app.demo import run_demo

                run_demo(
                    output_dir=args.output,
                    epochs=args.epochs,
                    train_size=args.train_size or None,
                    seed=args.seed,
                )
            elif args.command == "evaluate":
                _evaluate(args)
            else:
                _export(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"keras-isomax {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # Every failure: one line, the traceback on --debug.
            if debug:
                raise
            report_error(args.command, _one_line(error))
            return 2
    return 0


def _quiet_python_logging() -> None:
    """TensorFlow's and absl's Python loggers: errors only (e.g. no 'Assets written')."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if "absl.logging" in sys.modules:
        sys.modules["absl.logging"].set_verbosity("error")


def _one_line_warning(command: str) -> Any:
    seen: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        text = " ".join(str(message).split())
        if text in seen:
            return
        seen.add(text)
        print(f"keras-isomax {command}: warning: {text}", file=sys.stderr, flush=True)

    return show


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    for python_words, flag_words in _FLAG_WORDS:
        text = text.replace(python_words, flag_words)
    if len(text) > 400:
        text = text[:397] + "..."
    if isinstance(error, ValueError | TypeError) or not text:
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}"


def _load(path: str) -> Any:
    """Loads a `.keras` file that `keras_isomax_cli.check_model_file` accepted."""
    import keras

    import keras_isomax  # noqa: F401  (registers the custom objects)

    try:
        return keras.saving.load_model(path)
    except Exception as error:
        raise ModelFileError(
            f"could not load the Keras model {path} (corrupted, truncated, or using custom "
            f"objects that are not registered?): {type(error).__name__}: {_one_line(error)}"
        ) from error


def _image_shape(model: Any) -> tuple[int, ...]:
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise CommandLineError(
            "data sets by name need a model with a fixed image input (height, width, "
            f"channels); this model takes inputs of shape {model.input_shape}"
        )
    return shape


def _has_isomax(model: Any) -> bool:
    from keras_isomax import find_isomax_layer

    try:
        find_isomax_layer(model)
    except ValueError:
        return False
    return True


def _parse_detectors(text: str) -> list[tuple[str, dict[str, int], str]]:
    """`--detector` specs: `(name, constructor kwargs, spec as written)`."""
    parsed = []
    for spec in filter(None, (d.strip() for d in text.split(","))):
        name, _, param = spec.partition(":")
        name = name.lower()
        kwargs: dict[str, int] = {}
        if param:
            try:
                value = int(param)
            except ValueError:
                raise CommandLineError(
                    f"--detector {spec}: the parameter after ':' must be an integer"
                ) from None
            if name not in ("knn", "vim"):
                raise CommandLineError(
                    f"--detector {spec}: only knn:K and vim:DIM take a parameter"
                )
            kwargs = {"k": value} if name == "knn" else {"dim": value}
        elif name == "vim":
            raise CommandLineError(f"--detector {spec}: ViM needs its dimension, e.g. vim:64")
        parsed.append((name, kwargs, spec))
    if not parsed:
        raise CommandLineError(f"--detector names no detector: {text!r}")
    return parsed


def _detectors(args: argparse.Namespace, model: Any, shape: tuple[int, ...]) -> list[Any]:
    """Builds the detectors named by `--detector`, fitting feature detectors on `--fit-on`.

    For `evaluate`, `--fit-on` defaults to the `--in` data set (its train
    split); the command says so in its output.
    """
    from keras_isomax import detectors
    from keras_isomax.app import data

    if not args.detector:
        return []
    built = []
    parsed = _parse_detectors(args.detector)
    names = [name for name, _, _ in parsed]
    for name, kwargs, spec in parsed:
        # Rows and messages name a detector as written: `knn`, or `knn_5` when
        # several knn detectors are compared (never Keras' `knn_1` counters).
        label = name if names.count(name) == 1 else spec.lower().replace(":", "_")
        try:
            built.append(detectors.get(name, name=label, **kwargs))
        except ValueError:
            known = "knn[:K], mahalanobis, vim:DIM, energy, max_logit, max_probability, ..."
            raise CommandLineError(
                f"--detector {spec}: unknown detector (known: {known})"
            ) from None
    fit_on = args.fit_on
    implicit = False
    if fit_on is None and args.command == "evaluate":
        fit_on, implicit = args.in_data, True
    for det in built:
        if det.input_kind == "logits":
            det.fit(model)
    needs_data = [det for det in built if det.input_kind != "logits"]
    if not needs_data:
        return built
    if not fit_on:
        raise CommandLineError(
            f"--detector {needs_data[0].name} is fitted on labelled training data: "
            "pass --fit-on DATASET (its train split is used)"
        )
    x, y = data.load_dataset(fit_on, "train", image_shape=shape, n=args.fit_n)
    for det in needs_data:
        det.fit(model, (x, y))
        where = f"{len(x)} examples of the train split of {fit_on}"
        if implicit:
            where += " (the --in data set; choose another with --fit-on)"
        print(f"Fitted detector {det.name} on {where}", flush=True)
    return built


def _evaluate(args: argparse.Namespace) -> None:
    from keras_isomax import evaluate_ood
    from keras_isomax.app import data

    model = _load(args.model)
    shape = _image_shape(model)
    x_in, y_in = data.load_dataset(args.in_data, "test", image_shape=shape, n=args.n)
    ood = {}
    for name in filter(None, (n.strip() for n in args.ood.split(","))):
        ood[name] = data.load_dataset(name, "test", image_shape=shape, n=args.n)[0]
    if not ood:
        raise CommandLineError(f"--ood names no data set: {args.ood!r}")
    score: list[Any]
    if args.score:
        score = [s.strip() for s in args.score.split(",") if s.strip()]
    else:
        score = ["minimum_distance" if _has_isomax(model) else "max_probability"]
    score = [*score, *_detectors(args, model, shape)]
    result = evaluate_ood(model, (x_in, y_in), ood, score=score, tpr=args.tpr)
    print(result)


def _softmax_export_hint(path: str) -> str:
    return (
        f"{path} has no IsoMaxPlusLayer, so it has no IsoMax+ threshold to export: export "
        "it with a detector (--detector energy, or --detector knn --fit-on DATASET), or "
        "give it an IsoMax+ head first (keras_isomax.replace_head in Python)"
    )


def _export(args: argparse.Namespace) -> None:
    from keras_isomax import calibrate_threshold, find_isomax_layer
    from keras_isomax.app import data

    model = _load(args.model)
    detector = None
    if args.detector:
        fitted = _detectors(args, model, _image_shape(model))
        if len(fitted) != 1:
            raise CommandLineError(f"export takes one detector; --detector {args.detector}")
        detector = fitted[0]
        if not args.calibrate_on and args.threshold is None:
            if not args.fit_on:
                raise CommandLineError(
                    f"--detector {detector.name} needs a threshold: pass --calibrate-on "
                    "DATASET --calibrate-split SPLIT, --threshold T, or --fit-on DATASET "
                    "(then its test split calibrates it)"
                )
            args.calibrate_on, args.calibrate_split = args.fit_on, "test"
    elif not _has_isomax(model):
        raise CommandLineError(_softmax_export_hint(args.model))
    elif (
        not args.calibrate_on
        and args.threshold is None
        and not find_isomax_layer(model).is_calibrated
    ):
        raise CommandLineError(
            f"{args.model} holds no calibrated threshold: pass --calibrate-on DATASET "
            "--calibrate-split SPLIT (data the model was not trained on), or --threshold T"
        )
    if args.calibrate_on:
        x, _ = data.load_dataset(
            args.calibrate_on,
            args.calibrate_split,
            image_shape=_image_shape(model),
            n=args.calibrate_n,
        )
        threshold = calibrate_threshold(model, x, tpr=args.tpr, detector=detector)
        print(
            f"Calibrated threshold at TPR {args.tpr:.2f} on {args.calibrate_on} split "
            f"{args.calibrate_split!r} ({len(x)} examples): {threshold:.6f}"
        )
    if args.format != "saved_model":
        from keras_isomax import edge

        export = edge.export_litert if args.format == "litert" else edge.export_onnx
        path = export(
            model,
            args.export_dir,
            threshold=args.threshold,
            detector=detector,
            overwrite=args.overwrite,
        )
        print(f"{args.format} file written to {path} (outputs: {', '.join(edge.OUTPUT_NAMES)})")
        return
    from keras_isomax import export_saved_model

    path = export_saved_model(
        model,
        args.export_dir,
        threshold=args.threshold,
        version=args.version,
        overwrite=args.overwrite,
        detector=detector,
    )
    print(f"SavedModel written to {path} (signatures: serving_default, score)")
