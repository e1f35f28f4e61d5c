"""``pollen certs``: the certificates and keys of a deployment (:mod:`pollen.deploy.certs`)."""

from __future__ import annotations

import argparse
from typing import Any

from pollen.cli.options import CERTS, add_options
from pollen.deploy.certs import create_certs


def add_parser(commands: Any) -> None:
    """Add ``certs`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        CERTS,
        help="make TLS certificates and client keys for a deployment",
        description="Make a CA, a server certificate and client key pairs in --out: "
        "DIR/server for `pollen server --certs`, DIR/clients/client-i for each "
        "`pollen client --certs`, DIR/ca/ca.key to keep private. See DIR/README.txt.",
    )
    add_options(parser, CERTS)
    parser.set_defaults(run=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    """``pollen certs``: make them in ``--out`` and say where each goes; returns 0.

    Raises:
        PollenError: ``--out`` exists (without ``--force``) or a name cannot be dialled.
    """
    summary = create_certs(args.out, args.server_name, args.clients, force=args.force)
    out = summary.out
    names = ", ".join([*summary.dns, *summary.ips])
    print(f"pollen: certificates and keys in {out} (see {out}/README.txt)")
    print(f"pollen: server certificate for: {names}")
    print(f"pollen: on the server:  pollen server --certs {out}/server ...")
    for name, fingerprint in summary.clients.items():
        print(f"pollen: give {out}/clients/{name} to one client ({fingerprint})")
    print(f"pollen: keep {out}/ca/ca.key private: it is not needed to run the federation.")
    return 0
