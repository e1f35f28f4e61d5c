"""``pollen predict``: classify image files and folders with a saved or exported model."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from pollen.cli.options import PREDICT, add_options
from pollen.deploy.processes import TF_LOAD_NOTICES, without_native_notices

#: Lines the model runtimes write to standard error that say nothing to a user, held back
#: with TensorFlow's load-time notices unless --verbose.
RUNTIME_NOTICES = (
    *TF_LOAD_NOTICES,
    "Created TensorFlow Lite XNNPACK delegate",
)


@contextlib.contextmanager
def runtime_notices_held_back(verbose: bool) -> Iterator[None]:
    """Hold back the runtimes' load-time notices (all through with ``verbose``).

    Keras, TensorFlow, LiteRT and ONNX Runtime load inside :mod:`pollen.inference`
    only when a model is opened, so ``pollen --help`` and the other commands stay free
    of their start-up time; their notices would otherwise precede the command's result.
    """
    with without_native_notices(() if verbose else RUNTIME_NOTICES):
        yield


def add_parser(commands: Any) -> None:
    """Add ``predict`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        PREDICT,
        help="classify images with a saved or exported model",
        description="Print the top classes of image files, and of every image in folders "
        "(recursively). With --labels-from-folders, also score the predictions against "
        "each image's folder name: accuracy, per-class accuracy and a confusion matrix.",
    )
    add_options(parser, PREDICT)
    parser.set_defaults(run=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """``pollen predict``: print one line per image (and the scores); returns 0.

    Raises:
        PollenError: The model or an image cannot be read, or a folder name is not a class.
    """
    from pollen.inference.predict import predict

    with runtime_notices_held_back(args.verbose):
        lines, _ = predict(
            args.model,
            args.images,
            top=args.top,
            labels_from_folders=args.labels_from_folders,
        )
    for line in lines:
        print(line)
    return 0
