"""The round loop: send the global weights, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs rounds too, but offers no hook between
rounds; Pollen needs one to record per-client history, write outputs and a
checkpoint after every round, and stop at a target accuracy. So this loop
drives the strategy's own ``configure_*``/``aggregate_*`` methods, exactly as
``Strategy.start`` does, and calls :class:`RoundObserver` after each round.

Fault tolerance lives here too: every exchange with clients has a hard
deadline (:func:`exchange`), every update is checked before aggregation
(:func:`validate_update`), failures are recorded per client, and a round
needs ``min_clients`` valid updates.

The arithmetic (FedAvg's weighted mean, merging BatchNorm statistics,
checking updates) lives in :mod:`pollen.server.aggregation`, free of Flower and Keras.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen.errors import PollenError
from pollen.protocol import NUM_EXAMPLES_KEY, PREPARE_REQUEST, RUN_OVER_REQUEST
from pollen.server.aggregation import merge_batchnorm_stats, validate_update
from pollen.server.history import ClientRound, History, RoundRecord
from pollen.server.privacy import privacy_record
from pollen.server.strategies import seeded_sampling
from pollen.wire import NOT_HELD, HeldWeights, pack_content, unpack_content

EvaluateFn = Callable[[int, ArrayRecord], "dict[str, float] | None"]
#: A round's train phase: :func:`train_phase` or a replacement with its signature.
TrainPhase = Callable[..., ArrayRecord]


# --- helpers -------------------------------------------------------------------


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord's arrays in bytes."""
    return int(sum(len(a.data) for a in record.values()))


_FLOWER_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.DOTALL)


def readable_reason(reason: str) -> str:
    """Turn Flower's ``"<class 'pkg.Error'>:<'message'>"`` into ``"Error: message"``.

    A :class:`PollenError` raised in a client app becomes just its message,
    which already says what is wrong and what to do.
    """
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


# --- talking to clients with a deadline -------------------------------------------


@dataclass
class Exchange:
    """What came back from one batch of messages within its deadline.

    Attributes:
        replies: Reply per destination node id (possibly error replies).
        missing: Node ids that did not reply before the deadline.
    """

    replies: dict[int, Message] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    timeout: float,
    poll_interval: float = 0.25,
    *,
    pack: bool = True,
) -> Exchange:
    """Send ``messages`` and collect their replies, returning after ``timeout`` at most.

    With ``pack`` (the default) the messages' records travel packed
    (:mod:`pollen.wire`) and the replies come back unpacked. Flower's SecAgg+
    workflow exchanges its messages as they are: packed, its secure aggregate
    came back as one flat vector (tests/test_secagg.py; cause not traced).

    Flower's ``Grid.send_and_receive`` can block far beyond its timeout: when
    a reply's metadata reached the SuperLink but its content never did (the
    client was killed while uploading), ``pull_messages`` keeps retrying the
    missing objects for up to two hours. Here every message is pulled by its
    own daemon thread, and the caller waits for those threads until the
    deadline only; a thread still stuck then is abandoned (its late result is
    dropped) and its node is reported missing.

    Each outstanding reply is asked for every ``poll_interval`` seconds (one
    small request to the SuperLink): a reply waits half that on average
    before the round goes on.
    """
    messages = list(messages)
    if not messages:
        return Exchange()
    for m in messages if pack else ():  # a few objects on the wire, not one per array
        m.content = pack_content(m.content)
    destinations = [m.metadata.dst_node_id for m in messages]
    deadline = time.monotonic() + timeout
    message_ids = list(grid.push_messages(messages))
    result = Exchange()
    if len(message_ids) != len(messages):  # Flower refused the batch (e.g. too large)
        log(WARNING, "Flower accepted %d of %d messages", len(message_ids), len(messages))
        result.missing = destinations
        return result
    lock = threading.Lock()
    stop = threading.Event()
    done = threading.Event()  # every pull thread has ended
    running = [sum(1 for i in message_ids if i)]

    def pull(message_id: str, node: int) -> None:
        try:
            _pull(message_id, node)
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    done.set()

    def _pull(message_id: str, node: int) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                replies = list(grid.pull_messages([message_id]))
            except Exception as err:  # noqa: BLE001 - reported as that node's failure
                log(WARNING, "Pulling the reply of node %s failed: %s", node, err)
                replies = []
            if replies:
                reply = replies[0]
                if reply.has_content():
                    reply.content = unpack_content(reply.content)
                with lock:
                    if not stop.is_set():
                        result.replies[node] = reply
                return
            stop.wait(poll_interval)

    threads = []
    for message_id, node in zip(message_ids, destinations, strict=True):
        if not message_id:  # Flower could not push this one
            continue
        t = threading.Thread(target=pull, args=(message_id, node), daemon=True)
        t.start()
        threads.append(t)
    # Wait in short slices: a signal raised by another thread (Flower's parent-process
    # monitor stops the app that way) is only handled when this thread runs again.
    # The last reply ends the wait at once.
    while threads and not done.is_set() and time.monotonic() < deadline:
        done.wait(min(0.2, max(0.0, deadline - time.monotonic())))
    with lock:
        stop.set()
        result.missing = [n for n in destinations if n not in result.replies]
    return result


# --- the loop -------------------------------------------------------------------


class RoundObserver(Protocol):
    """What the loop tells the outside world after each round."""

    def round_done(
        self, record: RoundRecord, arrays: ArrayRecord, history: History, strategy: Strategy
    ) -> None:
        """Called after every round with the new global arrays.

        ``strategy`` is the strategy as it stood at the end of the round (a
        copy when the call comes while the next round already runs), e.g. for
        a checkpoint.
        """


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


def request_initial_arrays(
    grid: Grid, node_id: int, timeout: float, *, prepare: Iterable[int] = ()
) -> tuple[ArrayRecord, ConfigRecord]:
    """Ask one client for freshly initialised weights (the server has no model).

    The clients in ``prepare`` are asked at the same time to load their data
    and build their model (:data:`PREPARE_REQUEST`), so that round 1 does not
    wait for their start-up: deployed, each does it on its own machine while
    the first one builds the initial weights. A client that fails to prepare
    is only logged here; round 1 records what becomes of it.

    Returns:
        The weights, and what the client says about itself (``name``, ``classes``).

    Raises:
        PollenError: ``node_id`` did not provide the weights within ``timeout``.
    """
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"request": request})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
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
    content = reply.content
    return content["arrays"], content.config_records.get("client", ConfigRecord())


def learn_names(grid: Grid, node_ids: Iterable[int], names: dict[int, str], timeout: float) -> None:
    """Ask clients not in ``names`` for their names (a light query, no model).

    Knowing every sampled client's name before it trains means a client that
    then dies without replying is still named in the history.
    """
    unknown = [n for n in node_ids if n not in names]
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"request": "hello"})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in unknown
    ]
    for node, reply in exchange(grid, messages, timeout).replies.items():
        if reply.has_content():
            names[node] = _client_name(reply, node)


def _client_name(msg: Message, node: int | None = None) -> str:
    info = msg.content.config_records.get("client") if msg.has_content() else None
    if info is not None and "name" in info:
        return str(info["name"])
    return f"node-{msg.metadata.src_node_id if node is None else node}"


class _RoundClients:
    """Per-client records of one round, keyed by node id.

    Args:
        names: Names of clients learned so far (node id to name); replies
            add to it, and clients that never replied are shown by it.
        seed: Seed of the round's client sample (:func:`seeded_sampling`);
            None leaves sampling to Flower's unseeded draw.
    """

    def __init__(self, names: dict[int, str] | None = None, seed: int | None = None) -> None:
        self.by_node: dict[int, ClientRound] = {}
        self.names = names if names is not None else {}
        self.seed = seed

    def sampling(
        self, grid: Grid, rnd: int, timeout: float
    ) -> contextlib.AbstractContextManager[Grid]:
        """The grid to configure round ``rnd``'s phases with, under its seeded sample.

        With a seed, the names of connected clients not yet known are asked
        first (:func:`learn_names`), since the sample is drawn over the
        clients in the order of their names. Each client is asked once a run:
        one that does not answer goes by ``node-<id>`` until a reply of its
        names it, and later rounds do not wait for it again.
        """
        if self.seed is None:
            return contextlib.nullcontext(grid)
        nodes = list(grid.get_node_ids())
        learn_names(grid, nodes, self.names, min(timeout, 15))
        for node in nodes:
            self.names.setdefault(node, f"node-{node}")
        return seeded_sampling(grid, self.names, self.seed, rnd)

    def __call__(self, msg: Message, node: int | None = None) -> ClientRound:
        node = msg.metadata.src_node_id if node is None else node
        if msg.has_content() and "client" in msg.content.config_records:
            self.names[node] = _client_name(msg, node)
        return self.get(node)

    def get(self, node: int) -> ClientRound:
        """The record of ``node``, created on first use."""
        if node not in self.by_node:
            self.by_node[node] = ClientRound(
                node_id=node, name=self.names.get(node, f"node-{node}")
            )
        return self.by_node[node]

    def fail(self, node: int, phase: str, reason: str) -> ClientRound:
        """Record that ``node`` failed ``phase`` of this round because of ``reason``."""
        c = self.get(node)
        text = f"{phase}: {reason}"
        c.error = f"{c.error}; {text}" if c.error else text
        return c

    def sorted(self) -> list[ClientRound]:
        return sorted(self.by_node.values(), key=lambda c: c.name)


def _collect(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    phase: str,
    rnd: int,
    clients: _RoundClients,
) -> list[tuple[int, Message]]:
    """Exchange ``messages``; record error replies and missing replies as failures.

    Returns:
        ``(node id, reply)`` of every reply that carries content.
    """
    return _replies_of(exchange(grid, messages, timeout), timeout, phase, rnd, clients)


def _replies_of(
    result: Exchange, timeout: float, phase: str, rnd: int, clients: _RoundClients
) -> list[tuple[int, Message]]:
    """:func:`_collect` for an exchange already made."""
    ok = []
    for node, msg in result.replies.items():
        if msg.has_error():
            c = clients.fail(node, phase, readable_reason(msg.error.reason))
            log(WARNING, "Round %d: client %s failed to %s: %s", rnd, c.name, phase, c.error)
        else:
            clients(msg, node)
            ok.append((node, msg))
    for node in result.missing:
        c = clients.fail(node, phase, f"no reply within round-timeout ({timeout:g} s)")
        log(WARNING, "Round %d: client %s sent no %s reply in %g s", rnd, c.name, phase, timeout)
    return ok


def _failures_text(clients: _RoundClients) -> str:
    failed = [c for c in clients.sorted() if c.error]
    if not failed:
        return "no client failed"
    return "; ".join(f"{c.name} ({c.error})" for c in failed)


def train_phase(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    config: dict,
    timeout: float,
    record: RoundRecord,
    clients: _RoundClients,
    *,
    max_update_norm: float = 0.0,
    min_valid: int = 1,
    held: HeldWeights | None = None,
) -> ArrayRecord:
    """Send ``arrays`` for training, validate and record replies, return the aggregate.

    Every reply is checked by :func:`validate_update`; a rejected one is left
    out of the aggregate and recorded as the client's error (``"train:
    rejected: ..."``). Clients that fail or do not reply within ``timeout``
    are recorded too.

    With ``held``, a client that holds the weights of the last evaluate
    message gets only the arrays that differ from them
    (:meth:`HeldWeights.shorten`); one that replies it no longer holds them
    gets the whole weights, within the same ``timeout``.

    Raises:
        PollenError: Fewer than ``min_valid`` clients returned a valid update.
    """
    deadline = time.monotonic() + timeout
    with clients.sampling(grid, rnd, timeout) as sampled:
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), sampled))
    whole = held.shorten(messages, arrays) if held is not None else {}
    record.bytes_sent += sum(_arrays_bytes(m.content) for m in messages)
    learn_names(grid, [m.metadata.dst_node_id for m in messages], clients.names, min(timeout, 15))
    global_np = arrays.to_numpy_ndarrays()
    result = exchange(grid, messages, timeout)
    resend = [
        Message(whole[node], dst_node_id=node, message_type=MessageType.TRAIN)
        for node, reply in result.replies.items()
        if node in whole and reply.has_error() and NOT_HELD in reply.error.reason
    ]
    if resend:
        log(INFO, "Round %d: sending the whole weights to %d client(s)", rnd, len(resend))
        record.bytes_sent += sum(_arrays_bytes(m.content) for m in resend)
        again = exchange(grid, resend, max(0.0, deadline - time.monotonic()))
        for m in resend:
            del result.replies[m.metadata.dst_node_id]
        result.replies.update(again.replies)
        result.missing += again.missing
    valid: list[Message] = []
    for node, msg in _replies_of(result, timeout, "train", rnd, clients):
        c = clients.get(node)
        if "arrays" not in msg.content or "metrics" not in msg.content:
            reason = "reply has no weights or metrics"
        else:
            record.bytes_received += record_bytes(msg.content["arrays"])
            update = msg.content["arrays"].to_numpy_ndarrays()
            reason = validate_update(global_np, update, max_update_norm)
        if reason is not None:
            clients.fail(node, "train", f"rejected: {reason}")
            log(WARNING, "Round %d: update of client %s rejected: %s", rnd, c.name, reason)
            continue
        m = msg.content["metrics"]
        c.train_loss, c.train_accuracy = m.get("train_loss"), m.get("train_accuracy")
        c.train_examples, c.fit_seconds = int(m[NUM_EXAMPLES_KEY]), m.get("fit_seconds")
        valid.append(msg)
    if len(valid) < min_valid:
        raise PollenError(
            f"Round {rnd} has {len(valid)} valid update(s), fewer than the {min_valid} "
            f"--min-clients needs; failed: {_failures_text(clients)}. The run stopped; its "
            "last completed round is checkpointed: fix or restart the failing clients, then "
            "continue with `pollen server --resume RUN_DIR` (or `pollen simulate --resume`)."
        )
    new_arrays, metrics = strategy.aggregate_train(rnd, valid)
    if new_arrays is None and getattr(strategy, "accountant", None) is not None:
        raise PollenError(
            f"Round {rnd}: differential privacy needs every sampled client's update "
            f"(the noise is calibrated to their number), but {len(valid)} of "
            f"{len(messages)} arrived; failed: {_failures_text(clients)}. The run stopped; "
            "continue with --resume once the clients are back."
        )
    if new_arrays is None:
        raise PollenError(
            f"Round {rnd}: no client returned a usable update; failed: "
            f"{_failures_text(clients)}. See the clients' consoles."
        )
    if metrics is not None:
        record.train = {
            "loss": metrics.get("train_loss"),
            "accuracy": metrics.get("train_accuracy"),
            "examples": sum(int(m.content["metrics"][NUM_EXAMPLES_KEY]) for m in valid),
        }
    return _cast_like(new_arrays, arrays)


def _arrays_bytes(content: RecordDict) -> int:
    """Payload bytes of the ArrayRecords of a message's content."""
    return sum(record_bytes(r) for r in content.array_records.values())


def _cast_like(new: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``new`` with each array in the dtype of ``like``'s array of the same key.

    Server-side optimizers (FedAdam, FedYogi, FedAdagrad) compute in float64;
    the global model keeps its own dtypes, so clients' float32 updates stay
    valid (see :func:`validate_update`) and the payload does not double.
    """
    out = {}
    for k, a in new.items():
        target = like[k].dtype if k in like else a.dtype
        if a.dtype == target:
            out[k] = a
        else:
            out[k] = Array(np.asarray(a.numpy(), dtype=np.dtype(target)))
    return ArrayRecord(array_dict=out)


def evaluate_phase(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    timeout: float,
    record: RoundRecord,
    clients: _RoundClients,
    skip: Iterable[int] = (),
    bn_stats: bool = True,
    held: HeldWeights | None = None,
) -> ArrayRecord:
    """Clients evaluate ``arrays``; return them with re-estimated BatchNorm statistics.

    The strategy samples the clients; under a seeded sample
    (``clients.seed``, :func:`seeded_sampling`) they are the ones the round's
    train phase sampled, unless the connected clients changed meanwhile.
    Nodes in ``skip`` (those that sent no train reply this round: dead or
    still busy) are not asked. With ``bn_stats=False`` (secure aggregation:
    per-client statistics would reveal per-client data) clients' BatchNorm
    statistics are ignored and ``arrays`` come back unchanged. With
    ``held``, the clients are asked to keep ``arrays``
    (:meth:`HeldWeights.keep`), and those that confirm it are noted.
    """
    skip = set(skip)
    with clients.sampling(grid, rnd, timeout) as sampled:
        messages = [
            m
            for m in strategy.configure_evaluate(rnd, arrays, ConfigRecord(), sampled)
            if m.metadata.dst_node_id not in skip
        ]
    if held is not None:
        held.keep(messages, arrays)
    record.bytes_sent += sum(_arrays_bytes(m.content) for m in messages)
    ok = _collect(grid, messages, timeout, "evaluate", rnd, clients)
    if held is not None:
        held.held_by(ok)
    for node, msg in ok:
        m, c = msg.content["metrics"], clients.get(node)
        c.eval_loss, c.eval_accuracy = m.get("eval_loss"), m.get("eval_accuracy")
        c.eval_examples, c.eval_seconds = int(m[NUM_EXAMPLES_KEY]), m.get("eval_seconds")
    replies = [msg for _, msg in ok]
    metrics = strategy.aggregate_evaluate(rnd, replies) if replies else None
    if metrics is not None:
        record.evaluate = {
            "loss": metrics.get("eval_loss"),
            "accuracy": metrics.get("eval_accuracy"),
            "examples": sum(int(m.content["metrics"][NUM_EXAMPLES_KEY]) for m in replies),
        }
    return _apply_batchnorm_stats(arrays, replies) if bn_stats else arrays


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    *,
    num_rounds: int,
    history: History,
    timeout: float,
    train_config: dict | None = None,
    evaluate_fn: EvaluateFn | None = None,
    observer: RoundObserver | None = None,
    target_accuracy: float = 0.0,
    first_round: int = 1,
    min_clients: int = 1,
    max_update_norm: float = 0.0,
    names: dict[int, str] | None = None,
    train: TrainPhase | None = None,
    bn_stats: bool = True,
    release: Callable[[], None] | None = None,
    held_weights: bool = False,
    sampling_seed: int | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; return the final global arrays.

    Each round: the strategy samples clients and sends them ``arrays``; their
    updates are validated (:func:`validate_update`) and the valid ones
    aggregated; the strategy samples clients to evaluate the new global model
    (with ``sampling_seed``, those that trained; :func:`seeded_sampling`), and they
    return re-estimated BatchNorm statistics, which replace the averaged
    ones; the server evaluates centrally if ``evaluate_fn`` is given; the
    round is appended to ``history`` and ``observer.round_done`` is called.

    The server's central evaluation never holds the clients up unless it has
    to: it runs in a background thread beside the next round (the round's
    record, history line and ``observer.round_done`` follow when it ends,
    always before the next round's), and after the last round it runs once
    ``release`` has told the clients that the run is over. Only with
    ``target_accuracy`` (> 0) does the next round wait for it, since whether
    there is a next round depends on it. A round's ``seconds`` is the time
    until the federation could go on: ``phase_seconds`` has ``server`` for an
    evaluation the next round waited for (counted in ``seconds``) and
    ``server-beside`` for one that ran beside it or after the release (not
    counted).

    A client that fails, sends an invalid update or does not reply within
    ``timeout`` is recorded in the round's history and the round goes on
    with the others, as long as at least ``min_clients`` valid updates came
    back.

    Stops early once the central accuracy reaches ``target_accuracy`` (> 0).

    ``train`` replaces :func:`train_phase` (same arguments and result): secure
    aggregation passes ``pollen.server.secagg.SecureAggregation.train_phase``, under
    which the server sees only the aggregate. ``bn_stats=False`` ignores the
    clients' BatchNorm statistics (per-client data statistics).

    ``held_weights``: the clients keep the weights of each evaluate message,
    and the next round's train message to a client that evaluated carries
    only the arrays that changed since (:class:`pollen.wire.HeldWeights`;
    with :func:`train_phase` only). For deployments: a simulated client's
    messages do not leave the process.

    ``sampling_seed``: each round's client sample is drawn with this seed
    over the clients in the order of their names (:func:`seeded_sampling`),
    so it repeats from run to run; None leaves it to Flower's unseeded draw.

    Raises:
        PollenError: Fewer than ``min_clients`` clients are connected within
            ``timeout``, or fewer valid updates came back in a round.
    """
    names = names if names is not None else {}

    def finish(record: RoundRecord, arrays: ArrayRecord, state: Strategy) -> None:
        history.rounds.append(record)
        log(INFO, progress_line(record, num_rounds))
        if observer is not None:
            observer.round_done(record, arrays, history, state)

    pending: _Beside | None = None
    gate = _TrainSent(grid)
    held = HeldWeights() if held_weights and train is None else None
    train = train or functools.partial(train_phase, held=held)
    try:
        for rnd in range(first_round, num_rounds + 1):
            start = time.perf_counter()
            record = RoundRecord(round=rnd)
            clients = _RoundClients(names, sampling_seed)
            # Flower's samplers wait for enough nodes forever: bound that wait here.
            _wait_for_quorum(grid, min_clients, timeout, rnd)
            arrays = train(
                gate,
                strategy,
                rnd,
                arrays,
                train_config or {},
                timeout,
                record,
                clients,
                max_update_norm=max_update_norm,
                min_valid=min_clients,
            )
            record.privacy = privacy_record(strategy)
            failed = [n for n, c in clients.by_node.items() if c.error]
            record.phase_seconds["train"] = time.perf_counter() - start
            _wait_for_quorum(grid, min_clients, timeout, rnd)
            arrays = evaluate_phase(
                grid, strategy, rnd, arrays, timeout, record, clients, failed, bn_stats, held
            )
            record.phase_seconds["evaluate"] = (
                time.perf_counter() - start - sum(record.phase_seconds.values())
            )
            record.clients = clients.sorted()
            record.seconds = time.perf_counter() - start
            if pending is not None:  # the previous round is recorded before this one
                previous, pending = pending, None
                previous.wait()
            if evaluate_fn is None or target_accuracy > 0:
                if evaluate_fn is not None:
                    record.server = evaluate_fn(rnd, arrays) or {}
                    record.phase_seconds["server"] = time.perf_counter() - start - record.seconds
                    record.seconds = time.perf_counter() - start
                finish(record, arrays, strategy)
                accuracy = record.server.get("accuracy", 0.0)
                if target_accuracy > 0 and accuracy >= target_accuracy:
                    log(INFO, "Target accuracy %.3f reached after round %d", target_accuracy, rnd)
                    break
                continue
            last = rnd == num_rounds
            if last and release is not None:
                release()
            # The next round changes the strategy's state (FedOpt's moments, the DP
            # accountant): the round is recorded with its state as it is now.
            state = strategy if last else copy.deepcopy(strategy)
            gate = _TrainSent(grid)  # the next round's
            after = None if last else gate.sent
            pending = _Beside(evaluate_fn, finish, record, arrays, state, after)
    except BaseException:
        if pending is not None:  # the completed round is still recorded and checkpointed
            gate.sent.set()
            pending.wait(quiet=True)
        raise
    if pending is not None:
        pending.wait()
    return arrays


class _TrainSent:
    """The grid for a round's train phase, noting when its training messages have left.

    The central evaluation beside the round starts then, not before: started at
    once, it competed with packing and sending the round's weights (a loopback
    deployment's train phase took 4.6-5.4 s longer than the clients' fit
    instead of about 3 s). Everything but ``push_messages`` goes to ``grid``.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        #: Set once a batch of messages holding a training message has been pushed.
        self.sent = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` through the grid; note it if one of them is a training message."""
        messages = list(messages)
        ids = self.grid.push_messages(messages)
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.sent.set()
        return ids


#: Longest wait, in seconds, of a central evaluation for the next round's training
#: messages to leave (a train phase that sends none, e.g. Flower's SecAgg+ workflow
#: talking through another call, does not hold it up longer).
START_AFTER_SECONDS = 10.0


class _Beside:
    """A round's central evaluation and recording, in a thread beside the next round.

    Args:
        evaluate_fn: The server's central evaluation.
        finish: Records the round (history, console, observer).
        record: The round, complete but for ``server``.
        arrays: The round's global arrays.
        state: The strategy as it stood at the end of the round.
        after: Start once this is set (the next round's weights have left), or
            after :data:`START_AFTER_SECONDS`; ``None``: at once.
    """

    def __init__(
        self,
        evaluate_fn: EvaluateFn,
        finish: Callable[[RoundRecord, ArrayRecord, Strategy], None],
        record: RoundRecord,
        arrays: ArrayRecord,
        state: Strategy,
        after: threading.Event | None = None,
    ) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                if after is not None:
                    after.wait(START_AFTER_SECONDS)
                start = time.perf_counter()
                record.server = evaluate_fn(record.round, arrays) or {}
                record.phase_seconds["server-beside"] = time.perf_counter() - start
                finish(record, arrays, state)
            except BaseException as err:  # noqa: BLE001 - raised again in the loop's thread
                self.error = err

        self.thread = threading.Thread(
            target=run, name=f"pollen-server-eval-{record.round}", daemon=True
        )
        self.thread.start()

    def wait(self, *, quiet: bool = False) -> None:
        """Block until the round is recorded; raise what went wrong there.

        Args:
            quiet: Log the error instead of raising it (another one is on its way).
        """
        while self.thread.is_alive():  # short slices: signals reach this thread
            self.thread.join(0.2)
        if self.error is not None:
            if not quiet:
                raise self.error
            log(WARNING, "The server's evaluation failed too: %s", self.error)


def _wait_for_quorum(grid: Grid, min_clients: int, timeout: float, rnd: int) -> None:
    try:
        wait_for_clients(grid, min_clients, timeout)
    except PollenError as err:
        raise PollenError(
            f"Round {rnd} cannot go on: {err} The last completed round is checkpointed; "
            "continue later with `--resume RUN_DIR`."
        ) from None


def _apply_batchnorm_stats(arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
    """Replace averaged BatchNorm statistics by the clients' re-estimated ones."""
    with_stats = [
        m
        for m in replies
        if "bn-stats" in m.content
        and all(np.isfinite(a.numpy()).all() for a in m.content["bn-stats"].values())
    ]
    if not with_stats:
        return arrays
    stats = [{k: a.numpy() for k, a in m.content["bn-stats"].items()} for m in with_stats]
    counts = [int(m.content["metrics"]["calibration-examples"]) for m in with_stats]
    keys = list(stats[0])
    if any(list(s) != keys for s in stats) or any(k not in arrays for k in keys):
        log(WARNING, "Clients sent BatchNorm statistics that do not match; keeping averages")
        return arrays
    merged = merge_batchnorm_stats(stats, counts, keys[0::2])
    return ArrayRecord(
        array_dict={k: Array(merged[k]) if k in merged else v for k, v in arrays.items()}
    )


def _fmt(value: float | None, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def progress_line(record: RoundRecord, num_rounds: int) -> str:
    """One console line summarising a finished round."""
    errors = sum(1 for c in record.clients if c.error)
    parts = [
        f"Round {record.round}/{num_rounds}",
        f"train loss {_fmt(record.train.get('loss'))} acc {_fmt(record.train.get('accuracy'))}",
        f"clients eval acc {_fmt(record.evaluate.get('accuracy'))}",
    ]
    if record.server:
        parts.append(f"server test acc {_fmt(record.server.get('accuracy'))}")
    if record.privacy:
        parts.append(
            f"DP epsilon {record.privacy['epsilon']:.3g} (delta {record.privacy['delta']:g})"
        )
    beside = record.phase_seconds.get("server-beside")
    parts.append(
        f"{record.seconds:.1f} s"
        + ("" if beside is None else f" (+ server evaluation {beside:.1f} s beside)")
    )
    parts.append(
        f"sent {record.bytes_sent / 1e6:.1f} MB, received {record.bytes_received / 1e6:.1f} MB"
    )
    if errors:
        parts.append(f"{errors} client(s) failed")
    return " | ".join(parts)


def announce_run_over(grid: Grid, timeout: float = 15.0) -> None:
    """Tell every connected client that the run is over (they then exit).

    Args:
        grid: The run's grid.
        timeout: Seconds to wait for the clients' acknowledgements; default 15.
    """
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"request": RUN_OVER_REQUEST})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in grid.get_node_ids()
    ]
    if messages:
        exchange(grid, messages, timeout)
