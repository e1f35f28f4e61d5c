"""The round loop and its phases: validation, recording, quorum, sampling, held weights,
the central evaluation beside the next round."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from server_fakes import FakeGrid, _arrays, _deterministic_client, _nan, _strategy, _trainer
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen import wire
from pollen.errors import PollenError
from pollen.server.history import History, RoundRecord
from pollen.server.phases import RoundClients, RoundContext, train_phase
from pollen.server.rounds import RoundSettings, run_rounds
from pollen.wire import unpack_content

# --- train_phase: validation, recording and quorum ---------------------------------------------


def test_train_phase_rejects_bad_updates_and_aggregates_the_good_ones() -> None:
    big = lambda arrays: [a * 1e6 for a in arrays]  # noqa: E731
    grid = FakeGrid(
        {
            1: _trainer("good-a", 0.1),
            2: _trainer("good-b", 0.3),
            3: _trainer("nan", tamper=_nan),
            4: _trainer("huge", tamper=big),
            5: _trainer("shape", tamper=lambda a: [a[0]]),
            6: "silent",
            7: "error",
        }
    )
    record, clients = RoundRecord(round=1), RoundClients({})
    new = train_phase(
        RoundContext(grid, _strategy(), 1, 1.5, record, clients),
        _arrays(),
        {},
        max_update_norm=100.0,
    )
    # Only the two good updates are averaged: mean shift 0.2.
    np.testing.assert_allclose(new.to_numpy_ndarrays()[0], np.full((2, 3), 0.2), rtol=1e-5)
    by_name = {c.name: c for c in clients.sorted()}
    assert by_name["good-a"].error is None and by_name["good-a"].train_examples == 10
    assert by_name["nan"].error == "train: rejected: update has NaN/inf values (array 0)"
    assert "rejected: update norm" in by_name["huge"].error
    assert "rejected: update has 1 arrays" in by_name["shape"].error
    assert by_name["node-6"].error == "train: no reply within round-timeout (1.5 s)"
    assert by_name["node-7"].error == "train: ValueError: broken client"
    assert record.train["examples"] == 20


def test_train_phase_names_clients_that_never_reply() -> None:
    """A client that answers the hello query but dies before replying is named."""
    hello_only = _trainer("flaky")

    def dies_in_training(msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return hello_only(msg)
        raise AssertionError("unreachable")

    grid = FakeGrid({1: _trainer("good"), 2: dies_in_training})
    original = grid.pull_messages

    def pull(ids):  # node 2 answers the hello query, then goes silent
        msgs = [grid.sent[i] for i in ids]
        if any(m.metadata.dst_node_id == 2 and m.metadata.message_type != "query" for m in msgs):
            return []
        return original(ids)

    grid.pull_messages = pull
    clients = RoundClients({})
    train_phase(
        RoundContext(grid, _strategy(), 1, 1.0, RoundRecord(round=1), clients), _arrays(), {}
    )
    flaky = [c for c in clients.sorted() if c.name == "flaky"]
    assert flaky and "no reply within round-timeout" in flaky[0].error


def test_train_phase_without_quorum_names_who_failed() -> None:
    grid = FakeGrid({1: _trainer("good"), 2: _trainer("poisoner", tamper=_nan), 3: "silent"})
    with pytest.raises(PollenError) as err:
        train_phase(
            RoundContext(grid, _strategy(), 4, 1.0, RoundRecord(round=4), RoundClients()),
            _arrays(),
            {},
            min_valid=2,
        )
    text = str(err.value)
    assert "Round 4 has 1 valid update(s), fewer than the 2" in text
    assert "poisoner (train: rejected: update has NaN/inf values" in text
    assert "node-3 (train: no reply within round-timeout" in text
    assert "--resume" in text


def test_run_rounds_records_failures_and_goes_on() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b"), 3: _trainer("bad", tamper=_nan)})
    history = History(config={})
    run_rounds(
        grid,
        _strategy(),
        _arrays(),
        RoundSettings(
            num_rounds=2, history=history, timeout=2.0, min_clients=2, max_update_norm=100.0
        ),
    )
    assert [r.round for r in history.rounds] == [1, 2]
    for r in history.rounds:
        errors = {c.name: c.error for c in r.clients}
        assert errors["a"] is None and errors["b"] is None
        assert errors["bad"].startswith("train: rejected: update has NaN/inf")
        # The rejected client is not asked to evaluate in the same round.
        bad = next(c for c in r.clients if c.name == "bad")
        assert bad.eval_accuracy is None


def test_with_a_sampling_seed_a_round_trains_and_evaluates_the_same_repeatable_clients() -> None:
    """Two clients of four a round: the same ones train and evaluate, whatever the node ids."""

    def sampled(node_ids: list[int]) -> list[tuple[list[str], list[str]]]:
        names = ["a", "b", "c", "d"]
        grid = FakeGrid({n: _trainer(name) for n, name in zip(node_ids, names, strict=True)})
        strategy = FedAvg(
            fraction_train=0.5,
            fraction_evaluate=0.5,
            min_train_nodes=2,
            min_evaluate_nodes=2,
            min_available_nodes=2,
        )
        history = History(config={})
        run_rounds(
            grid,
            strategy,
            _arrays(),
            RoundSettings(
                num_rounds=4, history=history, timeout=2.0, min_clients=2, sampling_seed=42
            ),
        )
        return [
            (
                [c.name for c in r.clients if c.train_examples is not None],
                [c.name for c in r.clients if c.eval_accuracy is not None],
            )
            for r in history.rounds
        ]

    first = sampled([1, 2, 3, 4])
    assert all(train == evaluated and len(train) == 2 for train, evaluated in first)
    assert len({tuple(train) for train, _ in first}) > 1, "every round drew the same clients"
    assert sampled([907, 15, 4242, 3]) == first


def test_a_client_that_does_not_say_its_name_is_asked_once_a_run() -> None:
    """Seeded sampling asks every connected client's name, but never waits twice for one."""
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b"), 3: _trainer("c"), 4: "silent"})
    strategy = FedAvg(
        fraction_train=0.5, fraction_evaluate=0.5, min_train_nodes=1,
        min_evaluate_nodes=1, min_available_nodes=1,
    )  # fmt: skip
    history = History(config={})
    run_rounds(
        grid,
        strategy,
        _arrays(),
        RoundSettings(num_rounds=3, history=history, timeout=1.0, min_clients=1, sampling_seed=42),
    )
    hellos = [
        m for m in grid.sent.values()
        if m.metadata.dst_node_id == 4 and m.metadata.message_type == MessageType.QUERY
    ]  # fmt: skip
    assert len(hellos) == 1
    assert [r.round for r in history.rounds] == [1, 2, 3]


def _calibrating(name: str, shift: float):
    """A trainer whose evaluate replies carry BatchNorm statistics of arrays "1" and "2"."""
    trainer = _trainer(name, shift)

    def reply(msg: Message) -> RecordDict:
        content = trainer(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            mean, var = np.full(10, 10 * shift, np.float32), np.full(10, 1 + shift, np.float32)
            content["bn-stats"] = ArrayRecord(array_dict={"1": Array(mean), "2": Array(var)})
            content["metrics"]["calibration-examples"] = 10
        return content

    return reply


class RestartingGrid(FakeGrid):
    """Node 2's app restarts after each of its evaluate replies: it loses what it kept."""

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for r in replies:
            if r.metadata.src_node_id == 2 and r.metadata.message_type == MessageType.EVALUATE:
                wire._kept.pop(2, None)
        return replies


def _bn_arrays() -> ArrayRecord:
    return ArrayRecord(
        [np.zeros((20, 10), np.float32), np.zeros(10, np.float32), np.ones(10, np.float32)]
    )


@pytest.mark.parametrize("client", ["warm", "restarts", "cold"])
def test_train_messages_carry_only_what_changed_since_the_clients_evaluated(
    monkeypatch, client: str
) -> None:
    """held_weights: the same rounds, the same weights; far fewer bytes sent.

    ``warm``: the clients' apps serve every message (pollen.deploy.warm_clientapp).
    ``restarts``: node 2's app restarts between messages. ``cold``: a process per
    message (Flower's own app runner), which keeps nothing.
    """
    monkeypatch.setattr(wire, "_kept", {})
    monkeypatch.setattr(wire, "_serves_later", [client != "cold"])
    grid_type = RestartingGrid if client == "restarts" else FakeGrid
    results = {}
    for held in (False, True):
        grid = grid_type({1: _calibrating("a", 0.1), 2: _calibrating("b", 0.3)})
        history = History(config={})
        final = run_rounds(
            grid,
            _strategy(2),
            _bn_arrays(),
            RoundSettings(
                num_rounds=3,
                history=history,
                timeout=5.0,
                min_clients=2,
                held_weights=held,
                bn_keys=lambda: ["1", "2"],
            ),
        )
        assert all(c.error is None for r in history.rounds for c in r.clients)
        trains = [m for m in grid.sent.values() if m.metadata.message_type == MessageType.TRAIN]
        sizes = [(m.metadata.dst_node_id, unpack_content(m.content)["arrays"]) for m in trains]
        results[held] = (final.to_numpy_ndarrays(), history, sizes)
    plain, held = results[False], results[True]
    for a, b in zip(plain[0], held[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r.server for r in plain[1].rounds] == [r.server for r in held[1].rounds]
    assert all(len(arrays) == 3 for _, arrays in plain[2])  # always the whole weights
    # Round 1: whole. Rounds 2 and 3: the merged statistics only, to a client that kept
    # the weights; one that lost them says so and gets the whole weights after all; one
    # that never keeps any says nothing and gets the whole weights.
    later = {
        "warm": [(1, 2), (2, 2)],
        "restarts": [(1, 2), (2, 2), (2, 3)],
        "cold": [(1, 3), (2, 3)],
    }[client]
    expected = [(1, 3), (2, 3)] + later + later
    got = [(node, len(arrays)) for node, arrays in held[2]]
    assert sorted(got) == sorted(expected), got
    if client == "warm":
        assert held[1].rounds[1].bytes_sent < plain[1].rounds[1].bytes_sent


def test_run_rounds_resumes_at_first_round() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b")})
    history = History(config={}, rounds=[RoundRecord(round=1), RoundRecord(round=2)])
    seen = []

    class Observer:
        def round_done(self, record, arrays, history, strategy):
            seen.append(record.round)

    run_rounds(
        grid,
        _strategy(),
        _arrays(),
        RoundSettings(
            num_rounds=4, history=history, timeout=2.0, observer=Observer(), first_round=3
        ),
    )
    assert seen == [3, 4]
    assert [r.round for r in history.rounds] == [1, 2, 3, 4]


def _sent(grid: FakeGrid, kind: str) -> int:
    return sum(1 for m in list(grid.sent.values()) if m.metadata.message_type == kind)


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_server_evaluation_runs_beside_the_next_round_and_after_the_release() -> None:
    """Round 1's central evaluation overlaps round 2; the last one follows the release."""
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b")})
    history, events = History(config={}), []

    def evaluate(rnd, arrays):
        if rnd == 1:  # starts once round 2's weights have left, then holds until it trained
            events.append(("round 2 sent", _sent(grid, MessageType.TRAIN) == 4))
            events.append(("round 2 trained meanwhile", _wait_until(
                lambda: _sent(grid, MessageType.EVALUATE) == 4)))  # fmt: skip
        events.append(("evaluated", rnd))
        return {"accuracy": 0.25 * rnd}

    class Observer:
        def round_done(self, record, arrays, history, strategy):
            events.append(("recorded", record.round, record.server["accuracy"]))

    run_rounds(
        grid,
        _strategy(),
        _arrays(),
        RoundSettings(
            num_rounds=2,
            history=history,
            timeout=5.0,
            evaluate_fn=evaluate,
            observer=Observer(),
            release=lambda: events.append("release"),
        ),
    )
    assert events == [
        ("round 2 sent", True),
        ("round 2 trained meanwhile", True),
        ("evaluated", 1),
        ("recorded", 1, 0.25),
        "release",
        ("evaluated", 2),
        ("recorded", 2, 0.5),
    ]
    assert [r.round for r in history.rounds] == [1, 2]
    for r in history.rounds:
        assert set(r.phase_seconds) == {"train", "evaluate", "server-beside"}
        assert r.seconds == pytest.approx(
            sum(r.phase_seconds.values()) - r.phase_seconds["server-beside"], abs=0.01
        )
    assert history.rounds[0].phase_seconds["server-beside"] > 0


def test_with_a_target_accuracy_the_next_round_waits_for_the_server_evaluation() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b")})
    history, trained_before = History(config={}), []

    def evaluate(rnd, arrays):
        trained_before.append(_sent(grid, MessageType.TRAIN))
        time.sleep(0.1)
        return {"accuracy": 0.5}

    run_rounds(
        grid,
        _strategy(),
        _arrays(),
        RoundSettings(
            num_rounds=3, history=history, timeout=5.0, evaluate_fn=evaluate, target_accuracy=0.5
        ),
    )
    assert trained_before == [2]  # reached after round 1, before any round-2 message
    (record,) = history.rounds
    assert set(record.phase_seconds) == {"train", "evaluate", "server"}
    assert record.seconds == pytest.approx(sum(record.phase_seconds.values()), abs=0.01)
    assert record.phase_seconds["server"] >= 0.1


def test_a_round_recorded_beside_the_next_keeps_its_own_strategy_state() -> None:
    """FedAdam's moments in round 1's checkpoint are round 1's, not round 2's."""

    def grid():
        return FakeGrid({1: _deterministic_client("a", 0), 2: _deterministic_client("b", 1)})

    def moments(grid: FakeGrid, rounds: int, evaluate) -> list[dict]:
        seen = []

        class Observer:
            def round_done(self, record, arrays, history, strategy):
                seen.append(pickle.loads(pickle.dumps(strategy)).m_t)

        strategy = FedAdam(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
        run_rounds(
            grid,
            strategy,
            _arrays(),
            RoundSettings(
                num_rounds=rounds,
                history=History(config={}),
                timeout=5.0,
                evaluate_fn=evaluate,
                observer=Observer(),
            ),
        )
        return seen

    two = grid()

    def slow_first(rnd, arrays):  # round 2 aggregates before round 1 is recorded
        if rnd == 1:
            assert _wait_until(lambda: _sent(two, MessageType.EVALUATE) >= 4)
        return {"accuracy": 0.5}

    alone = moments(grid(), 1, lambda rnd, arrays: {"accuracy": 0.5})[0]
    seen = moments(two, 2, slow_first)
    assert len(seen) == 2
    for k in alone:
        np.testing.assert_array_equal(seen[0][k], alone[k])
        assert not np.array_equal(seen[1][k], alone[k])


def test_a_failing_round_still_records_the_one_evaluated_beside_it() -> None:
    def once(name: str):  # trains in round 1 only, then never replies
        trainer, trained = _trainer(name), []

        def reply(msg: Message) -> RecordDict:
            if msg.metadata.message_type == MessageType.TRAIN:
                if trained:
                    raise ValueError("broken client")
                trained.append(1)
            return trainer(msg)

        return reply

    grid = FakeGrid({1: once("a"), 2: once("b")})
    history, recorded = History(config={}), []

    class Observer:
        def round_done(self, record, arrays, history, strategy):
            recorded.append(record.round)

    with pytest.raises(PollenError, match="Round 2 has 0 valid update"):
        run_rounds(
            grid,
            _strategy(),
            _arrays(),
            RoundSettings(
                num_rounds=3,
                history=history,
                timeout=1.0,
                evaluate_fn=lambda rnd, arrays: {"accuracy": 0.5},
                observer=Observer(),
            ),
        )
    assert recorded == [1] and history.rounds[0].server == {"accuracy": 0.5}


def test_a_failing_server_evaluation_beside_the_next_round_stops_the_run_with_its_error() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b")})
    history = History(config={})

    def evaluate(rnd, arrays):
        raise RuntimeError(f"test split unreadable in round {rnd}")

    with pytest.raises(RuntimeError, match="unreadable in round 1"):
        run_rounds(
            grid,
            _strategy(),
            _arrays(),
            RoundSettings(num_rounds=3, history=history, timeout=5.0, evaluate_fn=evaluate),
        )
    assert history.rounds == []  # round 1 is never recorded without its evaluation
    assert _sent(grid, MessageType.TRAIN) == 4  # round 2 had trained; round 3 never began
