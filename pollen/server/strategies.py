"""Aggregation strategies: the registry of Flower strategies a run can use.

All strategies are Flower's own (``flwr.serverapp.strategy``); this module
only maps a run-config name to a configured instance. The server aggregates
weights without knowing the model: strategies see ``ArrayRecord`` s only.

Adding a strategy means adding one :class:`StrategyEntry` to :data:`STRATEGIES`.
Which clients a round samples is :func:`pollen.server.sampling.seeded_sampling`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import strategy as fl

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.protocol import NUM_EXAMPLES_KEY, UNIT_WEIGHT_KEY


def _common(cfg: RunConfig) -> dict[str, Any]:
    """Sampling settings shared by every strategy.

    As many clients evaluate as train (``fraction_evaluate = fraction_train``);
    ``min-clients`` is both the quorum to start a round and the minimum sample
    size. Under DP every client weighs the same (client-level DP averages
    clients, not examples; see :mod:`pollen.server.privacy`).
    """
    return {
        "weighted_by_key": UNIT_WEIGHT_KEY if cfg.dp == "client" else NUM_EXAMPLES_KEY,
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_train,
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
    }


def _no_options(cfg: RunConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class StrategyEntry:
    """One registry entry: a Flower strategy and what it takes from the run config.

    Attributes:
        flower: Flower's strategy class.
        options: Its arguments beyond :func:`_common`'s, from the run config.
        min_updates: Fewest updates per round it needs for ``f`` assumed
            malicious clients; None: no such bound.
        secagg: Works under secure aggregation (needs only the sum of updates).
        dp: Covered by Flower's DP accountant (plain FedAvg aggregation).
        robust: Built to withstand malicious clients: their BatchNorm
            statistics are then combined by the coordinate-wise median, not
            weighted by the counts clients state
            (:func:`pollen.server.replies.merged_batchnorm_stats`).
    """

    flower: Callable[..., fl.Strategy]
    options: Callable[[RunConfig], dict[str, Any]] = _no_options
    min_updates: Callable[[int], int] | None = None
    secagg: bool = False
    dp: bool = False
    robust: bool = False

    def __call__(self, cfg: RunConfig) -> fl.Strategy:
        """The configured Flower strategy for ``cfg``."""
        return self.flower(**_common(cfg), **self.options(cfg))


def _byzantine(f: int) -> int:  # Krum and Multi-Krum: n >= 2f + 3
    return 2 * f + 3


STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(fl.FedAvg, secagg=True, dp=True),
    "fedavgm": StrategyEntry(
        fl.FedAvgM,
        lambda cfg: {"server_learning_rate": cfg.server_lr, "server_momentum": cfg.server_momentum},
    ),
    # FedProx aggregates like FedAvg and sends "proximal-mu" to the clients, which
    # add mu/2 * ||w - w_global||^2 to their loss (pollen.training.local.ProximalTerm).
    "fedprox": StrategyEntry(fl.FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}, dp=True),
    # Flower's defaults for the adaptive strategies are eta=0.1 (0.01 for FedYogi): their
    # server step is eta * m / (sqrt(v) + tau); server-lr scales it.
    "fedadam": StrategyEntry(fl.FedAdam, lambda cfg: {"eta": 0.1 * cfg.server_lr}),
    "fedyogi": StrategyEntry(fl.FedYogi, lambda cfg: {"eta": 0.01 * cfg.server_lr}),
    "fedadagrad": StrategyEntry(fl.FedAdagrad, lambda cfg: {"eta": 0.1 * cfg.server_lr}),
    "fedmedian": StrategyEntry(fl.FedMedian, robust=True),
    "trimmedmean": StrategyEntry(
        fl.FedTrimmedAvg, lambda cfg: {"beta": cfg.trim_beta}, robust=True
    ),
    "krum": StrategyEntry(
        fl.Krum,
        lambda cfg: {"num_malicious_nodes": cfg.num_malicious_nodes},
        _byzantine,
        robust=True,
    ),
    "multikrum": StrategyEntry(
        fl.MultiKrum,
        lambda cfg: {
            "num_malicious_nodes": cfg.num_malicious_nodes,
            "num_nodes_to_select": cfg.num_nodes_to_select,
        },
        _byzantine,
        robust=True,
    ),
    "bulyan": StrategyEntry(
        fl.Bulyan,
        lambda cfg: {"num_malicious_nodes": cfg.num_malicious_nodes},
        lambda f: 4 * f + 3,
        robust=True,
    ),
}

#: Fewest updates per round a robust strategy needs for ``f`` assumed malicious clients.
MIN_UPDATES: dict[str, Callable[[int], int]] = {
    name: s.min_updates for name, s in STRATEGIES.items() if s.min_updates is not None
}


def check_config(cfg: RunConfig) -> None:
    """Refuse a strategy name, or a strategy combined with ``--secagg``/``--dp``, that cannot run.

    :meth:`pollen.config.RunConfig.validate` checks each field alone; this checks
    what depends on the strategy registry. The CLI calls it before anything
    starts, the ServerApp when it reads its run config.

    Raises:
        PollenError: The first problem found, phrased for the user.
    """
    if cfg.strategy not in STRATEGIES:
        raise PollenError(f"Unknown strategy {cfg.strategy!r}: use one of {', '.join(STRATEGIES)}.")
    entry = STRATEGIES[cfg.strategy]
    if cfg.secagg and not entry.secagg:
        raise PollenError(
            f"Secure aggregation works with the fedavg strategy only, not {cfg.strategy!r}: "
            "with SecAgg+ the server sees only the sum of the updates, which is all FedAvg "
            "needs, while robust and adaptive strategies need each update. Drop --secagg "
            "or use --strategy fedavg."
        )
    if cfg.dp == "example" and not (cfg.dp_epsilon > 0 or cfg.dp_noise > 0):
        raise PollenError(
            "--dp example needs a noise level: give --dp-epsilon E (the budget of every "
            "client's examples for the whole run; each client picks its noise from its data "
            "size, batch size and steps) or --dp-noise Z (the noise multiplier)."
        )
    if cfg.client_sampling == "poisson" and cfg.dp != "client":
        raise PollenError(
            "--client-sampling poisson changes only how client-level differential privacy "
            "samples and accounts (amplification by sampling), so it needs --dp client. Add "
            "--dp client with a budget, or leave --client-sampling at seeded."
        )
    if cfg.client_sampling == "poisson" and cfg.secagg:
        raise PollenError(
            "--client-sampling poisson cannot be combined with --secagg yet: a Poisson round "
            "may sample fewer than the 2 clients SecAgg+ needs, and distributed noise is "
            "sized from the round's SecAgg+ threshold. Use the seeded sample with --secagg "
            "(no amplification credited), or drop --secagg for Poisson sampling."
        )
    if cfg.dp == "client" and not entry.dp:
        raise PollenError(
            f"Differential privacy works with fedavg or fedprox, not {cfg.strategy!r}: "
            "Flower's privacy accountant covers plain FedAvg aggregation only. Use "
            "--strategy fedavg with --dp."
        )


def check_sample_size(cfg: RunConfig, sampled: int) -> None:
    """Refuse a round size the configured robust strategy cannot work with.

    Krum and Multi-Krum need ``n >= 2f + 3`` updates, Bulyan ``n >= 4f + 3``
    (f = ``num-malicious-nodes``); below that Flower's strategies fail deep
    inside aggregation or silently return a useless choice.

    Raises:
        PollenError: ``sampled`` clients are too few.
    """
    need = MIN_UPDATES.get(cfg.strategy)
    if need is None:
        return
    f = cfg.num_malicious_nodes
    if sampled < need(f):
        raise PollenError(
            f"The {cfg.strategy} strategy with num-malicious-nodes={f} needs at least "
            f"{need(f)} clients per round, but rounds have {sampled}. Run more clients, "
            "lower --num-malicious-nodes, or choose fedmedian or trimmedmean."
        )


def make_strategy(cfg: RunConfig) -> fl.Strategy:
    """Return the configured strategy instance for ``cfg.strategy``."""
    return STRATEGIES[cfg.strategy](cfg)
