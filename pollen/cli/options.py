"""Every option of the ``pollen`` command, in one table.

:data:`OPTIONS` is the single source of the command line: each command's argparse
options (:func:`add_options`), the run-config field each option sets
(:func:`run_config_from_args`, :func:`resume_fields`) and ``docs/options.md``
(:func:`options_markdown`; ``python -m pollen.cli.options`` rewrites the file).
The table's order is the order of the options in ``pollen COMMAND --help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pollen.config import (
    ATTACK_KINDS,
    FAULT_KINDS,
    LR_SCHEDULES,
    PARTITION_METHODS,
    RunConfig,
    parse_image_size,
)
from pollen.deploy.dashboard import DEFAULT_ADDRESS as DASHBOARD_ADDRESS
from pollen.deploy.dashboard import TOKEN_ENV as DASHBOARD_TOKEN_ENV
from pollen.errors import PollenError
from pollen.models.registry import MODELS
from pollen.server.strategies import STRATEGIES, check_config

DEFAULTS = RunConfig()
#: Field defaults as declared (0 / "auto" where the model's recipe decides).
DECLARED = {k.replace("-", "_"): v for k, v in RunConfig.declared_defaults().items()}

#: The file :func:`options_markdown` writes, relative to the repository root.
DOCS_FILE = Path("docs") / "options.md"


@dataclass(frozen=True)
class Number:
    """An argparse ``type``: a number of ``kind`` that passes ``test``.

    Calling it with the option's text returns the number, or raises
    :class:`argparse.ArgumentTypeError` whose message argparse prints after
    ``argument --flag:`` (``'0' must be at least 1``).
    """

    kind: type  # int or float
    test: Callable[[Any], bool]  # False for a value outside the range (also for NaN)
    rule: str  # the error's wording, e.g. "must be at least 1"
    doc: str  # the value in docs/options.md, e.g. "whole number >= 1"

    def __call__(self, text: str) -> Any:
        """The number ``text`` spells; ArgumentTypeError if it is none or out of range."""
        noun = "whole number" if self.kind is int else "number"
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if not self.test(value):
            raise argparse.ArgumentTypeError(f"{text!r} {self.rule}")
        return value


positive_int = Number(int, lambda v: v >= 1, "must be at least 1", "whole number >= 1")
non_negative_int = Number(int, lambda v: v >= 0, "must not be negative", "whole number >= 0")
positive_float = Number(float, lambda v: v > 0, "must be positive", "number > 0")
non_negative_float = Number(float, lambda v: v >= 0, "must not be negative", "number >= 0")
fraction = Number(float, lambda v: 0 <= v <= 1, "must be between 0 and 1", "number in [0, 1]")


def image_size_text(text: str) -> str:
    """An argparse ``type``: ``auto``, ``N`` or ``HxW``, returned as ``auto`` or ``HxW``.

    ``N`` becomes ``NxN``, the form the run config holds, so ``--resume`` compares like
    with like.
    """
    try:
        size = parse_image_size(text)
    except PollenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return "auto" if size is None else f"{size[0]}x{size[1]}"


def weights_text(text: str) -> str:
    """An argparse ``type``: ``imagenet``, or an existing weights file as an absolute path."""
    from pollen.models.pretrained import check_weights_source

    try:
        return check_weights_source(text.strip())
    except PollenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: What a resumed run (``--resume``) does with an option.
KEEP = "keep"  # must equal the run's value (or be left at its default)
CHANGE = "change"  # may differ: the resumed run takes the new value
PATH = "path"  # must name the run's path; resume_config checks it with its own message
IGNORE = "ignore"  # the resumed run keeps its saved value

_RESUME_DOCS = {
    KEEP: "must match",
    CHANGE: "may change",
    PATH: "must match",
    IGNORE: "ignored",
}

_CONFIG_DEFAULT: Any = object()  # Option.default: RunConfig()'s value of the option's field


@dataclass(frozen=True)
class Option:
    """One command-line option, as argparse takes it and as it reaches the run config."""

    flag: str  # "--rounds"; without leading dashes: a positional argument
    commands: tuple[str, ...]  # the subcommands that take it
    help: str  # argparse help; "%(default)s" is replaced by the default
    field: str | None = None  # RunConfig field it sets; None: only the command uses it
    type: Callable[[str], Any] | None = None
    default: Any = _CONFIG_DEFAULT  # _CONFIG_DEFAULT: DEFAULTS.<field>, or None without one
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None  # callable: at parse
    group: str | None = None  # argparse group title; None: the command's own "options"
    metavar: str | None = None
    action: str | None = None  # "store_true" (a switch) or "append" (repeatable)
    required: bool = False
    nargs: str | None = None
    const: Any = None  # with nargs="?": the value of the bare flag
    invert: bool = False  # a --no-X switch: the field is the negation of the switch
    derived: bool = False  # the command computes the field (paths, defaults that depend)
    on_resume: str = IGNORE  # KEEP, CHANGE, PATH or IGNORE

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments: ``--batch-size`` -> ``batch_size``."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def default_value(self) -> Any:
        """The value argparse gives the option when it is not on the command line."""
        if self.action == "store_true":
            return False
        if self.default is not _CONFIG_DEFAULT:
            return self.default
        return getattr(DEFAULTS, self.field) if self.field else None

    def choice_list(self) -> Sequence[str] | None:
        """The allowed values now (a registry's names include those registered since import)."""
        return self.choices() if callable(self.choices) else self.choices

    def argparse_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``add_argument`` for this option."""
        kwargs: dict[str, Any] = {"help": self.help}
        if self.action is not None:
            kwargs["action"] = self.action
        else:
            kwargs["default"] = self.default_value
        for name in ("type", "metavar", "nargs", "const"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.choices is not None:
            kwargs["choices"] = self.choice_list()
        if self.required:
            kwargs["required"] = True
        return kwargs


SIMULATE, SERVER, CLIENT, CERTS, PREDICT = "simulate", "server", "client", "certs", "predict"
EXPORT, EVALUATE = "export", "evaluate"
FEDERATION = (SIMULATE, SERVER)  # the commands that start a run

_TRAINING = "training"
_STRATEGY = "strategy parameters"
_PRIVACY = "privacy"
_SECURITY = "security"

OPTIONS: tuple[Option, ...] = (
    # ---- pollen simulate, before the training options
    Option(
        "--clients",
        (SIMULATE,),
        "simulated clients (default: %(default)s)",
        type=positive_int,
        default=2,
    ),
    Option(
        "--min-clients",
        (SIMULATE,),
        "fewest clients a round needs (default: the clients a round samples: all of "
        "--clients, or --fraction-train of them)",
        field="min_clients",
        type=positive_int,
        default=None,
        derived=True,
        on_resume=CHANGE,
    ),
    Option(
        "--client-threads",
        (SIMULATE,),
        "intra-op threads per client (torch or TensorFlow); 0 = cores / parallel clients "
        "(default: %(default)s)",
        field="client_threads",
        type=non_negative_int,
    ),
    Option(
        "--ray-address",
        (SIMULATE,),
        "run the simulated clients on an existing Ray cluster: its head's HOST:PORT, as "
        "`ray start --head` printed it (default: a private Ray instance on this machine; "
        "see docs/scale.md)",
        metavar="HOST:PORT",
        default=None,
    ),
    Option(
        "--client-gpus",
        (SIMULATE,),
        "GPUs (a fraction of one, e.g. 0.25, shares it) Ray reserves for each simulated "
        "client (default: %(default)s)",
        type=non_negative_float,
        default=0.0,
    ),
    # ---- pollen server, before the training options
    Option(
        "--address",
        (SERVER,),
        "HOST:PORT that clients dial (default: %(default)s)",
        default="0.0.0.0:8080",
    ),
    Option(
        "--min-clients",
        (SERVER,),
        "clients needed before a round starts (default: %(default)s)",
        field="min_clients",
        type=positive_int,
        on_resume=CHANGE,
    ),
    Option(
        "--test-data",
        (SERVER,),
        "dataset whose test split the server evaluates the global model on "
        "after each round (default: no central evaluation)",
        field="server_data_dir",
        type=Path,
        default=None,
        derived=True,
        on_resume=PATH,
    ),
    Option(
        "--certs",
        (SERVER,),
        "the server/ folder made by `pollen certs`: serve TLS and admit only the "
        "clients whose keys are in DIR/authorized-clients (required unless --address "
        "is loopback or --insecure is given)",
        type=Path,
        default=None,
        metavar="DIR",
        group=_SECURITY,
    ),
    Option(
        "--insecure",
        (SERVER,),
        "plaintext, and any client may join: only on a trusted network or VPN",
        action="store_true",
        group=_SECURITY,
    ),
    Option(
        "--dashboard",
        FEDERATION,
        "serve a live, read-only status page of the run on HOST:PORT (bare flag: "
        f"{DASHBOARD_ADDRESS}); beyond loopback it needs a token: {DASHBOARD_TOKEN_ENV} "
        "or a generated one, printed in the page's URL",
        nargs="?",
        const=DASHBOARD_ADDRESS,
        default=None,
        metavar="HOST:PORT",
    ),
    Option(
        "--partition",
        (SERVER,),
        "partition method for clients that use --partition-id (default: %(default)s)",
        field="partition",
        choices=PARTITION_METHODS,
        on_resume=KEEP,
    ),
    Option(
        "--alpha",
        (SERVER,),
        "Dirichlet concentration for --partition dirichlet (default: %(default)s)",
        field="alpha",
        type=positive_float,
        on_resume=KEEP,
    ),
    # ---- training (simulate and server)
    Option(
        "--rounds",
        FEDERATION,
        "federated rounds (default: %(default)s)",
        field="num_rounds",
        type=positive_int,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--model",
        FEDERATION,
        "model from the registry (default: %(default)s)",
        field="model",
        choices=lambda: sorted(MODELS),
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--epochs",
        FEDERATION,
        "local epochs per round (default: %(default)s)",
        field="local_epochs",
        type=positive_int,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--batch-size",
        FEDERATION,
        "local batch size (default: the model's recipe: 32 for mobilenetv2, 64 for fastnet)",
        field="batch_size",
        type=positive_int,
        default=DECLARED["batch_size"],
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--lr",
        FEDERATION,
        "peak local learning rate (default: the model's recipe: 0.001 for "
        "mobilenetv2, 0.1 for fastnet)",
        field="learning_rate",
        type=positive_float,
        default=DECLARED["learning_rate"],
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--lr-schedule",
        FEDERATION,
        "local learning rate over the run: cosine decay to 0 across all rounds, "
        "onecycle (linear warm-up, then linear decay to 0), or constant (default: auto, "
        "the model's recipe: cosine for mobilenetv2, onecycle for fastnet)",
        field="lr_schedule",
        choices=("auto", *LR_SCHEDULES),
        default=DECLARED["lr_schedule"],
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--strategy",
        FEDERATION,
        "aggregation strategy (default: %(default)s)",
        field="strategy",
        choices=lambda: list(STRATEGIES),
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--server-lr",
        FEDERATION,
        "server learning rate of fedavgm/fedadam/fedyogi/fedadagrad (default: %(default)s)",
        field="server_lr",
        type=positive_float,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--server-momentum",
        FEDERATION,
        "server momentum of fedavgm (default: %(default)s)",
        field="server_momentum",
        type=fraction,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--no-whiten",
        FEDERATION,
        "start the first convolution at random, not from whitened image patches of the "
        "client that provides the initial weights",
        field="whiten",
        action="store_true",
        invert=True,
        group=_TRAINING,
    ),
    Option(
        "--no-tta",
        FEDERATION,
        "evaluate with one forward pass per image, without the model's test-time "
        "augmentation (fastnet: image and mirror image averaged)",
        field="tta",
        action="store_true",
        invert=True,
        group=_TRAINING,
    ),
    Option(
        "--image-size",
        FEDERATION,
        "N or HxW: images are resized to it and the model is built for it; auto = "
        "32x32 for CIFAR-10, else the model's own size (mobilenetv2: 96x96; cnn, "
        "fastnet: 32x32) (default: %(default)s)",
        field="image_size",
        type=image_size_text,
        default=DECLARED["image_size"],
        metavar="SIZE",
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--weights",
        FEDERATION,
        "start from pretrained weights: imagenet (mobilenetv2, efficientnetb0; downloaded "
        "once into ~/.keras/models) or a .keras/.h5/.weights.h5 file, e.g. an earlier run's "
        "model.keras (a classifier with another class count starts fresh); read by the "
        "server only, clients receive the weights (default: random initialisation)",
        field="weights",
        type=weights_text,
        metavar="imagenet|PATH",
        group=_TRAINING,
    ),
    Option(
        "--freeze-rounds",
        FEDERATION,
        "with --weights: the first K rounds train only the classifier, the pretrained "
        "backbone frozen (default: %(default)s, every layer trains from round 1)",
        field="freeze_rounds",
        type=non_negative_int,
        default=DECLARED["freeze_rounds"],
        metavar="K",
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--fine-tune-lr",
        FEDERATION,
        "with --weights: peak learning rate once the backbone trains, after "
        "--freeze-rounds (default: auto, the learning rate / 10)",
        field="fine_tune_lr",
        type=positive_float,
        default=DECLARED["fine_tune_lr"],
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--num-classes",
        FEDERATION,
        "classes the model predicts (default: %(default)s)",
        field="num_classes",
        type=positive_int,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--bn-calibration-examples",
        FEDERATION,
        "local images each client uses to re-estimate BatchNorm statistics "
        "of the aggregated model; 0 = off (default: %(default)s)",
        field="bn_calibration_examples",
        type=non_negative_int,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--target-accuracy",
        FEDERATION,
        "stop once the server's test accuracy reaches this (0-1; "
        "default: %(default)s = run all rounds)",
        field="target_accuracy",
        type=fraction,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--round-timeout",
        FEDERATION,
        "seconds to wait for clients in one round; a client that has not replied "
        "by then is recorded as failed for that round (default: %(default)s)",
        field="round_timeout",
        type=positive_float,
        group=_TRAINING,
        on_resume=CHANGE,
    ),
    Option(
        "--max-update-norm",
        FEDERATION,
        "reject a client's update whose L2 distance from the global weights exceeds "
        "this; 0 = no bound (default: %(default)s)",
        field="max_update_norm",
        type=non_negative_float,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    # ---- strategy parameters (simulate and server)
    Option(
        "--fraction-train",
        FEDERATION,
        "fraction of the connected clients sampled per round (default: %(default)s)",
        field="fraction_train",
        type=fraction,
        group=_STRATEGY,
        on_resume=KEEP,
    ),
    Option(
        "--proximal-mu",
        FEDERATION,
        "fedprox: weight of the proximal term (default: %(default)s)",
        field="proximal_mu",
        type=non_negative_float,
        group=_STRATEGY,
        on_resume=KEEP,
    ),
    Option(
        "--trim-beta",
        FEDERATION,
        "trimmedmean: fraction cut from each end per coordinate (default: %(default)s)",
        field="trim_beta",
        type=fraction,
        group=_STRATEGY,
        on_resume=KEEP,
    ),
    Option(
        "--num-malicious-nodes",
        FEDERATION,
        "krum/multikrum/bulyan: malicious clients to tolerate (f) (default: %(default)s)",
        field="num_malicious_nodes",
        type=non_negative_int,
        group=_STRATEGY,
        on_resume=KEEP,
    ),
    Option(
        "--num-nodes-to-select",
        FEDERATION,
        "multikrum: updates to average (m) (default: %(default)s)",
        field="num_nodes_to_select",
        type=positive_int,
        group=_STRATEGY,
        on_resume=KEEP,
    ),
    # ---- privacy (simulate and server): SecAgg+ and differential privacy
    Option(
        "--secagg",
        FEDERATION,
        "secure aggregation (Flower SecAgg+): the server learns only the sum of the updates",
        field="secagg",
        action="store_true",
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--secagg-num-shares",
        FEDERATION,
        "SecAgg+ shares per client secret: fraction (<=1) of the sampled clients or a count "
        "(default: %(default)s)",
        field="secagg_num_shares",
        type=positive_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--secagg-reconstruction-threshold",
        FEDERATION,
        "SecAgg+ shares needed to reconstruct a dropped client's mask: fraction or count "
        "(default: %(default)s)",
        field="secagg_reconstruction_threshold",
        type=positive_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--secagg-clipping-range",
        FEDERATION,
        "SecAgg+ clips update values to +-this (default: %(default)s)",
        field="secagg_clipping_range",
        type=positive_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--dp",
        FEDERATION,
        "differential privacy: client (client-level: each update clipped, noise on the "
        "average; the default of a bare --dp) or example (example-level: DP-SGD on every "
        "client, per-example clipping + noise, an accountant per client) (default: off)",
        field="dp",
        nargs="?",
        const="client",
        choices=("client", "example"),
        metavar="LEVEL",
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--dp-noise",
        FEDERATION,
        "DP noise multiplier z; 0 = the smallest z within --dp-epsilon (default: %(default)s)",
        field="dp_noise",
        type=non_negative_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--dp-clip",
        FEDERATION,
        "DP clipping norm of one client's update (default: %(default)s)",
        field="dp_clip",
        type=positive_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--dp-delta",
        FEDERATION,
        "DP delta of the reported (epsilon, delta) (default: %(default)s)",
        field="dp_delta",
        type=fraction,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--dp-epsilon",
        FEDERATION,
        "DP budget for the whole run; 0 = none (default: %(default)s)",
        field="dp_epsilon",
        type=non_negative_float,
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    Option(
        "--client-sampling",
        FEDERATION,
        "client-level DP: seeded (fixed-size sample from --seed, no amplification credited) "
        "or poisson (each client joins with probability --fraction-train, unseeded; "
        "amplification credited) (default: %(default)s)",
        field="client_sampling",
        choices=("seeded", "poisson"),
        group=_PRIVACY,
        on_resume=KEEP,
    ),
    # ---- compression (simulate and server): pollen/compress.py
    Option(
        "--compress",
        FEDERATION,
        "how clients send their updates: none, fp16, int8 (per-array scale) or topk:K "
        "(K: fraction such as 0.05, or 5%%, of each array's values), as the change to the "
        "weights received, with error feedback; not with --secagg (default: %(default)s)",
        field="compress",
        group="compression",
        metavar="CODEC",
        on_resume=CHANGE,
    ),
    Option(
        "--compress-down",
        FEDERATION,
        "how the server sends the weights: none, fp16 or int8 (per-array scale); "
        "not with --secagg (default: %(default)s)",
        field="compress_down",
        group="compression",
        metavar="CODEC",
        on_resume=CHANGE,
    ),
    # ---- training, continued (simulate and server)
    Option(
        "--seed",
        FEDERATION,
        "seed for partitions, shuffling, initialisation and client sampling (default: %(default)s)",
        field="seed",
        type=int,
        group=_TRAINING,
        on_resume=KEEP,
    ),
    Option(
        "--out",
        FEDERATION,
        "run folder to write (default: ./runs/<timestamp>)",
        field="out",
        type=Path,
        default=None,
        group=_TRAINING,
        derived=True,
        on_resume=PATH,
    ),
    Option(
        "--mlflow",
        FEDERATION,
        "MLflow tracking URI (sqlite:///mlflow.db, http://host:5000) to log the run's "
        "parameters, per-round metrics and final model to (needs the mlflow extra)",
        field="mlflow_uri",
        metavar="URI",
        on_resume=CHANGE,
    ),
    # ---- pollen simulate, after the training options
    Option(
        "--data-dir",
        (SIMULATE,),
        "dataset: CIFAR-10 archive, cifar-10-batches-py/, an image folder "
        "train/<class>/*, test/<class>/* or its .tar/.tar.gz/.tgz/.zip archive, or a CSV "
        "manifest (path,label,split) (default: CIFAR-10, downloaded once)",
        field="data_dir",
        type=Path,
        default=None,
        group="data",
        derived=True,
        on_resume=PATH,
    ),
    Option(
        "--partition",
        (SIMULATE,),
        "how the data is split among clients (default: %(default)s)",
        field="partition",
        choices=PARTITION_METHODS,
        group="data",
        on_resume=KEEP,
    ),
    Option(
        "--alpha",
        (SIMULATE,),
        "Dirichlet concentration for --partition dirichlet; smaller = more "
        "label skew (default: %(default)s)",
        field="alpha",
        type=positive_float,
        group="data",
        on_resume=KEEP,
    ),
    Option(
        "--no-server-eval",
        (SIMULATE,),
        "skip central evaluation on the dataset's test split",
        field="server_eval",
        action="store_true",
        invert=True,
    ),
    Option(
        "--resume",
        (SIMULATE,),
        "continue the interrupted simulation in RUN_DIR from its last completed round, "
        "with its saved options",
        type=Path,
        default=None,
        metavar="RUN_DIR",
    ),
    Option(
        "--malicious",
        (SIMULATE,),
        "EXPERIMENTS ONLY: the clients with partition ids 0..K-1 send poisoned updates",
        field="malicious",
        type=non_negative_int,
        default=0,
        metavar="K",
        group="attack harness (experiments only)",
    ),
    Option(
        "--attack",
        (SIMULATE,),
        "what the malicious clients send: signflip (update negated), noise (Gaussian "
        "noise, std 1, added to the weights) or scale (update x1000) (default: %(default)s)",
        field="attack",
        choices=ATTACK_KINDS,
        group="attack harness (experiments only)",
    ),
    Option(
        "--fault",
        (SIMULATE,),
        "TESTS AND EXPERIMENTS ONLY: clients with these partition ids misbehave on "
        "purpose, e.g. 'nan@1' or 'scale@0,2 arch@3' (KIND: nan, scale, signflip, noise, "
        "arch)",
        field="fault",
        default="",
        metavar="KIND@IDS",
    ),
    # ---- pollen server, after the training options
    Option(
        "--resume",
        (SERVER,),
        "continue the interrupted run in RUN_DIR from its last completed round, with "
        "its saved training options (only --address, --min-clients, --round-timeout, "
        "--mlflow and the security options may change)",
        type=Path,
        default=None,
        metavar="RUN_DIR",
    ),
    # ---- pollen client
    Option("--server", (CLIENT,), "HOST:PORT of the pollen server", required=True),
    Option(
        "--data-dir",
        (CLIENT,),
        "this client's data (alone: all of it is this client's own; with "
        "--partition-id: the dataset to take a partition of; default CIFAR-10)",
        type=Path,
        default=None,
    ),
    Option(
        "--partition-id",
        (CLIENT,),
        "take partition i of --num-partitions of the dataset",
        type=non_negative_int,
        default=None,
    ),
    Option(
        "--num-partitions",
        (CLIENT,),
        "number of partitions the dataset is split into",
        type=positive_int,
        default=None,
    ),
    Option("--name", (CLIENT,), "name shown in the server's history (default: host name)"),
    Option(
        "--threads",
        (CLIENT,),
        "intra-op threads of the training backend; 0 = all cores (default: %(default)s)",
        type=non_negative_int,
        default=0,
    ),
    Option(
        "--connect-timeout",
        (CLIENT,),
        "seconds to keep trying to reach the server (default: %(default)s)",
        type=positive_float,
        default=120.0,
    ),
    Option(
        "--log-dir",
        (CLIENT,),
        "folder for Flower's output on this client (default: ./runs/client-<timestamp>-<pid>/logs)",
        type=Path,
        default=None,
        metavar="DIR",
    ),
    Option(
        "--certs",
        (CLIENT,),
        "this client's folder made by `pollen certs` (DIR/clients/client-i: "
        "ca.crt, client.key); required unless --server is loopback or --insecure",
        type=Path,
        default=None,
        metavar="DIR",
        group=_SECURITY,
    ),
    Option(
        "--insecure",
        (CLIENT,),
        "plaintext, for a server started with --insecure: trusted networks only",
        action="store_true",
        group=_SECURITY,
    ),
    Option(
        "--fault",
        (CLIENT,),
        "TESTS AND EXPERIMENTS ONLY: misbehave on purpose (nan: NaN weights; scale: "
        "update x1000; signflip; noise; arch: a model that does not fit the federation's)",
        choices=FAULT_KINDS,
        default=None,
    ),
    # ---- pollen certs
    Option(
        "--out",
        (CERTS,),
        "folder to create (default: %(default)s)",
        type=Path,
        default=Path("certs"),
    ),
    Option(
        "--server-name",
        (CERTS,),
        "host name or IP address clients dial to reach the server; repeat for "
        "several (default: this host's name); localhost, 127.0.0.1 and ::1 are always added",
        action="append",
        metavar="NAME",
    ),
    Option(
        "--clients",
        (CERTS,),
        "client key pairs to make (default: %(default)s)",
        type=positive_int,
        default=2,
    ),
    Option(
        "--force",
        (CERTS,),
        "replace the certificates and keys in an existing --out",
        action="store_true",
    ),
    # ---- pollen predict
    Option(
        "--model",
        (PREDICT, EVALUATE),
        "RUN/model.keras, or a model written by pollen export (.tflite, .onnx, SavedModel "
        "folder); class names come from classes.json beside model.keras or from the export",
        type=Path,
        required=True,
    ),
    Option(
        "--top",
        (PREDICT,),
        "classes to show per image (default: %(default)s)",
        type=positive_int,
        default=3,
    ),
    Option(
        "--labels-from-folders",
        (PREDICT,),
        "each image's folder name is its true class: also print the accuracy, per-class "
        "accuracy and confusion matrix",
        action="store_true",
    ),
    Option(
        "images",
        (PREDICT,),
        "image files, and folders of images (searched recursively)",
        type=Path,
        nargs="+",
    ),
    # ---- pollen export
    Option(
        "--model",
        (EXPORT,),
        "RUN/model.keras to export (class names: classes.json beside it)",
        type=Path,
        required=True,
    ),
    Option(
        "--format",
        (EXPORT,),
        "savedmodel: a TensorFlow SavedModel folder; tflite: a LiteRT (TensorFlow Lite) "
        "file; onnx: an ONNX file",
        choices=("savedmodel", "tflite", "onnx"),
        required=True,
    ),
    Option(
        "--out",
        (EXPORT,),
        "file (SavedModel: folder) to write; .tflite and .onnx files must end so "
        "(default: beside --model, model.tflite, model.onnx or model_savedmodel/)",
        type=Path,
        default=None,
    ),
    Option("--force", (EXPORT,), "replace an existing --out", action="store_true"),
    # ---- pollen evaluate
    Option(
        "--data-dir",
        (EVALUATE,),
        "dataset whose test split to score: an image folder train/<class>/*, "
        "test/<class>/*, its .tar/.tar.gz/.tgz/.zip archive, or CIFAR-10 (archive or "
        "cifar-10-batches-py/)",
        type=Path,
        required=True,
    ),
    Option(
        "--out",
        (EVALUATE,),
        "folder to write confusion.png in (default: the current folder)",
        type=Path,
        default=Path("."),
    ),
    Option("--force", (EVALUATE,), "replace an existing confusion.png", action="store_true"),
    # ---- every command
    Option(
        "--verbose",
        (SIMULATE, SERVER, CLIENT, CERTS, PREDICT, EXPORT, EVALUATE),
        "show Flower's, Ray's, uvicorn's and TensorFlow's output too (it always goes to "
        "the run's logs/ folder)",
        action="store_true",
    ),
)


def options_of(command: str) -> tuple[Option, ...]:
    """The options ``pollen COMMAND`` takes, in ``--help`` order."""
    return tuple(opt for opt in OPTIONS if command in opt.commands)


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the options of ``command`` to its parser, each in its argument group."""
    groups: dict[str, Any] = {}
    for opt in options_of(command):
        target: Any = parser
        if opt.group is not None:
            if opt.group not in groups:
                groups[opt.group] = parser.add_argument_group(opt.group)
            target = groups[opt.group]
        target.add_argument(opt.flag, **opt.argparse_kwargs())


def resume_fields(command: str) -> dict[str, str]:
    """Option destination -> run-config field of the options ``--resume`` compares.

    Those that must equal the run's value (KEEP) and those that may change
    (CHANGE); PATH options are compared by :func:`pollen.cli.runs.resume_config`.
    """
    return {
        opt.dest: opt.field
        for opt in options_of(command)
        if opt.field and opt.on_resume in (KEEP, CHANGE)
    }


def resume_may_change(command: str) -> tuple[str, ...]:
    """Run-config fields a resumed run of ``command`` may change."""
    return tuple(opt.field for opt in options_of(command) if opt.field and opt.on_resume == CHANGE)


def _default_out() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def run_config_from_args(args: argparse.Namespace, **extra: Any) -> RunConfig:
    """Turn parsed options into a validated :class:`RunConfig`.

    Every option of ``args.command`` with a run-config field sets it (a ``--no-X``
    switch sets its negation); ``--out`` becomes an absolute path (default
    ``./runs/<timestamp>``); ``extra`` (fields the command computed) wins over both.

    Raises:
        PollenError: The options contradict each other, or ``--dp`` asks for an
            impossible privacy budget.
    """
    out = (args.out or _default_out()).expanduser().resolve()
    values: dict[str, Any] = {}
    for opt in options_of(args.command):
        if opt.field and not opt.derived:
            value = getattr(args, opt.dest)
            values[opt.field] = not value if opt.invert else value
    if values.get("dp") == "example" and values.get("model") == DEFAULTS.model:
        # --dp example's default model: no BatchNorm, fixed features (pollen.models.scatternet)
        values["model"] = "scatternet"
    cfg = DEFAULTS.replace(**{**values, "out": str(out), **extra})
    check_config(cfg)
    if cfg.dp == "client":  # refuse an impossible privacy budget before anything starts
        # Imported here: the accountant (dp-accounting, scipy) costs every command that
        # does not need it ~0.8 s and ~60 MB, `pollen client`'s long-lived wrapper too.
        from pollen.server.privacy import resolve_noise

        resolve_noise(cfg)
    return cfg


def existing_dir_or_file(path: Path | None, option: str) -> str:
    """``path`` as an absolute path string, "" for None.

    Raises:
        PollenError: ``path`` does not exist (``option`` names it in the message).
    """
    if path is None:
        return ""
    path = path.expanduser().resolve()
    if not path.exists():
        raise PollenError(
            f"{option} {path} does not exist: point it at a CIFAR-10 archive, a "
            "cifar-10-batches-py/ folder, an image folder with train/ and test/, a "
            ".tar/.tar.gz/.tgz/.zip archive of one, or a CSV manifest (path,label,split)."
        )
    return str(path)


def _value_doc(opt: Option) -> str:
    if opt.action == "store_true":
        return "switch"
    if opt.action == "append":
        return f"{opt.metavar or 'text'} (repeatable)"
    if opt.choices is not None:
        return ", ".join(f"`{c}`" for c in opt.choice_list() or ())
    if isinstance(opt.type, Number):
        text = opt.type.doc
    elif opt.type is image_size_text:
        text = "`auto`, N or HxW"
    elif opt.type is Path:
        text = "path"
    elif opt.type is int:
        text = "whole number"
    else:
        text = "text"
    if opt.nargs == "?":
        text = f"optional {text}"
    if opt.nargs == "+":
        text = f"one or more {text}s"
    return text


def _required(opt: Option) -> bool:
    """Whether the option must be given (a positional argument, unless optional)."""
    return opt.required or opt.nargs not in (None, "?")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Help text as Markdown prose: ``<x>`` and ``*`` stay literal."""
    for char in "\\<>*":
        text = text.replace(char, "\\" + char)
    return text


def options_markdown() -> str:
    """``docs/options.md``: one table per command, generated from :data:`OPTIONS`."""
    lines = [
        "# Options of the `pollen` command",
        "",
        "<!-- Generated from pollen/cli/options.py by `python -m pollen.cli.options`; "
        "do not edit by hand. -->",
        "",
        "Every option of every command, as `pollen COMMAND --help` shows it. *Run config* "
        "is the field of `pollen.config.RunConfig` the option sets (empty: the command "
        "uses the option itself); *--resume* says what a resumed run does with the option: "
        "it must match the run's value, it may change, or it is ignored (the run keeps "
        "its saved value).",
    ]
    commands = list(dict.fromkeys(c for opt in OPTIONS for c in opt.commands))
    for command in commands:
        lines += [
            "",
            f"## pollen {command}",
            "",
            "| Option | Value | Default | Run config | --resume | Description |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for opt in options_of(command):
            default = opt.default_value
            resume = _RESUME_DOCS[opt.on_resume] if opt.field and command in FEDERATION else ""
            field = f"`{opt.field}`" + (" (negated)" if opt.invert else "") if opt.field else ""
            cells = [
                f"`{opt.flag}`" + (" (required)" if _required(opt) else ""),
                _value_doc(opt),
                ""
                if default is None or opt.action
                else f"`{default!r}`"
                if default == ""
                else f"`{default}`",
                field,
                resume,
                _prose(opt.help % {"default": default}),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m pollen.cli.options [--check] [FILE]``: write (or check) docs/options.md.

    Returns 0, or 1 with ``--check`` when FILE differs from what the table generates.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0]) if paths else Path(__file__).resolve().parents[2] / DOCS_FILE
    text = options_markdown()
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run python -m pollen.cli.options", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
