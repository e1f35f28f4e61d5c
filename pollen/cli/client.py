"""``pollen client``: join a federation with this machine's data."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pollen.cli.options import CLIENT, add_options, existing_dir_or_file
from pollen.cli.runs import _prepare_data
from pollen.cli.transport import _transport
from pollen.deploy.client import join
from pollen.errors import PollenError


def add_parser(commands: Any) -> None:
    """Add ``client`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        CLIENT,
        help="join a federation as a participant",
        description="Join the federation at --server with local data. Exits 0 "
        "when the server's run is over.",
    )
    add_options(parser, CLIENT)
    parser.set_defaults(run=cmd_client)


def cmd_client(args: argparse.Namespace) -> int:
    """``pollen client``: take part until the server's run is over; returns its exit status.

    Raises:
        PollenError: Bad options, data or certificates, or no server to reach.
    """
    _check_data_options(args)
    node_config: dict[str, Any] = {}
    data_dir = existing_dir_or_file(args.data_dir, "--data-dir")
    if data_dir:
        node_config["data-dir"] = data_dir
    if args.partition_id is not None:
        node_config["partition-id"] = args.partition_id
        node_config["num-partitions"] = args.num_partitions
    if args.name:
        node_config["name"] = args.name
    node_config["threads"] = args.threads
    if args.fault:
        node_config["fault"] = args.fault
        print(f"pollen: warning: --fault {args.fault}: this client misbehaves on purpose.")
    tls = _transport(args, args.server, "client")
    _prepare_data(data_dir)
    return join(
        args.server,
        node_config,
        connect_timeout=args.connect_timeout,
        tls=tls,
        log_dir=_log_dir(args.log_dir),
        verbose=args.verbose,
    )


def _log_dir(given: Path | None) -> Path:
    """``--log-dir``, or ``./runs/client-<timestamp>-<pid>/logs``; absolute.

    The process id keeps apart clients started in the same second on one machine.
    """
    if given is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        given = Path("runs") / f"client-{stamp}-{os.getpid()}" / "logs"
    return given.expanduser().resolve()


def _check_data_options(args: argparse.Namespace) -> None:
    """``--data-dir``, ``--partition-id`` and ``--num-partitions`` must make sense together."""
    if (args.partition_id is None) != (args.num_partitions is None):
        raise PollenError(
            "--partition-id and --num-partitions go together: give both to take one "
            "partition of a dataset, or neither to use all of --data-dir as this client's data."
        )
    if args.partition_id is not None and args.partition_id >= args.num_partitions:
        raise PollenError(
            f"--partition-id {args.partition_id} is out of range: with --num-partitions "
            f"{args.num_partitions} it must be between 0 and {args.num_partitions - 1}."
        )
    if args.partition_id is None and args.data_dir is None:
        raise PollenError(
            "This client has no data: give --data-dir DIR (all of DIR is this client's own "
            "data) or --partition-id i --num-partitions n (partition i of CIFAR-10 or of "
            "--data-dir)."
        )
