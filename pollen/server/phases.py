"""A round's phases: the train phase and the evaluate phase, and the round's client records.

:func:`train_phase` sends the global weights to the clients the strategy
samples, checks every reply before any is aggregated
(:mod:`pollen.server.replies`), records failures per client and returns the
aggregate; secure aggregation's train phase
(:mod:`pollen.server.secagg`) has the same signature (:class:`TrainPhase`).
:func:`evaluate_phase` has the clients evaluate the new weights and merges
their re-estimated BatchNorm statistics, checked the same way. The loop that runs them is
:mod:`pollen.server.rounds`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen.compress import Codec
from pollen.errors import PollenError
from pollen.server.exchange import (
    Exchange,
    client_name,
    exchange,
    learn_names,
    readable_reason,
)
from pollen.server.history import ClientRound, RoundRecord
from pollen.server.replies import (
    Checked,
    Invalid,
    capped,
    checked_evaluate_reply,
    checked_train_reply,
    global_batchnorm_stats,
    is_robust,
    merged_batchnorm_problem,
    merged_batchnorm_stats,
    pairs_of,
    to_strategy,
)
from pollen.server.sampling import seeded_sampling
from pollen.wire import NOT_HELD, HeldWeights

# --- one round's clients and context -----------------------------------------------


class RoundClients:
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
        """The record of the node that sent ``msg``, named by it if it says its name."""
        node = msg.metadata.src_node_id if node is None else node
        if msg.has_content() and "client" in msg.content.config_records:
            self.names[node] = client_name(msg, node)
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
        """The records, by client name."""
        return sorted(self.by_node.values(), key=lambda c: c.name)

    def failures(self) -> str:
        """``"name (error); ..."`` of the clients that failed, or ``"no client failed"``."""
        failed = [c for c in self.sorted() if c.error]
        if not failed:
            return "no client failed"
        return "; ".join(f"{c.name} ({c.error})" for c in failed)


@dataclass
class RoundContext:
    """One round under way: whom a phase talks to, how long it waits, where it records.

    Attributes:
        grid: The grid the phase talks through.
        strategy: The run's strategy (samples clients, aggregates).
        rnd: The round, from 1.
        timeout: Deadline of each exchange with clients, seconds.
        record: The round's record, filled in by the phases.
        clients: The round's per-client records.
        codec: Compression of the weights sent to clients (:mod:`pollen.compress`);
            None: sent whole, ``float32``.
    """

    grid: Grid
    strategy: Strategy
    rnd: int
    timeout: float
    record: RoundRecord
    clients: RoundClients
    codec: Codec | None = None


class TrainPhase(Protocol):
    """A round's train phase: :func:`train_phase`, or secure aggregation's."""

    def __call__(
        self,
        ctx: RoundContext,
        arrays: ArrayRecord,
        config: dict,
        *,
        max_update_norm: float = 0.0,
        min_valid: int = 1,
    ) -> ArrayRecord:
        """Train the global ``arrays`` on the clients the strategy samples; return the new ones.

        ``config`` (e.g. ``learning-rate``) goes to the clients; replies and
        failures are recorded in ``ctx``; ``max_update_norm`` bounds an
        update's L2 norm where updates can be seen (0 = none).

        Raises:
            PollenError: Fewer than ``min_valid`` valid updates came back.
        """
        ...


def _collect(ctx: RoundContext, messages: list[Message], phase: str) -> list[tuple[int, Message]]:
    """Exchange ``messages``; record error replies and missing replies as failures.

    Returns:
        ``(node id, reply)`` of every reply that carries content.
    """
    result = exchange(ctx.grid, messages, ctx.timeout, codec=ctx.codec)
    _count_bytes(ctx, result)
    return _replies_of(ctx, result, phase)


def _count_bytes(ctx: RoundContext, result: Exchange) -> None:
    """Add the bytes ``result`` sent and received to the round's and each client's record."""
    for node, size in result.sent_bytes.items():
        ctx.record.bytes_sent += size
        ctx.clients.get(node).bytes_sent += size
    for node, size in result.received_bytes.items():
        ctx.record.bytes_received += size
        ctx.clients.get(node).bytes_received += size


def _replies_of(ctx: RoundContext, result: Exchange, phase: str) -> list[tuple[int, Message]]:
    """:func:`_collect` for an exchange already made."""
    ok = []
    rnd, clients, timeout = ctx.rnd, ctx.clients, ctx.timeout
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


# --- the train phase -----------------------------------------------------------------


def train_phase(
    ctx: RoundContext,
    arrays: ArrayRecord,
    config: dict,
    *,
    max_update_norm: float = 0.0,
    min_valid: int = 1,
    held: HeldWeights | None = None,
) -> ArrayRecord:
    """Send ``arrays`` for training, validate and record replies, return the aggregate.

    A :class:`TrainPhase`. Every reply is checked whole before any is
    aggregated (:func:`pollen.server.replies.checked_train_reply`: weights,
    ``max_update_norm`` bounding an update's L2 norm, 0 = none; example
    count; metrics); a rejected one is left out of the aggregate and
    recorded as the client's error (``"train: rejected: ..."``). Clients
    that fail or do not reply within ``ctx.timeout`` are recorded too.

    With ``held``, a client that holds the weights of the last evaluate
    message gets only the arrays that differ from them
    (:meth:`HeldWeights.shorten`); one that replies it no longer holds them
    gets the whole weights, within the same ``ctx.timeout``.

    Returns:
        The aggregate, in the dtypes of ``arrays``.

    Raises:
        PollenError: Fewer than ``min_valid`` clients returned a valid update.
    """
    messages, result = _send_for_training(ctx, arrays, config, held)
    valid = _valid_updates(ctx, result, arrays, max_update_norm)
    if len(valid) < min_valid:
        raise PollenError(
            f"Round {ctx.rnd} has {len(valid)} valid update(s), fewer than the {min_valid} "
            f"--min-clients needs; failed: {ctx.clients.failures()}. The run stopped; its "
            "last completed round is checkpointed: fix or restart the failing clients, then "
            "continue with `pollen server --resume RUN_DIR` (or `pollen simulate --resume`)."
        )
    return _aggregate_train(ctx, valid, len(messages), arrays)


def _send_for_training(
    ctx: RoundContext, arrays: ArrayRecord, config: dict, held: HeldWeights | None
) -> tuple[list[Message], Exchange]:
    """Sample, send the training messages and collect the replies by the deadline.

    Returns:
        The messages sent first, and the replies (whole weights sent again to
        clients that no longer held the ones a shortened message built on).
    """
    grid, rnd, timeout = ctx.grid, ctx.rnd, ctx.timeout
    deadline = time.monotonic() + timeout
    with ctx.clients.sampling(grid, rnd, timeout) as sampled:
        train_config = ConfigRecord(dict(config))
        messages = list(ctx.strategy.configure_train(rnd, arrays, train_config, sampled))
    whole = held.shorten(messages, arrays) if held is not None else {}
    nodes = [m.metadata.dst_node_id for m in messages]
    learn_names(grid, nodes, ctx.clients.names, min(timeout, 15))
    # base: a compressed update comes back as the change to ``arrays``, rebuilt on arrival.
    result = exchange(grid, messages, timeout, codec=ctx.codec, base=arrays)
    _count_bytes(ctx, result)
    resend = [
        Message(whole[node], dst_node_id=node, message_type=MessageType.TRAIN)
        for node, reply in result.replies.items()
        if node in whole and reply.has_error() and NOT_HELD in reply.error.reason
    ]
    if resend:
        log(INFO, "Round %d: sending the whole weights to %d client(s)", rnd, len(resend))
        limit = max(0.0, deadline - time.monotonic())
        again = exchange(grid, resend, limit, codec=ctx.codec, base=arrays)
        _count_bytes(ctx, again)
        for m in resend:
            del result.replies[m.metadata.dst_node_id]
        result.replies.update(again.replies)
        result.missing += again.missing
    return messages, result


def _valid_updates(
    ctx: RoundContext, result: Exchange, arrays: ArrayRecord, max_update_norm: float
) -> list[Checked]:
    """The replies that pass :func:`checked_train_reply`; the others recorded as rejected."""
    valid: list[Checked] = []
    global_np = arrays.to_numpy_ndarrays()
    for node, msg in _replies_of(ctx, result, "train"):
        c = ctx.clients.get(node)
        try:
            checked = checked_train_reply(node, msg, arrays, global_np, max_update_norm)
        except Invalid as err:
            ctx.clients.fail(node, "train", f"rejected: {err}")
            log(WARNING, "Round %d: update of client %s rejected: %s", ctx.rnd, c.name, err)
            continue
        m = checked.metrics
        c.train_loss, c.train_accuracy = m.get("train_loss"), m.get("train_accuracy")
        c.train_examples, c.fit_seconds = checked.examples, m.get("fit_seconds")
        c.dp_epsilon = m.get("dp_epsilon")  # --dp example: this client's accountant
        valid.append(checked)
    return valid


def _aggregate_train(
    ctx: RoundContext, valid: list[Checked], sent: int, arrays: ArrayRecord
) -> ArrayRecord:
    """The strategy's aggregate of ``valid`` (of ``sent`` messages), cast like ``arrays``.

    The strategy sees only what :func:`to_strategy` leaves of each reply,
    weighted by its :func:`capped` example count.
    """
    rnd, failures = ctx.rnd, ctx.clients.failures
    to_strategy(valid, capped([r.examples for r in valid]), train=True)
    new_arrays, metrics = ctx.strategy.aggregate_train(rnd, [r.msg for r in valid])
    if new_arrays is None and getattr(ctx.strategy, "accountant", None) is not None:
        raise PollenError(
            f"Round {rnd}: differential privacy needs every sampled client's update "
            f"(the noise is calibrated to their number), but {len(valid)} of "
            f"{sent} arrived; failed: {failures()}. The run stopped; "
            "continue with --resume once the clients are back."
        )
    if new_arrays is None:
        raise PollenError(
            f"Round {rnd}: no client returned a usable update; failed: "
            f"{failures()}. See the clients' consoles."
        )
    if metrics is not None:
        ctx.record.train = {
            "loss": metrics.get("train_loss"),
            "accuracy": metrics.get("train_accuracy"),
            "examples": sum(r.examples for r in valid),
        }
    return _cast_like(new_arrays, arrays)


def _cast_like(new: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``new`` with each array in the dtype of ``like``'s array of the same key.

    Server-side optimizers (FedAdam, FedYogi, FedAdagrad) compute in float64;
    the global model keeps its own dtypes, so clients' float32 updates stay
    valid (see :func:`pollen.server.aggregation.validate_update`) and the
    payload does not double.
    """
    out = {}
    for k, a in new.items():
        target = like[k].dtype if k in like else a.dtype
        if a.dtype == target:
            out[k] = a
        else:
            out[k] = Array(np.asarray(a.numpy(), dtype=np.dtype(target)))
    return ArrayRecord(array_dict=out)


# --- the evaluate phase --------------------------------------------------------------

#: The model's BatchNorm moving mean and variance keys, in the order of its weights,
#: asked for on first use (:func:`pollen.models.registry.batchnorm_stat_indices`).
BatchNormKeys = Callable[[], Sequence[str]]


def evaluate_phase(
    ctx: RoundContext,
    arrays: ArrayRecord,
    skip: Iterable[int] = (),
    bn_keys: BatchNormKeys | None = None,
    held: HeldWeights | None = None,
    *,
    max_update_norm: float = 0.0,
) -> ArrayRecord:
    """Clients evaluate ``arrays``; return them with re-estimated BatchNorm statistics.

    The strategy samples the clients; under a seeded sample
    (``ctx.clients.seed``, :func:`seeded_sampling`) they are the ones the
    round's train phase sampled, unless the connected clients changed
    meanwhile. Nodes in ``skip`` (those that sent no train reply this round:
    dead or still busy) are not asked. Every reply is checked before any is
    used (:func:`pollen.server.replies.checked_evaluate_reply`); a rejected
    one counts for nothing and is the client's error (``"evaluate:
    rejected: ..."``).

    Clients' BatchNorm statistics replace the global ones only for the keys
    ``bn_keys`` names (the model's own statistics). Without ``bn_keys``
    (secure aggregation, differential privacy: per-client statistics would
    reveal per-client data), or under a strategy with a DP accountant, any
    statistics sent are ignored and ``arrays`` come back unchanged. Under a
    robust strategy they are combined by the coordinate-wise median. A
    client's statistics, and then the merged ones, must lie within
    ``max_update_norm`` (0 = no bound) of the global ones, like an update
    (:func:`pollen.server.replies.checked_batchnorm_stats`); merged
    statistics that fail a check are not installed
    (:func:`_with_merged_stats`). With ``held``, the clients are asked to
    keep ``arrays`` (:meth:`HeldWeights.keep`), and those that confirm it
    are noted.
    """
    skip, record, clients = set(skip), ctx.record, ctx.clients
    with clients.sampling(ctx.grid, ctx.rnd, ctx.timeout) as sampled:
        messages = [
            m
            for m in ctx.strategy.configure_evaluate(ctx.rnd, arrays, ConfigRecord(), sampled)
            if m.metadata.dst_node_id not in skip
        ]
    if held is not None:
        held.keep(messages, arrays)
    ok = _collect(ctx, messages, "evaluate")
    if held is not None:
        held.held_by(ok)
    private = getattr(ctx.strategy, "accountant", None) is not None
    pairs = _pairs(ok, None if private else bn_keys)
    global_stats = global_batchnorm_stats(arrays, pairs) if pairs is not None else None
    valid = _valid_evaluations(ctx, ok, global_stats, pairs, max_update_norm)
    to_strategy(valid, capped([r.examples for r in valid]), train=False)
    metrics = ctx.strategy.aggregate_evaluate(ctx.rnd, [r.msg for r in valid]) if valid else None
    if metrics is not None:
        record.evaluate = {
            "loss": metrics.get("eval_loss"),
            "accuracy": metrics.get("eval_accuracy"),
            "examples": sum(r.examples for r in valid),
        }
    if pairs is None or global_stats is None:
        return arrays
    return _with_merged_stats(ctx, arrays, valid, pairs, global_stats, max_update_norm)


def _with_merged_stats(
    ctx: RoundContext,
    arrays: ArrayRecord,
    valid: list[Checked],
    pairs: list[tuple[str, str]],
    global_stats: dict[str, np.ndarray],
    max_norm: float,
) -> ArrayRecord:
    """``arrays`` with the statistics merged from ``valid``, if the merge passes its checks.

    Merged statistics that are not finite in their dtype, hold a negative
    variance or lie farther than ``max_norm`` from ``global_stats``
    (:func:`pollen.server.replies.merged_batchnorm_problem`) are not
    installed: ``arrays`` come back with their previous statistics, and the
    reason goes to the round's record (``evaluate["batchnorm"]``) and the log.
    """
    merged = merged_batchnorm_stats(valid, pairs, robust=is_robust(ctx.strategy))
    if not merged:
        return arrays
    problem = merged_batchnorm_problem(merged, global_stats, pairs, max_norm)
    if problem is not None:
        reason = f"kept the previous statistics: merged {problem}"
        ctx.record.evaluate["batchnorm"] = reason
        log(WARNING, "Round %d: BatchNorm statistics %s", ctx.rnd, reason)
        return arrays
    return ArrayRecord(
        array_dict={k: Array(merged[k]) if k in merged else v for k, v in arrays.items()}
    )


def _pairs(
    replies: list[tuple[int, Message]], bn_keys: BatchNormKeys | None
) -> list[tuple[str, str]] | None:
    """The model's BatchNorm key pairs, asked for only when a reply carries statistics."""
    if bn_keys is None or not any("bn-stats" in m.content.array_records for _, m in replies):
        return None
    return pairs_of(bn_keys())


def _valid_evaluations(
    ctx: RoundContext,
    replies: list[tuple[int, Message]],
    global_stats: dict[str, np.ndarray] | None,
    pairs: list[tuple[str, str]] | None,
    max_norm: float,
) -> list[Checked]:
    """The replies that pass :func:`checked_evaluate_reply`; the others recorded as rejected."""
    valid: list[Checked] = []
    for node, msg in replies:
        c = ctx.clients.get(node)
        try:
            checked = checked_evaluate_reply(node, msg, global_stats, pairs, max_norm)
        except Invalid as err:
            ctx.clients.fail(node, "evaluate", f"rejected: {err}")
            log(WARNING, "Round %d: evaluation of client %s rejected: %s", ctx.rnd, c.name, err)
            continue
        m = checked.metrics
        c.eval_loss, c.eval_accuracy = m.get("eval_loss"), m.get("eval_accuracy")
        c.eval_examples, c.eval_seconds = checked.examples, m.get("eval_seconds")
        valid.append(checked)
    return valid
