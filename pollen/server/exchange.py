"""Talking to clients with hard deadlines: exchanges, quorum waits and small queries.

Every exchange with clients returns by its deadline (:func:`exchange`),
whatever the SuperLink does; a client that does not reply in time is
reported missing, never waited for.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from pollen.compat.flower import is_simulation_grid
from pollen.compress import Codec
from pollen.errors import PollenError
from pollen.protocol import PREPARE_REQUEST, RUN_OVER_REQUEST
from pollen.server.history import MAX_REASON_CHARS, printable
from pollen.server.replies import ModelReference, initial_arrays_problem
from pollen.server.sampling import simulated_names
from pollen.wire import content_bytes, pack_content, unpack_reply


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord's arrays in bytes."""
    return int(sum(len(a.data) for a in record.values()))


def arrays_bytes(content: RecordDict) -> int:
    """Payload bytes of the ArrayRecords of a message's content."""
    return sum(record_bytes(r) for r in content.array_records.values())


_FLOWER_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.DOTALL)


def readable_reason(reason: str) -> str:
    """Turn Flower's ``"<class 'pkg.Error'>:<'message'>"`` into ``"Error: message"``.

    A :class:`PollenError` raised in a client app becomes just its message,
    which already says what is wrong and what to do. The client chose the
    text: it comes back :func:`printable`, at most :data:`MAX_REASON_CHARS` long.
    """
    return printable(_reason_text(str(reason)), MAX_REASON_CHARS)


def _reason_text(reason: str) -> str:
    text = reason.strip()
    match = _FLOWER_REASON.match(text)
    if match is None:
        return text
    cls, message = match.group(1), match.group(2).strip()
    # The simulation engine wraps the client's exception in a ClientAppException
    # (inside Ray's RayTaskError, with a traceback) whose message is the original
    # exception's; its class is lost.
    marker = "occurred. Message: "
    if "ClientAppException" in cls and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    if cls.endswith("PollenError"):
        return message
    return f"{cls.rsplit('.', 1)[-1]}: {message}"


# --- one batch of messages within a deadline ------------------------------------------


@dataclass
class Exchange:
    """What came back from one batch of messages within its deadline.

    Attributes:
        replies: Reply per destination node id (possibly error replies).
        missing: Node ids that did not reply before the deadline.
        sent_bytes: Bytes of the arrays sent to each node, as they travelled
            (packed, compressed; see :func:`pollen.wire.content_bytes`).
        received_bytes: Bytes of the arrays of each node's reply, as they travelled.
    """

    replies: dict[int, Message] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    sent_bytes: dict[int, int] = field(default_factory=dict)
    received_bytes: dict[int, int] = field(default_factory=dict)


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    timeout: float,
    poll_interval: float = 0.25,
    *,
    pack: bool = True,
    codec: Codec | None = None,
    base: ArrayRecord | None = None,
) -> Exchange:
    """Send ``messages`` and collect their replies, returning after ``timeout`` at most.

    With ``pack`` (the default) the messages' records travel packed
    (:mod:`pollen.wire`) and the replies come back unpacked. Flower's SecAgg+
    workflow exchanges its messages as they are (``pack=False``).

    Flower's ``Grid.send_and_receive`` can block far beyond its timeout (a
    reply whose content never reaches the SuperLink is retried for hours).
    Here the replies are pulled by a few daemon threads (at most
    :data:`MAX_PULL_THREADS`, however many clients; each pulls its share of
    the replies in one request a poll), and the caller waits for them until
    the deadline only; a thread still stuck then is abandoned (its late
    results are dropped) and the nodes it had not heard from are reported
    missing.

    Args:
        grid: The run's grid.
        messages: One message per destination node.
        timeout: Seconds until the exchange returns at the latest.
        poll_interval: Seconds between two requests for the outstanding replies.
        pack: Pack the messages' content and unpack the replies'.
        codec: Compress the weights (``arrays``) sent with it (:mod:`pollen.compress`).
        base: The weights the messages carry whole: a reply's weights sent as
            a change to them (a compressed update) are rebuilt from them.
    """
    messages = list(messages)
    if not messages:
        return Exchange()
    for m in messages if pack else ():  # a few objects on the wire, not one per array
        m.content = pack_content(m.content, codec)
    destinations = [m.metadata.dst_node_id for m in messages]
    sent = {m.metadata.dst_node_id: content_bytes(m.content) for m in messages}
    deadline = time.monotonic() + timeout
    message_ids = list(grid.push_messages(messages))
    if len(message_ids) != len(messages):  # Flower refused the batch (e.g. too large)
        log(WARNING, "Flower accepted %d of %d messages", len(message_ids), len(messages))
        return Exchange(missing=destinations)
    pulls = _Pulls(grid, deadline, poll_interval, base)
    pulls.result.sent_bytes = sent
    return pulls.collect(zip(message_ids, destinations, strict=True), destinations)


MAX_PULL_THREADS = 8
"""Threads that pull one exchange's replies, whatever the number of clients.

Each thread pulls its share of the outstanding replies with one ``pull_messages``
call per poll: the SuperLink sees a few requests per poll interval, not one per
client. More than one thread so that a reply whose objects never arrive (Flower's
pull then blocks) holds back only its share; the caller returns by the deadline in
any case.
"""


class _Pulls:
    """At most :data:`MAX_PULL_THREADS` daemon threads pulling the replies until the deadline."""

    def __init__(
        self, grid: Grid, deadline: float, poll_interval: float, base: ArrayRecord | None = None
    ) -> None:
        self.grid = grid
        self.base = base
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.result = Exchange()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.done = threading.Event()  # every pull thread has ended
        self.running = 0

    def collect(self, pushed: Iterable[tuple[str, int]], destinations: list[int]) -> Exchange:
        """Pull the replies of ``pushed`` ``(message id, node)``; return by the deadline."""
        pushed = [(mid, node) for mid, node in pushed if mid]  # "": Flower could not push it
        shares = [pushed[i::MAX_PULL_THREADS] for i in range(MAX_PULL_THREADS)]
        shares = [dict(share) for share in shares if share]
        self.running = len(shares)
        for share in shares:
            threading.Thread(target=self._run, args=(share,), daemon=True).start()
        # Wait in short slices: a signal raised by another thread (Flower's parent-process
        # monitor stops the app that way) is only handled when this thread runs again.
        # The last reply ends the wait at once.
        while pushed and not self.done.is_set() and time.monotonic() < self.deadline:
            self.done.wait(min(0.2, max(0.0, self.deadline - time.monotonic())))
        with self.lock:
            self.stop.set()
            self.result.missing = [n for n in destinations if n not in self.result.replies]
        return self.result

    def _run(self, share: dict[str, int]) -> None:
        try:
            self._pull(share)
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    self.done.set()

    def _pull(self, share: dict[str, int]) -> None:
        """Pull the replies to ``share`` (message id -> node) until all are in or time is up."""
        while share and not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                replies = list(self.grid.pull_messages(list(share)))
            except Exception as err:  # noqa: BLE001 - those nodes are reported missing
                log(WARNING, "Pulling the replies of %d clients failed: %s", len(share), err)
                replies = []
            for reply in replies:
                node = share.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    self._keep(node, reply)
            if share:
                self.stop.wait(self.poll_interval)

    def _keep(self, node: int, reply: Message) -> None:
        size = content_bytes(reply.content) if reply.has_content() else 0
        # A malformed reply becomes an error reply: that client's failure.
        unpacked = unpack_reply(reply, self.base)
        with self.lock:
            if not self.stop.is_set():
                self.result.replies[node] = unpacked
                self.result.received_bytes[node] = size


# --- waiting for clients and small queries --------------------------------------------


def wait_for_clients(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Block until ``minimum`` clients are connected; return their node ids.

    Raises:
        PollenError: Fewer than ``minimum`` connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last_logged = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise PollenError(
                f"Only {len(nodes)} of the {minimum} clients needed connected within "
                f"{timeout:.0f} s. Start more clients (pollen client --server HOST:PORT) "
                "or lower --min-clients."
            )
        if len(nodes) != last_logged:
            log(INFO, "Waiting for clients: %d of %d connected", len(nodes), minimum)
            last_logged = len(nodes)
        time.sleep(0.25)


def wait_for_quorum(grid: Grid, min_clients: int, timeout: float, rnd: int) -> None:
    """:func:`wait_for_clients` before round ``rnd``, failing with how to resume the run."""
    try:
        wait_for_clients(grid, min_clients, timeout)
    except PollenError as err:
        raise PollenError(
            f"Round {rnd} cannot go on: {err} The last completed round is checkpointed; "
            "continue later with `--resume RUN_DIR`."
        ) from None


def _query(node: int, request: str) -> Message:
    """A QUERY message to ``node`` asking ``request``."""
    return Message(
        RecordDict({"config": ConfigRecord({"request": request})}),
        dst_node_id=node,
        message_type=MessageType.QUERY,
    )


def request_initial_arrays(
    grid: Grid,
    node_id: int,
    timeout: float,
    *,
    reference: Callable[[], ModelReference],
    prepare: Iterable[int] = (),
) -> tuple[ArrayRecord, ConfigRecord]:
    """Ask one client for freshly initialised weights (the server aggregates without a model).

    The clients in ``prepare`` are asked at the same time to load their data
    and build their model (:data:`PREPARE_REQUEST`), so that round 1 does not
    wait for their start-up. A client that fails to prepare is only logged
    here; round 1 records what becomes of it.

    The weights are checked against the run's model, freshly initialised
    (:func:`pollen.server.replies.initial_arrays_problem`); ``reference``
    gives it, asked once the reply is in (the server builds the model
    meanwhile).

    Returns:
        The weights, and what the client says about itself (``name``, ``classes``).

    Raises:
        PollenError: ``node_id`` did not provide usable weights within ``timeout``.
    """
    messages = [
        _query(node, request)
        for node, request in [
            (node_id, "initial-arrays"),
            *((n, PREPARE_REQUEST) for n in dict.fromkeys(prepare) if n != node_id),
        ]
    ]
    replies = exchange(grid, messages, timeout).replies
    for node, other in replies.items():
        if node != node_id and other.has_error():
            reason = readable_reason(other.error.reason)
            log(WARNING, "Client %s could not prepare for round 1: %s", node, reason)
    reply = replies.get(node_id)
    if reply is None or reply.has_error():
        reason = readable_reason(reply.error.reason) if reply is not None else "no reply"
        raise PollenError(
            f"Client {node_id} could not provide the initial model weights ({reason}). "
            "Check that client's console for the error."
        )
    arrays = reply.content.array_records.get("arrays")
    problem = initial_arrays_problem(arrays, reference())
    if problem is not None:
        raise PollenError(
            f"Client {node_id} sent unusable initial model weights ({problem}). "
            "Check that this client runs Pollen's own client app."
        )
    info = reply.content.config_records.get("client")
    return arrays, info if isinstance(info, ConfigRecord) else ConfigRecord()


def learn_names(grid: Grid, node_ids: Iterable[int], names: dict[int, str], timeout: float) -> None:
    """Ask clients not in ``names`` for their names (a light query, no model).

    Knowing every sampled client's name before it trains means a client that
    then dies without replying is still named in the history. A simulation's
    clients are not asked: their names are known (:func:`simulated_names`).
    """
    node_ids = list(node_ids)
    if any(node not in names for node in node_ids):
        names.update(simulated_names(grid))
    messages = [_query(node, "hello") for node in node_ids if node not in names]
    for node, reply in exchange(grid, messages, timeout).replies.items():
        if reply.has_content():
            names[node] = client_name(reply, node)


def client_name(msg: Message, node: int | None = None) -> str:
    """The name a client's reply gives, or ``node-<id>`` when it gives none.

    The client chose the name: it comes back :func:`printable` and at most
    :data:`pollen.server.history.MAX_NAME_CHARS` long (a name that is not a
    string, or empty once cleaned, counts as none), so it lands safely in the
    history, the status and the console.
    """
    info = msg.content.config_records.get("client") if msg.has_content() else None
    name = info.get("name") if info is not None else None
    if isinstance(name, str) and name.strip():
        return printable(name.strip())
    return f"node-{msg.metadata.src_node_id if node is None else node}"


#: Seconds the server waits at least for its clients to acknowledge the end of the run
#: (:func:`run_over_timeout`). It returns as soon as all have; a client that never hears
#: of it waits for the server until its --connect-timeout and exits non-zero. 15 s was
#: too short for 25 clients sharing 2 loaded cores (4 of them missed it,
#: benchmarks/scale_deploy.py).
RUN_OVER_TIMEOUT = 60.0


def run_over_timeout(round_seconds: Iterable[float], round_timeout: float) -> float:
    """How long the server waits for its clients to acknowledge the end of the run.

    A client still busy with the last round's work (a late evaluation the round
    no longer waited for) pulls the notice only once that is done, and a round
    takes that client up to as long as the rounds so far took. So: the longest
    round so far, at least :data:`RUN_OVER_TIMEOUT`, at most ``round_timeout``.
    At 50 clients on 2 cores (rounds of 220-380 s) 3 clients missed a 60-s wait.

    Args:
        round_seconds: The seconds of the rounds recorded so far.
        round_timeout: The run's ``--round-timeout``.
    """
    longest = max(round_seconds, default=0.0)
    return max(RUN_OVER_TIMEOUT, min(longest, round_timeout))


def announce_run_over(grid: Grid, timeout: float = RUN_OVER_TIMEOUT) -> None:
    """Tell every connected client that the run is over (they then exit).

    Not in a simulation: its clients have no process to end, and a message to
    each of 10,000 simulated clients would cost minutes (docs/scale.md).

    Args:
        grid: The run's grid.
        timeout: Seconds to wait for the clients' acknowledgements (returns when all did).
    """
    if is_simulation_grid(grid):
        return
    messages = [_query(node, RUN_OVER_REQUEST) for node in grid.get_node_ids()]
    if not messages:
        return
    missing = exchange(grid, messages, timeout).missing
    if missing:
        log(
            WARNING,
            "%d of %d clients did not acknowledge the end of the run within %.0f s; they "
            "will wait for the server until their --connect-timeout, then exit",
            len(missing),
            len(messages),
            timeout,
        )
