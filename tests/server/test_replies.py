"""Hostile clients: every reply is checked before aggregation, and a bad one is that client's.

Each attack is one honest client beside one hostile client (tests/server/server_fakes.py's
FakeGrid): the round completes, the hostile client is ``rejected: <reason>``, the honest one
is not blamed, and the aggregate is the honest client's contribution.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian
from server_fakes import FakeGrid, _arrays, _deterministic_client, _strategy, _trainer
from server_fakes import fake_model as fake_model  # noqa: F401 - a fixture
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen.config import RunConfig
from pollen.server import app as server_app
from pollen.server.history import History, RoundRecord, write_history
from pollen.server.model_files import ModelFiles
from pollen.server.phases import RoundClients, RoundContext, evaluate_phase
from pollen.server.rounds import RoundSettings, run_rounds
from pollen.server.sampling import seeded_order

HONEST_SHIFT, HOSTILE_SHIFT = 0.1, 0.7

# --- clients ------------------------------------------------------------------------------------


def _with_metrics(name: str, shift: float, change=None, n: int = 10):
    """``_trainer``, its train replies' metrics changed by ``change(dict)`` (``None``: removed)."""
    trainer = _trainer(name, shift, n=n)

    def reply(msg: Message) -> RecordDict:
        content = trainer(msg)
        if change is not None and msg.metadata.message_type == MessageType.TRAIN:
            metrics = change(dict(content["metrics"]))
            del content["metrics"]
            if metrics is not None:
                content["metrics"] = MetricRecord(metrics)
        return content

    return reply


def _run(grid: FakeGrid, rounds: int = 1, strategy=None, **settings) -> tuple[History, list]:
    history = History(config={})
    final = run_rounds(
        grid,
        strategy or _strategy(2),
        _arrays(),
        RoundSettings(num_rounds=rounds, history=history, timeout=5.0, min_clients=1, **settings),
    )
    return history, final.to_numpy_ndarrays()


def _errors(history: History) -> list[dict[str, str | None]]:
    return [{c.name: c.error for c in r.clients} for r in history.rounds]


# --- train replies: example counts and metrics --------------------------------------------------


def _set(key, value):
    return lambda m: {**m, key: value}


def _drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


TRAIN_ATTACKS = {
    "missing num-examples": (_drop("num-examples"), "metrics have no num-examples"),
    "NaN num-examples": (_set("num-examples", math.nan), "num-examples nan is not an integer"),
    "negative num-examples": (_set("num-examples", -5), "num-examples -5 is outside 1.."),
    "zero num-examples": (_set("num-examples", 0), "num-examples 0 is outside 1.."),
    "huge num-examples": (_set("num-examples", 10**12), "is outside 1..1000000000"),
    "non-integer num-examples": (_set("num-examples", 2.5), "num-examples 2.5 is not an integer"),
    "NaN train loss": (_set("train_loss", math.nan), "metric train_loss is nan"),
    "inf fit seconds": (_set("fit_seconds", math.inf), "metric fit_seconds is inf"),
    "accuracy above 1": (_set("train_accuracy", 1.5), "metric train_accuracy 1.5 is outside 0..1"),
    "negative accuracy": (_set("train_accuracy", -0.1), "train_accuracy -0.1 is outside 0..1"),
    "negative loss": (_set("train_loss", -2.0), "metric train_loss -2 is outside 0..1e+06"),
    "huge loss": (_set("train_loss", 1e300), "metric train_loss 1e+300 is outside 0..1e+06"),
    "negative fit seconds": (_set("fit_seconds", -1), "metric fit_seconds -1 is outside 0.."),
    "endless fit seconds": (_set("fit_seconds", 1e7), "fit_seconds 1e+07 is outside 0..1e+06"),
    "no metrics": (lambda m: None, "reply has no metrics"),
}


@pytest.mark.parametrize("attack", sorted(TRAIN_ATTACKS))
def test_a_hostile_train_reply_is_rejected_and_the_honest_one_aggregated(attack: str) -> None:
    change, reason = TRAIN_ATTACKS[attack]
    grid = FakeGrid(
        {1: _trainer("honest", HONEST_SHIFT), 2: _with_metrics("hostile", HOSTILE_SHIFT, change)}
    )
    history, final = _run(grid, rounds=2, max_update_norm=100.0)
    assert [r.round for r in history.rounds] == [1, 2]
    for errors in _errors(history):
        assert errors["honest"] is None
        assert errors["hostile"].startswith("train: rejected: ") and reason in errors["hostile"]
    for got, start in zip(final, _arrays().to_numpy_ndarrays(), strict=True):
        np.testing.assert_allclose(got, start + 2 * HONEST_SHIFT, rtol=1e-6)
    assert history.rounds[0].train["examples"] == 10


def test_an_extra_metric_key_is_dropped_not_the_run() -> None:
    """Flower's aggregation ends the run when replies' metric keys differ; Pollen's does not."""
    grid = FakeGrid({1: _trainer("honest", 0.1), 2: _with_metrics("extra", 0.3, _set("evil", 1.0))})
    history, final = _run(grid, rounds=2)
    assert all(e == {"honest": None, "extra": None} for e in _errors(history))
    np.testing.assert_allclose(final[0], np.full((2, 3), 0.4), rtol=1e-5)  # 2 x mean shift
    assert history.rounds[0].train["loss"] == 1.0


def test_a_missing_optional_metric_leaves_it_out_of_the_aggregate_only() -> None:
    grid = FakeGrid(
        {1: _trainer("honest", 0.1), 2: _with_metrics("quiet", 0.3, _drop("train_loss"))}
    )
    history, final = _run(grid)
    assert _errors(history) == [{"honest": None, "quiet": None}]
    assert history.rounds[0].train["loss"] is None
    np.testing.assert_allclose(final[0], np.full((2, 3), 0.2), rtol=1e-5)


def test_a_negative_count_cannot_push_the_aggregate_past_the_norm_bound() -> None:
    """The reported attack: -9 of 10 examples moved the aggregate ~99x and blamed the honest."""
    grid = FakeGrid(
        {
            1: _trainer("honest", 0.1),
            2: _with_metrics("hostile", 0.2, _set("num-examples", -9)),
        }
    )
    history, final = _run(grid, max_update_norm=1.0)
    errors = _errors(history)[0]
    assert errors["honest"] is None and "num-examples -9" in errors["hostile"]
    np.testing.assert_allclose(final[0], np.full((2, 3), 0.1), rtol=1e-5)


def test_no_client_weighs_more_than_ten_times_the_median_count() -> None:
    grid = FakeGrid(
        {
            1: _trainer("a", 0.1, n=10),
            2: _trainer("b", 0.3, n=10),
            3: _trainer("greedy", 0.5, n=10**9),
        }
    )
    history, final = _run(grid, strategy=_strategy(3))
    assert all(c.error is None for c in history.rounds[0].clients)
    # greedy's weight is capped at 10 x median(10, 10, 1e9) = 100: (1 + 3 + 50) / 120
    np.testing.assert_allclose(final[0], np.full((2, 3), 0.45), rtol=1e-5)


def test_two_clients_of_unequal_data_weigh_as_before() -> None:
    grid = FakeGrid({1: _trainer("small", 0.1, n=10), 2: _trainer("large", 0.3, n=1000)})
    history, final = _run(grid)
    np.testing.assert_allclose(final[0], np.full((2, 3), (1 + 300) / 1010), rtol=1e-5)
    assert history.rounds[0].train["examples"] == 1010


def test_an_update_keyed_differently_is_rejected() -> None:
    def rekey(msg: Message) -> RecordDict:
        content = _trainer("rekeyed", 0.3)(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            arrays = content["arrays"]
            content["arrays"] = ArrayRecord(array_dict={f"x{k}": arrays[k] for k in arrays.keys()})
        return content

    history, final = _run(FakeGrid({1: _trainer("honest", 0.1), 2: rekey}))
    errors = _errors(history)[0]
    assert errors["honest"] is None and "keys differ" in errors["rekeyed"]
    np.testing.assert_allclose(final[0], np.full((2, 3), 0.1), rtol=1e-5)


# --- evaluate replies and BatchNorm statistics --------------------------------------------------

BN_KEYS = ["1", "2"]  # moving mean, moving variance of _bn_arrays' one BatchNorm layer


def _bn_arrays() -> ArrayRecord:
    return ArrayRecord(
        [np.zeros((20, 10), np.float32), np.zeros(10, np.float32), np.ones(10, np.float32)]
    )


def _honest_stats(shift: float) -> dict[str, np.ndarray]:
    return {"1": np.full(10, 10 * shift, np.float32), "2": np.full(10, 1 + shift, np.float32)}


def _calibrating(name: str, shift: float, stats=None, calibration=10, metrics=True):
    """A trainer whose evaluate replies carry BatchNorm statistics (honest, or ``stats``)."""
    trainer = _trainer(name, shift)

    def reply(msg: Message) -> RecordDict:
        content = trainer(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            sent = _honest_stats(shift) if stats is None else stats
            content["bn-stats"] = ArrayRecord(array_dict={k: Array(v) for k, v in sent.items()})
            if calibration is not None:
                content["metrics"]["calibration-examples"] = calibration
            if not metrics:
                del content["metrics"]
        return content

    return reply


def _stats_with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**_honest_stats(HOSTILE_SHIFT), key: value}


BN_ATTACKS = {
    "foreign key": (
        {**_honest_stats(HOSTILE_SHIFT), "0": np.full((20, 10), 9.0, np.float32)},
        10,
        "keys that are no BatchNorm statistics of the model (0)",
    ),
    "mean without variance": (
        {"1": np.zeros(10, np.float32)},
        10,
        "a mean or a variance without its pair",
    ),
    "wrong shape": (_stats_with("1", np.zeros(11, np.float32)), 10, "bn-stats 1 is float32[11]"),
    "wrong dtype": (_stats_with("2", np.ones(10, np.float64)), 10, "bn-stats 2 is float64[10]"),
    "NaN mean": (_stats_with("1", np.full(10, np.nan, np.float32)), 10, "1 has NaN/inf values"),
    "negative variance": (
        _stats_with("2", np.full(10, -1.0, np.float32)),
        10,
        "bn-stats 2 has negative variances",
    ),
    "huge means": (
        _stats_with("1", np.full(10, 1e20, np.float32)),
        10,
        "bn-stats distance 3.162e+20 from the global statistics exceeds max-update-norm 100",
    ),
    "huge variances": (
        _stats_with("2", np.full(10, 3e38, np.float32)),
        10,
        "exceeds max-update-norm 100",
    ),
    "huge calibration count": (None, 10**12, "calibration-examples 1000000000000 is outside"),
    "zero calibration count": (None, 0, "calibration-examples 0 is outside"),
    "no calibration count": (None, None, "metrics have no calibration-examples"),
}


@pytest.mark.parametrize("attack", sorted(BN_ATTACKS))
def test_hostile_batchnorm_statistics_are_rejected_and_the_honest_ones_kept(attack: str) -> None:
    stats, calibration, reason = BN_ATTACKS[attack]
    stats = _honest_stats(HOSTILE_SHIFT) if stats is None else stats
    grid = FakeGrid(
        {
            1: _calibrating("honest", HONEST_SHIFT),
            2: _calibrating("hostile", HOSTILE_SHIFT, stats, calibration),
        }
    )
    history = History(config={})
    final = run_rounds(
        grid,
        _strategy(2),
        _bn_arrays(),
        RoundSettings(
            num_rounds=1,
            history=history,
            timeout=5.0,
            min_clients=1,
            max_update_norm=100.0,
            bn_keys=lambda: BN_KEYS,
        ),
    ).to_numpy_ndarrays()
    errors = _errors(history)[0]
    assert errors["honest"] is None
    assert errors["hostile"].startswith("evaluate: rejected: ") and reason in errors["hostile"]
    # Both trained; only the honest client's statistics replace the global ones.
    np.testing.assert_allclose(final[0], np.full((20, 10), 0.4), rtol=1e-5)
    expected = _honest_stats(HONEST_SHIFT)
    np.testing.assert_array_equal(final[1], expected["1"])
    np.testing.assert_array_equal(final[2], expected["2"])
    assert history.rounds[0].evaluate["examples"] == 10  # the hostile evaluation counts nothing


def _bn_run(grid: FakeGrid, strategy, rounds: int = 2, max_update_norm: float = 100.0):
    history = History(config={})
    final = run_rounds(
        grid,
        strategy,
        _bn_arrays(),
        RoundSettings(
            num_rounds=rounds,
            history=history,
            timeout=5.0,
            min_clients=1,
            max_update_norm=max_update_norm,
            bn_keys=lambda: BN_KEYS,
        ),
    ).to_numpy_ndarrays()
    return history, final


HUGE_MEANS = {"1": np.full(10, 1e20, np.float32), "2": np.zeros(10, np.float32)}


@pytest.mark.parametrize("median", [False, True])
def test_batchnorm_means_of_1e20_cannot_stop_the_run(median: bool) -> None:
    """The reported attack: merged, the variances overflowed float32 and every next update was NaN.

    Under FedMedian with 2 clients the median is the mean of the two: no defence either.
    """
    grid = FakeGrid(
        {1: _calibrating("honest", HONEST_SHIFT), 2: _calibrating("hostile", 0.1, HUGE_MEANS)}
    )
    strategy = FedMedian(min_evaluate_nodes=2, min_available_nodes=2) if median else _strategy(2)
    history, final = _bn_run(grid, strategy)
    assert [r.round for r in history.rounds] == [1, 2]
    for errors in _errors(history):
        assert errors["honest"] is None
        assert "exceeds max-update-norm 100" in errors["hostile"]
    assert all(np.isfinite(a).all() for a in final)
    np.testing.assert_array_equal(final[1], _honest_stats(HONEST_SHIFT)["1"])
    np.testing.assert_array_equal(final[2], _honest_stats(HONEST_SHIFT)["2"])


def test_merged_statistics_that_overflow_are_not_installed_and_the_run_goes_on() -> None:
    """Without --max-update-norm each client's statistics pass; their merge must still be finite."""
    grid = FakeGrid(
        {1: _calibrating("honest", HONEST_SHIFT), 2: _calibrating("hostile", 0.1, HUGE_MEANS)}
    )
    history, final = _bn_run(grid, _strategy(2), max_update_norm=0.0)
    assert [r.round for r in history.rounds] == [1, 2]
    assert all(e == {"honest": None, "hostile": None} for e in _errors(history))
    for r in history.rounds:
        assert r.evaluate["batchnorm"] == (
            "kept the previous statistics: merged 2 has NaN/inf values"
        )
    # Each round only the training moved the statistics: by the mean shift 0.1.
    np.testing.assert_allclose(final[1], np.full(10, 0.2), rtol=1e-6)
    np.testing.assert_allclose(final[2], np.full(10, 1.2), rtol=1e-6)


def test_merged_statistics_farther_than_the_bound_are_not_installed() -> None:
    """Each client within the bound, their means apart: the spread adds to the merged variance."""
    apart = [
        {"1": np.full(10, sign * 9.0, np.float32), "2": np.ones(10, np.float32)} for sign in (-1, 1)
    ]
    grid = FakeGrid({1: _calibrating("a", 0.0, apart[0]), 2: _calibrating("b", 0.0, apart[1])})
    history, final = _bn_run(grid, _strategy(2), rounds=1, max_update_norm=30.0)
    assert _errors(history) == [{"a": None, "b": None}]  # each lies 28.5 from the global ones
    reason = history.rounds[0].evaluate["batchnorm"]
    assert reason.startswith("kept the previous statistics: merged distance 256.1 ")
    np.testing.assert_array_equal(final[2], np.ones(10, np.float32))


@pytest.mark.parametrize("name", ["cnn", "mobilenetv2"])
def test_honest_calibrated_statistics_lie_far_inside_the_default_bound(name: str) -> None:
    """Real calibration magnitudes against the global statistics of a fresh model (round 1)."""
    from pollen.server.aggregation import batchnorm_stats_problem
    from pollen.server.replies import checked_batchnorm_stats, pairs_of
    from pollen.training.compile import build_client_model
    from pollen.training.evaluate import calibrate_batchnorm

    model = build_client_model(name, 10, 0)
    fresh = model.get_weights()
    images = np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    indices, stats, _ = calibrate_batchnorm(model, images, max_examples=128)
    pairs = pairs_of(str(i) for i in indices)
    global_stats = {str(i): fresh[i] for i in indices}
    sent = ArrayRecord(array_dict={str(i): Array(a) for i, a in zip(indices, stats, strict=True)})
    bound = RunConfig().max_update_norm
    checked = checked_batchnorm_stats(sent, global_stats, pairs, bound)
    assert list(checked) == [str(i) for i in indices]
    variances = {v for _, v in pairs}
    assert batchnorm_stats_problem(checked, global_stats, variances, bound / 10) is None


def test_an_evaluate_reply_without_metrics_is_rejected_not_the_run() -> None:
    grid = FakeGrid(
        {
            1: _calibrating("honest", HONEST_SHIFT),
            2: _calibrating("mute", HOSTILE_SHIFT, metrics=False),
        }
    )
    history = History(config={})
    final = run_rounds(
        grid,
        _strategy(2),
        _bn_arrays(),
        RoundSettings(
            num_rounds=2, history=history, timeout=5.0, min_clients=1, bn_keys=lambda: BN_KEYS
        ),
    ).to_numpy_ndarrays()
    for errors in _errors(history):
        assert errors["honest"] is None
        assert errors["mute"] == "evaluate: rejected: reply has no metrics"
    np.testing.assert_array_equal(final[1], _honest_stats(HONEST_SHIFT)["1"])
    assert history.rounds[1].evaluate["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("eval_accuracy", 2.0, "metric eval_accuracy 2 is outside 0..1"),
        ("eval_loss", -0.5, "metric eval_loss -0.5 is outside 0..1e+06"),
        ("eval_seconds", 1e9, "metric eval_seconds 1e+09 is outside 0..1e+06"),
    ],
)
def test_evaluation_metrics_out_of_range_are_rejected(key: str, value: float, reason: str) -> None:
    hostile = _calibrating("hostile", HOSTILE_SHIFT)

    def lying(msg: Message) -> RecordDict:
        content = hostile(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            content["metrics"][key] = value
        return content

    grid = FakeGrid({1: _calibrating("honest", HONEST_SHIFT), 2: lying})
    history, _ = _bn_run(grid, _strategy(2))
    for errors in _errors(history):
        assert errors == {"honest": None, "hostile": f"evaluate: rejected: {reason}"}
    assert history.rounds[0].evaluate == {"loss": 1.0, "accuracy": 0.5, "examples": 10}


def _evaluate(strategy, grid: FakeGrid, bn_keys) -> tuple[list[np.ndarray], RoundClients]:
    clients = RoundClients({})
    ctx = RoundContext(grid, strategy, 1, 5.0, RoundRecord(round=1), clients)
    return evaluate_phase(ctx, _bn_arrays(), (), bn_keys).to_numpy_ndarrays(), clients


def test_batchnorm_statistics_under_dp_are_ignored() -> None:
    """Whatever clients send, a strategy with a DP accountant merges no statistics."""

    class Private(FedAvg):
        accountant = object()

    grid = FakeGrid({1: _calibrating("a", 0.1), 2: _calibrating("b", 0.3)})
    strategy = Private(min_evaluate_nodes=2, min_available_nodes=2)
    final, clients = _evaluate(strategy, grid, lambda: BN_KEYS)
    for got, start in zip(final, _bn_arrays().to_numpy_ndarrays(), strict=True):
        np.testing.assert_array_equal(got, start)
    assert all(c.error is None and c.eval_accuracy == 0.5 for c in clients.sorted())


def test_dp_and_secagg_runs_take_no_batchnorm_keys(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(server_app, "run_rounds", lambda g, s, a, settings: seen.append(settings))
    monkeypatch.setattr(
        server_app, "_start", lambda *a: server_app._Start(None, a[-1], _arrays(), 1)
    )
    for cfg in (
        RunConfig(model="cnn", server_eval=False),
        RunConfig(model="cnn", server_eval=False, dp=True, dp_noise=1.0),
        RunConfig(model="cnn", server_eval=False, secagg=True),
    ):
        server_app.run_federation(FakeGrid({}), cfg, Path("/nonexistent"))
    plain, dp, secagg = (s.bn_keys for s in seen)
    assert plain is not None and dp is None and secagg is None


def test_batchnorm_statistics_under_a_robust_strategy_are_median_combined() -> None:
    """A valid but extreme client, claiming a huge calibration set, does not move the median."""
    extreme = {"1": np.full(10, 1e6, np.float32), "2": np.full(10, 1e6, np.float32)}
    grid = FakeGrid(
        {
            1: _calibrating("a", 0.1),
            2: _calibrating("b", 0.3),
            3: _calibrating("extreme", 0.5, extreme, calibration=10**9),
        }
    )
    strategy = FedMedian(min_evaluate_nodes=3, min_available_nodes=3)
    final, clients = _evaluate(strategy, grid, lambda: BN_KEYS)
    assert all(c.error is None for c in clients.sorted())
    np.testing.assert_allclose(final[1], np.full(10, 3.0), rtol=1e-6)  # median of 1, 3, 1e6
    np.testing.assert_allclose(final[2], np.full(10, 1.3), rtol=1e-6)  # median of 1.1, 1.3, 1e6


def test_batchnorm_statistics_without_known_keys_are_ignored() -> None:
    grid = FakeGrid({1: _calibrating("a", 0.1), 2: _calibrating("b", 0.3)})
    final, _ = _evaluate(_strategy(2), grid, None)
    np.testing.assert_array_equal(final[1], np.zeros(10, np.float32))


# --- the client that starts the run, and names --------------------------------------------------

FORMULA = "=cmd|' /C calc'!A0"


def _named(name: str, seed: int, initial=None):
    """``_deterministic_client`` under ``name``; ``initial`` replaces its initial weights."""
    client = _deterministic_client(name, seed)

    def reply(msg: Message) -> RecordDict:
        content = client(msg)
        request = msg.content.config_records.get("config", ConfigRecord()).get("request")
        if request == "initial-arrays" and initial is not None:
            content["arrays"] = initial
        return content

    return reply


def _federation(tmp_path: Path, monkeypatch, grid: FakeGrid, **cfg) -> History:
    monkeypatch.setattr(ModelFiles, "save", lambda self, run_dir, arrays: None)
    config = RunConfig(
        model="cnn", server_eval=False, min_clients=2, round_timeout=5, num_rounds=1, **cfg
    )
    history = server_app.run_federation(grid, config.replace(out=str(tmp_path)), tmp_path)
    write_history(tmp_path, history)
    return history


def _asked_first(grid: FakeGrid) -> list[int]:
    return [
        m.metadata.dst_node_id
        for m in grid.sent.values()
        if m.metadata.message_type == MessageType.QUERY
        and m.content["config"].get("request") == "initial-arrays"
    ]


@pytest.mark.usefixtures("fake_model")
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_first_client_is_chosen_by_the_seed_over_node_ids_not_by_name(
    tmp_path: Path, monkeypatch, seed: int
) -> None:
    """A name sorting first (``=...`` sorts before letters) does not make a client first."""
    grid = FakeGrid({5: _named("honest", 0), 9: _named(FORMULA, 1)})
    _federation(tmp_path, monkeypatch, grid, seed=seed)
    assert _asked_first(grid) == [seeded_order([5, 9], seed)[0]]


@pytest.mark.usefixtures("fake_model")
def test_a_name_like_a_formula_lands_neutralised_in_history_csv(
    tmp_path: Path, monkeypatch
) -> None:
    grid = FakeGrid({5: _named("honest", 0), 9: _named(FORMULA + "\x1b[2J" + "x" * 200, 1)})
    _federation(tmp_path, monkeypatch, grid)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    scopes = [r["scope"] for r in rows if r["scope"] not in ("aggregate", "server")]
    (hostile,) = [s for s in scopes if "cmd" in s]
    assert hostile.startswith("'=cmd|' /C calc'!A0?[2J") and len(hostile) <= 65
    assert all(s.isprintable() for s in scopes)
    names = {c["name"] for c in json.loads((tmp_path / "history.json").read_text())["rounds"][0]
             ["clients"]}  # fmt: skip
    assert all(n.isprintable() and len(n) <= 64 for n in names)


UNUSABLE_INITIAL = {
    "NaN": [np.full((2, 3), np.nan, np.float32), np.ones(3, np.float32)],
    "huge values": [np.full((2, 3), 1e30, np.float32), np.ones(3, np.float32)],
    "another model": [np.zeros((4, 4), np.float32)],
    "a wider array": [np.zeros((2, 4), np.float32), np.ones(3, np.float32)],
    "float64": [np.zeros((2, 3), np.float64), np.ones(3, np.float32)],
    "an extra array": [np.zeros((2, 3), np.float32), np.ones(3, np.float32), np.ones(1)],
}


@pytest.mark.usefixtures("fake_model")
@pytest.mark.parametrize("weights", sorted(UNUSABLE_INITIAL))
def test_unusable_initial_weights_are_refused_and_the_next_client_asked(
    tmp_path: Path, monkeypatch, weights: str
) -> None:
    """Weights that are not the run's model's (the fake one here: _arrays') start nothing."""
    unusable = ArrayRecord(UNUSABLE_INITIAL[weights])
    first = seeded_order([5, 9], 0)[0]
    behaviours = {first: _named("hostile", 1, initial=unusable), 14 - first: _named("honest", 0)}
    grid = FakeGrid(behaviours)
    history = _federation(tmp_path, monkeypatch, grid, seed=0)
    assert _asked_first(grid) == [first, 14 - first]
    assert [r.round for r in history.rounds] == [1]
    assert json.loads((tmp_path / "classes.json").read_text()) == ["a", "b"]


@pytest.mark.usefixtures("fake_model")
def test_class_names_are_made_printable_and_bounded(tmp_path: Path, monkeypatch) -> None:
    def sneaky(msg: Message) -> RecordDict:
        content = _named("c", 0)(msg)
        if "client" in content.config_records:
            content["client"]["classes"] = ["cat\x1b[31m", "=1+1", "d" * 500]
        return content

    _federation(tmp_path, monkeypatch, FakeGrid({5: sneaky, 9: sneaky}))
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes[:2] == ["cat?[31m", "=1+1"] and len(classes[2]) == 100


# --- the reply checks themselves ----------------------------------------------------------------


def test_initial_arrays_problems() -> None:
    from pollen.server.replies import ModelReference, initial_arrays_problem

    fresh = [np.full((2, 3), 0.5, np.float32), np.arange(3), np.zeros(2, np.float32)]
    ref = ModelReference.of(fresh)
    assert ref.bounds == (100.0, math.inf, 100.0)

    def problem(*arrays):
        return initial_arrays_problem(ArrayRecord(list(arrays)), ref)

    assert problem(*fresh) is None
    assert problem(np.full((2, 3), -99.0, np.float32), np.arange(3) * 10**6, fresh[2]) is None
    assert problem(fresh[0], fresh[1], np.full(2, 101, np.float32)) == (
        "array 2 holds 101, beyond its bound 100"
    )
    assert problem(fresh[0], fresh[1], np.full(2, np.inf, np.float32)) == (
        "array 2 has NaN/inf values"
    )
    assert problem(fresh[0], fresh[1], np.zeros(2, np.complex64)) == (
        "array 2 is complex64[2], the model's is float32[2]"
    )
    transposed = problem(fresh[0].T, *fresh[1:])
    assert transposed == "array 0 is float32[3, 2], the model's is float32[2, 3]"
    assert problem(*fresh[:2]) == "2 arrays, the run's model has 3"
    keyed = ArrayRecord(array_dict={f"w{i}": Array(a) for i, a in enumerate(fresh)})
    assert "keyed" in initial_arrays_problem(keyed, ref)
    assert initial_arrays_problem(ArrayRecord(), ref) == "no weights"
    assert initial_arrays_problem(None, ref) == "no weights"


@pytest.mark.parametrize("server_eval", [False, True])
def test_an_honest_clients_initial_weights_pass_the_servers_model(server_eval: bool) -> None:
    """The server's reference is the model the client builds; a whitened first layer passes.

    Images of one colour give the largest whitened kernel there is (1 / sqrt(5e-4) ~= 44.7).
    """
    from pollen.models.registry import MODELS
    from pollen.models.whitening import whiten_first_conv
    from pollen.server.replies import initial_arrays_problem
    from pollen.training.compile import build_client_model

    cfg = RunConfig(model="fastnet", num_classes=10, server_eval=server_eval)
    reference = server_app._model_reference(ModelFiles(cfg))
    for images in (
        np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        np.full((8, 32, 32, 3), 128, np.uint8),
    ):
        client = build_client_model("fastnet", 10, 7)
        whiten_first_conv(client, MODELS["fastnet"].whiten, images)
        weights = client.get_weights()
        assert max(np.abs(w).max() for w in weights) > 1  # whitened: beyond a fresh init
        assert initial_arrays_problem(ArrayRecord(weights), reference) is None
        k = int(np.argmax([np.abs(w).max() for w in weights]))  # the whitened kernel
        weights[k] *= np.float32(2.5 / np.sqrt(5e-4) / np.abs(weights[k]).max())
        reason = initial_arrays_problem(ArrayRecord(weights), reference)  # 2.5x the largest
        assert reason is not None and reason.startswith(f"array {k} holds 111.8, beyond")


def test_robust_is_a_field_of_the_strategy_entry(monkeypatch) -> None:
    """A new robust strategy is one registry entry: the reply checks read its ``robust`` flag."""
    from flwr.serverapp import strategy as fl

    from pollen.server.replies import is_robust
    from pollen.server.strategies import STRATEGIES, StrategyEntry, make_strategy

    robust = {name for name, entry in STRATEGIES.items() if entry.robust}
    assert robust == {"fedmedian", "trimmedmean", "krum", "multikrum", "bulyan"}
    for name in STRATEGIES:
        strategy = make_strategy(RunConfig(strategy=name, min_clients=7))
        assert is_robust(strategy) == (name in robust), name

    class Careful(fl.FedAvg):
        pass

    assert not is_robust(Careful())
    monkeypatch.setitem(STRATEGIES, "careful", StrategyEntry(Careful, robust=True))
    assert is_robust(Careful()) and not is_robust(fl.FedAvg())


def test_capped_counts() -> None:
    from pollen.server.replies import capped

    assert capped([10, 1000]) == [10, 1000]  # two clients: as before
    assert capped([10, 20, 10**9]) == [10, 20, 200]
    assert capped([100, 120, 90, 80]) == [100, 120, 90, 80]


@pytest.mark.parametrize("server_eval", [True, False])
def test_the_server_knows_the_batchnorm_keys_clients_send(server_eval: bool) -> None:
    """The keys the server accepts are those a client's calibration sends (same layout)."""
    from pollen.models.registry import batchnorm_stat_indices
    from pollen.training.compile import build_client_model

    cfg = RunConfig(model="cnn", num_classes=3, server_eval=server_eval)
    keys = server_app._batchnorm_keys(ModelFiles(cfg))()
    client = build_client_model("cnn", 3, cfg.seed)
    assert keys and keys == [str(i) for i in batchnorm_stat_indices(client)]


# --- secure aggregation: the plaintext a client adds to its masked update -----------------------


def test_secagg_train_example_counts_from_clients_are_checked() -> None:
    from pollen.server.secagg import learn_train_examples

    def says(count):
        return lambda msg: RecordDict(
            {"client": ConfigRecord({"name": "c", "train-examples": count})}
        )

    grid = FakeGrid({1: says(100), 2: says("lots"), 3: says(-5), 4: says(10**12)})
    counts: dict[int, int] = {}
    learn_train_examples(grid, [1, 2, 3, 4], counts, 2.0)
    assert counts == {1: 100}


def test_secagg_plaintext_metrics_that_are_unusable_are_not_recorded() -> None:
    from pollen.server.secagg import _record_clients

    def masked(metrics: dict) -> Message:
        content = RecordDict({"fitres.metrics": ConfigRecord(metrics)})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    collected = {
        1: masked({"num-examples": 10, "train_loss": 1.0}),
        2: masked({"num-examples": -9, "train_loss": 1.0}),
        3: masked({"num-examples": 10, "train_loss": math.nan}),
    }
    clients, record = RoundClients({1: "a", 2: "b", 3: "c"}), RoundRecord(round=1)
    assert _record_clients(collected, clients, record) == 3
    assert record.train == {"loss": 1.0, "accuracy": None, "examples": 10}
    assert [c.train_examples for c in clients.sorted()] == [10, None, None]
