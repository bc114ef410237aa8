"""Runs the commands of `keras-isomax` (also `python -m keras_isomax`).

The parser lives in the dependency-free top-level module `keras_isomax_cli`, so
that `--help` needs no Keras; `main` here parses with it and runs the command.
A mistake (a missing or corrupted file, a bad argument, an existing export)
prints one line on stderr and exits with status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys
import zipfile

from keras_isomax_cli import parse_args


def main(argv=None):
    """As `keras_isomax_cli.main` (the console script's entry point)."""
    return run(parse_args(argv))


def run(args):
    """Runs a parsed command (`keras_isomax_cli.parse_args`); returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
        if args.debug:
            raise
        print(f"keras-isomax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # Every failure: one line, the traceback on --debug.
        if args.debug:
            raise
        print(f"keras-isomax {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error):
    text = " ".join(str(error).split())
    if len(text) > 400:
        text = text[:397] + "..."
    kind = type(error).__name__
    if isinstance(error, ValueError | TypeError) or not text:
        return text or kind
    return f"{kind}: {text}"


class ModelFileError(ValueError):
    """A model file that is missing, not a Keras file, or cannot be loaded."""


def _load(path):
    import keras

    import keras_isomax  # noqa: F401  (registers the custom objects)

    if not os.path.exists(path):
        raise ModelFileError(f"No model file at {path!r}. Received: model={path!r}")
    if os.path.isdir(path):
        raise ModelFileError(
            f"{path!r} is a directory, not a .keras file (a SavedModel cannot be "
            f"re-exported; pass the .keras file). Received: model={path!r}"
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path!r} is not a Keras model file (a .keras file is a zip archive); "
            f"it is corrupted or of another format. Received: model={path!r}"
        )
    try:
        return keras.saving.load_model(path)
    except Exception as error:
        raise ModelFileError(
            f"Could not load the Keras model {path!r} (corrupted, truncated or not a "
            f"Keras model file?): {type(error).__name__}: {_one_line(error)}"
        ) from error


def _image_shape(model):
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise ValueError(
            "Data sets by name need a model with a fixed image input (H, W, C). "
            f"Received: input_shape={model.input_shape}"
        )
    return shape


def _has_isomax(model):
    from keras_isomax import find_isomax_layer

    try:
        find_isomax_layer(model)
    except ValueError:
        return False
    return True


def _detectors(args, model, shape, default_fit_on=None):
    """Fits the detectors named by `--detector` on `--fit-on` (train split)."""
    from keras_isomax import detectors
    from keras_isomax.app import data

    if not args.detector:
        return []
    fit_on = args.fit_on or default_fit_on
    if not fit_on:
        raise ValueError("`--detector` needs `--fit-on DATASET`. Received: --fit-on=None")
    x, y = data.load_dataset(fit_on, "train", image_shape=shape, n=args.fit_n)
    fitted = []
    for spec in filter(None, (d.strip() for d in args.detector.split(","))):
        name, _, param = spec.partition(":")
        name = name.lower()
        kwargs = {}
        if param:
            try:
                value = int(param)
            except ValueError:
                raise ValueError(
                    f"The parameter after ':' must be an integer. Received: --detector={spec}"
                ) from None
            kwargs = {"knn": {"k": value}, "vim": {"dim": value}}.get(name)
            if kwargs is None:
                raise ValueError(
                    f"Only knn:K and vim:DIM take a parameter. Received: --detector={spec}"
                )
        elif name == "vim":
            raise ValueError(f"ViM needs its dimension, e.g. vim:64. Received: --detector={spec}")
        det = detectors.get(name, **kwargs).fit(model, (x, y))
        print(f"Fitted detector {det.name} on {len(x)} examples of {fit_on} (train)")
        fitted.append(det)
    return fitted


def _evaluate(args):
    from keras_isomax.app import data
    from keras_isomax.evaluation import evaluate_ood

    model = _load(args.model)
    shape = _image_shape(model)
    x_in, y_in = data.load_dataset(args.in_data, "test", image_shape=shape, n=args.n)
    ood = {}
    for name in filter(None, (n.strip() for n in args.ood.split(","))):
        ood[name] = data.load_dataset(name, "test", image_shape=shape, n=args.n)[0]
    if args.score:
        score = [s.strip() for s in args.score.split(",") if s.strip()]
    else:
        score = "minimum_distance" if _has_isomax(model) else "max_probability"
    fitted = _detectors(args, model, shape, default_fit_on=args.in_data)
    if fitted:
        score = [score] if isinstance(score, str) else score
        score = [*score, *fitted]
    result = evaluate_ood(model, (x_in, y_in), ood, score=score, tpr=args.tpr)
    print(result)


def _export(args):
    from keras_isomax.app import data
    from keras_isomax.calibration import calibrate_threshold
    from keras_isomax.export import export_saved_model

    model = _load(args.model)
    detector = None
    if args.detector:
        fitted = _detectors(args, model, _image_shape(model))
        if len(fitted) != 1:
            raise ValueError(f"`export` takes one detector. Received: --detector={args.detector}")
        detector = fitted[0]
        if not args.calibrate_on and args.threshold is None:
            args.calibrate_on, args.calibrate_split = args.fit_on, "test"
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
    path = export_saved_model(
        model,
        args.export_dir,
        threshold=args.threshold,
        version=args.version,
        overwrite=args.overwrite,
        detector=detector,
    )
    print(f"SavedModel written to {path} (signatures: serving_default, score)")


if __name__ == "__main__":
    sys.exit(main())
