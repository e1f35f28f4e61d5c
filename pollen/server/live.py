"""The run's live state in ``live.json``: what a status page shows between rounds.

``history.json`` holds completed rounds; :class:`LiveStatus` adds what happens
before and between them: which round runs now, and per client its name, when
it last replied, how many rounds it completed and how many it failed. The
ServerApp writes it (atomically, like every run-folder file) when the clients
are known and after each round; :mod:`pollen.deploy.dashboard` reads it.

Client names reach the file only as :func:`pollen.server.history.printable`
made them (:func:`pollen.server.exchange.client_name`); the page shows them as
text, never as markup.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from pollen.files import atomic_write
from pollen.server.history import History, RoundRecord, printable

#: The file in the run folder.
LIVE_FILE = "live.json"

#: Most clients listed in the file (a larger federation lists those seen last).
MAX_CLIENTS = 500

#: Phases of a run as the file names them.
WAITING, ROUND, DONE = "waiting for clients", "round", "done"


@dataclass
class LiveClient:
    """One client as the status page shows it.

    Attributes:
        name: The name it told (printable, bounded).
        joined: When the server first knew it (seconds since the epoch).
        last_seen: When it last replied in a completed round (None: not yet).
        rounds: Rounds it took part in without failing.
        failures: Rounds it failed in (an error, an invalid update or no reply).
        last_error: The reason of its last failure.
    """

    name: str
    joined: float
    last_seen: float | None = None
    rounds: int = 0
    failures: int = 0
    last_error: str | None = None


def _recency(client: LiveClient) -> float:
    return client.last_seen or client.joined


class LiveStatus:
    """A :class:`pollen.server.rounds.RoundObserver` that keeps ``live.json`` up to date.

    Args:
        run_dir: The run folder.
        num_rounds: The run's last round.
        names: Client names by node id, as the server learns them (read, never changed).
        clock: Seconds since the epoch (tests pass their own).
    """

    def __init__(
        self,
        run_dir: Path,
        num_rounds: int,
        names: dict[int, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = run_dir / LIVE_FILE
        self.num_rounds = num_rounds
        self.names = names
        self.clock = clock
        self.clients: dict[int, LiveClient] = {}
        self.phase = WAITING
        self.round = 0
        self._lock = threading.Lock()

    def waiting(self) -> None:
        """The server waits for ``min-clients`` to connect."""
        with self._lock:
            self.phase = WAITING
            self._write()

    def begin(self, history: History, first_round: int) -> None:
        """The clients are known and ``first_round`` starts.

        A resumed run's ``history`` (its completed rounds) counts too.
        """
        with self._lock:
            self._add_known()
            for record in history.rounds:
                self._count(record, None)
            self.phase, self.round = ROUND, first_round
            self._write()

    def round_done(
        self, record: RoundRecord, arrays: Any = None, history: Any = None, strategy: Any = None
    ) -> None:
        """After ``record``'s round: count each client's part; the next round is current."""
        with self._lock:
            self._add_known()
            self._count(record, self.clock())
            if record.round >= self.num_rounds:
                self.phase, self.round = DONE, record.round
            else:
                self.phase, self.round = ROUND, max(self.round, record.round + 1)
            self._write()

    def snapshot(self) -> dict[str, Any]:
        """The content of ``live.json``."""
        recent = sorted(self.clients.values(), key=_recency, reverse=True)
        listed = recent[:MAX_CLIENTS]
        return {
            "phase": self.phase,
            "round": self.round,
            "num_rounds": self.num_rounds,
            "updated": self.clock(),
            "clients": [asdict(c) for c in sorted(listed, key=lambda c: c.name)],
        }

    def _add_known(self) -> None:
        now = self.clock()
        for node, name in list(self.names.items()):
            if node not in self.clients:
                self.clients[node] = LiveClient(name=printable(name), joined=now)

    def _count(self, record: RoundRecord, seen: float | None) -> None:
        for part in record.clients:
            client = self.clients.get(part.node_id)
            if client is None:
                client = LiveClient(name=printable(part.name), joined=seen or self.clock())
                self.clients[part.node_id] = client
            if part.error:
                client.failures += 1
                client.last_error = part.error
            else:
                client.rounds += 1
                if seen is not None:
                    client.last_seen = seen

    def _write(self) -> None:
        """Write the file; a failure is logged, never raised: the page is not worth a run."""
        try:
            atomic_write(self.path, json.dumps(self.snapshot(), indent=1) + "\n")
        except OSError as err:
            log(WARNING, "Could not update %s: %s", self.path, err)


class Observers:
    """Several :class:`pollen.server.rounds.RoundObserver` s as one, told in order."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def round_done(self, record: RoundRecord, arrays: Any, history: Any, strategy: Any) -> None:
        """Tell each observer, in order."""
        for observer in self.observers:
            observer.round_done(record, arrays, history, strategy)
