"""The round loop: send the global weights, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs rounds too, but offers no hook between
rounds; Pollen needs one to record per-client history, write outputs after
every round, stop at a target accuracy and (later) checkpoint. So this loop
drives the strategy's own ``configure_*``/``aggregate_*`` methods, exactly as
``Strategy.start`` does, and calls :class:`RoundObserver` after each round.

The pure helpers at the top (:func:`merge_batchnorm_stats`,
:func:`weighted_mean`) know nothing about Flower or Keras.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen.errors import PollenError
from pollen.history import ClientRound, History, RoundRecord

EvaluateFn = Callable[[int, ArrayRecord], "dict[str, float] | None"]


# --- pure helpers ---------------------------------------------------------------


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of equally shaped arrays (FedAvg's aggregation rule).

    Args:
        values: Arrays of one shape.
        weights: Non-negative weights, e.g. example counts; not all zero.

    Returns:
        ``sum_i w_i * values_i / sum_i w_i``, in float64 unless all inputs
        share a floating dtype.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    mean = np.tensordot(w / w.sum(), stacked, axes=1)
    dtype = np.result_type(*values)
    return mean.astype(dtype) if np.issubdtype(dtype, np.floating) else mean


def merge_batchnorm_stats(
    stats: Sequence[dict[str, np.ndarray]], counts: Sequence[int], mean_keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Combine per-client BatchNorm statistics into population statistics.

    Each client measured, under the same global weights, the mean ``m_i`` and
    variance ``v_i`` of every BatchNorm layer's inputs over ``n_i`` of its
    images. The statistics of all ``N = sum n_i`` images together are
    ``m = sum n_i m_i / N`` and ``v = sum n_i (v_i + m_i^2) / N - m^2`` (the law
    of total variance), which is what a single pass over all the data would
    have measured.

    Args:
        stats: Per client, arrays keyed like the global ArrayRecord.
        counts: Images each client used.
        mean_keys: Keys that hold moving means; the key that follows each in
            ``stats[0]``'s order is the matching moving variance.

    Returns:
        Combined arrays, same keys as ``stats[0]``.
    """
    keys = list(stats[0])
    out: dict[str, np.ndarray] = {}
    for mean_key in mean_keys:
        var_key = keys[keys.index(mean_key) + 1]
        means = [s[mean_key].astype(np.float64) for s in stats]
        variances = [s[var_key].astype(np.float64) for s in stats]
        m = weighted_mean(means, counts)
        second = weighted_mean([v + mi**2 for v, mi in zip(variances, means, strict=True)], counts)
        out[mean_key] = m.astype(stats[0][mean_key].dtype)
        out[var_key] = np.maximum(second - m**2, 0.0).astype(stats[0][var_key].dtype)
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord's arrays in bytes."""
    return int(sum(len(a.data) for a in record.values()))


# --- the loop -------------------------------------------------------------------


class RoundObserver(Protocol):
    """What the loop tells the outside world after each round."""

    def round_done(self, record: RoundRecord, arrays: ArrayRecord, history: History) -> None:
        """Called after every round with the new global arrays."""


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
        time.sleep(1.0)


def request_initial_arrays(
    grid: Grid, node_id: int, timeout: float
) -> tuple[ArrayRecord, ConfigRecord]:
    """Ask one client for freshly initialised weights (the server has no model).

    Returns:
        The weights, and what the client says about itself (``name``, ``classes``).
    """
    msg = Message(
        RecordDict({"config": ConfigRecord({"request": "initial-arrays"})}),
        dst_node_id=node_id,
        message_type=MessageType.QUERY,
    )
    replies = list(grid.send_and_receive([msg], timeout=timeout))
    if not replies or replies[0].has_error():
        reason = replies[0].error.reason if replies else "no reply"
        raise PollenError(
            f"Client {node_id} could not provide the initial model weights ({reason}). "
            "Check that client's console for the error."
        )
    content = replies[0].content
    return content["arrays"], content.config_records.get("client", ConfigRecord())


def _client_name(msg: Message) -> str:
    info = msg.content.config_records.get("client") if msg.has_content() else None
    if info is not None and "name" in info:
        return str(info["name"])
    return f"node-{msg.metadata.src_node_id}"


class _RoundClients:
    """Per-client records of one round, keyed by node id."""

    def __init__(self) -> None:
        self.by_node: dict[int, ClientRound] = {}

    def __call__(self, msg: Message) -> ClientRound:
        node = msg.metadata.src_node_id
        if node not in self.by_node:
            self.by_node[node] = ClientRound(node_id=node, name=_client_name(msg))
        return self.by_node[node]

    def fail(self, msg: Message, phase: str) -> None:
        c = self(msg)
        reason = f"{phase}: {msg.error.reason}"
        c.error = f"{c.error}; {reason}" if c.error else reason

    def sorted(self) -> list[ClientRound]:
        return sorted(self.by_node.values(), key=lambda c: c.name)


def _split(replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    ok, failed = [], []
    for msg in replies:
        (failed if msg.has_error() else ok).append(msg)
    return ok, failed


def train_phase(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    config: dict,
    timeout: float,
    record: RoundRecord,
    clients: _RoundClients,
) -> ArrayRecord:
    """Send ``arrays`` for training, record replies, return the aggregate."""
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid))
    record.bytes_sent += record_bytes(arrays) * len(messages)
    ok, failed = _split(grid.send_and_receive(messages, timeout=timeout))
    for msg in failed:
        clients.fail(msg, "train")
    for msg in ok:
        m, c = msg.content["metrics"], clients(msg)
        c.train_loss, c.train_accuracy = m.get("train_loss"), m.get("train_accuracy")
        c.train_examples, c.fit_seconds = int(m["num-examples"]), m.get("fit_seconds")
        record.bytes_received += record_bytes(msg.content["arrays"])
    new_arrays, metrics = strategy.aggregate_train(rnd, ok)
    if new_arrays is None:
        raise PollenError(
            f"Round {rnd}: no client returned a usable update ({len(failed)} failed). "
            "See the clients' consoles."
        )
    if metrics is not None:
        record.train = {
            "loss": metrics.get("train_loss"),
            "accuracy": metrics.get("train_accuracy"),
            "examples": sum(int(m.content["metrics"]["num-examples"]) for m in ok),
        }
    return new_arrays


def evaluate_phase(
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    timeout: float,
    record: RoundRecord,
    clients: _RoundClients,
) -> ArrayRecord:
    """Clients evaluate ``arrays``; return them with re-estimated BatchNorm statistics."""
    messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
    record.bytes_sent += record_bytes(arrays) * len(messages)
    ok, failed = _split(grid.send_and_receive(messages, timeout=timeout))
    for msg in failed:
        clients.fail(msg, "evaluate")
    for msg in ok:
        m, c = msg.content["metrics"], clients(msg)
        c.eval_loss, c.eval_accuracy = m.get("eval_loss"), m.get("eval_accuracy")
        c.eval_examples = int(m["num-examples"])
    metrics = strategy.aggregate_evaluate(rnd, ok)
    if metrics is not None:
        record.evaluate = {
            "loss": metrics.get("eval_loss"),
            "accuracy": metrics.get("eval_accuracy"),
            "examples": sum(int(m.content["metrics"]["num-examples"]) for m in ok),
        }
    return _apply_batchnorm_stats(arrays, ok)


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
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; return the final global arrays.

    Each round: the strategy samples clients and sends them ``arrays``; their
    updates are aggregated; every client evaluates the new global model and
    returns re-estimated BatchNorm statistics, which replace the averaged
    ones; the server evaluates centrally if ``evaluate_fn`` is given; the
    round is appended to ``history`` and ``observer.round_done`` is called.

    Stops early once the central accuracy reaches ``target_accuracy`` (> 0).
    """
    for rnd in range(first_round, num_rounds + 1):
        start = time.perf_counter()
        record = RoundRecord(round=rnd)
        clients = _RoundClients()
        arrays = train_phase(
            grid, strategy, rnd, arrays, train_config or {}, timeout, record, clients
        )
        arrays = evaluate_phase(grid, strategy, rnd, arrays, timeout, record, clients)
        if evaluate_fn is not None:
            record.server = evaluate_fn(rnd, arrays) or {}
        record.clients = clients.sorted()
        record.seconds = time.perf_counter() - start
        history.rounds.append(record)
        log(INFO, progress_line(record, num_rounds))
        if observer is not None:
            observer.round_done(record, arrays, history)
        if target_accuracy > 0 and record.server.get("accuracy", 0.0) >= target_accuracy:
            log(INFO, "Target accuracy %.3f reached after round %d", target_accuracy, rnd)
            break
    return arrays


def _apply_batchnorm_stats(arrays: ArrayRecord, replies: list[Message]) -> ArrayRecord:
    """Replace averaged BatchNorm statistics by the clients' re-estimated ones."""
    with_stats = [m for m in replies if "bn-stats" in m.content]
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
    parts.append(f"{record.seconds:.1f} s")
    parts.append(
        f"sent {record.bytes_sent / 1e6:.1f} MB, received {record.bytes_received / 1e6:.1f} MB"
    )
    if errors:
        parts.append(f"{errors} client(s) failed")
    return " | ".join(parts)
