"""``pollen evaluate``: score a saved or exported model on a dataset's test split."""

from __future__ import annotations

import argparse
from typing import Any

from pollen.cli.options import EVALUATE, add_options
from pollen.cli.predict import runtime_notices_held_back


def add_parser(commands: Any) -> None:
    """Add ``evaluate`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        EVALUATE,
        help="score a saved or exported model on a dataset's test split",
        description="Print the accuracy, per-class precision and recall and the confusion "
        "matrix of a model on the test split of --data-dir, and draw the confusion matrix "
        "in confusion.png.",
    )
    add_options(parser, EVALUATE)
    parser.set_defaults(run=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``pollen evaluate``: print the scores and write ``confusion.png``; returns 0.

    Raises:
        PollenError: The model or the data cannot be read, a class is unknown to the
            model, or confusion.png exists without --force.
    """
    from pollen.inference.evaluate import evaluate

    with runtime_notices_held_back(args.verbose):
        lines, _, png = evaluate(args.model, args.data_dir, args.out, force=args.force)
    for line in lines:
        print(line)
    print(f"\nwrote {png}")
    return 0
