"""Talking to clients: readable reasons, and exchanges that keep their deadline."""

from __future__ import annotations

import threading
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from server_fakes import FakeGrid, _trainer
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen.server.exchange import (
    RUN_OVER_TIMEOUT,
    exchange,
    readable_reason,
    run_over_timeout,
)


def test_the_end_of_run_wait_grows_with_the_rounds_within_the_round_timeout() -> None:
    """A client busy with the last round's late work hears of the end only when done."""
    assert run_over_timeout([], 3600) == RUN_OVER_TIMEOUT  # no round recorded yet
    assert run_over_timeout([4.0, 9.5], 3600) == RUN_OVER_TIMEOUT  # quick rounds: the floor
    assert run_over_timeout([380.8, 275.8], 3600) == 380.8  # 50 clients on 2 cores
    assert run_over_timeout([380.8], 300) == 300  # never past the round timeout


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


# --- what clients chose: names and error reasons -----------------------------------------------


def test_client_names_are_printable_and_bounded() -> None:
    from pollen.server.exchange import learn_names

    def named(name):
        return lambda msg: RecordDict({"client": ConfigRecord({"name": name})})

    grid = FakeGrid(
        {1: named("ok"), 2: named("\x1b[2Jevil\nname" + "x" * 500), 3: named("  "), 4: named(7)}
    )
    names: dict[int, str] = {}
    learn_names(grid, [1, 2, 3, 4], names, 2.0)
    assert names[1] == "ok" and names[3] == "node-3" and names[4] == "node-4"
    assert names[2].startswith("?[2Jevil name") and len(names[2]) == 64
    assert names[2].isprintable()


def test_error_reasons_from_clients_are_printable_and_bounded() -> None:
    reason = readable_reason("<class 'ValueError'>:<'\x1b[31mred\r\n" + "y" * 5000 + "'>")
    assert reason.startswith("ValueError: ?[31mred") and reason.isprintable()
    assert len(reason) == 500


# --- many clients: bounded threads and requests ------------------------------------------------


def test_exchange_threads_and_pull_requests_do_not_grow_with_the_clients() -> None:
    """200 clients: at most MAX_PULL_THREADS pulling threads, a few requests per poll."""
    from pollen.server.exchange import MAX_PULL_THREADS

    class CountingGrid(FakeGrid):  # replies are there from the third pull of a message on
        def __init__(self, behaviours: dict) -> None:
            super().__init__(behaviours)
            self.seen: dict[str, int] = {}
            self.threads: set[int] = set()

        def pull_messages(self, message_ids):
            self.threads.add(threading.get_ident())
            ready = []
            for mid in message_ids:
                self.seen[mid] = self.seen.get(mid, 0) + 1
                if self.seen[mid] >= 3:
                    ready.append(mid)
            return super().pull_messages(ready)

    nodes = range(1, 201)
    grid = CountingGrid({n: _trainer(f"c{n}") for n in nodes})
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"request": "hello"})}), n, MessageType.QUERY)
        for n in nodes
    ]
    before = threading.active_count()
    result = exchange(grid, msgs, timeout=10.0, poll_interval=0.01)
    assert set(result.replies) == set(nodes) and not result.missing
    assert len(grid.threads) <= MAX_PULL_THREADS
    assert grid.pulls == 3 * MAX_PULL_THREADS  # three polls of each share, not 3 x 200
    time.sleep(0.1)
    assert threading.active_count() <= before  # the pulling threads have ended


def test_a_hanging_pull_holds_back_only_its_share() -> None:
    """One client whose reply never arrives: the others' replies still come in."""
    from pollen.server.exchange import MAX_PULL_THREADS

    nodes = range(1, 3 * MAX_PULL_THREADS + 1)
    grid = FakeGrid({n: "hang" if n == 1 else _trainer(f"c{n}") for n in nodes})
    msgs = [
        Message(RecordDict({"config": ConfigRecord({"request": "hello"})}), n, MessageType.QUERY)
        for n in nodes
    ]
    result = exchange(grid, msgs, timeout=1.5, poll_interval=0.05)
    grid.release.set()
    # FakeGrid answers a batch after its hanging member: only node 1's share is lost.
    assert len(result.replies) == len(nodes) - 3
    assert 1 in result.missing and len(result.missing) == 3
