"""``pollen simulate``: a whole federation on this machine (Flower's simulation engine)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollen.cli.options import (
    SIMULATE,
    add_options,
    existing_dir_or_file,
    run_config_from_args,
)
from pollen.cli.runs import (
    SIMULATION_FILE,
    _prepare_data,
    _print_summary,
    _refuse_unfinished_run,
    _simulated_clients,
    image_size_line,
    resume_config,
)
from pollen.config import RunConfig
from pollen.data.dataset import Dataset
from pollen.data.partition import check_partitions
from pollen.deploy import simulation
from pollen.deploy.dashboard import dashboard
from pollen.errors import PollenError
from pollen.files import atomic_write
from pollen.server.privacy import sample_size
from pollen.server.strategies import check_sample_size
from pollen.server.tracking import resolve_mlflow

if TYPE_CHECKING:
    import numpy as np


def add_parser(commands: Any) -> None:
    """Add ``simulate`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        SIMULATE,
        help="run a whole federation on this machine",
        description="Run a federation of simulated clients on this machine "
        "with Flower's simulation engine.",
    )
    add_options(parser, SIMULATE)
    parser.set_defaults(run=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``pollen simulate``: run the federation, print its summary; returns 0.

    Raises:
        PollenError: Bad options or data (before anything starts), or a failed run.
    """
    data_dir = existing_dir_or_file(args.data_dir, "--data-dir")
    if args.resume is not None:
        cfg = resume_config(args, SIMULATE)
        clients = _simulated_clients(Path(cfg.out), args.clients)
        data_dir = cfg.data_dir
    else:
        clients = args.clients
        cfg = _new_run_config(args, data_dir)
    cfg = resolve_mlflow(cfg)
    print(image_size_line(cfg, args.image_size), flush=True)
    _check_clients_have_data(_prepare_data(data_dir, cfg.image_hw), clients, cfg)
    if args.resume is None:
        atomic_write(Path(cfg.out) / SIMULATION_FILE, json.dumps({"clients": clients}) + "\n")
    print(
        f"pollen: simulating {clients} clients, {cfg.num_rounds} rounds of "
        f"{cfg.model}; run folder {cfg.out}",
        flush=True,
    )
    with dashboard(args.dashboard, Path(cfg.out), cfg.to_mapping()):
        status = simulation.simulate(
            cfg,
            clients,
            verbose=args.verbose,
            ray_address=args.ray_address,
            client_gpus=args.client_gpus,
        )
    _print_summary(Path(cfg.out), status)
    return 0


def _check_clients_have_data(ds: Dataset, clients: int, cfg: RunConfig) -> None:
    """Refuse, before anything starts, data that cannot give every client its share.

    Each of ``clients`` needs at least one training and one test example
    (:func:`pollen.data.partition.check_partitions`); found here, not after the
    simulation engine's start-up, by the first client. ``ds`` is dropped after.
    """
    try:
        sizes = check_partitions(ds, clients, method=cfg.partition, alpha=cfg.alpha, seed=cfg.seed)
    except PollenError as err:
        raise PollenError(f"--clients {clients} does not fit the data: {err}") from None
    _check_example_budget(cfg, sizes)


def _check_example_budget(cfg: RunConfig, sizes: np.ndarray) -> None:
    """Refuse, before the run starts, an example-level DP budget some client cannot keep.

    Each client calibrates its own noise from its number of examples
    (:func:`pollen.training.accountant.example_noise`); the smallest and the
    largest client are the extremes of the sample rate and of the steps, so a
    budget both can keep is one every client can. A deployment's server does not
    know its clients' sizes: there each client refuses in round 1.
    """
    if cfg.dp != "example" or len(sizes) == 0:
        return
    from pollen.training.accountant import example_noise, steps_per_round

    for n in sorted({int(sizes.min()), int(sizes.max())}):
        steps = cfg.num_rounds * steps_per_round(n, cfg.batch_size, cfg.local_epochs)
        try:
            example_noise(cfg.dp_epsilon, cfg.dp_noise, cfg.dp_delta, n, cfg.batch_size, steps)
        except PollenError as err:
            raise PollenError(f"A client with {n} training examples cannot start: {err}") from None


def _new_run_config(args: argparse.Namespace, data_dir: str) -> RunConfig:
    """The run config of a new simulation; refuses inconsistent options before any data loads."""
    # Default: as many as a round samples (all clients unless --fraction-train is lower).
    sampled = max(1, math.ceil(args.fraction_train * args.clients))
    min_clients = args.min_clients or sampled
    if min_clients > args.clients:
        raise PollenError(
            f"--min-clients {min_clients} is more than --clients {args.clients}: the run "
            "would wait forever. Lower --min-clients or simulate more clients."
        )
    cfg = run_config_from_args(
        args, data_dir=data_dir, server_data_dir=data_dir, min_clients=min_clients
    )
    check_sample_size(cfg, sample_size(cfg, args.clients))
    if args.malicious > args.clients:
        raise PollenError(
            f"--malicious {args.malicious} is more than --clients {args.clients}: at most "
            "every client can be malicious."
        )
    _refuse_unfinished_run(Path(cfg.out))
    return cfg
