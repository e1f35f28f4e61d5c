"""The ``pollen`` command: a friendly front door to the same Flower App.

``pollen simulate`` / ``server`` / ``client`` turn options into the app's run
config and start Flower's runtime (see :mod:`pollen.deploy.simulation` and
:mod:`pollen.deploy.deployment`); ``pollen certs`` makes the certificates and keys for a
real deployment (:mod:`pollen.deploy.certs`); ``pollen predict`` uses a saved model.

Transport: ``server`` and ``client`` use TLS and client authentication with
``--certs``; without it they refuse any address other than loopback unless
``--insecure`` says plaintext is wanted (then they print a warning).

Errors a user can fix print one paragraph to stderr and exit with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from pollen.config import ATTACK_KINDS, FAULT_KINDS, LR_SCHEDULES, PARTITION_METHODS, RunConfig
from pollen.errors import PollenError
from pollen.server.strategies import check_config

DEFAULTS = RunConfig()
#: Field defaults as declared (0 / "auto" where the model's recipe decides).
DECLARED = {k.replace("-", "_"): v for k, v in RunConfig.declared_defaults().items()}


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


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


#: ``(flag, type, help)`` of the strategies' parameters; each sets the run-config
#: field named like the flag.
STRATEGY_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--fraction-train", _fraction, "fraction of the connected clients sampled per round"),
    ("--proximal-mu", _non_negative_float, "fedprox: weight of the proximal term"),
    ("--trim-beta", _fraction, "trimmedmean: fraction cut from each end per coordinate"),
    (
        "--num-malicious-nodes",
        _non_negative_int,
        "krum/multikrum/bulyan: malicious clients to tolerate (f)",
    ),
    ("--num-nodes-to-select", _positive_int, "multikrum: updates to average (m)"),
)

#: ``(flag, type, help)`` of the privacy options (SecAgg+ and differential privacy).
PRIVACY_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    (
        "--secagg",
        bool,
        "secure aggregation (Flower SecAgg+): the server learns only the sum of the updates",
    ),
    (
        "--secagg-num-shares",
        _positive_float,
        "SecAgg+ shares per client secret: fraction (<=1) of the sampled clients or a count",
    ),
    (
        "--secagg-reconstruction-threshold",
        _positive_float,
        "SecAgg+ shares needed to reconstruct a dropped client's mask: fraction or count",
    ),
    ("--secagg-clipping-range", _positive_float, "SecAgg+ clips update values to +-this"),
    ("--dp", bool, "client-level differential privacy (clipping + Gaussian noise, accountant)"),
    (
        "--dp-noise",
        _non_negative_float,
        "DP noise multiplier z; 0 = the smallest z within --dp-epsilon",
    ),
    ("--dp-clip", _positive_float, "DP clipping norm of one client's update"),
    ("--dp-delta", _fraction, "DP delta of the reported (epsilon, delta)"),
    ("--dp-epsilon", _non_negative_float, "DP budget for the whole run; 0 = none"),
)


def _option_fields() -> dict[str, str]:
    """Destination name -> run-config field of the strategy and privacy options."""
    return {
        flag[2:].replace("-", "_"): flag[2:].replace("-", "_")
        for flag, _, _ in STRATEGY_OPTIONS + PRIVACY_OPTIONS
    }


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Options that define the federation's training (server and simulation)."""
    from pollen.models.registry import MODELS
    from pollen.server.strategies import STRATEGIES

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
        default=DECLARED["batch_size"],
        help="local batch size (default: the model's recipe: 32 for mobilenetv2, 64 for fastnet)",
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=DECLARED["learning_rate"],
        help="peak local learning rate (default: the model's recipe: 0.001 for "
        "mobilenetv2, 0.1 for fastnet)",
    )
    g.add_argument(
        "--lr-schedule",
        choices=("auto", *LR_SCHEDULES),
        default=DECLARED["lr_schedule"],
        help="local learning rate over the run: cosine decay to 0 across all rounds, "
        "onecycle (linear warm-up, then linear decay to 0), or constant (default: auto, "
        "the model's recipe: cosine for mobilenetv2, onecycle for fastnet)",
    )
    g.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default=DEFAULTS.strategy,
        help="aggregation strategy (default: %(default)s)",
    )
    g.add_argument(
        "--server-lr",
        type=_positive_float,
        default=DEFAULTS.server_lr,
        help="server learning rate of fedavgm/fedadam/fedyogi/fedadagrad (default: %(default)s)",
    )
    g.add_argument(
        "--server-momentum",
        type=_fraction,
        default=DEFAULTS.server_momentum,
        help="server momentum of fedavgm (default: %(default)s)",
    )
    g.add_argument(
        "--no-whiten",
        action="store_true",
        help="start the first convolution at random, not from whitened image patches of the "
        "client that provides the initial weights",
    )
    g.add_argument(
        "--no-tta",
        action="store_true",
        help="evaluate with one forward pass per image, without the model's test-time "
        "augmentation (fastnet: image and mirror image averaged)",
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
        help="seconds to wait for clients in one round; a client that has not replied "
        "by then is recorded as failed for that round (default: %(default)s)",
    )
    g.add_argument(
        "--max-update-norm",
        type=_non_negative_float,
        default=DEFAULTS.max_update_norm,
        help="reject a client's update whose L2 distance from the global weights exceeds "
        "this; 0 = no bound (default: %(default)s)",
    )
    for group, options in (("strategy parameters", STRATEGY_OPTIONS), ("privacy", PRIVACY_OPTIONS)):
        g2 = p.add_argument_group(group)
        for flag, kind, help_text in options:
            name = flag[2:].replace("-", "_")
            if kind is bool:
                g2.add_argument(flag, action="store_true", help=help_text)
            else:
                default = getattr(DEFAULTS, name)
                g2.add_argument(
                    flag, type=kind, default=default, help=f"{help_text} (default: {default})"
                )
    g.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed for partitions, shuffling, initialisation and client sampling "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--out", type=Path, default=None, help="run folder to write (default: ./runs/<timestamp>)"
    )


def _add_transport_options(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("security")
    if role == "server":
        g.add_argument(
            "--certs",
            type=Path,
            default=None,
            metavar="DIR",
            help="the server/ folder made by `pollen certs`: serve TLS and admit only the "
            "clients whose keys are in DIR/authorized-clients (required unless --address "
            "is loopback or --insecure is given)",
        )
        g.add_argument(
            "--insecure",
            action="store_true",
            help="plaintext, and any client may join: only on a trusted network or VPN",
        )
    else:
        g.add_argument(
            "--certs",
            type=Path,
            default=None,
            metavar="DIR",
            help="this client's folder made by `pollen certs` (DIR/clients/client-i: "
            "ca.crt, client.key); required unless --server is loopback or --insecure",
        )
        g.add_argument(
            "--insecure",
            action="store_true",
            help="plaintext, for a server started with --insecure: trusted networks only",
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
        help="fewest clients a round needs (default: the clients a round samples: all of "
        "--clients, or --fraction-train of them)",
    )
    sim.add_argument(
        "--client-threads",
        type=_non_negative_int,
        default=DEFAULTS.client_threads,
        help="intra-op threads per client (torch or TensorFlow); 0 = cores / parallel clients "
        "(default: %(default)s)",
    )
    _add_training_options(sim)
    _add_partition_options(sim)
    sim.add_argument(
        "--no-server-eval",
        action="store_true",
        help="skip central evaluation on the dataset's test split",
    )
    sim.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the interrupted simulation in RUN_DIR from its last completed round, "
        "with its saved options",
    )
    atk = sim.add_argument_group("attack harness (experiments only)")
    atk.add_argument(
        "--malicious",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="EXPERIMENTS ONLY: the clients with partition ids 0..K-1 send poisoned updates",
    )
    atk.add_argument(
        "--attack",
        choices=ATTACK_KINDS,
        default=DEFAULTS.attack,
        help="what the malicious clients send: signflip (update negated), noise (Gaussian "
        "noise, std 1, added to the weights) or scale (update x1000) (default: %(default)s)",
    )
    sim.add_argument(
        "--fault",
        default="",
        metavar="KIND@IDS",
        help="TESTS AND EXPERIMENTS ONLY: clients with these partition ids misbehave on "
        "purpose, e.g. 'nan@1' or 'scale@0,2 arch@3' (KIND: nan, scale, signflip, noise, "
        "arch)",
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
    _add_transport_options(srv, "server")
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
    srv.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue the interrupted run in RUN_DIR from its last completed round, with "
        "its saved training options (only --address, --min-clients, --round-timeout and "
        "the security options may change)",
    )

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
        help="intra-op threads of the training backend; 0 = all cores (default: %(default)s)",
    )
    cli.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to keep trying to reach the server (default: %(default)s)",
    )
    _add_transport_options(cli, "client")
    cli.add_argument(
        "--fault",
        choices=FAULT_KINDS,
        default=None,
        help="TESTS AND EXPERIMENTS ONLY: misbehave on purpose (nan: NaN weights; scale: "
        "update x1000; signflip; noise; arch: a model that does not fit the federation's)",
    )

    crt = sub.add_parser(
        "certs",
        help="make TLS certificates and client keys for a deployment",
        description="Make a CA, a server certificate and client key pairs in --out: "
        "DIR/server for `pollen server --certs`, DIR/clients/client-i for each "
        "`pollen client --certs`, DIR/ca/ca.key to keep private. See DIR/README.txt.",
    )
    crt.add_argument(
        "--out",
        type=Path,
        default=Path("certs"),
        help="folder to create (default: %(default)s)",
    )
    crt.add_argument(
        "--server-name",
        action="append",
        default=None,
        metavar="NAME",
        help="host name or IP address clients dial to reach the server; repeat for "
        "several (default: this host's name); localhost, 127.0.0.1 and ::1 are always added",
    )
    crt.add_argument(
        "--clients",
        type=_positive_int,
        default=2,
        help="client key pairs to make (default: %(default)s)",
    )
    crt.add_argument(
        "--force",
        action="store_true",
        help="replace the certificates and keys in an existing --out",
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
        "server_lr": args.server_lr,
        "server_momentum": args.server_momentum,
        "bn_calibration_examples": args.bn_calibration_examples,
        "whiten": not args.no_whiten,
        "tta": not args.no_tta,
        "target_accuracy": args.target_accuracy,
        "round_timeout": args.round_timeout,
        "max_update_norm": args.max_update_norm,
        "seed": args.seed,
        "partition": args.partition,
        "alpha": args.alpha,
        "out": str(out),
        **{name: getattr(args, name) for name in _option_fields()},
        **extra,
    }
    cfg = DEFAULTS.replace(**values)
    check_config(cfg)
    if cfg.dp:  # refuse an impossible privacy budget before anything starts
        from pollen.server.privacy import resolve_noise

        resolve_noise(cfg)
    return cfg


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
    from pollen.deploy.simulation import simulate

    data_dir = _existing_dir_or_file(args.data_dir, "--data-dir")
    if args.resume is not None:
        cfg = resume_config(args, "simulate")
        clients = _simulated_clients(Path(cfg.out), args.clients)
        data_dir = cfg.data_dir
    else:
        clients = args.clients
        # Default: as many as a round samples (all clients unless --fraction-train is lower).
        sampled = max(1, math.ceil(args.fraction_train * args.clients))
        min_clients = args.min_clients or sampled
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
            fault=args.fault,
            malicious=args.malicious,
            attack=args.attack,
        )
        from pollen.server.privacy import sample_size
        from pollen.server.strategies import check_sample_size

        check_sample_size(cfg, sample_size(cfg, clients))
        if args.malicious > args.clients:
            raise PollenError(
                f"--malicious {args.malicious} is more than --clients {args.clients}: at most "
                "every client can be malicious."
            )
        _refuse_unfinished_run(Path(cfg.out))
    _prepare_data(data_dir)
    if args.resume is None:
        from pollen.files import atomic_write

        atomic_write(Path(cfg.out) / SIMULATION_FILE, json.dumps({"clients": clients}) + "\n")
    print(
        f"pollen: simulating {clients} clients, {cfg.num_rounds} rounds of "
        f"{cfg.model}; run folder {cfg.out}",
        flush=True,
    )
    status = simulate(cfg, clients)
    _print_summary(Path(cfg.out), status)
    return 0


#: File in a simulation's run folder that records its number of clients (for --resume).
SIMULATION_FILE = "simulation.json"


def _simulated_clients(run_dir: Path, given: int) -> int:
    """The number of clients the simulation in ``run_dir`` ran with."""
    try:
        saved = int(json.loads((run_dir / SIMULATION_FILE).read_text())["clients"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PollenError(
            f"--resume {run_dir}: it has no {SIMULATION_FILE}, so it is not a run of "
            "`pollen simulate`; resume a server's run with `pollen server --resume`."
        ) from None
    if given not in (saved, 2):  # 2: the default, indistinguishable from not given
        raise PollenError(
            f"--resume {run_dir}: the run simulated {saved} clients, not {given}; drop "
            "--clients to resume it, or start a new run with another --out."
        )
    return saved


def _prepare_data(data_dir: str) -> None:
    """Load (and download, if needed) the dataset once, before any client starts.

    Otherwise every simulated client would race to download CIFAR-10, and a
    missing dataset would surface as a failed round instead of a clear error.
    """
    from pollen.data.load import describe, load_dataset

    print(f"pollen: data: {describe(load_dataset(data_dir or None))}", flush=True)


def _transport(args: argparse.Namespace, address: str, role: str) -> Any:
    """Checked certificates for ``--certs``, or None for plaintext (see module doc)."""
    from pollen.deploy.certs import is_loopback, load_client_certs, load_server_certs
    from pollen.deploy.runtime import split_address

    host, _ = split_address(address)
    if args.certs is not None and args.insecure:
        raise PollenError(
            "--certs and --insecure contradict each other: --certs turns TLS and client "
            "authentication on, --insecure turns them off. Give only one of them."
        )
    if args.certs is not None and role == "client":
        return load_client_certs(args.certs)
    if args.certs is not None:
        certs = load_server_certs(args.certs)
        names = {n.lower() for n in certs.names}
        if host not in ("0.0.0.0", "::") and host.lower() not in names:
            print(
                f"pollen: warning: the server certificate does not name {host} (it names "
                f"{', '.join(certs.names)}): clients must dial one of those names.",
                file=sys.stderr,
                flush=True,
            )
        return certs
    if args.insecure:
        who = "any client may join" if role == "server" else "the server is not verified"
        print(
            f"pollen: warning: --insecure: traffic to and from {address} is plaintext and "
            f"{who}; use it only on a trusted network or VPN.",
            file=sys.stderr,
            flush=True,
        )
        return None
    if is_loopback(host):
        return None
    if role == "server":
        raise PollenError(
            f"--address {address} is reachable from other machines, so the server needs TLS "
            "and client keys: run `pollen certs --out certs --server-name HOST` (HOST: the "
            "name or IP address clients dial), start the server with --certs certs/server "
            "and give client i the folder certs/clients/client-i. On a trusted network you "
            "may add --insecure instead (plaintext, any client may join)."
        )
    raise PollenError(
        f"--server {address} is another machine, so this client needs TLS: start it with "
        "--certs DIR, the folder the server's operator made for this client with `pollen "
        "certs` (DIR/clients/client-i: ca.crt, client.key). If the server was started with "
        "--insecure on a trusted network, add --insecure instead."
    )


def cmd_certs(args: argparse.Namespace) -> int:
    """``pollen certs``."""
    from pollen.deploy.certs import create_certs

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


def cmd_server(args: argparse.Namespace) -> int:
    """``pollen server``."""
    from pollen.deploy.deployment import serve

    test_data = _existing_dir_or_file(args.test_data, "--test-data")
    tls = _transport(args, args.address, "server")
    if args.resume is not None:
        cfg = resume_config(args, "server")
    else:
        cfg = run_config_from_args(
            args,
            server_eval=bool(test_data),
            server_data_dir=test_data,
            min_clients=args.min_clients,
            keras_verbose=1,
        )
        _refuse_unfinished_run(Path(cfg.out))
    status = serve(cfg, args.address, tls=tls)
    _print_summary(Path(cfg.out), status)
    return 0


#: Options a resumed run may change; every other option must keep the run's value.
RESUME_MAY_CHANGE = ("min_clients", "round_timeout")

#: Training options and the run-config field each one sets.
_OPTION_FIELDS = {
    "rounds": "num_rounds",
    "model": "model",
    "num_classes": "num_classes",
    "epochs": "local_epochs",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "lr_schedule": "lr_schedule",
    "strategy": "strategy",
    "bn_calibration_examples": "bn_calibration_examples",
    "target_accuracy": "target_accuracy",
    "round_timeout": "round_timeout",
    "max_update_norm": "max_update_norm",
    "seed": "seed",
    "partition": "partition",
    "alpha": "alpha",
    "min_clients": "min_clients",
    "server_lr": "server_lr",
    "server_momentum": "server_momentum",
    **_option_fields(),
}


def resume_config(args: argparse.Namespace, command: str) -> RunConfig:
    """The run config of the run in ``args.resume``, ready to continue it.

    Training options given on the command line must equal the run's (or be
    left at their defaults); ``--min-clients`` and ``--round-timeout`` may
    change.

    Raises:
        PollenError: No resumable run there, it has completed, or an option
            contradicts the run's.
    """
    from pollen.server.checkpoint import read_manifest
    from pollen.server.history import read_status

    run_dir = args.resume.expanduser().resolve()
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise PollenError(
            f"--resume {run_dir}: there is no checkpoint there (no checkpoint/manifest.json). "
            "Give the run folder of a run that completed at least one round, or start a new "
            "run without --resume."
        )
    status = read_status(run_dir) or {}
    if status.get("status") == "completed":
        raise PollenError(
            f"--resume {run_dir}: that run has already completed ({manifest['round']} "
            "rounds); there is nothing to continue. Start a new run with another --out."
        )
    saved = RunConfig.from_mapping(manifest["config"])
    changes: dict[str, Any] = {}
    conflicts = []
    for option, field in _OPTION_FIELDS.items():
        value = getattr(args, option, None)
        if value is None or not hasattr(saved, field) or value == DECLARED[field]:
            continue  # not given (or given as the default, which is indistinguishable)
        if field in RESUME_MAY_CHANGE:
            changes[field] = value
        elif value != getattr(saved, field):
            conflicts.append(
                f"--{option.replace('_', '-')} {value} (the run has {getattr(saved, field)})"
            )
    data_dir = getattr(args, "data_dir", None) if command == "simulate" else None
    if data_dir is not None and str(data_dir.expanduser().resolve()) != saved.data_dir:
        conflicts.append(f"--data-dir {data_dir} (the run has {saved.data_dir or 'CIFAR-10'})")
    test_data = getattr(args, "test_data", None)
    if test_data is not None and str(test_data.expanduser().resolve()) != saved.server_data_dir:
        conflicts.append(f"--test-data {test_data} (the run has {saved.server_data_dir or 'none'})")
    if args.out is not None and args.out.expanduser().resolve() != run_dir:
        conflicts.append(f"--out {args.out} (the run's folder is {run_dir})")
    if conflicts:
        raise PollenError(
            f"--resume continues the run in {run_dir} with the options it started with, but "
            f"these differ: {'; '.join(conflicts)}. Drop them to resume, or start a new run "
            "with another --out to change them."
        )
    print(
        f"pollen: resuming {run_dir} after round {manifest['round']} of {saved.num_rounds}",
        flush=True,
    )
    return saved.replace(out=str(run_dir), resume=True, **changes)


def _refuse_unfinished_run(run_dir: Path) -> None:
    """A new run must not overwrite the checkpoint of one that can still be resumed."""
    from pollen.server.checkpoint import read_manifest
    from pollen.server.history import read_status

    manifest = read_manifest(run_dir)
    status = (read_status(run_dir) or {}).get("status")
    if manifest is not None and status != "completed":
        raise PollenError(
            f"{run_dir} holds an unfinished run (last completed round {manifest['round']}, "
            f"status {status or 'unknown'}). Continue it with --resume {run_dir}, or give "
            "another --out for a new run."
        )


def cmd_client(args: argparse.Namespace) -> int:
    """``pollen client``."""
    from pollen.deploy.deployment import join

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
    if args.fault:
        node_config["fault"] = args.fault
        print(f"pollen: warning: --fault {args.fault}: this client misbehaves on purpose.")
    tls = _transport(args, args.server, "client")
    _prepare_data(data_dir)
    return join(args.server, node_config, connect_timeout=args.connect_timeout, tls=tls)


def cmd_predict(args: argparse.Namespace) -> int:
    """``pollen predict``."""
    from pollen.cli.predict import predict

    for line in predict(args.model, args.images, top=args.top):
        print(line)
    return 0


def _print_summary(run_dir: Path, status: dict[str, Any]) -> None:
    acc = status.get("final_server_accuracy")
    acc_text = f", final server test accuracy {acc:.4f}" if isinstance(acc, float) else ""
    target = status.get("target_accuracy")
    if target:
        if target.get("reached_round"):
            acc_text += (
                f"; target accuracy {target['target']:g} reached after round "
                f"{target['reached_round']}, {target['seconds']:.1f} s into the run"
            )
        else:
            acc_text += f"; target accuracy {target['target']:g} not reached"
    privacy = status.get("privacy")
    if privacy:
        acc_text += (
            f"; differential privacy spent: epsilon {privacy['epsilon']:.3g} at delta "
            f"{privacy['delta']:g} (noise multiplier {privacy['noise_multiplier']:g}, "
            f"clipping norm {privacy['clipping_norm']:g})"
        )
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
    "certs": cmd_certs,
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
