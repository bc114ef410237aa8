"""The `keras-isomax` command line: its parser and entry point.

A top-level module beside the `keras_isomax` package, importing nothing but the
standard library: `--help`, `--version` and argument errors answer at once,
without importing Keras or TensorFlow (which `import keras_isomax` does). A
valid command is then run by `keras_isomax.app.cli.run`.

    keras-isomax demo [--epochs N] [--output DIR]
    keras-isomax evaluate MODEL.keras --in fashion_mnist --ood digits,photos,gaussian_noise
    keras-isomax export MODEL.keras DIR [--calibrate-on fashion_mnist --calibrate-split test]
        [--format saved_model|litert|onnx]
"""

from __future__ import annotations

import argparse
import math
import sys

DISTRIBUTION = "keras-isomax"


def version():
    """The installed distribution's version, read from its metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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


def _add_detector_arguments(command):
    command.add_argument(
        "--detector",
        default=None,
        help="feature detector(s), comma-separated: knn[:K], mahalanobis, vim:DIM "
        "(fitted on --fit-on)",
    )
    command.add_argument(
        "--fit-on", default=None, help="labelled data set (train split) to fit the detector on"
    )
    command.add_argument(
        "--fit-n", type=_int_at_least(1), default=10000, help="training examples for the fit"
    )


def build_parser():
    """The `keras-isomax` argument parser (the only definition of the command line)."""
    parser = argparse.ArgumentParser(
        prog="keras-isomax",
        description="IsoMax+ out-of-distribution detection for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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
    _add_detector_arguments(evaluate)

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
    _add_detector_arguments(export)
    for command in (demo, evaluate, export):
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
    return parser


def parse_args(argv=None):
    """Parses and checks a command line; exits with status 2 on a mistake.

    Args:
        argv: The arguments (without the program name), or `None` for
            `sys.argv[1:]`. Defaults to `None`.

    Returns:
        The `argparse.Namespace` of a valid command.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export" and bool(args.calibrate_on) != bool(args.calibrate_split):
        parser.error(
            "--calibrate-on and --calibrate-split go together: name the data set and a split "
            "the model was not trained on (e.g. --calibrate-split test)"
        )
    return args


def main(argv=None):
    """Entry point of the `keras-isomax` console script.

    Args:
        argv: The arguments (without the program name), or `None` for
            `sys.argv[1:]`. Defaults to `None`.

    Returns:
        The exit status: 0, 2 for an error, 130 when interrupted.
    """
    args = parse_args(argv)
    from keras_isomax.app.cli import run  # Keras and TensorFlow load from here on.

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
