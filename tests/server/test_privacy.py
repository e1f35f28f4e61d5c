"""Differential privacy: noise calibration, Flower's DP strategy as Pollen wires it, accounting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import NodesGrid, train_reply
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
)

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.privacy import (
    epsilon_after,
    make_private,
    noise_for_budget,
    privacy_record,
    resolve_noise,
    sample_size,
)
from pollen.server.strategies import check_config, make_strategy

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("flower_task")


# --- calibration ---------------------------------------------------------------------------------


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    assert epsilon_after(1.0, 1, DELTA) < epsilon_after(1.0, 10, DELTA)
    assert epsilon_after(2.0, 10, DELTA) < epsilon_after(1.0, 10, DELTA)


@pytest.mark.parametrize("budget,rounds", [(1.0, 5), (8.0, 20), (50.0, 30)])
def test_noise_for_budget_is_the_smallest_noise_within_budget(budget: float, rounds: int) -> None:
    z = noise_for_budget(budget, rounds, DELTA)
    assert epsilon_after(z, rounds, DELTA) <= budget
    assert epsilon_after(z * 0.99, rounds, DELTA) > budget


def test_resolve_noise_cases() -> None:
    base = RunConfig().replace(dp=True, num_rounds=10, model="cnn-gn")
    with pytest.raises(PollenError, match="--dp-epsilon E"):
        resolve_noise(base)
    assert resolve_noise(base.replace(dp_noise=1.3)) == 1.3
    z = resolve_noise(base.replace(dp_epsilon=5.0))
    assert epsilon_after(z, 10, DELTA) <= 5.0
    with pytest.raises(PollenError, match="spends epsilon"):
        resolve_noise(base.replace(dp_noise=0.3, dp_epsilon=5.0))
    with pytest.raises(PollenError, match="needs a noise multiplier above"):
        resolve_noise(base.replace(dp_epsilon=1e-4))


def test_dp_refuses_strategies_the_accountant_does_not_cover() -> None:
    with pytest.raises(PollenError, match="fedavg or fedprox"):
        check_config(RunConfig().replace(dp=True, strategy="krum"))
    check_config(RunConfig().replace(dp=True, secagg=True))  # distributed DP
    with pytest.raises(PollenError, match="fedavg strategy only"):
        check_config(RunConfig().replace(dp=True, secagg=True, strategy="fedprox"))


def test_sample_size_follows_flower_fedavg() -> None:
    cfg = RunConfig(fraction_train=0.1, min_clients=2)
    assert sample_size(cfg, 100) == 10
    assert sample_size(cfg, 5) == 2


# --- the strategy Pollen builds ------------------------------------------------------------------


def test_private_fedavg_clips_each_update_adds_calibrated_noise_and_accounts() -> None:
    """Clipping to C, noise std z*C/n on the equal-weight mean, epsilon of one release."""
    n, clip, z, size = 10, 2.0, 1.5, 200_000
    cfg = RunConfig().replace(dp=True, dp_noise=z, dp_clip=clip, min_clients=n, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, n)
    global_w = [np.zeros(size, np.float32)]
    grid = NodesGrid(list(range(1, n + 1)))
    messages = list(strategy.configure_train(1, ArrayRecord(global_w), ConfigRecord({}), grid))
    assert len(messages) == n
    # Every client's update points the same way with norm 10 (5x the clipping norm),
    # and claims a different example count, which DP must ignore.
    direction = np.ones(size, np.float32) / np.sqrt(size)
    replies = [train_reply(i + 1, [10.0 * direction], n=10 * (i + 1)) for i in range(n)]
    new, _ = strategy.aggregate_train(1, replies)
    got = new.to_numpy_ndarrays()[0]
    # Mean of the clipped updates is clip * direction; what remains is the noise.
    noise = got - clip * direction
    assert np.std(noise) == pytest.approx(z * clip / n, rel=0.02)
    assert abs(float(np.mean(noise))) < 5 * z * clip / n / np.sqrt(size)
    record = privacy_record(strategy)
    assert record["releases"] == 1
    assert record["epsilon"] == pytest.approx(epsilon_after(z, 1, DELTA), rel=1e-6)
    assert record["noise_multiplier"] == z and record["clipping_norm"] == clip


def test_private_strategy_survives_a_deepcopy() -> None:
    n = 3
    cfg = RunConfig().replace(dp=True, dp_noise=1.0, min_clients=n, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, n)
    grid = NodesGrid([1, 2, 3])
    w = [np.zeros(4, np.float32)]
    for rnd in (1, 2):
        list(strategy.configure_train(rnd, ArrayRecord(w), ConfigRecord({}), grid))
        strategy.aggregate_train(rnd, [train_reply(i, [np.ones(4, np.float32)]) for i in (1, 2, 3)])
    restored = copy.deepcopy(strategy)  # the round loop copies the strategy each round
    assert privacy_record(restored) == privacy_record(strategy)
    assert privacy_record(restored)["epsilon"] == pytest.approx(epsilon_after(1.0, 2, DELTA))


def test_a_missing_reply_is_not_aggregated_under_dp() -> None:
    """Noise is calibrated to the sampled count: a round with a missing update is refused."""
    cfg = RunConfig().replace(dp=True, dp_noise=1.0, min_clients=3, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, 3)
    w = [np.zeros(4, np.float32)]
    list(strategy.configure_train(1, ArrayRecord(w), ConfigRecord({}), NodesGrid([1, 2, 3])))
    new, _ = strategy.aggregate_train(1, [train_reply(i, [np.ones(4, np.float32)]) for i in (1, 2)])
    assert new is None
    assert privacy_record(strategy)["releases"] == 0


def test_arrays_stay_float32_after_noise() -> None:
    cfg = RunConfig().replace(dp=True, dp_noise=1.0, min_clients=2, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, 2)
    w = [np.zeros(4, np.float32)]
    list(strategy.configure_train(1, ArrayRecord(w), ConfigRecord({}), NodesGrid([1, 2])))
    new, _ = strategy.aggregate_train(1, [train_reply(i, [np.ones(4, np.float32)]) for i in (1, 2)])
    assert isinstance(new["0"], Array) and new.to_numpy_ndarrays()[0].shape == (4,)


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_dp_simulation_with_fedprox_records_epsilon_every_round(tmp_path, tiny_data, pollen_env):
    """`pollen simulate --dp --dp-epsilon 20 --strategy fedprox`: real processes, 2 rounds."""
    import json
    import subprocess

    from conftest import pollen_cmd

    run = tmp_path / "run"
    argv = ["simulate", "--clients", "3", "--rounds", "2", "--model", "cnn-gn"]
    argv += ["--num-classes", "3", "--data-dir", str(tiny_data), "--out", str(run)]
    argv += ["--strategy", "fedprox", "--proximal-mu", "0.1", "--dp", "--dp-epsilon", "20"]
    proc = subprocess.run(
        pollen_cmd(*argv), env=pollen_env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    history = json.loads((run / "history.json").read_text())
    privacy = [r["privacy"] for r in history["rounds"]]
    assert [p["releases"] for p in privacy] == [1, 2]
    assert privacy[0]["epsilon"] < privacy[1]["epsilon"] <= 20.0
    z = privacy[0]["noise_multiplier"]
    assert privacy[1]["epsilon"] == pytest.approx(epsilon_after(z, 2, DELTA), rel=1e-6)
    assert "DP epsilon" in log and "differential privacy spent: epsilon" in proc.stdout
    assert history["config"]["dp"] == "client" and history["config"]["strategy"] == "fedprox"
    assert (run / "model.keras").exists()
