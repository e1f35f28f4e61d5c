"""The ``pollen`` command: a friendly front door to the same Flower App.

``pollen simulate`` / ``server`` / ``client`` turn options into the app's run
config and start Flower's runtime (see :mod:`pollen.simulation` and
:mod:`pollen.deployment`); ``pollen predict`` uses a saved model.

Errors a user can fix print one paragraph to stderr and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from pollen.config import LR_SCHEDULES, PARTITION_METHODS, RunConfig
from pollen.errors import PollenError

DEFAULTS = RunConfig()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Options that define the federation's training (server and simulation)."""
    from pollen.models import MODELS
    from pollen.strategy import STRATEGIES

    g = p.add_argument_group("training")
    g.add_argument(
        "--rounds",
        type=_positive_int,
        default=DEFAULTS.num_rounds,
        help="federated rounds (default: %(default)s)",
    )
    g.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=DEFAULTS.model,
        help="model from the registry (default: %(default)s)",
    )
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULTS.local_epochs,
        help="local epochs per round (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULTS.batch_size,
        help="local batch size (default: %(default)s)",
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=DEFAULTS.learning_rate,
        help="local learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=DEFAULTS.lr_schedule,
        help="local learning rate over the run: cosine decay to 0 across all "
        "rounds, or constant (default: %(default)s)",
    )
    g.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default=DEFAULTS.strategy,
        help="aggregation strategy (default: %(default)s)",
    )
    g.add_argument(
        "--num-classes",
        type=_positive_int,
        default=DEFAULTS.num_classes,
        help="classes the model predicts (default: %(default)s)",
    )
    g.add_argument(
        "--bn-calibration-examples",
        type=_non_negative_int,
        default=DEFAULTS.bn_calibration_examples,
        help="local images each client uses to re-estimate BatchNorm statistics "
        "of the aggregated model; 0 = off (default: %(default)s)",
    )
    g.add_argument(
        "--target-accuracy",
        type=_fraction,
        default=DEFAULTS.target_accuracy,
        help="stop once the server's test accuracy reaches this (0-1; "
        "default: %(default)s = run all rounds)",
    )
    g.add_argument(
        "--round-timeout",
        type=_positive_float,
        default=DEFAULTS.round_timeout,
        help="seconds to wait for clients in one round (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed for partitions, shuffling and initialisation (default: %(default)s)",
    )
    g.add_argument(
        "--out", type=Path, default=None, help="run folder to write (default: ./runs/<timestamp>)"
    )


def _add_partition_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset: CIFAR-10 archive, cifar-10-batches-py/ or an image folder "
        "train/<class>/*, test/<class>/* (default: CIFAR-10, downloaded once)",
    )
    g.add_argument(
        "--partition",
        choices=PARTITION_METHODS,
        default=DEFAULTS.partition,
        help="how the data is split among clients (default: %(default)s)",
    )
    g.add_argument(
        "--alpha",
        type=_positive_float,
        default=DEFAULTS.alpha,
        help="Dirichlet concentration for --partition dirichlet; smaller = more "
        "label skew (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pollen`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="pollen",
        description="Federated learning with Flower and Keras: simulate on one machine, "
        "or deploy a server and clients across machines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine",
        description="Run a federation of simulated clients on this machine "
        "with Flower's simulation engine.",
    )
    sim.add_argument(
        "--clients", type=_positive_int, default=2, help="simulated clients (default: %(default)s)"
    )
    sim.add_argument(
        "--min-clients",
        type=_positive_int,
        default=None,
        help="fewest clients a round needs (default: all of --clients)",
    )
    sim.add_argument(
        "--client-threads",
        type=_non_negative_int,
        default=DEFAULTS.client_threads,
        help="TensorFlow threads per client; 0 = cores / parallel clients (default: %(default)s)",
    )
    _add_training_options(sim)
    _add_partition_options(sim)
    sim.add_argument(
        "--no-server-eval",
        action="store_true",
        help="skip central evaluation on the dataset's test split",
    )

    srv = sub.add_parser(
        "server",
        help="coordinate a federation of remote clients",
        description="Start the coordinator: clients dial --address; the run "
        "starts when --min-clients have joined and the command "
        "exits 0 when all rounds are done.",
    )
    srv.add_argument(
        "--address",
        default="0.0.0.0:8080",
        help="HOST:PORT that clients dial (default: %(default)s)",
    )
    srv.add_argument(
        "--min-clients",
        type=_positive_int,
        default=DEFAULTS.min_clients,
        help="clients needed before a round starts (default: %(default)s)",
    )
    srv.add_argument(
        "--test-data",
        type=Path,
        default=None,
        help="dataset whose test split the server evaluates the global model on "
        "after each round (default: no central evaluation)",
    )
    srv.add_argument(
        "--partition",
        choices=PARTITION_METHODS,
        default=DEFAULTS.partition,
        help="partition method for clients that use --partition-id (default: %(default)s)",
    )
    srv.add_argument(
        "--alpha",
        type=_positive_float,
        default=DEFAULTS.alpha,
        help="Dirichlet concentration for --partition dirichlet (default: %(default)s)",
    )
    _add_training_options(srv)

    cli = sub.add_parser(
        "client",
        help="join a federation as a participant",
        description="Join the federation at --server with local data. Exits 0 "
        "when the server's run is over.",
    )
    cli.add_argument("--server", required=True, help="HOST:PORT of the pollen server")
    cli.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="this client's data (alone: all of it is this client's own; with "
        "--partition-id: the dataset to take a partition of; default CIFAR-10)",
    )
    cli.add_argument(
        "--partition-id",
        type=_non_negative_int,
        default=None,
        help="take partition i of --num-partitions of the dataset",
    )
    cli.add_argument(
        "--num-partitions",
        type=_positive_int,
        default=None,
        help="number of partitions the dataset is split into",
    )
    cli.add_argument(
        "--name", default=None, help="name shown in the server's history (default: host name)"
    )
    cli.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        help="TensorFlow threads; 0 = all cores (default: %(default)s)",
    )
    cli.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to keep trying to reach the server (default: %(default)s)",
    )

    pred = sub.add_parser(
        "predict",
        help="classify images with a saved model",
        description="Print the top classes of image files.",
    )
    pred.add_argument("--model", type=Path, required=True, help="RUN/model.keras")
    pred.add_argument(
        "--top",
        type=_positive_int,
        default=3,
        help="classes to show per image (default: %(default)s)",
    )
    pred.add_argument("images", nargs="+", type=Path, help="image files")
    return parser


def _default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_config_from_args(args: argparse.Namespace, **extra: Any) -> RunConfig:
    """Turn parsed options into a validated :class:`RunConfig`."""
    out = (args.out or _default_out()).expanduser().resolve()
    values = {
        "num_rounds": args.rounds,
        "model": args.model,
        "num_classes": args.num_classes,
        "local_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "lr_schedule": args.lr_schedule,
        "strategy": args.strategy,
        "bn_calibration_examples": args.bn_calibration_examples,
        "target_accuracy": args.target_accuracy,
        "round_timeout": args.round_timeout,
        "seed": args.seed,
        "partition": args.partition,
        "alpha": args.alpha,
        "out": str(out),
        **extra,
    }
    return DEFAULTS.replace(**values)


def _existing_dir_or_file(path: Path | None, option: str) -> str:
    if path is None:
        return ""
    path = path.expanduser().resolve()
    if not path.exists():
        raise PollenError(
            f"{option} {path} does not exist: point it at a CIFAR-10 archive, a "
            "cifar-10-batches-py/ folder or an image folder with train/ and test/."
        )
    return str(path)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``pollen simulate``."""
    from pollen.simulation import simulate

    data_dir = _existing_dir_or_file(args.data_dir, "--data-dir")
    min_clients = args.min_clients or args.clients
    if min_clients > args.clients:
        raise PollenError(
            f"--min-clients {min_clients} is more than --clients {args.clients}: the run "
            "would wait forever. Lower --min-clients or simulate more clients."
        )
    cfg = run_config_from_args(
        args,
        data_dir=data_dir,
        server_data_dir=data_dir,
        server_eval=not args.no_server_eval,
        min_clients=min_clients,
        client_threads=args.client_threads,
    )
    _prepare_data(data_dir)
    print(
        f"pollen: simulating {args.clients} clients, {cfg.num_rounds} rounds of "
        f"{cfg.model}; run folder {cfg.out}",
        flush=True,
    )
    status = simulate(cfg, args.clients)
    _print_summary(Path(cfg.out), status)
    return 0


def _prepare_data(data_dir: str) -> None:
    """Load (and download, if needed) the dataset once, before any client starts.

    Otherwise every simulated client would race to download CIFAR-10, and a
    missing dataset would surface as a failed round instead of a clear error.
    """
    from pollen.data import describe, load_dataset

    print(f"pollen: data: {describe(load_dataset(data_dir or None))}", flush=True)


def cmd_server(args: argparse.Namespace) -> int:
    """``pollen server``."""
    from pollen.deployment import serve

    test_data = _existing_dir_or_file(args.test_data, "--test-data")
    cfg = run_config_from_args(
        args,
        server_eval=bool(test_data),
        server_data_dir=test_data,
        min_clients=args.min_clients,
        keras_verbose=1,
    )
    status = serve(cfg, args.address)
    _print_summary(Path(cfg.out), status)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """``pollen client``."""
    from pollen.deployment import join

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
    node_config: dict[str, Any] = {}
    data_dir = _existing_dir_or_file(args.data_dir, "--data-dir")
    if data_dir:
        node_config["data-dir"] = data_dir
    if args.partition_id is not None:
        node_config["partition-id"] = args.partition_id
        node_config["num-partitions"] = args.num_partitions
    if args.name:
        node_config["name"] = args.name
    node_config["threads"] = args.threads
    _prepare_data(data_dir)
    return join(args.server, node_config, connect_timeout=args.connect_timeout)


def cmd_predict(args: argparse.Namespace) -> int:
    """``pollen predict``."""
    from pollen.predict import predict

    for line in predict(args.model, args.images, top=args.top):
        print(line)
    return 0


def _print_summary(run_dir: Path, status: dict[str, Any]) -> None:
    acc = status.get("final_server_accuracy")
    acc_text = f", final server test accuracy {acc:.4f}" if isinstance(acc, float) else ""
    print(
        f"pollen: run completed: {status.get('rounds')} rounds in "
        f"{status.get('elapsed_seconds', 0):.1f} s{acc_text}.\n"
        f"pollen: results in {run_dir} (model.keras, history.json, history.csv, metrics.png)",
        flush=True,
    )


COMMANDS = {
    "simulate": cmd_simulate,
    "server": cmd_server,
    "client": cmd_client,
    "predict": cmd_predict,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pollen`` command; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PollenError as err:
        print(f"pollen: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("pollen: interrupted.", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
