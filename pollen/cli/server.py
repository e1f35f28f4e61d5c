"""``pollen server``: coordinate a federation of remote ``pollen client``s."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pollen.cli.options import SERVER, add_options, existing_dir_or_file, run_config_from_args
from pollen.cli.runs import _print_summary, _refuse_unfinished_run, image_size_line, resume_config
from pollen.cli.transport import _transport
from pollen.deploy.dashboard import dashboard
from pollen.deploy.server import serve
from pollen.server.tracking import resolve_mlflow


def add_parser(commands: Any) -> None:
    """Add ``server`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        SERVER,
        help="coordinate a federation of remote clients",
        description="Start the coordinator: clients dial --address; the run "
        "starts when --min-clients have joined and the command "
        "exits 0 when all rounds are done.",
    )
    add_options(parser, SERVER)
    parser.set_defaults(run=cmd_server)


def cmd_server(args: argparse.Namespace) -> int:
    """``pollen server``: serve the run until all rounds are done; returns 0.

    Raises:
        PollenError: Bad options, data or certificates, or a failed run.
    """
    test_data = existing_dir_or_file(args.test_data, "--test-data")
    tls = _transport(args, args.address, "server")
    if args.resume is not None:
        cfg = resume_config(args, SERVER)
    else:
        cfg = run_config_from_args(
            args, server_eval=bool(test_data), server_data_dir=test_data, keras_verbose=1
        )
        _refuse_unfinished_run(Path(cfg.out))
    print(image_size_line(cfg, args.image_size, server=True), flush=True)
    cfg = resolve_mlflow(cfg)
    with dashboard(args.dashboard, Path(cfg.out), cfg.to_mapping()):
        status = serve(cfg, args.address, tls=tls, verbose=args.verbose)
    _print_summary(Path(cfg.out), status)
    return 0
