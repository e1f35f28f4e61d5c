"""Aggregation arithmetic: pollen.server.aggregation, the round's helpers, Flower's FedAvg."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from server_fakes import _global

from pollen.server.aggregation import (
    batchnorm_stats_problem,
    merge_batchnorm_stats,
    validate_update,
    weighted_mean,
)
from pollen.server.exchange import record_bytes
from pollen.server.history import ClientRound, RoundRecord
from pollen.server.rounds import progress_line

SHAPES = [(5,), (3, 4), (2, 3, 3, 1), ()]

# --- weighted_mean -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_weighted_mean_matches_numpy(shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(len(shape))
    values = [(rng.normal(size=shape) * 100).astype(dtype) for _ in range(4)]
    weights = [3, 1, 0, 7.5]
    got = weighted_mean(values, weights)
    want = np.average(np.stack([v.astype(np.float64) for v in values]), axis=0, weights=weights)
    assert got.shape == shape
    if dtype is np.float32:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    else:
        assert got.dtype == np.float64  # integers average to floats, not truncated
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_weighted_mean_single_value_is_identity() -> None:
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(weighted_mean([v], [42]), v)


@pytest.mark.parametrize("weights", [[0, 0], [0.0, 0.0]])
def test_weighted_mean_zero_total_weight_raises(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([np.ones(3), np.zeros(3)], weights)


# --- Flower's FedAvg ---------------------------------------------------------------------------


def _client_arrays(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        rng.normal(size=(10, 2)).astype(np.float64),
    ]


CLIENT_EXAMPLES = [10, 250, 37]


@pytest.fixture
def client_updates() -> list[list[np.ndarray]]:
    rng = np.random.default_rng(7)
    return [_client_arrays(rng) for _ in CLIENT_EXAMPLES]


def _reply_content(arrays: list[np.ndarray], n: int, loss: float) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
        }
    )


def _expected_mean(updates: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [
        np.average(np.stack([u[i] for u in updates]), axis=0, weights=CLIENT_EXAMPLES)
        for i in range(len(updates[0]))
    ]


def test_flower_aggregate_arrayrecords_is_weighted_mean(client_updates) -> None:
    contents = [
        _reply_content(u, n, 0.0) for u, n in zip(client_updates, CLIENT_EXAMPLES, strict=True)
    ]
    aggregated = aggregate_arrayrecords(contents, "num-examples")
    got = aggregated.to_numpy_ndarrays()
    want = _expected_mean(client_updates)
    assert list(aggregated.keys()) == ["0", "1", "2"]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # ... and pollen's own helper agrees with Flower's.
    for i, g in enumerate(got):
        ours = weighted_mean([u[i] for u in client_updates], CLIENT_EXAMPLES)
        np.testing.assert_allclose(ours, g, rtol=1e-5, atol=1e-6)


def _metadata(src_node_id: int, message_id: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src_node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{src_node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )


def test_fedavg_aggregate_train_on_real_reply_messages(client_updates) -> None:
    """The strategy pollen runs by default, fed Message objects as the Grid returns them."""
    losses = [0.5, 1.0, 2.0]
    replies = [
        Message(metadata=_metadata(100 + i, f"reply-{i}"), content=_reply_content(u, n, loss))
        for i, (u, n, loss) in enumerate(zip(client_updates, CLIENT_EXAMPLES, losses, strict=True))
    ]
    failed = Message(metadata=_metadata(999, "reply-failed"), error=Error(code=1, reason="boom"))
    assert [m.metadata.src_node_id for m in replies] == [100, 101, 102]
    assert failed.has_error() and not replies[0].has_error()

    arrays, metrics = FedAvg().aggregate_train(1, [*replies, failed])
    assert arrays is not None and metrics is not None
    for g, w in zip(arrays.to_numpy_ndarrays(), _expected_mean(client_updates), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(np.average(losses, weights=CLIENT_EXAMPLES))


def test_fedavg_aggregate_train_with_only_failures_returns_none() -> None:
    failed = Message(metadata=_metadata(5, "r"), error=Error(code=1, reason="boom"))
    assert FedAvg().aggregate_train(1, [failed]) == (None, None)


# --- merge_batchnorm_stats ---------------------------------------------------------------------


def _chunk_stats(chunks: list[np.ndarray], keys: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    stats = []
    for c in chunks:
        s = {}
        # Two BatchNorm layers whose inputs happen to be the same features (x and 2x + 1).
        for (mk, vk), data in zip((keys[0:2], keys[2:4]), (c, 2 * c + 1), strict=True):
            s[mk] = data.mean(axis=0).astype(np.float32)
            s[vk] = data.var(axis=0).astype(np.float32)  # population variance, ddof=0
        stats.append(s)
    return stats


def test_merge_batchnorm_stats_equals_pooled_statistics() -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(loc=[0.0, 5.0, -3.0, 100.0], scale=[1.0, 0.1, 4.0, 10.0], size=(1000, 4))
    # Non-iid chunks: sorted by the first feature, so each client's mean differs.
    data = data[np.argsort(data[:, 0])]
    sizes = [100, 650, 250]
    chunks = np.split(data, np.cumsum(sizes)[:-1])
    keys = ("7", "8", "12", "13")  # mean, var, mean, var, as in a bn-stats ArrayRecord
    stats = _chunk_stats(chunks, keys)

    merged = merge_batchnorm_stats(stats, sizes, mean_keys=["7", "12"])

    assert list(merged) == list(keys)
    for mk, vk, pooled in (("7", "8", data), ("12", "13", 2 * data + 1)):
        np.testing.assert_allclose(merged[mk], pooled.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[vk], pooled.var(axis=0), rtol=1e-5)
        assert merged[mk].dtype == np.float32 and merged[vk].dtype == np.float32
    # The naive average of the client variances is wrong for non-iid chunks: the test
    # would not notice a merge that forgot the between-client term.
    naive = np.average([s["8"] for s in stats], axis=0, weights=sizes)
    assert not np.allclose(naive, data.var(axis=0), rtol=1e-3)


def test_merge_batchnorm_stats_variance_never_negative() -> None:
    # Clients that all saw a constant feature with a large offset: the true variance is 0,
    # and the law of total variance (E[x^2] - m^2) cancels catastrophically, so rounding
    # alone makes it slightly negative for some of these cases; the merge must clip.
    rng = np.random.default_rng(0)
    would_go_negative = 0
    for _ in range(200):
        k = int(rng.integers(2, 5))
        mean = np.full(4, rng.uniform(-1e4, 1e4), np.float32)
        counts = [int(c) for c in rng.integers(1, 1000, k)]
        stats = [{"0": mean.copy(), "1": np.zeros(4, np.float32)} for _ in range(k)]
        merged = merge_batchnorm_stats(stats, counts, mean_keys=["0"])
        assert list(merged) == ["0", "1"]
        assert np.all(merged["1"] >= 0), (mean[0], counts)
        np.testing.assert_allclose(merged["0"], mean, rtol=1e-6)
        m64 = mean.astype(np.float64)
        raw = weighted_mean([m64**2] * k, counts) - weighted_mean([m64] * k, counts) ** 2
        would_go_negative += bool(np.any(raw < 0))
    assert would_go_negative > 0  # the cases above really exercise the clipping


def test_merge_batchnorm_stats_single_client_is_identity() -> None:
    rng = np.random.default_rng(0)
    s = {"a": rng.normal(size=5).astype(np.float32), "b": rng.random(5).astype(np.float32)}
    merged = merge_batchnorm_stats([s], [17], mean_keys=["a"])
    np.testing.assert_allclose(merged["a"], s["a"], rtol=1e-6)
    np.testing.assert_allclose(merged["b"], s["b"], rtol=1e-5)


def test_merged_statistics_of_huge_means_overflow_float32_and_are_caught() -> None:
    """The reported attack: means of 1e20, finite in float32, merge to an infinite variance."""
    honest = {"m": np.ones(4, np.float32), "v": np.ones(4, np.float32)}
    hostile = {"m": np.full(4, 1e20, np.float32), "v": np.zeros(4, np.float32)}
    merged = merge_batchnorm_stats([honest, hostile], [10, 10], mean_keys=["m"])
    assert np.isfinite(merged["m"]).all() and np.isinf(merged["v"]).all()
    global_stats = {"m": np.zeros(4, np.float32), "v": np.ones(4, np.float32)}
    assert batchnorm_stats_problem(merged, global_stats, {"v"}, 0.0) == "v has NaN/inf values"
    assert batchnorm_stats_problem(hostile, global_stats, {"v"}, 0.0) is None  # no bound
    assert batchnorm_stats_problem(hostile, global_stats, {"v"}, 3000.0) == (
        "distance 2e+20 from the global statistics exceeds max-update-norm 3000"
    )


def test_batchnorm_stats_problem_bounds_the_distance_of_all_arrays_together() -> None:
    global_stats = {"m": np.zeros(3, np.float32), "v": np.ones(3, np.float32)}
    stats = {"m": np.full(3, 3.0, np.float32), "v": np.full(3, 5.0, np.float32)}
    distance = np.sqrt(3 * 9 + 3 * 16)  # 8.66
    assert batchnorm_stats_problem(stats, global_stats, {"v"}, distance + 1e-3) is None
    assert "distance 8.66 " in batchnorm_stats_problem(stats, global_stats, {"v"}, 8.6)
    negative = {**stats, "v": np.full(3, -1.0, np.float32)}
    assert batchnorm_stats_problem(negative, global_stats, {"v"}, 0) == "v has negative variances"
    nan = {**stats, "m": np.full(3, np.nan, np.float32)}
    assert batchnorm_stats_problem(nan, global_stats, {"v"}, 0) == "m has NaN/inf values"


# --- record_bytes, progress_line ---------------------------------------------------------------


def test_record_bytes_is_sum_of_payloads() -> None:
    arrays = [np.zeros((10, 10), np.float32), np.ones(3, np.int64), np.zeros((0,), np.float64)]
    record = ArrayRecord(arrays)
    expected = sum(len(a.data) for a in record.values())
    assert record_bytes(record) == expected
    assert isinstance(record_bytes(record), int)
    assert expected >= sum(a.nbytes for a in arrays)
    bigger = ArrayRecord([*arrays, np.zeros(1000, np.float32)])
    assert record_bytes(bigger) >= expected + 4000
    assert record_bytes(ArrayRecord()) == 0
    assert record_bytes(ArrayRecord(array_dict={"x": Array(np.zeros(4, np.float32))})) > 0


def _record(errors: bool) -> RoundRecord:
    return RoundRecord(
        round=2,
        seconds=12.34,
        train={"loss": 1.23456, "accuracy": 0.5, "examples": 100},
        evaluate={"loss": 1.5, "accuracy": 0.625, "examples": 40},
        server={"loss": 1.4, "accuracy": 0.7125},
        clients=[
            ClientRound(node_id=1, name="a"),
            ClientRound(node_id=2, name="b", error="train: boom" if errors else None),
        ],
        bytes_sent=3_000_000,
        bytes_received=1_500_000,
    )


def test_progress_line_contents() -> None:
    line = progress_line(_record(errors=False), 5)
    assert "Round 2/5" in line
    assert "1.2346" in line and "0.5000" in line  # train loss, accuracy
    assert "0.6250" in line  # clients' eval accuracy
    assert "0.7125" in line  # server test accuracy
    assert "12.3 s" in line
    assert "3.0 MB" in line and "1.5 MB" in line
    assert "failed" not in line


def test_progress_line_reports_failed_clients() -> None:
    line = progress_line(_record(errors=True), 5)
    assert "1 client(s) failed" in line


def test_progress_line_without_metrics() -> None:
    line = progress_line(RoundRecord(round=1), 1)
    assert "Round 1/1" in line and "-" in line and "server" not in line


# --- validate_update ---------------------------------------------------------------------------


def test_validate_update_accepts_an_honest_update() -> None:
    g = _global()
    u = [a + 0.01 if a.dtype.kind == "f" else a for a in g]
    assert validate_update(g, u, max_norm=10.0) is None
    assert validate_update(g, [a.copy() for a in g], max_norm=0.0) is None


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda u: u[:2], "update has 2 arrays, the global model has 3"),
        (lambda u: [*u, u[1]], "update has 4 arrays"),
        (lambda u: [u[0].reshape(3, 3, 4, 2), *u[1:]], "array 0 has shape (3, 3, 4, 2)"),
        (lambda u: [u[0], u[1].astype(np.float64), u[2]], "array 1 has dtype float64"),
        (lambda u: [u[0], np.full_like(u[1], np.nan), u[2]], "update has NaN/inf values"),
        (lambda u: [u[0], np.full_like(u[1], np.inf), u[2]], "update has NaN/inf values"),
        (lambda u: [u[0] * 1000, *u[1:]], "exceeds max-update-norm 10"),
    ],
)
def test_validate_update_rejects(change, phrase: str) -> None:
    g = _global()
    reason = validate_update(g, change([a.copy() for a in g]), max_norm=10.0)
    assert reason is not None and phrase in reason, reason


def test_validate_update_norm_is_l2_of_the_change() -> None:
    g = [np.zeros(4, np.float32), np.zeros((2, 2), np.float32)]
    u = [np.array([3, 0, 0, 0], np.float32), np.array([[0, 4], [0, 0]], np.float32)]  # norm 5
    assert validate_update(g, u, max_norm=5.0) is None
    assert "update norm 5 exceeds" in validate_update(g, u, max_norm=4.99)
    assert validate_update(g, u, max_norm=0) is None  # 0 = no bound
