"""Sampling credit where it is honest: ``--client-sampling poisson`` (unseeded) vs seeded."""

from __future__ import annotations

import random

import dp_accounting
import numpy as np
import pytest
from conftest import NodesGrid, train_reply
from dp_accounting import rdp
from flwr.app import ArrayRecord, ConfigRecord

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.distributed_dp import (
    POISSON,
    SEEDED,
    ClientLevelDP,
    ledger_epsilon,
    poisson_sample,
)
from pollen.server.privacy import (
    epsilon_after,
    make_private,
    noise_for_budget,
    privacy_record,
    private_state,
    resolve_noise,
    restore_private,
)
from pollen.server.sampling import seeded_sampling
from pollen.server.strategies import check_config, make_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

DELTA = 1e-5


def poisson_cfg(**kw) -> RunConfig:
    base = {"dp": "client", "client_sampling": "poisson", "fraction_train": 0.1}
    return RunConfig().replace(**{**base, "min_clients": 1, "model": "cnn-gn", **kw})


def library_epsilon(q: float, z: float, rounds: int) -> float:
    """dp-accounting's figure, composed round by round."""
    acc = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for _ in range(rounds):
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("q,z,rounds", [(0.1, 1.0, 15), (0.01, 0.8, 60), (0.5, 2.0, 30)])
def test_the_accountant_figure_is_dp_accountings(q: float, z: float, rounds: int) -> None:
    want = library_epsilon(q, z, rounds)
    assert ledger_epsilon([[q, z, rounds]], DELTA) == pytest.approx(want, rel=1e-9)
    assert epsilon_after(z, rounds, DELTA, q) == pytest.approx(want, rel=1e-9)
    assert want < epsilon_after(z, rounds, DELTA)  # the credit: less than without sampling


def test_seeded_sampling_gets_no_credit_and_poisson_does() -> None:
    seeded = RunConfig().replace(dp="client", dp_epsilon=10.0, fraction_train=0.1, num_rounds=15)
    poisson = seeded.replace(client_sampling="poisson")
    z_seeded, z_poisson = resolve_noise(seeded), resolve_noise(poisson)
    assert epsilon_after(z_seeded, 15, DELTA) <= 10.0
    assert library_epsilon(0.1, z_poisson, 15) <= 10.0 < library_epsilon(0.1, z_poisson * 0.99, 15)
    assert z_poisson < z_seeded / 2  # amplification lets far less noise keep the same budget
    assert noise_for_budget(10.0, 15, DELTA, 0.1) == z_poisson
    strategy = make_private(make_strategy(seeded.replace(min_clients=2)), seeded, 100)
    assert not isinstance(strategy, ClientLevelDP)  # Flower's wrapper, NO_AMPLIFICATION
    assert privacy_record(strategy)["sampling"] == SEEDED
    assert "no amplification" in SEEDED and "amplification credited" in POISSON


def test_poisson_samples_are_not_reproducible_from_the_seed() -> None:
    nodes = list(range(1, 1001))
    draws = []
    for _ in range(2):
        random.seed(42)  # the run's seed, and seeded_sampling, decide nothing here
        with seeded_sampling(NodesGrid(nodes), {}, 42, 1):
            draws.append(poisson_sample(nodes, 0.1))
    assert draws[0] != draws[1]
    sizes = [len(poisson_sample(range(100), 0.1)) for _ in range(400)]
    assert len(set(sizes)) > 3  # the round size varies
    assert np.mean(sizes) == pytest.approx(10.0, abs=0.6)  # 5 standard errors


def test_poisson_central_dp_configures_a_poisson_sample_and_noises_the_sum() -> None:
    n, q, z, clip, size = 100, 0.1, 1.5, 2.0, 200_000
    cfg = poisson_cfg(dp_noise=z, dp_clip=clip)
    check_config(cfg)
    strategy = make_private(make_strategy(cfg), cfg, n)
    assert isinstance(strategy, ClientLevelDP) and strategy.sample_rate == q
    grid = NodesGrid(list(range(1, n + 1)))
    w = ArrayRecord([np.zeros(size, np.float32)])
    picked = [
        [m.metadata.dst_node_id for m in strategy.configure_train(1, w, ConfigRecord({}), grid)]
        for _ in range(5)
    ]
    assert len({tuple(p) for p in picked}) > 1
    # Replies point the same way with norm 10 (5x C): each is clipped to C, the sum gets
    # noise of std z*C, and the result is divided by the expected count q*n = 10.
    direction = np.ones(size, np.float32) / np.sqrt(size)
    k = 7
    replies = [train_reply(i + 1, [10.0 * direction], n=10 * (i + 1)) for i in range(k)]
    new, metrics = strategy.aggregate_train(1, replies)
    got = new.to_numpy_ndarrays()[0].astype(np.float64)
    assert got.dtype == np.float64 and new.to_numpy_ndarrays()[0].dtype == np.float32
    noise = got - k * clip * direction / (q * n)
    assert np.std(noise) == pytest.approx(z * clip / (q * n), rel=0.01)
    assert abs(np.mean(noise)) < 5 * z * clip / (q * n) / np.sqrt(size)
    rec = privacy_record(strategy)
    assert rec["releases"] == 1 and rec["sampling"] == POISSON and rec["mode"] == "central"
    assert rec["epsilon"] == pytest.approx(library_epsilon(q, z, 1), rel=1e-9)
    # A round that sampled nobody is a release too: the noise alone.
    strategy.configure_train(2, new, ConfigRecord({}), NodesGrid([]))
    alone, _ = strategy.aggregate_train(2, [])
    diff = alone.to_numpy_ndarrays()[0].astype(np.float64) - got
    assert np.std(diff) == pytest.approx(z * clip / (q * n), rel=0.01)
    assert privacy_record(strategy)["epsilon"] == pytest.approx(library_epsilon(q, z, 2), rel=1e-9)


def test_poisson_state_survives_a_checkpoint_and_a_bad_ledger_is_refused() -> None:
    cfg = poisson_cfg(dp_noise=1.1)
    strategy = make_private(make_strategy(cfg), cfg, 50)
    for _ in range(4):
        strategy.accountant.compose(0.1, 1.1)
    state = private_state(strategy)
    assert state["accountant"] == {"population": 50, "ledger": [[0.1, 1.1, 4]]}
    back = restore_private(make_strategy(cfg), cfg, state, max_releases=4)
    assert privacy_record(back) == privacy_record(strategy)
    assert back.sample_rate == 0.1 and back.population == 50
    for bad in ([[1.5, 1.1, 4]], [[0.1, -1.0, 4]], [[0.1, 1.1, True]], "x", [[0.1, 1.1, 0]]):
        broken = {**state, "accountant": {"population": 50, "ledger": bad}}
        with pytest.raises(ValueError):
            restore_private(make_strategy(cfg), cfg, broken, max_releases=4)


def test_the_risk_of_a_round_below_min_clients() -> None:
    from pollen.server.privacy import short_round_risk

    assert short_round_risk(100, 0.1, 1, 1) == pytest.approx(0.9**100)
    assert short_round_risk(100, 0.1, 1, 15) == pytest.approx(1 - (1 - 0.9**100) ** 15)
    assert short_round_risk(100, 0.1, 10, 15) > 0.99  # --min-clients 10 at 10 expected
    assert short_round_risk(4, 0.5, 5, 1) == pytest.approx(1.0)


def test_refusals() -> None:
    with pytest.raises(PollenError, match="needs --dp client"):
        check_config(RunConfig().replace(client_sampling="poisson"))
    with pytest.raises(PollenError, match="cannot be combined with --secagg"):
        check_config(poisson_cfg(secagg=True))
    with pytest.raises(PollenError, match="client-sampling must be"):
        RunConfig().replace(client_sampling="uniform")
    with pytest.raises(PollenError, match="needs a noise multiplier above"):
        resolve_noise(poisson_cfg(dp_epsilon=1e-4))


@pytest.mark.e2e
def test_simulate_with_poisson_sampling(tmp_path, tiny_data, pollen_env):
    """`pollen simulate --dp --client-sampling poisson`: 4 real clients, q = 0.9, 2 rounds.

    A round samples nobody with probability 1e-4 (then it stops: --min-clients 1).
    """
    import json
    import subprocess

    from conftest import pollen_cmd

    run = tmp_path / "run"
    argv = ["simulate", "--dp", "--dp-noise", "1.0", "--client-sampling", "poisson"]
    argv += ["--fraction-train", "0.9", "--min-clients", "1", "--clients", "4", "--rounds", "2"]
    argv += ["--model", "cnn-gn", "--num-classes", "3", "--data-dir", str(tiny_data)]
    argv += ["--out", str(run), "--client-threads", "1"]
    proc = subprocess.run(
        pollen_cmd(*argv), env=pollen_env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    history = json.loads((run / "history.json").read_text())
    privacy = [r["privacy"] for r in history["rounds"]]
    assert [p["releases"] for p in privacy] == [1, 2]
    assert all(p["sampling"] == POISSON and p["mode"] == "central" for p in privacy)
    assert privacy[1]["epsilon"] == pytest.approx(library_epsilon(0.9, 1.0, 2), rel=1e-9)
    assert history["config"]["client-sampling"] == "poisson"
