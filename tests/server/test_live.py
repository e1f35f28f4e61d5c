"""live.json: the round now running and each client's part, for the status page."""

from __future__ import annotations

import json

from pollen.server.history import ClientRound, History, RoundRecord
from pollen.server.live import DONE, LIVE_FILE, ROUND, WAITING, LiveStatus, Observers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read(run_dir):
    return json.loads((run_dir / LIVE_FILE).read_text())


def test_live_file_follows_the_rounds(tmp_path):
    clock = Clock()
    names: dict[int, str] = {}
    live = LiveStatus(tmp_path, 2, names, clock=clock)
    live.waiting()
    assert read(tmp_path) | {"updated": 0} == {
        "phase": WAITING,
        "round": 0,
        "num_rounds": 2,
        "updated": 0,
        "clients": [],
    }
    names.update({11: "alice", 22: "bob\x1b[2J"})  # a name with a terminal escape
    live.begin(History(config={}), 1)
    state = read(tmp_path)
    assert (state["phase"], state["round"]) == (ROUND, 1)
    assert [c["name"] for c in state["clients"]] == ["alice", "bob?[2J"]
    assert all(c["last_seen"] is None and c["rounds"] == 0 for c in state["clients"])

    clock.now = 1010.0
    live.round_done(
        RoundRecord(
            round=1,
            clients=[ClientRound(11, "alice"), ClientRound(22, "bob", error="timed out")],
        )
    )
    state = read(tmp_path)
    assert (state["phase"], state["round"]) == (ROUND, 2)
    alice, bob = state["clients"]
    assert (alice["rounds"], alice["failures"], alice["last_seen"]) == (1, 0, 1010.0)
    assert (bob["rounds"], bob["failures"], bob["last_seen"]) == (0, 1, None)
    assert bob["last_error"] == "timed out"

    clock.now = 1020.0
    live.round_done(RoundRecord(round=2, clients=[ClientRound(11, "alice"), ClientRound(22, "b")]))
    state = read(tmp_path)
    assert (state["phase"], state["round"]) == (DONE, 2)
    assert [(c["rounds"], c["last_seen"]) for c in state["clients"]] == [(2, 1020.0), (1, 1020.0)]


def test_a_resumed_run_counts_its_completed_rounds(tmp_path):
    history = History(config={}, rounds=[RoundRecord(round=1, clients=[ClientRound(5, "carol")])])
    live = LiveStatus(tmp_path, 3, {}, clock=Clock())
    live.begin(history, 2)
    state = read(tmp_path)
    assert state["round"] == 2
    assert [(c["name"], c["rounds"]) for c in state["clients"]] == [("carol", 1)]


def test_a_failed_write_does_not_stop_the_run(tmp_path):
    (tmp_path / "file").write_text("")
    live = LiveStatus(tmp_path / "file", 1, {})  # its folder is a file: every write fails
    live.waiting()
    live.round_done(RoundRecord(round=1))
    assert live.phase == DONE


def test_observers_are_told_in_order():
    told = []

    class Probe:
        def __init__(self, name):
            self.name = name

        def round_done(self, record, arrays, history, strategy):
            told.append((self.name, record.round))

    Observers(Probe("a"), Probe("b")).round_done(RoundRecord(round=4), None, None, None)
    assert told == [("a", 4), ("b", 4)]
