"""Aggregation strategies: the registry of Flower strategies a run can use.

All strategies are Flower's own (``flwr.serverapp.strategy``); this module
only maps a run-config name to a configured instance. The server aggregates
weights without knowing the model: strategies see ``ArrayRecord`` s only.

Adding a strategy means adding one entry to :data:`STRATEGIES`. Which clients a
round samples is :func:`seeded_sampling`'s: a function of the run's seed and the
clients' names.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flwr.serverapp import Grid
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
        "weighted_by_key": UNIT_WEIGHT_KEY if cfg.dp else NUM_EXAMPLES_KEY,
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_train,
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
    }


STRATEGIES: dict[str, Callable[[RunConfig], fl.Strategy]] = {
    "fedavg": lambda cfg: fl.FedAvg(**_common(cfg)),
    "fedavgm": lambda cfg: fl.FedAvgM(
        **_common(cfg), server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum
    ),
    # FedProx aggregates like FedAvg and sends "proximal-mu" to the clients, which
    # add mu/2 * ||w - w_global||^2 to their loss (pollen.training.local.ProximalTerm).
    "fedprox": lambda cfg: fl.FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu),
    # Flower's defaults for the adaptive strategies are eta=0.1 (0.01 for FedYogi): their
    # server step is eta * m / (sqrt(v) + tau); server-lr scales it.
    "fedadam": lambda cfg: fl.FedAdam(**_common(cfg), eta=0.1 * cfg.server_lr),
    "fedyogi": lambda cfg: fl.FedYogi(**_common(cfg), eta=0.01 * cfg.server_lr),
    "fedadagrad": lambda cfg: fl.FedAdagrad(**_common(cfg), eta=0.1 * cfg.server_lr),
    "fedmedian": lambda cfg: fl.FedMedian(**_common(cfg)),
    "trimmedmean": lambda cfg: fl.FedTrimmedAvg(**_common(cfg), beta=cfg.trim_beta),
    "krum": lambda cfg: fl.Krum(**_common(cfg), num_malicious_nodes=cfg.num_malicious_nodes),
    "multikrum": lambda cfg: fl.MultiKrum(
        **_common(cfg),
        num_malicious_nodes=cfg.num_malicious_nodes,
        num_nodes_to_select=cfg.num_nodes_to_select,
    ),
    "bulyan": lambda cfg: fl.Bulyan(**_common(cfg), num_malicious_nodes=cfg.num_malicious_nodes),
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
    if cfg.secagg and cfg.strategy != "fedavg":
        raise PollenError(
            f"Secure aggregation works with the fedavg strategy only, not {cfg.strategy!r}: "
            "with SecAgg+ the server sees only the sum of the updates, which is all FedAvg "
            "needs, while robust and adaptive strategies need each update. Drop --secagg "
            "or use --strategy fedavg."
        )
    if cfg.secagg and cfg.dp:
        raise PollenError(
            "--secagg and --dp cannot be combined yet: Pollen's DP clips each client's "
            "update on the server, which SecAgg+ hides. Choose one of them."
        )
    if cfg.dp and cfg.strategy not in ("fedavg", "fedprox"):
        raise PollenError(
            f"Differential privacy works with fedavg or fedprox, not {cfg.strategy!r}: "
            "Flower's privacy accountant covers plain FedAvg aggregation only. Use "
            "--strategy fedavg with --dp."
        )


#: Fewest updates per round a robust strategy needs for ``f`` assumed malicious clients.
MIN_UPDATES = {
    "krum": lambda f: 2 * f + 3,
    "multikrum": lambda f: 2 * f + 3,
    "bulyan": lambda f: 4 * f + 3,
}


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


def by_name(nodes: Iterable[int], names: Mapping[int, str]) -> list[int]:
    """``nodes`` in the order of their clients' names; those not in ``names`` last, by id."""
    return sorted(nodes, key=lambda n: (n not in names, names.get(n, ""), n))


class _NameOrderedGrid:
    """A view of ``grid`` that lists the connected nodes :func:`by_name`.

    Everything else goes to ``grid``.
    """

    def __init__(self, grid: Grid, names: Mapping[int, str]) -> None:
        self.grid = grid
        self.names = names

    def get_node_ids(self) -> list[int]:
        return by_name(self.grid.get_node_ids(), self.names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


@contextlib.contextmanager
def seeded_sampling(grid: Grid, names: Mapping[int, str], seed: int, rnd: int) -> Iterator[Grid]:
    """Make a strategy's client sample in round ``rnd`` depend on ``seed`` and names only.

    Flower's strategies sample with the global ``random`` module
    (``flwr.serverapp.strategy.strategy_utils.sample_nodes``:
    ``random.sample(list(grid.get_node_ids()), k)``), unseeded, over node ids that
    are drawn at random for every run; Flower takes no sampler to pass in. Inside
    this context ``random`` is seeded from ``(seed, rnd)`` and the yielded grid
    lists the connected nodes by client name, so that:

    - the same clients (by name) are sampled in a round, run after run, whatever
      their node ids: runs with ``fraction-train < 1`` repeat, and two strategies
      compared with the same seed see the same clients every round;
    - a round's train and evaluate phases sample the same clients, as long as
      the connected clients did not change between them.

    ``random``'s state is restored on exit. The seed carries no secret: Pollen's
    DP accounting takes no amplification from sampling (:mod:`pollen.server.privacy`).

    Args:
        grid: The run's grid; configure the strategy with the yielded one.
        names: Client names by node id (connected nodes missing from it come
            last, by node id).
        seed: The run's seed.
        rnd: The round (1-based).

    Yields:
        ``grid``, listing its nodes by client name.
    """
    state = random.getstate()
    random.seed(f"pollen-sampling:{seed}:{rnd}")  # a str seed hashes the same in every process
    try:
        yield _NameOrderedGrid(grid, names)  # type: ignore[misc]
    finally:
        random.setstate(state)


def seeded_sample(grid: Grid, names: Mapping[int, str], seed: int, rnd: int, k: int) -> list[int]:
    """The ``k`` nodes a strategy samples in round ``rnd`` under :func:`seeded_sampling`.

    The same draw as Flower's ``sample_nodes`` makes there, for knowing a
    round's clients before the strategy is asked (round 1's prepare while the
    initial weights are built).
    """
    with seeded_sampling(grid, names, seed, rnd) as view:
        nodes = list(view.get_node_ids())
        return random.sample(nodes, min(k, len(nodes)))
