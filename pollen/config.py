"""Run configuration: one typed view of ``[tool.flwr.app.config]``.

Flower hands every ServerApp and ClientApp the run config as a flat mapping of
kebab-case keys (``context.run_config``). :class:`RunConfig` is the typed,
validated form of that mapping; the ``pollen`` command line builds the same
mapping from its options and passes it to ``flwr run`` as overrides, so the CLI
and ``flwr run .`` run exactly the same federation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pollen.errors import PollenError

PARTITION_METHODS = ("iid", "dirichlet")
LR_SCHEDULES = ("cosine", "constant")
#: Deliberate client misbehaviour for tests and experiments (see pollen.client_app.FAULTS).
FAULT_KINDS = ("nan", "scale", "signflip", "noise", "arch")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federation run needs to know, with its defaults.

    Attributes:
        num_rounds: Federated rounds to run. Default 3.
        model: Registry name of the model every client builds (see
            ``pollen.models.MODELS``). Default ``"mobilenetv2"``.
        num_classes: Classes the model predicts; every client's labels must
            be below it. Default 10 (CIFAR-10).
        local_epochs: Local epochs per round on each client. Default 1.
        batch_size: Local training batch size. Default 32.
        learning_rate: Peak learning rate of the local optimizer. Default 0.001.
        lr_schedule: ``"cosine"``: the local learning rate decays from
            ``learning_rate`` to 0 over the run's local steps (all rounds);
            ``"constant"``: it stays. Default cosine.
        partition: How the dataset is split among clients in simulation or
            with ``--partition-id``: ``"iid"`` or ``"dirichlet"``. Default iid.
        alpha: Concentration of the Dirichlet label skew (smaller = more
            skewed). Used only with ``partition="dirichlet"``. Default 0.5.
        seed: Seed for partitioning, shuffling and model initialisation.
        data_dir: Dataset location for clients ("" = CIFAR-10 from the cache,
            downloaded once). A client's own ``data-dir`` node config wins.
        out: Absolute path of the run folder the server writes. "" = the
            server app picks ``./runs/<timestamp>``.
        min_clients: Clients that must be connected before a round starts,
            and the fewest replies a round accepts. Default 2.
        fraction_train: Fraction of connected clients sampled per round.
        strategy: Aggregation strategy name (see ``pollen.strategy``).
        server_lr: Server learning rate of ``fedavgm`` and the adaptive
            strategies (``fedadam``, ``fedyogi``, ``fedadagrad``): how far the
            server moves along the clients' average update. Default 1.0.
        server_momentum: Server momentum of ``fedavgm``. Default 0.0.
        server_eval: Evaluate the global model on a central test set after
            every round (the server then builds the model). Default True.
        server_data_dir: Dataset whose test split the server evaluates on
            ("" = CIFAR-10 from the cache).
        bn_calibration_examples: Local training examples each client runs
            forward (no weight update) to re-estimate BatchNorm statistics of
            the aggregated model before it is evaluated; 0 turns it off.
        round_timeout: Seconds the server waits for replies in one round.
        client_threads: TensorFlow threads per client process; 0 = the
            machine's cores divided among the clients sharing it.
        keras_verbose: Keras ``fit`` verbosity on clients (0, 1 or 2).
        target_accuracy: Stop early once the server's test accuracy reaches
            this value (0 = run all rounds).
        max_update_norm: The server rejects a client's update whose L2
            distance from the global weights it was sent (all floating-point
            arrays together) exceeds this; 0 = no bound. Default 3000: a
            generous bound, about 10x what honest training produces. Measured:
            the reference MobileNetV2 after 3 rounds of the reference run is at
            distance 311 from its initialisation (BatchNorm moving statistics
            311, trained weights 15), so no honest round of it gets near 3000,
            while an update scaled x1000 (a model-replacement attack) lands
            far above; the small CNN's honest 1-epoch update on the test data
            is about 4. NaN/inf values, wrong shapes and dtypes are rejected
            whatever the bound.
        fault: Fault injection for tests and robustness experiments only:
            ``"KIND@IDS"`` (several separated by spaces) makes the clients
            whose ``partition-id`` is in the comma-separated IDS misbehave
            (``KIND`` one of ``nan``, ``scale``, ``signflip``, ``noise``,
            ``arch``; see ``pollen.client_app.FAULTS``).
            "" (the default) = every client is honest.
        resume: Continue the run in ``out`` from its checkpoint (the round
            after the last completed one) instead of starting a new run.
    """

    num_rounds: int = 3
    model: str = "mobilenetv2"
    num_classes: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.001
    lr_schedule: str = "cosine"
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 42
    data_dir: str = ""
    out: str = ""
    min_clients: int = 2
    fraction_train: float = 1.0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_eval: bool = True
    server_data_dir: str = ""
    bn_calibration_examples: int = 2000
    round_timeout: float = 3600.0
    client_threads: int = 0
    keras_verbose: int = 2
    target_accuracy: float = 0.0
    max_update_norm: float = 3000.0
    fault: str = ""
    resume: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a validated config from Flower's kebab-case run config.

        Unknown keys are ignored (Flower apps may carry extra keys); known keys
        are converted to the field's type.

        Raises:
            PollenError: A value has the wrong type or is out of range.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in values:
                continue
            kwargs[f.name] = _convert(key, values[key], type(getattr(cls(), f.name)))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """Return the kebab-case mapping Flower's run config uses."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a validated copy with ``changes`` applied."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and names.

        Raises:
            PollenError: The first problem found, phrased for the user.
        """
        from pollen.models import MODELS
        from pollen.strategy import STRATEGIES

        checks = [
            (self.num_rounds >= 1, "rounds must be at least 1"),
            (0 <= self.seed < 2**32, "seed must be between 0 and 4294967295"),
            (self.num_classes >= 2, "num-classes must be at least 2"),
            (self.local_epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.learning_rate > 0, "learning rate must be positive"),
            (self.alpha > 0, "alpha must be positive"),
            (self.min_clients >= 1, "min-clients must be at least 1"),
            (self.server_lr > 0, "server-lr must be positive"),
            (0 <= self.server_momentum < 1, "server-momentum must be in [0, 1)"),
            (0 < self.fraction_train <= 1, "fraction-train must be in (0, 1]"),
            (self.bn_calibration_examples >= 0, "bn-calibration-examples must be >= 0"),
            (self.round_timeout > 0, "round-timeout must be positive"),
            (self.client_threads >= 0, "client-threads must be >= 0"),
            (self.keras_verbose in (0, 1, 2), "keras-verbose must be 0, 1 or 2"),
            (0 <= self.target_accuracy <= 1, "target accuracy must be in [0, 1]"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
        ]
        for ok, message in checks:
            if not ok:
                raise PollenError(f"Invalid run configuration: {message}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PollenError(
                f"Unknown learning-rate schedule {self.lr_schedule!r}: use one of "
                f"{', '.join(LR_SCHEDULES)}."
            )
        if self.partition not in PARTITION_METHODS:
            raise PollenError(
                f"Unknown partition method {self.partition!r}: use one of "
                f"{', '.join(PARTITION_METHODS)}."
            )
        if self.model not in MODELS:
            raise PollenError(
                f"Unknown model {self.model!r}: the registry has {', '.join(sorted(MODELS))}. "
                "Add a model in pollen/models.py."
            )
        for spec in self.fault.split():
            kind, at, ids = spec.partition("@")
            ids_ok = at and all(i.strip().isdigit() for i in ids.split(","))
            if kind not in FAULT_KINDS or not ids_ok:
                raise PollenError(
                    f"Invalid fault {spec!r}: write KIND@IDS with KIND one of "
                    f"{', '.join(FAULT_KINDS)} and IDS comma-separated partition ids, for "
                    "example nan@1 or 'nan@1 arch@2' (fault injection is for tests and "
                    "experiments only)."
                )
        if self.strategy not in STRATEGIES:
            raise PollenError(
                f"Unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}."
            )


def _convert(key: str, value: Any, target: type) -> Any:
    """Convert a TOML/CLI value to ``target``, or raise a PollenError."""
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return target(value)
    except (TypeError, ValueError):
        raise PollenError(
            f"Invalid run configuration: {key}={value!r} is not a valid {target.__name__}."
        ) from None
