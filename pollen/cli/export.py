"""``pollen export``: write a run's ``model.keras`` as a SavedModel, TFLite or ONNX file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pollen.cli.options import EXPORT, add_options
from pollen.cli.predict import runtime_notices_held_back


def add_parser(commands: Any) -> None:
    """Add ``export`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        EXPORT,
        help="export a saved model as SavedModel, TFLite or ONNX",
        description="Convert a model.keras into a SavedModel folder, a .tflite file or an "
        ".onnx file that carries the class names, check that it predicts as the model "
        "does, and print where it is. pollen predict and pollen evaluate read every format.",
    )
    add_options(parser, EXPORT)
    parser.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``pollen export``: write the export and print a line about it; returns 0.

    Raises:
        PollenError: Bad arguments, an unreadable model, a missing converter, or an
            export that predicts differently from the model.
    """
    # A model.keras is the same on every backend, and the converters need TensorFlow's:
    # choose it unless Keras is already loaded (then export_model checks it).
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"
    from pollen.inference.export import export_model

    with runtime_notices_held_back(args.verbose):
        out, exported, difference = export_model(
            args.model, args.format, args.out, force=args.force
        )
    classes = ", ".join(exported.classes[:10]) + (" ..." if len(exported.classes) > 10 else "")
    h, w = exported.image_size
    print(
        f"wrote {out} ({args.format}; input {h}x{w}x{exported.channels}; "
        f"{len(exported.classes)} classes: {classes})"
    )
    print(
        f"checked: its class probabilities differ from {args.model.name}'s by at most "
        f"{difference:.2g} on random images."
    )
    return 0
