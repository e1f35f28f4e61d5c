"""Distributed DP (``--secagg --dp client``): clients clip and noise their update before SecAgg+.

Flower's real ``SecAggPlusWorkflow`` and Pollen's secure train phase run against
the in-process grid of ``test_secagg`` (every message goes to a ClientApp behind
Pollen's client mod). The clients' noise is drawn from the OS; the test records
what each client hands to SecAgg+'s quantization (by wrapping
:func:`pollen.client.dp_mod.noisy_update`) and checks the server's aggregate
against it.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from test_secagg import AppGrid  # tests/server/test_secagg.py

import pollen.client.dp_mod as dp_mod
import pollen.server.distributed_dp as server_dp
from pollen.client.secagg_mod import (
    is_legacy_train,
    legacy_train_input,
    legacy_train_reply,
    secagg_client_mod,
)
from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.protocol import TRAIN_EXAMPLES_REQUEST
from pollen.server.distributed_dp import ClientLevelDP, LedgerAccountant, clipped
from pollen.server.history import RoundRecord
from pollen.server.phases import RoundClients, RoundContext
from pollen.server.privacy import epsilon_after, make_private, privacy_record
from pollen.server.secagg import QUANTIZATION_RANGE, SecureAggregation
from pollen.server.strategies import check_config, make_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

CLIP = 1.0
DELTA = 1e-5
EXAMPLES = {11: 30, 22: 50, 33: 20}
#: A 'model' of 200,010 coordinates: enough to measure a noise std within 1%.
SHAPES = [(400, 500), (10,)]


def delta_of(node: int) -> list[np.ndarray]:
    """Node ``node``'s update: norm about 4.5, so clipping to 1 matters."""
    rng = np.random.default_rng(node)
    return [rng.normal(0.0, 0.01, s).astype("float32") for s in SHAPES]


app = ClientApp()


@app.query()
def _query(msg: Message, context: Context) -> Message:
    info = {"name": f"client-{context.node_id}", TRAIN_EXAMPLES_REQUEST: EXAMPLES[context.node_id]}
    return Message(RecordDict({"client": ConfigRecord(info)}), reply_to=msg)


@app.train(mods=[secagg_client_mod])
def _train(msg: Message, context: Context) -> Message:
    assert is_legacy_train(msg.content)
    content = legacy_train_input(msg.content)
    start = content["arrays"].to_numpy_ndarrays()
    trained = [g + d for g, d in zip(start, delta_of(context.node_id), strict=True)]
    metrics = {"train_loss": 0.5, "train_accuracy": 0.5, "fit_seconds": 0.01}
    metrics["num-examples"] = EXAMPLES[context.node_id]
    reply = RecordDict(
        {
            "arrays": ArrayRecord(trained),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"name": f"client-{context.node_id}"}),
        }
    )
    return Message(legacy_train_reply(reply, content["arrays"]), reply_to=msg)


@pytest.fixture
def sent(monkeypatch) -> list[list[np.ndarray]]:
    """What every client handed to SecAgg+ (its clipped, noised update), in call order."""
    calls: list[list[np.ndarray]] = []
    real = dp_mod.noisy_update

    def recording(update, clip, std, rng=None):
        out = real(update, clip, std, rng)
        calls.append([np.array(a) for a in out])
        return out

    monkeypatch.setattr(dp_mod, "noisy_update", recording)
    return calls


def secure_dp_round(z: float, silent=()):
    """One distributed-DP round over the three nodes; ``silent``: (node, stage) with no reply."""
    cfg = RunConfig().replace(
        secagg=True, dp="client", dp_noise=z, dp_clip=CLIP, min_clients=2, model="cnn-gn"
    )
    check_config(cfg)
    strategy = make_private(make_strategy(cfg), cfg, len(EXAMPLES))
    assert isinstance(strategy, ClientLevelDP) and strategy.distributed
    grid = AppGrid(app, list(EXAMPLES), silent=silent)
    arrays = ArrayRecord([np.zeros(s, "float32") for s in SHAPES])
    record, clients = RoundRecord(round=1), RoundClients()
    new = SecureAggregation(cfg).train_phase(
        RoundContext(grid, strategy, 1, 1.5 if silent else 30.0, record, clients),
        arrays, {"learning-rate": 0.1}, min_valid=2,
    )  # fmt: skip
    return strategy, grid, new.to_numpy_ndarrays(), record


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


def test_clients_send_masked_clipped_noisy_updates_and_the_aggregate_is_their_mean(sent):
    z = 1.0
    strategy, grid, new, record = secure_dp_round(z)
    nodes = list(EXAMPLES)
    assert len(sent) == 3
    # Each client sent its update clipped to C plus noise of std z*C/sqrt(m), m = threshold 2.
    std = z * CLIP / np.sqrt(2)
    clean = {n: flat(clipped(delta_of(n), CLIP)) for n in nodes}
    assert all(np.linalg.norm(c) == pytest.approx(CLIP, rel=1e-6) for c in clean.values())
    for out in sent:
        noise = [flat(out) - c for c in clean.values()]
        best = min(noise, key=lambda x: abs(np.std(x) - std))  # whichever client this was
        assert np.std(best) == pytest.approx(std, rel=0.01)
        assert abs(np.mean(best)) < 5 * std / np.sqrt(best.size)
    # The server saw masked vectors only, nothing near a client's quantized noisy update.
    masked = [(n, r) for stage, n, r in grid.log if stage == Stage.COLLECT_MASKED_VECTORS]
    assert sorted(n for n, _ in masked) == sorted(nodes)
    for _, reply in masked:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        vectors = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        seen = flat([bytes_to_ndarray(b) for b in vectors][1:])  # [0]: the weight factor
        for out in sent:
            plain = np.floor((flat(out) + 8.0) * QUANTIZATION_RANGE / 16.0)
            assert np.mean(np.abs(seen - plain) <= 2) < 0.01
    # The aggregate is the mean of exactly what the clients sent, within quantization.
    step = 2 * 8.0 / QUANTIZATION_RANGE  # clipping range 8 holds C + 6 sigma here
    want = sum(flat(out) for out in sent) / 3
    assert np.max(np.abs(flat(new) - want)) <= 2 * step
    # Every client weighed 1; the example counts shown are the clients' own.
    assert record.train["examples"] == sum(EXAMPLES.values())
    rec = privacy_record(strategy)
    assert rec["mode"] == "distributed" and rec["releases"] == 1
    assert rec["epsilon"] == pytest.approx(epsilon_after(z, 1, DELTA), rel=1e-9)
    assert rec["sampling"].startswith("fixed-size, seeded")


@pytest.mark.parametrize("z", [1.0, 10.0])
def test_the_sum_carries_noise_of_std_z_c_when_only_the_threshold_survives(sent, z):
    """A dropout after setup leaves 2 = m clients in the sum: its noise std is z*C, measured.

    At z = 10 each client's noise (std 7.1) would be clipped by the default range
    8 of SecAgg+; the range is widened to C + 6 sigma, so the std still holds.
    """
    silent = {(22, Stage.COLLECT_MASKED_VECTORS)}
    strategy, _, new, _ = secure_dp_round(z, silent=silent)
    survivors = [11, 33]
    assert len(sent) == 2  # client 22 dropped out before it trained
    clean = sum(flat(clipped(delta_of(n), CLIP)) for n in survivors)
    noise_of_sum = flat(new) * len(survivors) - clean
    assert np.std(noise_of_sum) == pytest.approx(z * CLIP, rel=0.01)
    assert abs(np.mean(noise_of_sum)) < 5 * z * CLIP / np.sqrt(noise_of_sum.size)
    assert privacy_record(strategy)["releases"] == 1


def test_a_sum_with_fewer_survivors_than_noise_shares_is_not_released():
    cfg = RunConfig().replace(secagg=True, dp="client", dp_noise=1.0, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, 5)
    with pytest.raises(PollenError, match="less noise than the privacy accounting needs"):
        strategy.account_secure_round(3, survivors=2, shares=3)
    assert strategy.accountant.num_releases == 0
    with pytest.raises(RuntimeError):
        strategy.aggregate_train(1, [])


def test_client_noise_settings_and_clipping():
    assert dp_mod.noise_settings({"learning-rate": 0.1}) is None
    settings = dp_mod.noise_settings({"dp-clip": 2.0, "dp-noise": 3.0, "dp-noise-shares": 4})
    assert settings == (2.0, 3.0, 4) and dp_mod.share_std(*settings) == 3.0
    for bad in (
        {"dp-noise": 0.0},
        {"dp-noise-shares": 0},
        {"dp-noise-shares": 1.5},
        {"dp-clip": True},
    ):
        config = {"dp-clip": 1.0, "dp-noise": 1.0, "dp-noise-shares": 2, **bad}
        with pytest.raises(ValueError, match="not a positive"):
            dp_mod.noise_settings(config)
    update = [np.full((3, 4), 2.0, "float32"), np.array([5, 6], "uint32")]
    out = dp_mod.noisy_update(update, 1.5, 0.0)
    assert out[0].dtype == np.float32 and np.linalg.norm(out[0]) == pytest.approx(1.5, rel=1e-6)
    assert out[1].dtype == np.uint32 and not out[1].any()  # integer state is not sent
    small = [np.full(4, 0.1, "float32")]
    np.testing.assert_allclose(dp_mod.noisy_update(small, 1.0, 0.0)[0], small[0])  # not scaled up


def _context(run_config: dict, threshold: int = 2, clipping_range: float = 8.0) -> Context:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = RecordDict(
        {RECORD_KEY_STATE: ConfigRecord({"threshold": threshold, "clipping_range": clipping_range})}
    )
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config=run_config)


def test_a_client_refuses_a_noise_share_too_small_for_its_config_or_setup():
    ok = _context({"dp": "client", "dp-epsilon": 20.0, "num-rounds": 2})
    z = 0.3  # epsilon over 2 rounds at delta 1e-5: about 32
    assert dp_mod.gaussian_epsilon(z, 2, DELTA) > 20.0
    assert dp_mod.gaussian_epsilon(1.0, 2, DELTA) == pytest.approx(epsilon_after(1.0, 2, DELTA))
    dp_mod.check_requested_noise(1.0, 1.0, 2, ok)
    with pytest.raises(ValueError, match="spends more than dp-epsilon 20"):
        dp_mod.check_requested_noise(1.0, z, 2, ok)
    with pytest.raises(ValueError, match="below dp-noise 2"):
        dp_mod.check_requested_noise(1.0, 1.5, 2, _context({"dp": "client", "dp-noise": 2.0}))
    with pytest.raises(ValueError, match="more than the SecAgg\\+ threshold 2"):
        dp_mod.check_requested_noise(1.0, 1.0, 3, _context({}))
    with pytest.raises(ValueError, match="would clip the noisy update"):
        dp_mod.check_requested_noise(1.0, 4.0, 2, _context({}, clipping_range=8.0))


def test_client_and_server_use_the_same_config_keys():
    assert (dp_mod.DP_CLIP_KEY, dp_mod.DP_NOISE_KEY, dp_mod.DP_SHARES_KEY) == (
        server_dp.DP_CLIP_KEY,
        server_dp.DP_NOISE_KEY,
        server_dp.DP_SHARES_KEY,
    )


def test_the_clipping_range_holds_the_noisy_values():
    assert server_dp.clipping_range_for(1.0, 0.5, 8.0) == 8.0
    assert server_dp.clipping_range_for(1.0, 2.0, 8.0) == pytest.approx(13.0)


def test_distributed_state_survives_a_checkpoint_round_trip():
    from pollen.server.privacy import private_state, restore_private

    cfg = RunConfig().replace(secagg=True, dp="client", dp_noise=1.2, model="cnn-gn")
    strategy = make_private(make_strategy(cfg), cfg, 4)
    for _ in range(3):
        strategy.accountant.compose(1.0, 1.2)
    state = private_state(strategy)
    back = restore_private(make_strategy(cfg), cfg, state, max_releases=3)
    assert isinstance(back, ClientLevelDP) and back.distributed
    assert privacy_record(back) == privacy_record(strategy)
    with pytest.raises(ValueError, match="more than 2 releases"):
        restore_private(make_strategy(cfg), cfg, state, max_releases=2)
    assert isinstance(strategy.accountant, LedgerAccountant)


@pytest.mark.e2e
def test_simulate_with_secagg_and_dp(tmp_path, tiny_data, pollen_env):
    """`pollen simulate --secagg --dp --dp-epsilon 20`: 3 real clients, 2 rounds."""
    import json
    import subprocess

    from conftest import pollen_cmd

    run = tmp_path / "run"
    argv = ["simulate", "--secagg", "--dp", "--dp-epsilon", "20", "--clients", "3"]
    argv += ["--rounds", "2", "--model", "cnn-gn", "--num-classes", "3"]
    argv += ["--data-dir", str(tiny_data), "--out", str(run), "--client-threads", "1"]
    proc = subprocess.run(
        pollen_cmd(*argv), env=pollen_env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "distributed DP: every client clips to 1" in log
    history = json.loads((run / "history.json").read_text())
    privacy = [r["privacy"] for r in history["rounds"]]
    assert [p["releases"] for p in privacy] == [1, 2]
    assert all(p["mode"] == "distributed" for p in privacy)
    z = privacy[0]["noise_multiplier"]
    assert privacy[1]["epsilon"] == pytest.approx(epsilon_after(z, 2, DELTA), rel=1e-6)
    assert privacy[1]["epsilon"] <= 20.0
    assert [r["train"]["examples"] for r in history["rounds"]] == [72, 72]
