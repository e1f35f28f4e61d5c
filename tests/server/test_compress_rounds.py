"""Compressed rounds: the server decodes updates to float32 before any check or strategy,
sends compressed weights, and records the bytes that travelled per client."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType
from server_fakes import FakeGrid, _strategy, _trainer
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen import wire
from pollen.compress import Int8, TopK
from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.history import History, RoundRecord
from pollen.server.phases import RoundClients, RoundContext, train_phase
from pollen.server.rounds import RoundSettings, run_rounds


def _weights() -> ArrayRecord:
    rng = np.random.default_rng(3)
    return ArrayRecord([rng.normal(size=(200, 50)).astype(np.float32), np.ones(50, np.float32)])


@pytest.fixture
def compressing_clients(monkeypatch):
    """The fake clients compress their updates with the codec the test sets."""
    codec = {"up": None}
    monkeypatch.setattr(wire, "uplink_codec", lambda run_config: codec["up"])
    wire._feedback.clear()
    return codec


def test_compressed_updates_are_checked_and_aggregated_as_float32(compressing_clients) -> None:
    compressing_clients["up"] = Int8()
    seen = []
    strategy = _strategy()
    aggregate = strategy.aggregate_train

    def spy(rnd, replies):
        replies = list(replies)
        seen.extend(m.content["arrays"] for m in replies)
        return aggregate(rnd, replies)

    strategy.aggregate_train = spy
    nan = lambda arrays: [np.full_like(a, np.nan) for a in arrays]  # noqa: E731
    grid = FakeGrid({1: _trainer("a", 0.1), 2: _trainer("b", 0.3), 3: _trainer("c", tamper=nan)})
    record, clients = RoundRecord(round=1), RoundClients({})
    new = train_phase(
        RoundContext(grid, strategy, 1, 2.0, record, clients), _weights(), {}, max_update_norm=1e3
    )
    assert len(seen) == 2 and all(a.dtype == "float32" for r in seen for a in r.values())
    # The mean shift 0.2, within int8's error of a change of 0.1 and 0.3.
    expected = [w + 0.2 for w in _weights().to_numpy_ndarrays()]
    for got, want in zip(new.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=0.3 / 254 + 1e-6)
    by_name = {c.name: c for c in clients.sorted()}
    assert by_name["c"].error == "train: rejected: update has NaN/inf values (array 0)"
    # Bytes that travelled: the whole weights down; up, int8 deflated: under a quarter (a
    # uniform change deflates to about a bit per value, the least Huffman coding sends).
    whole = sum(a.numpy().nbytes for a in _weights().values())
    for c in (by_name["a"], by_name["b"]):
        assert whole < c.bytes_sent < 1.2 * whole
        assert whole / 32 < c.bytes_received < 0.25 * whole  # int8, deflated
    assert record.bytes_received == sum(c.bytes_received for c in clients.sorted())
    assert record.bytes_sent == sum(c.bytes_sent for c in clients.sorted())


def _evaluator(trainer):
    """``trainer``, whose evaluate replies carry metrics only, as Pollen's client's do."""

    def reply(msg):
        content = trainer(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            del content["arrays"]
        return content

    return reply


def test_weights_sent_compressed_and_top_k_updates_over_rounds(compressing_clients) -> None:
    compressing_clients["up"] = TopK(0.1)
    grid = FakeGrid({1: _evaluator(_trainer("a", 0.01)), 2: _evaluator(_trainer("b", 0.01))})
    history = History(config={})
    final = run_rounds(
        grid,
        _strategy(),
        _weights(),
        RoundSettings(num_rounds=3, history=history, timeout=2.0, codec_down=Int8()),
    )
    assert all(c.error is None for r in history.rounds for c in r.clients)
    for m in grid.sent.values():
        if m.metadata.message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            assert bytes(m.content["arrays"]["packed-codec"].numpy()) == b"int8"
    whole = sum(a.numpy().nbytes for a in _weights().values())
    for c in history.rounds[-1].clients:  # train and evaluate messages, int8; top-k up
        assert 2 * 0.2 * whole < c.bytes_sent < 2 * 0.3 * whole
        assert c.bytes_received < 0.3 * whole
    # The weights moved by about the clients' 3 x 0.01, the values top-k left out carried.
    start = _weights().to_numpy_ndarrays()
    moved = [f - w for f, w in zip(final.to_numpy_ndarrays(), start, strict=True)]
    assert 0.0 < float(np.mean([m.mean() for m in moved])) <= 0.03 + 1e-3


def test_compression_is_refused_with_secagg_and_unknown_codecs_are_named() -> None:
    with pytest.raises(PollenError, match="cannot be combined with --secagg"):
        RunConfig(compress="int8", secagg=True).validate()
    with pytest.raises(PollenError, match="cannot be combined with --secagg"):
        RunConfig(compress_down="fp16", secagg=True).validate()
    with pytest.raises(PollenError, match="Unknown compression 'gzip'"):
        RunConfig(compress="gzip").validate()
    with pytest.raises(PollenError, match="weights the server sends"):
        RunConfig(compress_down="topk:0.1").validate()
    RunConfig(compress="topk:5%", compress_down="int8", dp=True).validate()  # DP clips after


def test_the_recorded_model_is_what_the_clients_decoded_with_the_statistics_kept(
    compressing_clients,
) -> None:
    """With ``--compress-down``, each round evaluates, saves and checkpoints the weights as
    the clients decoded them (their BatchNorm statistics describe those), while the server
    goes on from its exact weights; the statistics themselves are kept exactly."""
    compressing_clients["up"] = Int8()
    rng = np.random.default_rng(4)
    # (the fake clients send their arrays as a list: keys "0", "1")
    kernel = rng.normal(size=(200, 50)).astype(np.float32)
    variance = np.linspace(1e-3, 10.0, 50, dtype=np.float32)  # one int8 scale: small ones 0
    start = ArrayRecord([kernel, variance])
    kernel_key, stats_key = list(start)
    saved, evaluated = {}, {}

    class Observer:
        def round_done(self, record, arrays, history, strategy) -> None:
            saved[record.round] = arrays

    def evaluate_fn(rnd, arrays):
        evaluated[rnd] = arrays
        return {"accuracy": 0.5}

    grid = FakeGrid({1: _evaluator(_trainer("a", 0.01)), 2: _evaluator(_trainer("b", 0.03))})
    settings = RoundSettings(
        num_rounds=2, history=History(config={}), timeout=2.0, codec_down=Int8(),
        bn_keys=lambda: [stats_key], observer=Observer(), evaluate_fn=evaluate_fn,
    )  # fmt: skip
    final = run_rounds(grid, _strategy(), start, settings)
    last = saved[2]
    assert evaluated[2] is last  # what is evaluated is what is saved
    exact_kernel = final[kernel_key].numpy()
    decoded = wire.as_received(ArrayRecord(array_dict={kernel_key: final[kernel_key]}), Int8())
    np.testing.assert_array_equal(last[kernel_key].numpy(), decoded[kernel_key].numpy())
    assert not np.array_equal(last[kernel_key].numpy(), exact_kernel)  # rounded, the server's not
    step = np.abs(exact_kernel).max() / 127
    assert np.abs(last[kernel_key].numpy() - exact_kernel).max() <= step / 2 * (1 + 1e-5)
    # the statistics exactly as the server holds them, the smallest too
    np.testing.assert_array_equal(last[stats_key].numpy(), final[stats_key].numpy())
    assert last[stats_key].numpy()[0] > 0
    # Without statistics to keep consistent, the exact weights are recorded.
    saved.clear()
    settings.bn_keys, settings.history = None, History(config={})
    final = run_rounds(grid, _strategy(), start, settings)
    np.testing.assert_array_equal(saved[2][kernel_key].numpy(), final[kernel_key].numpy())
