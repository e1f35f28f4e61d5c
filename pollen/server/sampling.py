"""Seeded client sampling: a round's sample depends on the run's seed and the clients' names.

Flower's strategies sample with the global ``random`` module over node ids
that change from run to run; :func:`seeded_sampling` makes that draw
repeatable without replacing Flower's sampler. The draw is over the clients'
names; a simulation's are known without asking (:func:`simulated_names`), so
sampling 10 of 10,000 simulated clients sends 10 messages, not 10,000.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flwr.serverapp import Grid

from pollen.compat.flower import simulation_partitions


def seeded_order(nodes: Iterable[int], seed: int) -> list[int]:
    """``nodes`` in an order drawn from ``seed`` over their node ids alone.

    The order in which clients are asked for the run's initial weights: a
    client cannot get itself asked first by the name it chooses (names are
    the clients' own; node ids are the SuperLink's). The same seed and node
    ids give the same order.
    """
    ordered = sorted(set(nodes))
    return random.Random(f"pollen-first-client:{seed}").sample(ordered, len(ordered))


def simulated_name(partition_id: int) -> str:
    """The name a simulated client gives itself: ``partition-<id>``.

    The same as :func:`pollen.client.app.client_name` of a node config that has
    only ``partition-id`` and ``num-partitions`` (``tests/server/test_sampling_scale.py``
    checks that they agree).
    """
    return f"partition-{partition_id}"


def simulated_names(grid: Grid) -> dict[int, str]:
    """The names of a simulation's clients by node id, known without a message to any.

    A federation of 10,000 simulated clients must not ask each for its name before
    sampling 10 of them: every message costs the simulation engine a task, and Flower's
    engine scans its whole message store for each of its nodes (docs/scale.md). Its
    clients are named by their partition (:func:`simulated_name`), and the partition of
    every node is known from the engine (:func:`pollen.compat.flower.simulation_partitions`).
    ``{}`` for a deployed federation, whose clients choose their own names.
    """
    return {node: simulated_name(pid) for node, pid in simulation_partitions(grid).items()}


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

    ``random``'s state is restored on exit. The seed carries no secret, so this
    sample is predictable and client-level DP credits no amplification for it
    (``"sampling": "fixed-size, seeded: ..."``, :mod:`pollen.server.privacy`);
    ``--client-sampling poisson`` draws the train sample from the OS's randomness
    instead (:func:`pollen.server.distributed_dp.poisson_sample`).

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
