"""The `keras-isomax` command line: its parser, its input checks and its entry point.

A top-level module beside the `keras_isomax` package, importing nothing but the
standard library: `--help`, `--version`, argument errors and a missing or
malformed model file or export target are answered at once, before Keras or
TensorFlow is imported (which `import keras_isomax` does). A valid command is
then run by `keras_isomax.app.cli.run`, with TensorFlow's C++ and absl logging
silenced unless `--debug` is given.

    keras-isomax demo [--epochs N] [--output DIR]
    keras-isomax evaluate MODEL.keras --in fashion_mnist --ood digits,photos,gaussian_noise
    keras-isomax export MODEL.keras DIR [--calibrate-on fashion_mnist --calibrate-split test]
        [--format saved_model|litert|onnx]

Every mistake is one line on stderr (`keras-isomax COMMAND: error: ...`) and
exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

DISTRIBUTION = "keras-isomax"
PROG = "keras-isomax"
COMMANDS = ("demo", "evaluate", "export")

# The first bytes of an HDF5 file (Keras' legacy `.h5` model format).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class CommandLineError(ValueError):
    """A mistake on the command line, reported in one line with exit status 2."""


class ModelFileError(CommandLineError):
    """A model file that is missing, not a Keras file, or cannot be loaded."""


def version() -> str:
    """The installed distribution's version, read from its metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (no usage block)."""

    def error(self, message: str) -> NoReturn:
        _usage_error(self.prog, message)


def _usage_error(prog: str, message: str) -> NoReturn:
    text = " ".join(message.split())
    sys.stderr.write(f"{prog}: error: {text} (see `{prog} --help`)\n")
    sys.exit(2)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number_where(valid: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_fraction = _number_where(lambda value: 0.0 < value <= 1.0, "must be in (0, 1]")
_finite = _number_where(math.isfinite, "must be a finite number")


def _add_detector_arguments(command: argparse.ArgumentParser, fit_on_default: str) -> None:
    command.add_argument(
        "--detector",
        default=None,
        help="detector(s), comma-separated: knn[:K], mahalanobis, class_means, vim:DIM (fitted on "
        "--fit-on), or a logit score: energy, max_logit, max_probability, minimum_distance",
    )
    command.add_argument(
        "--fit-on",
        default=None,
        help=f"labelled data set (train split) to fit the detector on (default: {fit_on_default})",
    )
    command.add_argument(
        "--fit-n", type=_int_at_least(1), default=10000, help="training examples for the fit"
    )


def build_parser() -> argparse.ArgumentParser:
    """The `keras-isomax` argument parser (the only definition of the command line)."""
    parser = _Parser(
        prog=PROG,
        description="IsoMax+ out-of-distribution detection for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error and TensorFlow's own log messages",
    )
    # Not `required=True`: argparse would then report a missing command before an
    # unknown flag (`keras-isomax --wrongflag`); `parse_args` checks both.
    commands = parser.add_subparsers(dest="command")

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
    _add_detector_arguments(evaluate, "the --in data set")

    export = commands.add_parser("export", help="Export a SavedModel for TF Serving.")
    export.add_argument(
        "model",
        help="a .keras file with an IsoMaxPlusLayer (or any classifier, with --detector)",
    )
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
        "--overwrite", action="store_true", help="replace an existing SavedModel version or file"
    )
    export.add_argument(
        "--format",
        choices=("saved_model", "litert", "onnx"),
        default="saved_model",
        help="saved_model: EXPORT_DIR/VERSION for TF Serving; litert/onnx: one file EXPORT_DIR",
    )
    _add_detector_arguments(export, "none; required with a feature detector")
    for command in (demo, evaluate, export):
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error and TensorFlow's own log messages",
        )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks a command line; exits with status 2 on a mistake.

    Args:
        argv: The arguments (without the program name), or `None` for
            `sys.argv[1:]`. Defaults to `None`.

    Returns:
        The `argparse.Namespace` of a valid command.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(f"choose a command: {', '.join(COMMANDS)}")
    if args.command == "export" and bool(args.calibrate_on) != bool(args.calibrate_split):
        _usage_error(
            f"{PROG} export",
            "--calibrate-on and --calibrate-split go together: name the data set and a split "
            "the model was not trained on (e.g. --calibrate-split test)",
        )
    return args


def check_model_file(path: str) -> None:
    """Checks that `path` is a Keras model file, reading only its header.

    A `.keras` file must be a zip archive holding a `config.json`; a legacy
    `.h5`/`.hdf5` file must start with the HDF5 signature. Whether Keras can
    load it (its weights, its custom objects) is found out by loading it.

    Args:
        path: The model path given on the command line.

    Raises:
        ModelFileError: If the file is missing, a directory, of another format,
            or not a Keras model file.
    """
    if not os.path.exists(path):
        raise ModelFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelFileError(
            f"{path} is a directory, not a .keras file (a SavedModel cannot be re-exported; "
            "pass the .keras file it was exported from)"
        )
    lower = path.lower()
    if lower.endswith((".h5", ".hdf5")):
        with open(path, "rb") as f:
            if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
                raise ModelFileError(f"{path} is not an HDF5 file (corrupted or truncated?)")
        return
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a Keras model file (a .keras file is a zip archive); it is "
            "corrupted, truncated or of another format"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelFileError(f"{path} is not a readable zip archive: {error}") from None
    if "config.json" not in names:
        raise ModelFileError(
            f"{path} is a zip archive but not a Keras model file (it holds no config.json)"
        )
    if not lower.endswith(".keras"):
        raise ModelFileError(
            f"{path} looks like a Keras model file but Keras loads only names ending in "
            ".keras (or legacy .h5): rename it"
        )


def check_export_target(args: argparse.Namespace) -> None:
    """Refuses an export target that exists, unless `--overwrite` allows it.

    Mirrors the library's rules (a SavedModel version or an exported file is
    replaced only with `--overwrite`; anything else is never replaced) so that
    the mistake is reported before any model is loaded. Remote paths
    (`gs://...`) are left to the library.

    Raises:
        CommandLineError: If the target may not be written.
    """
    base = args.export_dir
    if "://" in base:
        return
    if args.format != "saved_model":
        if os.path.isdir(base):
            raise CommandLineError(
                f"{base} is a directory; --format {args.format} writes one file: name the file"
            )
        if os.path.exists(base) and not args.overwrite:
            raise CommandLineError(f"{base} exists: pass --overwrite to replace it")
        return
    if os.path.exists(base) and not os.path.isdir(base):
        raise CommandLineError(
            f"{base} is a file; a SavedModel is written to the directory EXPORT_DIR/VERSION"
        )
    target = os.path.join(base, str(args.version))
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise CommandLineError(f"{target} exists and is not a directory")
    entries = os.listdir(target)
    if not entries:
        return
    if "saved_model.pb" not in entries and "saved_model.pbtxt" not in entries:
        raise CommandLineError(
            f"{target} holds files that are not a SavedModel; it is never replaced, not even "
            "with --overwrite: choose another EXPORT_DIR or --version"
        )
    if not args.overwrite:
        raise CommandLineError(
            f"{target} holds a SavedModel: pass --overwrite to replace it, or --version "
            f"{args.version + 1} to add a version"
        )


def check_inputs(args: argparse.Namespace) -> None:
    """The checks that need no Keras: the model file and the export target.

    Raises:
        CommandLineError: On the first mistake found.
    """
    if args.command in ("evaluate", "export"):
        check_model_file(args.model)
    if args.command == "export":
        check_export_target(args)


def report_error(command: str | None, error: BaseException | str) -> None:
    """Prints one line `keras-isomax COMMAND: error: ...` on stderr."""
    text = " ".join(str(error).split()) or type(error).__name__
    prefix = f"{PROG} {command}" if command else PROG
    print(f"{prefix}: error: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def silenced_stderr(enabled: bool = True) -> Iterator[None]:
    """Sends file descriptor 2 to the null device inside the block.

    TensorFlow's C++ libraries write log lines (oneDNN, CUDA, CPU features,
    "All log messages before absl::InitializeLog() ...") straight to the
    process' stderr while they load, whatever `TF_CPP_MIN_LOG_LEVEL` says; only
    the file descriptor can hold them back. Python exceptions raised inside
    the block still propagate (and are reported after it).
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # No usable stderr: nothing to silence.
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _load_runner(debug: bool) -> Callable[[argparse.Namespace], int]:
    """Imports Keras, TensorFlow (on its backend) and the command runner, quietly."""
    if not debug:
        # C++ log lines after the libraries have loaded: warnings and info.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with silenced_stderr(enabled=not debug):
        from keras_isomax.app.cli import run  # Keras and TensorFlow load from here on.

        if "tensorflow" in sys.modules:
            # Device discovery logs too (e.g. "failed call to cuInit"): do it now.
            sys.modules["tensorflow"].config.list_logical_devices()
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keras-isomax` console script and `python -m keras_isomax`.

    Args:
        argv: The arguments (without the program name), or `None` for
            `sys.argv[1:]`. Defaults to `None`.

    Returns:
        The exit status: 0, 2 for an error, 130 when interrupted.

    Raises:
        SystemExit: With status 2 on an argument error (argparse), 0 after
            `--help` or `--version`.
    """
    args = parse_args(argv)
    try:
        check_inputs(args)
    except CommandLineError as error:
        if args.debug:
            raise
        report_error(args.command, error)
        return 2
    try:
        run = _load_runner(args.debug)
    except Exception as error:
        if args.debug:
            raise
        report_error(
            args.command, f"could not import keras-isomax: {type(error).__name__}: {error}"
        )
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
