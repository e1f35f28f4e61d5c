"""Robust aggregation: Flower's strategies as Pollen configures them, against poisoned updates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NodesGrid, train_reply
from flwr.app import ArrayRecord, ConfigRecord

from pollen.client.faults import corrupt, fault_of
from pollen.config import RunConfig
from pollen.server.strategies import STRATEGIES, make_strategy

pytestmark = pytest.mark.usefixtures("flower_task")


def _round(name: str, attack: str, clients: int = 5, **cfg_changes) -> tuple[float, float]:
    """Distance of the aggregate from the honest mean, and the honest updates' spread."""
    rng = np.random.default_rng(0)
    global_w = [
        rng.normal(size=(40, 30)).astype(np.float32),
        rng.normal(size=(30,)).astype(np.float32),
    ]
    direction = [rng.normal(size=w.shape).astype(np.float32) * 0.1 for w in global_w]
    honest = [
        [
            g + d + rng.normal(size=g.shape).astype(np.float32) * 0.01
            for g, d in zip(global_w, direction, strict=True)
        ]
        for _ in range(clients - 1)
    ]
    poisoned = corrupt(attack, global_w, honest[0], seed=1)
    cfg = RunConfig().replace(strategy=name, min_clients=clients, **cfg_changes)
    strategy = make_strategy(cfg)
    nodes = list(range(1, clients + 1))
    list(strategy.configure_train(1, ArrayRecord(global_w), ConfigRecord({}), NodesGrid(nodes)))
    replies = [train_reply(1, poisoned)] + [train_reply(i + 2, h) for i, h in enumerate(honest)]
    new, _ = strategy.aggregate_train(1, replies)
    got = new.to_numpy_ndarrays()
    mean = [np.mean([h[i] for h in honest], axis=0) for i in range(len(global_w))]
    step = np.sqrt(sum(float(((m - g) ** 2).sum()) for m, g in zip(mean, global_w, strict=True)))
    off = np.sqrt(sum(float(((a - m) ** 2).sum()) for a, m in zip(got, mean, strict=True)))
    return off, step


@pytest.mark.parametrize("attack", ["scale", "noise"])
def test_fedavg_is_wrecked_by_one_poisoned_update(attack: str) -> None:
    off, step = _round("fedavg", attack)
    assert off > step  # farther from the honest mean than not moving at all


@pytest.mark.parametrize("attack", ["scale", "noise", "signflip"])
@pytest.mark.parametrize(
    "name,changes",
    [
        ("fedmedian", {}),
        ("trimmedmean", {"trim_beta": 0.2}),
        ("krum", {"num_malicious_nodes": 1}),
        ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    ],
)
def test_robust_strategies_stay_near_the_honest_mean(name: str, changes: dict, attack: str) -> None:
    off, step = _round(name, attack, **changes)
    assert off < 0.35 * step, f"{name} vs {attack}: {off:.3f} off, honest step {step:.3f}"


def test_bulyan_with_enough_clients() -> None:
    off, step = _round("bulyan", "scale", clients=7, num_malicious_nodes=1)
    assert off < 0.35 * step


def test_strategy_parameters_reach_flower() -> None:
    cfg = RunConfig().replace(
        trim_beta=0.3, num_malicious_nodes=2, num_nodes_to_select=4, proximal_mu=0.5
    )
    assert make_strategy(cfg.replace(strategy="trimmedmean")).beta == 0.3
    assert make_strategy(cfg.replace(strategy="krum")).num_malicious_nodes == 2
    mk = make_strategy(cfg.replace(strategy="multikrum"))
    assert (mk.num_malicious_nodes, mk.num_nodes_to_select) == (2, 4)
    assert make_strategy(cfg.replace(strategy="fedprox")).proximal_mu == 0.5
    assert set(STRATEGIES) >= {
        "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
        "fedmedian", "trimmedmean", "krum", "multikrum", "bulyan",
    }  # fmt: skip


def test_fedprox_sends_mu_to_the_clients() -> None:
    cfg = RunConfig().replace(strategy="fedprox", proximal_mu=0.25, min_clients=2)
    w = [np.zeros(3, np.float32)]
    msgs = list(
        make_strategy(cfg).configure_train(1, ArrayRecord(w), ConfigRecord({}), NodesGrid([1, 2]))
    )
    assert [m.content["config"]["proximal-mu"] for m in msgs] == [0.25, 0.25]


def test_attack_harness_names_the_first_k_partitions() -> None:
    cfg = RunConfig().replace(malicious=2, attack="noise", fault="nan@3")
    assert cfg.fault_spec() == "nan@3 noise@0,1"
    assert [fault_of({"partition-id": i}, cfg.fault_spec()) for i in range(5)] == [
        "noise", "noise", "", "nan", "",
    ]  # fmt: skip
    assert RunConfig().fault_spec() == ""
