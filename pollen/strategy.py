"""Aggregation strategies: the registry of Flower strategies a run can use.

All strategies are Flower's own (``flwr.serverapp.strategy``); this module
only maps a run-config name to a configured instance. The server aggregates
weights without knowing the model: strategies see ``ArrayRecord`` s only.

Adding a strategy means adding one entry to :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp import strategy as fl

from pollen.config import RunConfig


def _common(cfg: RunConfig) -> dict[str, Any]:
    """Sampling settings shared by every strategy.

    Every connected client evaluates (``fraction_evaluate=1``); ``min-clients``
    is both the quorum to start a round and the minimum sample size.
    """
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
    }


STRATEGIES: dict[str, Callable[[RunConfig], fl.Strategy]] = {
    "fedavg": lambda cfg: fl.FedAvg(**_common(cfg)),
    "fedavgm": lambda cfg: fl.FedAvgM(
        **_common(cfg), server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum
    ),
    # Flower's defaults for the adaptive strategies are eta=0.1 (0.01 for FedYogi): their
    # server step is eta * m / (sqrt(v) + tau); server-lr scales it.
    "fedadam": lambda cfg: fl.FedAdam(**_common(cfg), eta=0.1 * cfg.server_lr),
    "fedyogi": lambda cfg: fl.FedYogi(**_common(cfg), eta=0.01 * cfg.server_lr),
    "fedadagrad": lambda cfg: fl.FedAdagrad(**_common(cfg), eta=0.1 * cfg.server_lr),
    "fedmedian": lambda cfg: fl.FedMedian(**_common(cfg)),
    "trimmedmean": lambda cfg: fl.FedTrimmedAvg(**_common(cfg)),
    "krum": lambda cfg: fl.Krum(**_common(cfg)),
    "multikrum": lambda cfg: fl.MultiKrum(**_common(cfg)),
    "bulyan": lambda cfg: fl.Bulyan(**_common(cfg)),
}


def make_strategy(cfg: RunConfig) -> fl.Strategy:
    """Return the configured strategy instance for ``cfg.strategy``."""
    return STRATEGIES[cfg.strategy](cfg)
