"""Client sampling: pollen.server.sampling.seeded_sampling around Flower's own strategies."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import NodesGrid
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as fl

from pollen.server.sampling import seeded_sample, seeded_sampling

pytestmark = pytest.mark.usefixtures("flower_task")

NAMES = [f"partition-{i}" for i in range(10)]


def _fleet(seed: int) -> tuple[NodesGrid, dict[int, str]]:
    """The same ten clients under random node ids, listed in a random order."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 2**63), len(NAMES))
    names = dict(zip(ids, NAMES, strict=True))
    rng.shuffle(ids)
    return NodesGrid(ids), names


def _strategy(name: str = "fedavg") -> fl.FedAvg:
    sizes = {"min_train_nodes": 3, "min_evaluate_nodes": 3, "min_available_nodes": 3}
    if name == "fedprox":
        return fl.FedProx(fraction_train=0.3, fraction_evaluate=0.3, proximal_mu=0.1, **sizes)
    if name == "krum":
        return fl.Krum(fraction_train=0.3, fraction_evaluate=0.3, **sizes)
    return fl.FedAvg(fraction_train=0.3, fraction_evaluate=0.3, **sizes)


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.zeros(3, np.float32)])


def _sampled(grid, names, seed: int, rnd: int, phase: str = "train", strategy=None) -> list[str]:
    strategy = strategy or _strategy()
    with seeded_sampling(grid, names, seed, rnd) as view:
        configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
        messages = configure(rnd, _arrays(), ConfigRecord(), view)
    return [names[m.metadata.dst_node_id] for m in messages]


def test_a_round_samples_the_same_clients_whatever_their_node_ids() -> None:
    (grid_a, names_a), (grid_b, names_b) = _fleet(1), _fleet(2)
    assert set(names_a) != set(names_b)
    runs = [[_sampled(grid, names, 42, rnd) for rnd in range(1, 6)] for grid, names in
            ((grid_a, names_a), (grid_b, names_b))]  # fmt: skip
    assert runs[0] == runs[1]
    assert all(len(s) == 3 and len(set(s)) == 3 for s in runs[0])
    assert len({tuple(sorted(s)) for s in runs[0]}) > 1, "every round drew the same clients"
    other_seed = [_sampled(grid_a, names_a, 7, rnd) for rnd in range(1, 6)]
    assert other_seed != runs[0]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "krum"])
def test_train_and_evaluate_sample_the_same_clients_and_seeded_sample_knows_them(
    name: str,
) -> None:
    grid, names = _fleet(3)
    for rnd in (1, 2, 3):
        train = _sampled(grid, names, 42, rnd, "train", _strategy(name))
        assert _sampled(grid, names, 42, rnd, "evaluate", _strategy(name)) == train
        predicted = seeded_sample(grid, names, 42, rnd, 3)
        assert [names[n] for n in predicted] == train


def test_unnamed_nodes_come_last_and_the_global_random_is_left_as_it_was() -> None:
    grid, names = _fleet(4)
    unnamed = grid.nodes[0]
    del names[unnamed]
    random.seed(123)
    state = random.getstate()
    with seeded_sampling(grid, names, 42, 1) as view:
        listed = view.get_node_ids()
        random.random()
    assert random.getstate() == state
    assert listed[-1] == unnamed
    assert [names[n] for n in listed[:-1]] == sorted(names.values())
