"""The `keras-isomax` command (also `python -m keras_isomax`).

keras-isomax demo [--epochs N] [--output DIR]
keras-isomax evaluate MODEL.keras --in fashion_mnist --ood digits,photos,gaussian_noise
keras-isomax export MODEL.keras DIR [--calibrate-on fashion_mnist --calibrate-split test]
    [--format saved_model|litert|onnx]

A mistake (a missing or corrupted file, a bad argument, an existing export)
prints one line on stderr and exits with status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile


def _int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-isomax",
        description="IsoMax+ out-of-distribution detection for Keras 3.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="SoftMax vs IsoMax+ on Fashion-MNIST: train, evaluate, calibrate, export."
    )
    demo.add_argument(
        "--epochs", type=_int_at_least(1), default=2, help="epochs per model, >= 1 (default 2)"
    )
    demo.add_argument("--output", default="demo_output", help="output directory")
    demo.add_argument(
        "--train-size",
        type=_int_at_least(0),
        default=30000,
        help="training images (default 30000; 0 = all 55,000)",
    )
    demo.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("evaluate", help="OOD metrics table for a saved model.")
    evaluate.add_argument("model", help="a .keras file (IsoMax+ or softmax classifier)")
    evaluate.add_argument(
        "--in", dest="in_data", required=True, help="in-distribution data set (test split)"
    )
    evaluate.add_argument("--ood", required=True, help="comma-separated OOD data set names")
    evaluate.add_argument(
        "--score",
        default=None,
        help="score name(s), comma-separated (default: minimum_distance for IsoMax+ models, "
        "max_probability otherwise)",
    )
    evaluate.add_argument(
        "--n", type=_int_at_least(1), default=None, help="use at most N examples per set"
    )
    evaluate.add_argument("--tpr", type=_fraction, default=0.95, help="in (0, 1] (default 0.95)")
    evaluate.add_argument(
        "--detector",
        default=None,
        help="feature detector(s), comma-separated: knn[:K], mahalanobis, vim:DIM "
        "(fitted on --fit-on)",
    )
    evaluate.add_argument(
        "--fit-on", default=None, help="labelled data set (train split) to fit the detector on"
    )
    evaluate.add_argument(
        "--fit-n", type=_int_at_least(1), default=10000, help="training examples for the fit"
    )

    export = commands.add_parser("export", help="Export a SavedModel for TF Serving.")
    export.add_argument("model", help="a .keras file with an IsoMaxPlusLayer")
    export.add_argument("export_dir", help="the model base path (a version folder is added)")
    export.add_argument(
        "--calibrate-on",
        default=None,
        help="in-distribution data set to calibrate the threshold on (needs --calibrate-split)",
    )
    export.add_argument(
        "--calibrate-split",
        default=None,
        help="split of --calibrate-on to calibrate on; required with it, and it must be data "
        "the model was not trained on (e.g. 'test', or a held-out slice such as "
        "'train[55000:]' for a TFDS set)",
    )
    export.add_argument(
        "--calibrate-n",
        type=_int_at_least(1),
        default=5000,
        help="calibrate on at most N examples (default 5000)",
    )
    export.add_argument(
        "--tpr", type=_fraction, default=0.95, help="fraction of inputs to accept, in (0, 1]"
    )
    export.add_argument("--threshold", type=_finite, default=None, help="explicit threshold")
    export.add_argument("--version", type=_int_at_least(0), default=1, help="version folder")
    export.add_argument(
        "--overwrite", action="store_true", help="replace an existing SavedModel version"
    )
    export.add_argument(
        "--format",
        choices=("saved_model", "litert", "onnx"),
        default="saved_model",
        help="saved_model: EXPORT_DIR/VERSION for TF Serving; litert/onnx: one file EXPORT_DIR",
    )
    export.add_argument(
        "--detector",
        default=None,
        help="feature detector(s), comma-separated: knn[:K], mahalanobis, vim:DIM "
        "(fitted on --fit-on)",
    )
    export.add_argument(
        "--fit-on", default=None, help="labelled data set (train split) to fit the detector on"
    )
    export.add_argument(
        "--fit-n", type=_int_at_least(1), default=10000, help="training examples for the fit"
    )
    for command in (demo, evaluate, export):
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
    return parser


def main(argv=None):
    """Entry point of the `keras-isomax` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export" and bool(args.calibrate_on) != bool(args.calibrate_split):
        parser.error(
            "--calibrate-on and --calibrate-split go together: name the data set and a split "
            "the model was not trained on (e.g. --calibrate-split test)"
        )
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
    from keras_isomax.calibration import find_isomax_layer

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
