"""The ``pollen`` command: a friendly front door to the same Flower App.

This module only wires the subcommands, one module each: ``pollen simulate`` /
``server`` / ``client`` (:mod:`pollen.cli.simulate`, :mod:`pollen.cli.server`,
:mod:`pollen.cli.client`) turn options into the app's run config and start Flower's
runtime; ``pollen certs`` (:mod:`pollen.cli.certs`) makes the certificates and keys for
a real deployment; ``pollen predict``, ``evaluate`` and ``export``
(:mod:`pollen.cli.predict`, :mod:`pollen.cli.evaluate`, :mod:`pollen.cli.export`) use a
saved model.
Every option is in the table of :mod:`pollen.cli.options` (``docs/options.md``).

Errors a user can fix print one paragraph to stderr and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pollen.cli import certs, client, evaluate, export, predict, server, simulate
from pollen.errors import PollenError

#: The subcommands, in ``pollen --help`` order; each module has ``add_parser``.
COMMANDS = (simulate, server, client, certs, predict, evaluate, export)


def build_parser() -> argparse.ArgumentParser:
    """The ``pollen`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="pollen",
        description="Federated learning with Flower and Keras: simulate on one machine, "
        "or deploy a server and clients across machines.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pollen`` command; returns the exit status.

    0 on success, 2 for an error the user can fix (one ``pollen: error:`` paragraph
    on stderr; argparse's own usage errors exit 2 too), 130 when interrupted.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PollenError as err:
        print(f"pollen: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("pollen: interrupted.", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
