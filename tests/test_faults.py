"""Fault tolerance: update validation, deadlines, quorum, checkpoints, resume, faults.

Unit tests first (pure functions and a fake Grid), then end-to-end runs with
real processes over loopback (marked ``e2e``):

a. a client killed during round 1's local training: the run completes with the
   others and the history names the client and the round;
b. a client sending NaN updates and one whose model does not fit the
   federation's (simulation): both are named with their reason, the run
   completes with the honest client;
c. the server killed after round 1's checkpoint: ``pollen server --resume``
   finishes the run, the clients (never restarted) rejoin and exit 0.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pollen_cmd
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg

from pollen import wire
from pollen.client.app import FAULTS, corrupt, fault_of
from pollen.config import FAULT_KINDS, RunConfig
from pollen.deploy.runtime import descendants, is_running
from pollen.errors import PollenError
from pollen.server.aggregation import validate_update
from pollen.server.checkpoint import RunLock, load_checkpoint, read_manifest, save_checkpoint
from pollen.server.history import ClientRound, History, RoundRecord
from pollen.server.rounds import (
    _RoundClients,
    exchange,
    readable_reason,
    run_rounds,
    train_phase,
)
from pollen.server.strategies import STRATEGIES
from pollen.wire import unpack_content, wire_mod

# --- validate_update ---------------------------------------------------------------------------


def _global() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        np.arange(3, dtype=np.int64),
    ]


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


def test_readable_reason() -> None:
    flower = "<class 'pollen.errors.PollenError'>:<'The federation's model does not match.'>"
    assert readable_reason(flower) == "The federation's model does not match."
    assert readable_reason("<class 'ZeroDivisionError'>:<'division by zero'>") == (
        "ZeroDivisionError: division by zero"
    )
    sim = (
        "<class 'flwr.simulation.ray_transport.ray_actor.ClientAppException'>:<'\n"
        "Exception ClientAppException occurred. Message: Model mismatch: fix it.'>"
    )
    assert readable_reason(sim) == "Model mismatch: fix it."
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
        '(pid=1, repr=<flwr.ClientAppActor object at 0x7f>)\n  File "x.py", line 65, in run\n'
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException "
        "occurred. Message: The model does not match: fix it.'>"
    )
    assert readable_reason(ray) == "The model does not match: fix it."
    assert readable_reason("plain words") == "plain words"


# --- fault injection ---------------------------------------------------------------------------


def test_fault_kinds_are_documented() -> None:
    assert set(FAULTS) == set(FAULT_KINDS)


def test_fault_of_node_config_and_run_config() -> None:
    assert fault_of({"fault": "nan"}, "") == "nan"
    assert fault_of({"fault": "scale", "partition-id": 1}, "nan@1") == "scale"
    assert fault_of({"partition-id": 1}, "nan@1,2") == "nan"
    assert fault_of({"partition-id": 0}, "nan@1,2") == ""
    assert fault_of({}, "nan@0") == ""


@pytest.mark.parametrize("bad", ["nan", "nan@", "boom@1", "nan@x"])
def test_fault_config_is_validated(bad: str) -> None:
    with pytest.raises(PollenError, match="Invalid fault"):
        RunConfig(fault=bad).validate()


def test_corrupt_produces_what_validation_rejects() -> None:
    g = _global()
    w = [a + 0.001 if a.dtype.kind == "f" else a for a in g]
    assert "NaN" in validate_update(g, corrupt("nan", g, w), 0)
    scaled = corrupt("scale", g, w)
    np.testing.assert_allclose(scaled[0] - g[0], 1000 * (w[0] - g[0]), rtol=1e-3)
    assert "exceeds" in validate_update(g, scaled, 1.0)
    flipped = corrupt("signflip", g, w)
    np.testing.assert_allclose(flipped[1] - g[1], -(w[1] - g[1]), rtol=1e-4, atol=1e-6)
    noisy = corrupt("noise", g, w)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(noisy, g, strict=True))
    assert "exceeds" in validate_update(g, noisy, 1.0)
    np.testing.assert_array_equal(noisy[2], g[2])  # integer arrays are left alone


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages built outside a running app need a run id (a ServerApp sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


# --- a fake Grid --------------------------------------------------------------------------------


class FakeGrid:
    """A Grid whose nodes answer by a per-node behaviour.

    Behaviours: a function ``(message) -> RecordDict`` (a reply), ``"error"``
    (an error reply), ``"silent"`` (never replies) or ``"hang"``
    (``pull_messages`` blocks, as Flower's does when a reply's objects never arrive).
    """

    def __init__(self, behaviours: dict) -> None:
        self.behaviours = behaviours
        self.sent: dict[str, Message] = {}
        self.release = threading.Event()
        self.pulls = 0

    def get_node_ids(self):
        return list(self.behaviours)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.sent)}-{i}"
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            msg = self.sent[mid]
            node = msg.metadata.dst_node_id
            behaviour = self.behaviours[node]
            if behaviour == "silent":
                continue
            if behaviour == "hang":
                self.release.wait()
                continue
            meta = Metadata(
                run_id=1,
                message_id=f"reply-{mid}",
                src_node_id=node,
                dst_node_id=0,
                reply_to_message_id=mid,
                group_id="",
                created_at=time.time(),
                ttl=3600,
                message_type=msg.metadata.message_type,
            )
            if behaviour == "error":
                err = Error(code=2, reason="<class 'ValueError'>:<'broken client'>")
                out.append(Message(metadata=meta, error=err))
            else:  # the node sees and sends records as a real client does (pollen.wire)
                try:
                    content = _through_wire(msg, behaviour)
                except Exception as ex:  # an error reply, as Flower makes of a raising app
                    reason = f"<class '{type(ex).__module__}.{type(ex).__name__}'>:<'{ex}'>"
                    out.append(Message(metadata=meta, error=Error(code=1, reason=reason)))
                    continue
                out.append(Message(metadata=meta, content=content))
        return out


def _through_wire(msg: Message, behaviour) -> RecordDict:
    """The content of the reply of ``behaviour``, a client's handler behind ``wire_mod``."""
    node = msg.metadata.dst_node_id
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def handler(received: Message, _context: Context) -> Message:
        return Message(metadata=received.metadata, content=behaviour(received))

    # A copy: wire_mod replaces the content of the message it gets.
    return wire_mod(Message(metadata=msg.metadata, content=msg.content), context, handler).content


def _trainer(name: str, shift: float = 0.01, n: int = 10, tamper=None):
    def reply(msg: Message) -> RecordDict:
        config = msg.content.config_records.get("config", ConfigRecord())
        if config.get("request") == "hello":
            return RecordDict({"client": ConfigRecord({"name": name})})
        arrays = [a + shift for a in msg.content["arrays"].to_numpy_ndarrays()]
        if tamper is not None:
            arrays = tamper(arrays)
        metrics = {"num-examples": n, "train_loss": 1.0, "eval_loss": 1.0, "eval_accuracy": 0.5}
        return RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord(metrics),
                "client": ConfigRecord({"name": name}),
            }
        )

    return reply


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.zeros((2, 3), np.float32), np.ones(3, np.float32)])


def _strategy(min_nodes: int = 1) -> FedAvg:
    return FedAvg(min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=1)


def _nan(arrays):
    return [np.full_like(a, np.nan) for a in arrays]


# --- exchange: replies, silence and hangs within the deadline ---------------------------------


def test_exchange_returns_replies_and_missing_nodes_within_the_deadline() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: "silent", 3: "hang", 4: "error"})
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"request": "hello"})}), n, MessageType.QUERY)
        for n in (1, 2, 3, 4)
    ]
    start = time.monotonic()
    result = exchange(grid, msgs, timeout=2.0, poll_interval=0.1)
    took = time.monotonic() - start
    grid.release.set()
    assert took < 4.0, f"exchange blocked for {took:.1f} s on a hanging pull"
    assert set(result.replies) == {1, 4}
    assert result.replies[4].has_error()
    assert sorted(result.missing) == [2, 3]


def test_exchange_returns_as_soon_as_the_last_reply_is_in() -> None:
    """No wait for the next 0.2-s slice of the deadline's loop once every reply is in."""

    class LateGrid(FakeGrid):  # each reply is there from the second pull on
        def pull_messages(self, message_ids):
            first = [m for m in message_ids if m not in self.asked]
            self.asked.update(first)
            return super().pull_messages([m for m in message_ids if m not in first])

    grid = LateGrid({1: _trainer("a"), 2: _trainer("b")})
    grid.asked = set()
    start = time.monotonic()
    for _ in range(5):
        msgs = [
            Message(RecordDict({"config": ConfigRecord({"request": "hello"})}), n, "query")
            for n in (1, 2)
        ]
        result = exchange(grid, msgs, timeout=5.0, poll_interval=0.01)
        assert set(result.replies) == {1, 2}
    took = time.monotonic() - start
    assert took < 0.6, f"5 exchanges took {took:.2f} s"


def test_flower_send_and_receive_would_hang_here() -> None:
    """The reason exchange exists: the same hanging node blocks send_and_receive."""
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = FakeGrid({1: "hang"})
    msg = Message(RecordDict({"config": ConfigRecord({})}), 1, MessageType.QUERY)
    done = threading.Event()

    def call():
        HttpGrid.send_and_receive(grid, [msg], timeout=1.0)  # Flower's loop, fake transport
        done.set()

    t = threading.Thread(target=call, daemon=True)
    t.start()
    assert not done.wait(3.0)
    grid.release.set()
    assert done.wait(5.0)


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
    record, clients = RoundRecord(round=1), _RoundClients({})
    new = train_phase(
        grid, _strategy(), 1, _arrays(), {}, 1.5, record, clients, max_update_norm=100.0
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
    clients = _RoundClients({})
    train_phase(grid, _strategy(), 1, _arrays(), {}, 1.0, RoundRecord(round=1), clients)
    flaky = [c for c in clients.sorted() if c.name == "flaky"]
    assert flaky and "no reply within round-timeout" in flaky[0].error


def test_train_phase_without_quorum_names_who_failed() -> None:
    grid = FakeGrid({1: _trainer("good"), 2: _trainer("poisoner", tamper=_nan), 3: "silent"})
    with pytest.raises(PollenError) as err:
        train_phase(
            grid, _strategy(), 4, _arrays(), {}, 1.0, RoundRecord(round=4), _RoundClients(),
            min_valid=2,
        )  # fmt: skip
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
        num_rounds=2,
        history=history,
        timeout=2.0,
        min_clients=2,
        max_update_norm=100.0,
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
            grid, strategy, _arrays(), num_rounds=4, history=history, timeout=2.0,
            min_clients=2, sampling_seed=42,
        )  # fmt: skip
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
        grid, strategy, _arrays(), num_rounds=3, history=history, timeout=1.0,
        min_clients=1, sampling_seed=42,
    )  # fmt: skip
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
            grid, _strategy(2), _bn_arrays(), num_rounds=3, history=history, timeout=5.0,
            min_clients=2, held_weights=held,
        )  # fmt: skip
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
        grid, _strategy(), _arrays(), num_rounds=4, history=history, timeout=2.0,
        observer=Observer(), first_round=3,
    )  # fmt: skip
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
        grid, _strategy(), _arrays(), num_rounds=2, history=history, timeout=5.0,
        evaluate_fn=evaluate, observer=Observer(), release=lambda: events.append("release"),
    )  # fmt: skip
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
        grid, _strategy(), _arrays(), num_rounds=3, history=history, timeout=5.0,
        evaluate_fn=evaluate, target_accuracy=0.5,
    )  # fmt: skip
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
            grid, strategy, _arrays(), num_rounds=rounds, history=History(config={}),
            timeout=5.0, evaluate_fn=evaluate, observer=Observer(),
        )  # fmt: skip
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
            grid, _strategy(), _arrays(), num_rounds=3, history=history, timeout=1.0,
            evaluate_fn=lambda rnd, arrays: {"accuracy": 0.5}, observer=Observer(),
        )  # fmt: skip
    assert recorded == [1] and history.rounds[0].server == {"accuracy": 0.5}


def test_a_failing_server_evaluation_beside_the_next_round_stops_the_run_with_its_error() -> None:
    grid = FakeGrid({1: _trainer("a"), 2: _trainer("b")})
    history = History(config={})

    def evaluate(rnd, arrays):
        raise RuntimeError(f"test split unreadable in round {rnd}")

    with pytest.raises(RuntimeError, match="unreadable in round 1"):
        run_rounds(
            grid, _strategy(), _arrays(), num_rounds=3, history=history, timeout=5.0,
            evaluate_fn=evaluate,
        )  # fmt: skip
    assert history.rounds == []  # round 1 is never recorded without its evaluation
    assert _sent(grid, MessageType.TRAIN) == 4  # round 2 had trained; round 3 never began


# --- checkpoints -------------------------------------------------------------------------------


def _history(rounds: int) -> History:
    return History(
        config={"num-rounds": 5},
        rounds=[
            RoundRecord(round=r, clients=[ClientRound(node_id=7, name="c", error="train: x")])
            for r in range(1, rounds + 1)
        ],
    )


def _fedadam_with_state() -> FedAdam:
    strategy = FedAdam()
    strategy.current_arrays = ArrayRecord([np.ones(3, np.float32)])
    strategy.m_t = {"0": np.full(3, 0.5)}
    strategy.v_t = {"0": np.full(3, 0.25)}
    return strategy


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"0": np.arange(6, dtype=np.float32).reshape(2, 3), "1": np.ones(2, np.float64)}
    save_checkpoint(tmp_path, 2, arrays, _fedadam_with_state(), _history(2), {"model": "cnn"})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.config == {"model": "cnn"}
    assert list(ckpt.arrays) == ["0", "1"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(ckpt.arrays[k], v)
        assert ckpt.arrays[k].dtype == v.dtype
    assert isinstance(ckpt.strategy, FedAdam)
    np.testing.assert_array_equal(ckpt.strategy.m_t["0"], np.full(3, 0.5))
    np.testing.assert_array_equal(ckpt.strategy.v_t["0"], np.full(3, 0.25))
    np.testing.assert_array_equal(ckpt.strategy.current_arrays.to_numpy_ndarrays()[0], np.ones(3))
    assert ckpt.history.to_dict() == _history(2).to_dict()


def test_checkpoint_keeps_only_the_latest_round(tmp_path: Path) -> None:
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, rnd, {"0": np.full(2, rnd)}, FedAvg(), _history(rnd), {})
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["arrays-0003.npz", "history-0003.json", "manifest.json", "strategy-0003.pkl"]
    assert load_checkpoint(tmp_path).round == 3


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_kill_mid_checkpoint_leaves_the_previous_one(
    tmp_path: Path, monkeypatch, fail_at
) -> None:
    """os.replace fails at the n-th file of round 2's checkpoint: round 1's still loads."""
    save_checkpoint(tmp_path, 1, {"0": np.full(2, 1.0)}, FedAvg(), _history(1), {})
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("killed mid-checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), {})
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    np.testing.assert_array_equal(ckpt.arrays["0"], np.full(2, 1.0))
    assert len(ckpt.history.rounds) == 1
    # ... and the next checkpoint works and tidies up.
    save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), {})
    assert load_checkpoint(tmp_path).round == 2


def test_damaged_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="has no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 1, {"0": np.zeros(2)}, FedAvg(), _history(1), {})
    manifest = read_manifest(tmp_path)
    (tmp_path / "checkpoint" / manifest["files"]["arrays"]["name"]).write_bytes(b"garbage")
    with pytest.raises(PollenError, match="damaged"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_pickles(name: str) -> None:
    strategy = STRATEGIES[name](RunConfig(model="cnn"))
    assert type(pickle.loads(pickle.dumps(strategy))) is type(strategy)


def test_run_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire()
    assert first.holder() == str(os.getpid())
    assert not second.acquire(timeout=0.3)
    first.release()
    assert second.acquire()
    second.release()


def _deterministic_client(name: str, seed: int):
    """Initial weights on request; a training step that depends only on the weights sent."""

    def reply(msg: Message) -> RecordDict:
        config = msg.content.config_records.get("config", ConfigRecord())
        info = ConfigRecord({"name": name, "classes": ["a", "b"]})
        if config.get("request") == "initial-arrays":
            return RecordDict({"arrays": _arrays(), "client": info})
        if config.get("request") in ("hello", "prepare"):
            return RecordDict({"client": info})
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        # Like Keras: the client's model is float32 whatever dtype it was sent.
        new = [np.tanh(a + 0.1 * (seed + 1)).astype(np.float32) for a in arrays]
        metrics = {"num-examples": 10 + seed, "train_loss": 1.0, "eval_loss": 1.0}
        return RecordDict(
            {"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics), "client": info}
        )

    return reply


@pytest.mark.parametrize("a_node", [1, 2])
def test_the_first_client_by_name_starts_the_run_while_the_others_prepare(
    tmp_path: Path, monkeypatch, a_node: int
) -> None:
    """Whichever node id it has, client "a" gives the initial weights; "b" prepares meanwhile."""
    from pollen.server import app as server_app

    monkeypatch.setattr(server_app.ModelFiles, "save", lambda self, run_dir, arrays: None)
    b_node = 3 - a_node
    # "b" is listed first: the node Flower lists first is not the one chosen.
    grid = FakeGrid({b_node: _deterministic_client("b", 1), a_node: _deterministic_client("a", 0)})
    cfg = RunConfig(model="cnn", server_eval=False, min_clients=2, round_timeout=5, num_rounds=1)
    server_app.run_federation(grid, cfg.replace(out=str(tmp_path)), tmp_path)
    queries = [
        (m.metadata.dst_node_id, m.content["config"].get("request"))
        for m in grid.sent.values()
        if m.metadata.message_type == MessageType.QUERY
    ]
    assert sorted(q for q in queries if q[1] != "hello") == sorted(
        [(a_node, "initial-arrays"), (b_node, "prepare")]
    )
    assert queries.index((a_node, "initial-arrays")) > max(
        queries.index((n, "hello")) for n in (1, 2)
    )  # names first, so the choice can be made


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch) -> None:
    """Weights and FedAdam's optimizer state survive the checkpoint exactly."""
    from pollen.server import app as server_app

    monkeypatch.setattr(server_app.ModelFiles, "save", lambda self, run_dir, arrays: None)

    def grid():
        return FakeGrid({1: _deterministic_client("a", 0), 2: _deterministic_client("b", 1)})

    base = RunConfig(
        model="cnn", strategy="fedadam", server_eval=False, min_clients=2, round_timeout=5
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    server_app.run_federation(grid(), base.replace(num_rounds=3, out=str(whole)), whole)
    server_app.run_federation(grid(), base.replace(num_rounds=2, out=str(split)), split)
    assert load_checkpoint(split).round == 2
    history = server_app.run_federation(
        grid(), base.replace(num_rounds=3, out=str(split), resume=True), split
    )
    assert [r.round for r in history.rounds] == [1, 2, 3]
    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a.round == b.round == 3
    for k in a.arrays:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=1e-6)
    for k in a.strategy.m_t:
        np.testing.assert_allclose(a.strategy.m_t[k], b.strategy.m_t[k], rtol=1e-6)
        np.testing.assert_allclose(a.strategy.v_t[k], b.strategy.v_t[k], rtol=1e-6)
    assert [r.round for r in b.history.rounds] == [1, 2, 3]
    # FedAdam computes in float64; the global model stays float32 and no update is rejected.
    assert all(a.dtype == np.float32 for a in b.arrays.values())
    assert all(c.error is None for r in history.rounds for c in r.clients)
    assert json.loads((split / "history.json").read_text())["rounds"][-1]["round"] == 3
    with pytest.raises(PollenError, match="already completed all 3 rounds"):
        server_app.run_federation(
            grid(), base.replace(num_rounds=3, out=str(split), resume=True), split
        )


# --- pollen server --resume: options -----------------------------------------------------------


def _saved_run(tmp_path: Path, status: str = "running") -> Path:
    from pollen.server.history import write_status

    run = tmp_path / "run"
    cfg = RunConfig(model="cnn", num_classes=3, num_rounds=4, local_epochs=2, out=str(run))
    save_checkpoint(run, 2, {"0": np.zeros(2)}, FedAvg(), _history(2), cfg.to_mapping())
    write_status(run, status)
    return run


def _server_args(*argv: str):
    from pollen.cli.app import build_parser

    return build_parser().parse_args(["server", *argv])


def test_resume_takes_the_saved_options(tmp_path: Path) -> None:
    from pollen.cli.app import resume_config

    run = _saved_run(tmp_path)
    cfg = resume_config(_server_args("--resume", str(run), "--model", "cnn"), "server")
    assert cfg.resume and cfg.out == str(run)
    assert (cfg.model, cfg.num_classes, cfg.num_rounds, cfg.local_epochs) == ("cnn", 3, 4, 2)
    changed = resume_config(
        _server_args("--resume", str(run), "--min-clients", "1", "--round-timeout", "30"),
        "server",
    )
    assert changed.min_clients == 1 and changed.round_timeout == 30.0


def test_resume_refuses_conflicting_options(tmp_path: Path) -> None:
    from pollen.cli.app import resume_config

    run = _saved_run(tmp_path)
    with pytest.raises(PollenError) as err:
        resume_config(_server_args("--resume", str(run), "--epochs", "5", "--lr", "0.1"), "server")
    assert "--epochs 5 (the run has 2)" in str(err.value)
    assert "--lr 0.1 (the run has 0.001)" in str(err.value)


def test_resume_refuses_completed_and_missing_runs(tmp_path: Path) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="completed")
    assert main(["server", "--resume", str(run), "--address", "127.0.0.1:1"]) == 2
    assert main(["server", "--resume", str(tmp_path / "nothing"), "--address", "127.0.0.1:1"]) == 2


def test_resume_messages(tmp_path: Path, capsys) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="completed")
    main(["server", "--resume", str(run), "--address", "127.0.0.1:1"])
    assert (
        "has already completed (2 rounds); there is nothing to continue" in capsys.readouterr().err
    )
    main(["server", "--resume", str(tmp_path / "nothing"), "--address", "127.0.0.1:1"])
    assert "there is no checkpoint there" in capsys.readouterr().err


def test_a_new_run_does_not_overwrite_an_unfinished_one(tmp_path: Path, capsys) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="interrupted")
    assert main(["server", "--out", str(run), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (last completed round 2, status interrupted)" in err
    assert f"--resume {run}" in err


def test_simulate_resume_keeps_the_number_of_clients(tmp_path: Path) -> None:
    from pollen.cli.app import SIMULATION_FILE, _simulated_clients

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(PollenError, match="not a run of `pollen simulate`"):
        _simulated_clients(run, 2)
    (run / SIMULATION_FILE).write_text('{"clients": 3}\n')
    assert _simulated_clients(run, 2) == 3  # 2 = the default: not given
    assert _simulated_clients(run, 3) == 3
    with pytest.raises(PollenError, match="simulated 3 clients, not 4"):
        _simulated_clients(run, 4)


# --- end to end ---------------------------------------------------------------------------------

CNN = ("--model", "cnn", "--num-classes", "3", "--lr", "0.003", "--bn-calibration-examples", "32")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (its own sessions included): a crash."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Fleet:
    """Server and client processes of one test, with logs, cleaned up afterwards."""

    def __init__(self, tmp_path: Path, env: dict) -> None:
        self.tmp, self.env = tmp_path, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 - closed in close()
        self.files.append(log)
        proc = subprocess.Popen(
            pollen_cmd(*args),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Like a command started from a terminal: Ctrl-C is not ignored. A shell that
            # runs pytest in the background (`.ci/run &`) sets SIGINT to "ignore", which
            # every child inherits; Python then never raises KeyboardInterrupt.
            preexec_fn=_default_sigint,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()
        for f in self.files:
            f.close()


@pytest.fixture
def fleet(tmp_path, pollen_env):
    f = Fleet(tmp_path, pollen_env)
    yield f
    f.close()


def _server(fleet: Fleet, port: int, run: Path, *extra: str, name: str = "server"):
    return fleet.start(
        name, "server", "--address", f"127.0.0.1:{port}", "--out", str(run), *CNN, *extra
    )


def _client(fleet: Fleet, port: int, data: Path, i: int, n: int, name: str, *extra: str):
    return fleet.start(
        name,
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data),
        "--partition-id",
        str(i),
        "--num-partitions",
        str(n),
        "--name",
        name,
        *extra,
    )


def _read_history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.mark.e2e
def test_a_client_killed_mid_training_is_recorded_and_the_run_goes_on(fleet, tmp_path, tiny_data):
    from conftest import free_port

    port, run = free_port(), tmp_path / "run"
    server = _server(
        fleet, port, run, "--rounds", "2", "--min-clients", "2", "--epochs", "25",
        "--round-timeout", "40",
    )  # fmt: skip
    for i, name in enumerate(("alice", "bob", "victim")):
        _client(fleet, port, tiny_data, i, 3, name)
    # Kill the victim (its whole process tree: a crash) once its round-1 training runs.
    _wait_for(lambda: "Epoch 1/25" in fleet.log("victim"), 150, "the victim's training")
    _kill_tree(fleet.procs["victim"].pid)
    assert server.wait(timeout=240) == 0, fleet.log("server")[-4000:]
    for name in ("alice", "bob"):
        assert fleet.procs[name].wait(timeout=60) == 0, fleet.log(name)[-3000:]

    assert _status(run)["status"] == "completed"
    rounds = _read_history(run)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    first = {c["name"]: c for c in rounds[0]["clients"]}
    assert first["victim"]["error"].startswith("train: "), first["victim"]
    assert first["victim"]["train_examples"] is None
    for name in ("alice", "bob"):
        assert first[name]["error"] is None and first[name]["train_examples"] == 24
    assert rounds[0]["train"]["examples"] == 48
    assert "victim" in fleet.log("server")  # the failure is logged with the client's name


@pytest.mark.e2e
def test_nan_updates_and_a_foreign_model_are_rejected_and_named(tmp_path, tiny_data, pollen_env):
    run = tmp_path / "run"
    proc = subprocess.run(
        pollen_cmd(
            "simulate", "--clients", "3", "--min-clients", "1", "--rounds", "2", *CNN,
            "--data-dir", str(tiny_data), "--out", str(run), "--fault", "nan@1 arch@2",
        ),
        env=pollen_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    rounds = _read_history(run)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        clients = {c["name"]: c for c in r["clients"]}
        assert clients["partition-0"]["error"] is None
        assert clients["partition-1"]["error"] == (
            "train: rejected: update has NaN/inf values (array 0)"
        )
        arch = clients["partition-2"]["error"]
        assert arch.startswith("train: ") and "does not match this client's model" in arch
        assert "Every client must build the same architecture" in arch
        assert "<class" not in arch  # readable, not Flower's repr
        # Only the honest client's update is in the aggregate.
        assert r["train"]["examples"] == clients["partition-0"]["train_examples"] == 24
    assert "update of client partition-1 rejected" in output
    assert "does not match this client's model" in output  # the client's side says it too
    assert np.isfinite(rounds[-1]["server"]["loss"])


@pytest.mark.e2e
def test_a_killed_server_resumes_and_its_clients_rejoin(fleet, tmp_path, tiny_data):
    from conftest import free_port

    port, run = free_port(), tmp_path / "run"
    first = _server(
        fleet, port, run, "--rounds", "2", "--min-clients", "2", "--strategy", "fedadam"
    )
    for i in range(2):
        _client(fleet, port, tiny_data, i, 2, f"c{i}", "--connect-timeout", "120")
    manifest = run / "checkpoint" / "manifest.json"
    _wait_for(manifest.exists, 180, "round 1's checkpoint")
    _kill_tree(first.pid)
    first.wait()
    assert _status(run)["status"] == "running"  # killed: nobody wrote a final status
    saved = json.loads(manifest.read_text())["round"]
    assert saved >= 1

    second = fleet.start(
        "resumed", "server", "--resume", str(run), "--address", f"127.0.0.1:{port}"
    )
    assert second.wait(timeout=300) == 0, fleet.log("resumed")[-4000:]
    for i in range(2):  # never restarted by the test
        assert fleet.procs[f"c{i}"].wait(timeout=60) == 0, fleet.log(f"c{i}")[-3000:]
        assert "joining the server again" in fleet.log(f"c{i}")

    assert _status(run)["status"] == "completed"
    history = _read_history(run)
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert {c["name"] for c in r["clients"]} == {"c0", "c1"}
        assert all(c["error"] is None for c in r["clients"])
    assert f"Resuming after round {saved} of 2" in fleet.log("resumed")
    ckpt = load_checkpoint(run)
    assert ckpt.round == 2 and isinstance(ckpt.strategy, FedAdam)

    # Resuming a completed run is refused with a clear message.
    again = subprocess.run(
        pollen_cmd("server", "--resume", str(run), "--address", f"127.0.0.1:{free_port()}"),
        env=fleet.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2
    assert "has already completed" in again.stderr


def _signal_state(pid: int) -> str:
    """The SigBlk/SigIgn/SigCgt masks of every thread of ``pid`` (Linux /proc)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        keep = ("SigBlk", "SigIgn", "SigCgt")
        masks = [line.replace("\t", "") for line in status if line.startswith(keep)]
        lines.append(f"thread {task.name}: " + " ".join(masks))
    return "; ".join(lines) or "no /proc"


@pytest.mark.e2e
def test_ctrl_c_stops_the_server_cleanly_and_says_how_to_resume(fleet, tmp_path, tiny_data):
    from conftest import free_port

    port, run = free_port(), tmp_path / "run"
    server = _server(fleet, port, run, "--rounds", "5", "--min-clients", "1")
    _client(fleet, port, tiny_data, 0, 1, "solo")
    _wait_for((run / "checkpoint" / "manifest.json").exists, 180, "round 1's checkpoint")
    tree = descendants(server.pid)
    assert len(tree) > 3  # pollen, flwr run, SuperLink, SuperExec, server app, ...
    # What the server process does with signals, for the failure message.
    signals = _signal_state(server.pid)
    server.send_signal(signal.SIGINT)
    # By design the shutdown may take ~50 s: the relay drains for up to 15 s, the
    # SuperLink gets 15 s before SIGKILL, the server app 20 s to release the folder.
    try:
        code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"pollen server did not stop within 120 s of Ctrl-C ({signals}):\n"
            + fleet.log("server")[-3000:]
        )
    assert code == 130, f"({signals})\n" + fleet.log("server")[-3000:]
    time.sleep(2)
    alive = [p for p in tree if is_running(p)]
    assert not alive, f"left behind: {alive}"
    status = _status(run)
    assert status["status"] == "interrupted"
    assert status["last_completed_round"] >= 1
    assert f"pollen server --resume {run}" in fleet.log("server")
    assert load_checkpoint(run).round == status["last_completed_round"]
