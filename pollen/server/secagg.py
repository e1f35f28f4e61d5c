"""Secure aggregation: Flower's SecAgg+ inside Pollen's round loop.

With ``--secagg`` the server never sees one client's update, only the
weighted sum of the updates of the clients that finished the round. Flower
1.42 offers SecAgg+ only on its legacy path: :class:`SecAggPlusWorkflow`
called with a :class:`flwr.server.LegacyContext` that holds a legacy
:class:`flwr.server.strategy.FedAvg` and a client manager. This module
bridges that path and Pollen's round loop (:mod:`pollen.server.rounds`):

Server side (:class:`SecureAggregation`, :func:`secure_train_phase`):

1. Pollen's own strategy (``pollen.server.strategies.make_strategy``, a new-style
   FedAvg) samples the round's clients, exactly as without SecAgg; that
   strategy object is also what the checkpoint saves the state of.
2. Each sampled client's training-example count is learned once (query
   ``request="train-examples"``); ``max_weight`` of the round is their
   maximum (the protocol scales each update by ``num_examples / max_weight``
   before quantizing, so it must be >= every count and not much bigger).
3. The workflow runs its four stages (setup, share keys, collect masked
   vectors, unmask) through a grid wrapper that gives every exchange
   Pollen's hard deadline (:func:`pollen.server.exchange.exchange`) and records
   failures, bytes and the per-client metrics for the history. Each reply is
   checked against what its stage must carry (:func:`stage_problems`) before
   the workflow reads it: one that fails is that client's ``rejected:
   <reason>`` and a dropout, which SecAgg+ recovers from while enough clients
   remain (:class:`EarlyDropoutSecAggPlus` also before the masked vectors).
4. What comes back is the weighted average of the clients' *updates*
   (trained minus global weights); the new global model is the old one plus
   that average, checked for shapes and finite values (individual updates
   cannot be checked: :func:`pollen.server.aggregation.validate_update` never sees them).

Client side: :mod:`pollen.client.secagg_mod`.

What stays in plaintext: each client's ``num_examples`` and its train
metrics (loss, accuracy, seconds); only the arrays are masked. BatchNorm
re-estimation (per-client ``bn-stats`` in the evaluate phase) would reveal
per-client data statistics, so under SecAgg it is off: clients calibrate on
0 examples and the server ignores any statistics it is sent.

Thresholds (see :func:`resolve_protocol`): ``secagg-num-shares`` <= 1 is a
fraction of the sampled clients, an integer > 2 a count;
``secagg-reconstruction-threshold`` <= 1 is a fraction of the shares, an
integer > 1 a count. With the defaults (1.0, 0.67): 2 clients -> 2 shares,
threshold 2, no dropout tolerated; 3 -> 3/2, 1 dropout; 5 -> 5/3, 2;
10 -> 10/7, 3.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common import (
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.protocol import NUM_EXAMPLES_KEY, TRAIN_EXAMPLES_REQUEST
from pollen.server.aggregation import validate_update
from pollen.server.distributed_dp import RANGE_SIGMAS, ClientLevelDP, clipping_range_for
from pollen.server.exchange import exchange, learn_names, readable_reason, record_bytes
from pollen.server.history import RoundRecord
from pollen.server.phases import RoundClients, RoundContext
from pollen.server.replies import TRAIN_METRICS, Invalid, checked_values, example_count
from pollen.wire import WireFormatError, wire_array

#: Quantization levels of SecAgg+ (Flower's default, 2**22).
QUANTIZATION_RANGE = 2**22
#: Longest public key a setup reply may carry (a PEM SECP384R1 key is 215 bytes).
MAX_KEY_BYTES = 4096
#: Longest ciphertext or key share a reply may carry (Flower's are under 1 KiB).
MAX_SECRET_BYTES = 1 << 16
#: The curve of SecAgg+'s keys (Flower 1.42's ``generate_key_pairs``).
KEY_CURVE = ec.SECP384R1.name
#: The dtype of every array of a masked vector (quantized values plus int64 masks, mod 2**32).
MASKED_DTYPE = "int64"


# --- thresholds -------------------------------------------------------------------


def workflow_counts(num_shares: float, threshold: float) -> tuple[int | float, int | float]:
    """Run-config values in the types :class:`SecAggPlusWorkflow` reads.

    Flower reads a ``float`` as a fraction and an ``int`` as a count.

    Args:
        num_shares: ``secagg-num-shares``: <= 1 a fraction of the sampled
            clients, an integer > 2 a count.
        threshold: ``secagg-reconstruction-threshold``: <= 1 a fraction of
            the shares, an integer > 1 a count (less than a count of shares).

    Raises:
        PollenError: A value is neither.
    """
    if num_shares <= 1:
        shares: int | float = float(num_shares)
    elif num_shares > 2 and float(num_shares).is_integer():
        shares = int(num_shares)
    else:
        raise PollenError(
            f"secagg-num-shares {num_shares:g} is neither a fraction (<= 1) nor a count "
            "(an integer > 2)."
        )
    if threshold <= 1:
        thr: int | float = float(threshold)
    elif float(threshold).is_integer():
        thr = int(threshold)
    else:
        raise PollenError(
            f"secagg-reconstruction-threshold {threshold:g} is neither a fraction (<= 1) "
            "nor a count (an integer > 1)."
        )
    if isinstance(shares, int) and isinstance(thr, int) and thr >= shares:
        raise PollenError(
            f"secagg-reconstruction-threshold ({thr}) must be less than secagg-num-shares "
            f"({shares})."
        )
    return shares, thr


def resolve_protocol(num_shares: float, threshold: float, clients: int) -> tuple[int, int]:
    """Shares and threshold SecAgg+ uses for a round of ``clients`` sampled clients.

    Mirrors ``SecAggPlusWorkflow.setup_stage`` of Flower 1.42: a fractional
    share count is ``round(fraction * clients)``, made odd if below
    ``clients``, and ``clients`` if that leaves <= 2; a fractional threshold
    is ``max(2, round(fraction * shares))``. Each client's neighbourhood
    (itself included) holds ``min(clients, shares)`` clients (rounded up to
    odd); every client needs ``threshold`` of its neighbours alive to the
    end, so ``neighbourhood - threshold`` dropouts are tolerated.

    Returns:
        ``(shares, threshold)``.
    """
    shares_in, thr_in = workflow_counts(num_shares, threshold)
    if isinstance(shares_in, float):
        shares = round(shares_in * clients)
        if shares < clients and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = clients
    else:
        shares = shares_in
    thr = max(round(thr_in * shares), 2) if isinstance(thr_in, float) else thr_in
    return shares, thr


def tolerated_dropouts(num_shares: float, threshold: float, clients: int) -> int:
    """Clients that may drop out of a round after setup without failing it.

    Args:
        num_shares: ``secagg-num-shares`` (see :func:`workflow_counts`).
        threshold: ``secagg-reconstruction-threshold``.
        clients: Clients sampled for the round.

    Returns:
        ``max(0, neighbourhood - threshold)`` where the neighbourhood is
        ``min(clients, shares)`` (shares made odd when below ``clients``).
    """
    shares, thr = resolve_protocol(num_shares, threshold, clients)
    if shares != clients and shares % 2 == 0:
        shares += 1
    return max(0, min(clients, shares) - thr)


# --- server side -------------------------------------------------------------------


def _fit_metrics(_: list[tuple[int, dict]]) -> dict:
    """Legacy FedAvg's metrics aggregation: none (Pollen aggregates them itself)."""
    return {}


def make_legacy_context(
    grid: Grid, nodes: Sequence[int], rnd: int, arrays: ArrayRecord, config: dict
) -> LegacyContext:
    """The :class:`LegacyContext` that runs one SecAgg+ round over exactly ``nodes``.

    A legacy FedAvg with ``fraction_fit=1`` and all minimums ``len(nodes)``
    over a client manager that holds only ``nodes``: Pollen's strategy has
    already sampled them. The FitIns config is ``{"server-round": rnd,
    **config}``, as Pollen's own strategy sends.
    """
    n = len(nodes)
    fit_config = {"server-round": rnd, **config}
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        on_fit_config_fn=lambda _: dict(fit_config),
        fit_metrics_aggregation_fn=_fit_metrics,
    )
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=0))
    state = RecordDict(
        {
            MAIN_PARAMS_RECORD: _as_legacy_record(arrays),
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
        }
    )
    base = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    return LegacyContext(context=base, strategy=strategy, client_manager=manager)


def _as_legacy_record(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the order of their keys ``"0"``, ``"1"``, ... (legacy Parameters order)."""
    return ArrayRecord(array_dict={k: arrays[k] for k in arrays})


def _from_legacy_record(record: ArrayRecord) -> list[np.ndarray]:
    """Arrays of a record built from legacy Parameters, in order."""
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))


def payload_bytes(content: RecordDict) -> int:
    """Bytes of arrays plus ``bytes`` config values (keys, ciphertexts, masked vectors)."""
    total = sum(record_bytes(r) for r in content.array_records.values())
    for rec in content.config_records.values():
        for value in rec.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def _stage(msg: Message) -> str:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(cfg.get(Key.STAGE, "?")) if cfg is not None else "?"


# --- what each stage's reply must carry ----------------------------------------------


def _config(reply: Message) -> ConfigRecord:
    cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is None:
        raise Invalid("its reply has no SecAgg+ record")
    return cfg


def _list_of(cfg: ConfigRecord, key: str, kind: type, what: str) -> list:
    """``cfg[key]``, a list of ``kind`` values (never booleans)."""
    value = cfg.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value
    ):
        raise Invalid(f"its {what} is not a list of {kind.__name__}")
    return value


def _check_public_key(key: object) -> bytes:
    """``key``: a PEM public key on SecAgg+'s curve, at most :data:`MAX_KEY_BYTES`."""
    if not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES:
        raise Invalid(f"its public keys are not two byte strings of at most {MAX_KEY_BYTES} bytes")
    try:
        loaded = serialization.load_pem_public_key(key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Invalid("a public key it sent is not a PEM public key") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != KEY_CURVE:
        raise Invalid(f"a public key it sent is not a {KEY_CURVE} key")
    return key


def _check_setup(reply: Message, request: Message, shapes: Sequence[tuple]) -> None:
    """Setup: two different public keys."""
    cfg = _config(reply)
    pk1 = _check_public_key(cfg.get(Key.PUBLIC_KEY_1))
    if pk1 == _check_public_key(cfg.get(Key.PUBLIC_KEY_2)):
        raise Invalid("its two public keys are the same")


def _check_share_keys(reply: Message, request: Message, shapes: Sequence[tuple]) -> None:
    """Share keys: one ciphertext for each neighbour it was sent the keys of, itself aside."""
    cfg = _config(reply)
    dsts = _list_of(cfg, Key.DESTINATION_LIST, int, "destination list")
    ciphertexts = _list_of(cfg, Key.CIPHERTEXT_LIST, bytes, "ciphertext list")
    sent = request.content.config_records[RECORD_KEY_CONFIGS]
    node = request.metadata.dst_node_id
    neighbours = sorted(int(k) for k in sent if k != Key.STAGE and int(k) != node)
    if len(ciphertexts) != len(dsts) or sorted(dsts) != neighbours:
        raise Invalid("its key shares are not one ciphertext for each of its neighbours")
    if any(len(c) > MAX_SECRET_BYTES for c in ciphertexts):
        raise Invalid(f"a ciphertext it sent is over {MAX_SECRET_BYTES} bytes")


def plaintext_part(reply: Message) -> tuple[int, dict[str, float]]:
    """The clear part of a collect-stage reply: its example count and train metrics.

    Raises:
        Invalid: Either is not what Pollen's client sends.
    """
    metrics = reply.content.config_records.get("fitres.metrics", ConfigRecord())
    count = reply.content.metric_records.get("fitres.num_examples")
    if count is not None:
        n = example_count(count, "num_examples")
    if count is None or NUM_EXAMPLES_KEY in metrics:  # under DP the weight is 1, not the count
        n = example_count(metrics, NUM_EXAMPLES_KEY)
    return n, checked_values(metrics, TRAIN_METRICS)


def _check_collect(reply: Message, request: Message, shapes: Sequence[tuple]) -> None:
    """Collect masked vectors: one int64 array per shape, nothing in the clear but metrics.

    Each ``.npy`` entry is read by :func:`pollen.wire.wire_array` (the header matched,
    never :func:`numpy.load`, no copy), against ``shapes``: the weight factor's
    ``(1,)`` and the global model's arrays.
    """
    vectors = _list_of(_config(reply), Key.MASKED_PARAMETERS, bytes, "masked vector")
    if len(vectors) != len(shapes):
        raise Invalid(
            f"its masked vector has {len(vectors)} arrays, not {len(shapes)} (a weight "
            "factor and one per model array)"
        )
    for i, (data, shape) in enumerate(zip(vectors, shapes, strict=True)):
        array = Array(dtype=MASKED_DTYPE, shape=tuple(shape), stype="numpy.ndarray", data=data)
        try:
            wire_array(array, f"array {i} of a masked vector")
        except WireFormatError:
            raise Invalid(
                f"array {i} of its masked vector is not an {MASKED_DTYPE} .npy array of "
                f"shape {tuple(shape)}"
            ) from None
    if any(len(record) for record in reply.content.array_records.values()):
        raise Invalid("it sent arrays in the clear beside its masked vector")
    try:  # what the workflow reads of it (its legacy FitRes)
        compat.recorddict_to_fitres(reply.content, keep_input=True)
    except (KeyError, TypeError, ValueError):
        raise Invalid("its reply has no legacy fit result (status, metrics, count)") from None
    plaintext_part(reply)


def _check_unmask(reply: Message, request: Message, shapes: Sequence[tuple]) -> None:
    """Unmask: one Shamir share for each neighbour it was asked about."""
    cfg = _config(reply)
    nids = _list_of(cfg, Key.NODE_ID_LIST, int, "node id list")
    shares = _list_of(cfg, Key.SHARE_LIST, bytes, "share list")
    sent = request.content.config_records[RECORD_KEY_CONFIGS]
    asked = [*sent[Key.ACTIVE_NODE_ID_LIST], *sent[Key.DEAD_NODE_ID_LIST]]  # type: ignore[misc]
    if len(shares) != len(nids) or sorted(nids) != sorted(asked):
        raise Invalid("its key shares are not one for each neighbour it was asked about")
    if any(len(s) < 20 or (len(s) - 4) % 16 or len(s) > MAX_SECRET_BYTES for s in shares):
        raise Invalid("a key share it sent is not a Shamir share (4 + 16k bytes)")


_STAGE_CHECKS = {
    Stage.SETUP: _check_setup,
    Stage.SHARE_KEYS: _check_share_keys,
    Stage.COLLECT_MASKED_VECTORS: _check_collect,
    Stage.UNMASK: _check_unmask,
}


def stage_problems(
    stage: str, replies: dict[int, Message], sent: dict[int, Message], shapes: Sequence[tuple]
) -> dict[int, str]:
    """Node -> why its reply does not carry what ``stage`` needs, for the replies that do not.

    What the workflow reads of a reply is checked before it reads it: its
    types and counts, the public keys, the masked vector's arrays against
    ``shapes``. A setup key that two clients sent is rejected for both. What
    is encrypted for, or secret-shared with, other clients cannot be checked
    here.
    """
    check = _STAGE_CHECKS.get(stage)  # type: ignore[call-overload]
    problems: dict[int, str] = {}
    if check is None:
        return problems
    for node, reply in replies.items():
        if reply.metadata.src_node_id != node:
            problems[node] = "its reply names another node as its sender"
            continue
        try:
            check(reply, sent[node], shapes)
        except Invalid as err:
            problems[node] = str(err)
    if stage == Stage.SETUP:
        holders: dict[object, list[int]] = {}
        for node, reply in replies.items():
            if node not in problems:
                cfg = _config(reply)
                for key in (cfg[Key.PUBLIC_KEY_1], cfg[Key.PUBLIC_KEY_2]):
                    holders.setdefault(key, []).append(node)
        for nodes in holders.values():
            for node in nodes if len(nodes) > 1 else ():
                problems[node] = "it sent a public key another client sent too"
    return problems


class DeadlineGrid:
    """A Grid for the workflow: hard deadlines, reply checks, failure and byte bookkeeping.

    ``SecAggPlusWorkflow`` talks to clients with ``grid.send_and_receive``
    only; that call can hang in Flower 1.42 when a node dies mid-push. Here
    it is :func:`pollen.server.exchange.exchange` with ``ctx.timeout``; error
    replies and missing replies are recorded as the client's ``train``
    failure, payload bytes in ``ctx.record``, and the collect-stage replies
    (masked vectors plus plaintext metrics) kept in :attr:`collected`.
    Every reply is checked against what its stage must carry
    (:func:`stage_problems`) before the workflow reads it; one that fails is
    that client's ``rejected: <reason>`` and is not handed on, so the
    workflow sees a dropout and SecAgg+ recovers from it as from any other.
    Everything else is delegated to ``ctx.grid``.

    Args:
        ctx: The round.
        shapes: Shapes of the masked vector's arrays: ``(1,)`` (the weight
            factor), then the global model's.
    """

    def __init__(self, ctx: RoundContext, shapes: Sequence[tuple]) -> None:
        self.grid = ctx.grid
        self.timeout = ctx.timeout
        self.rnd = ctx.rnd
        self.record = ctx.record
        self.clients = ctx.clients
        self.shapes = list(shapes)
        #: The stage of the last exchange (for errors).
        self.stage = "?"
        #: Node id -> its reply in the collect-masked-vectors stage.
        self.collected: dict[int, Message] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Exchange ``messages`` within ``min(timeout, self.timeout)``; return the good replies."""
        messages = list(messages)
        if not messages:
            return []
        stage = self.stage = _stage(messages[0])
        self.record.bytes_sent += sum(payload_bytes(m.content) for m in messages)
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        result = exchange(self.grid, messages, limit, pack=False)
        phase = f"train (secagg {stage})"
        answered: dict[int, Message] = {}
        for node, msg in result.replies.items():
            if msg.has_error():
                c = self.clients.fail(node, phase, readable_reason(msg.error.reason))
                log(WARNING, "Round %d: client %s failed: %s", self.rnd, c.name, c.error)
                continue
            self.clients(msg, node)
            self.record.bytes_received += payload_bytes(msg.content)
            answered[node] = msg
        sent = {m.metadata.dst_node_id: m for m in messages}
        for node, reason in stage_problems(stage, answered, sent, self.shapes).items():
            c = self.clients.fail(node, phase, f"rejected: {reason}")
            log(WARNING, "Round %d: %s reply of client %s rejected: %s", self.rnd, stage,
                c.name, reason)  # fmt: skip
            del answered[node]
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.collected.update(answered)
        for node in result.missing:
            c = self.clients.fail(node, phase, f"no reply within round-timeout ({limit:g} s)")
            log(WARNING, "Round %d: client %s sent no %s reply", self.rnd, c.name, phase)
        errors = [m for m in result.replies.values() if m.has_error()]
        return errors + list(answered.values())


class EarlyDropoutSecAggPlus(SecAggPlusWorkflow):
    """Flower 1.42's SecAgg+ workflow, recovering from dropouts before the masked vectors too.

    Flower's workflow counts a client that dropped out in the setup or share
    keys stage (it sent no reply, or :class:`DeadlineGrid` rejected it) among
    the dead of the unmask stage: it asks the others for key shares they
    never received (each of them fails) and itself needs shares of that
    client to unmask, so the round halts. Such a client's secrets were never
    shared and no one masked a vector with its keys, so here it is removed
    from the round before the masked vectors are collected: the sampled
    clients and every neighbourhood, as if it had never been sampled.
    """

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        """Drop the clients lost before this stage from the round, then collect."""
        early = state.sampled_node_ids - state.active_node_ids
        if early:
            state.sampled_node_ids = set(state.active_node_ids)
            for nid in early:
                state.nid_to_neighbours.pop(nid, None)
            for neighbours in state.nid_to_neighbours.values():
                neighbours -= early
        return super().collect_masked_vectors_stage(grid, context, state)


def learn_train_examples(
    grid: Grid, nodes: Iterable[int], counts: dict[int, int], timeout: float
) -> None:
    """Ask clients not in ``counts`` how many training examples they hold."""
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"request": TRAIN_EXAMPLES_REQUEST})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in nodes
        if node not in counts
    ]
    for node, reply in exchange(grid, messages, timeout).replies.items():
        info = reply.content.config_records.get("client") if reply.has_content() else None
        if info is not None and TRAIN_EXAMPLES_REQUEST in info:
            try:
                counts[node] = example_count(info, TRAIN_EXAMPLES_REQUEST)
            except Invalid as err:  # not counted: the others' maximum bounds the weights
                log(WARNING, "Client %s: %s", node, err)


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ protocol's settings.

    Attributes:
        num_shares: ``secagg-num-shares`` (see :func:`workflow_counts`); default 1.0.
        reconstruction_threshold: ``secagg-reconstruction-threshold``; default 0.67.
        clipping_range: Every scaled update value is clipped to +- this; default 8.0.
    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0

    @classmethod
    def of(cls, cfg: RunConfig) -> SecAggSettings:
        """The ``secagg-*`` settings of ``cfg``."""
        return cls(
            cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold, cfg.secagg_clipping_range
        )


def secure_train_phase(
    ctx: RoundContext,
    nodes: Sequence[int],
    arrays: ArrayRecord,
    config: dict,
    protocol: SecAggSettings,
    *,
    max_weight: float = 1000.0,
    min_valid: int = 1,
) -> tuple[ArrayRecord, DeadlineGrid]:
    """One round of training under SecAgg+ over the sampled ``nodes``.

    Fills ``ctx.record`` (``train`` aggregate, bytes) and ``ctx.clients``
    (per-client train loss, accuracy, examples, seconds; failures per
    protocol stage) as :func:`pollen.server.phases.train_phase` does.

    Args:
        ctx: The round (``ctx.timeout``: deadline of each of the protocol's
            four exchanges, seconds).
        nodes: Sampled node ids (at least 2).
        arrays: Global weights, keys ``"0"``, ``"1"``, ...
        config: Train config sent to clients (``learning-rate``).
        protocol: Shares, reconstruction threshold and clipping range.
        max_weight: >= every client's ``num_examples``.
        min_valid: Updates the aggregate must hold.

    Returns:
        The new global weights (``arrays`` plus the weighted mean update, in
        ``arrays``' dtypes), and the grid wrapper (its replies, for tests).

    Raises:
        PollenError: Fewer than 2 clients, the protocol halted (too many
            dropouts), fewer than ``min_valid`` updates, or the aggregate is
            not finite or has the wrong shapes.
    """
    rnd, clients = ctx.rnd, ctx.clients
    num_shares, threshold = protocol.num_shares, protocol.reconstruction_threshold
    if len(nodes) < 2:
        raise PollenError(
            f"Round {rnd}: SecAgg+ needs at least 2 clients in a round, {len(nodes)} were "
            "sampled. Raise --min-clients or --fraction-train, or drop --secagg."
        )
    shares, thr = workflow_counts(num_shares, threshold)
    workflow = EarlyDropoutSecAggPlus(
        shares,
        thr,
        max_weight=float(max_weight),
        clipping_range=float(protocol.clipping_range),
        quantization_range=QUANTIZATION_RANGE,
        timeout=ctx.timeout,
    )
    context = make_legacy_context(ctx.grid, nodes, rnd, arrays, config)
    before = context.state.array_records[MAIN_PARAMS_RECORD]
    wrapped = DeadlineGrid(ctx, [(1,), *(tuple(a.shape) for a in arrays.values())])
    try:
        workflow(wrapped, context)  # type: ignore[arg-type]
    except (ArithmeticError, IndexError, KeyError, TypeError, ValueError) as err:
        log(DEBUG, "SecAgg+ workflow failed", exc_info=True)
        raise PollenError(
            f"Round {rnd}: secure aggregation failed in its {wrapped.stage} stage "
            f"({type(err).__name__}: {str(err)[:200]}). Every reply had the form its stage "
            "needs, so a client sent secret material (a key share or ciphertext meant for "
            "another client) it did not compute honestly, which the server cannot read to "
            f"check; failed: {clients.failures()}. The last completed round is "
            "checkpointed: continue with --resume RUN_DIR, leaving out clients you do not "
            "trust, or drop --secagg to have every update checked."
        ) from None
    after = context.state.array_records[MAIN_PARAMS_RECORD]
    if after is before:
        raise PollenError(
            f"Round {rnd}: secure aggregation halted: too few clients stayed to the end "
            f"({len(wrapped.collected)} of {len(nodes)} sent masked updates; SecAgg+ "
            f"tolerates {tolerated_dropouts(num_shares, threshold, len(nodes))} "
            f"dropout(s) here); failed: {clients.failures()}. The last completed round "
            "is checkpointed: continue with --resume RUN_DIR, or lower "
            "--secagg-reconstruction-threshold."
        )
    used = _record_clients(wrapped.collected, clients, ctx.record)
    if used < min_valid:
        raise PollenError(
            f"Round {rnd} has {used} update(s) in its secure aggregate, fewer than the "
            f"{min_valid} --min-clients needs; failed: {clients.failures()}."
        )
    return _add_mean_update(arrays, _from_legacy_record(after), rnd), wrapped


def _add_mean_update(arrays: ArrayRecord, mean_update: list[np.ndarray], rnd: int) -> ArrayRecord:
    """``arrays`` plus the secure aggregate's mean update, in ``arrays``' dtypes.

    Raises:
        PollenError: The result has the wrong array count, shapes or dtypes,
            or values that are not finite.
    """
    start = arrays.to_numpy_ndarrays()
    new = []
    for g, u in zip(start, mean_update, strict=False):
        if np.issubdtype(g.dtype, np.floating):
            new.append((g.astype(np.float64) + u).astype(g.dtype))
        else:
            new.append((g + np.rint(u)).astype(g.dtype))
    # Individual updates are masked, so validate_update can only see the aggregate:
    # it must have the global model's shapes and dtypes and finite values.
    reason = validate_update(start, new, 0.0) if len(new) == len(start) else "wrong array count"
    if reason is not None:
        raise PollenError(
            f"Round {rnd}: the secure aggregate is unusable: {reason}. Every client's "
            "masked vector had the model's form, so one of them masked an update or weight "
            "it did not compute honestly (which one, the server cannot tell: single "
            "updates are masked). The last completed round is checkpointed: continue with "
            "--resume RUN_DIR, leaving out clients you do not trust, or drop --secagg to "
            "have every update checked."
        )
    return ArrayRecord(array_dict={k: Array(a) for k, a in zip(arrays, new, strict=True)})


def _record_clients(
    collected: dict[int, Message], clients: RoundClients, record: RoundRecord
) -> int:
    """Per-client and aggregated train metrics from the plaintext part of the masked replies."""
    weights, losses, accuracies = [], [], []
    for node, msg in collected.items():
        c = clients.get(node)
        try:  # checked when it arrived (stage_problems); a reply that fails is not collected
            n, m = plaintext_part(msg)
        except Invalid as err:
            log(WARNING, "Client %s sent unusable train metrics: %s", c.name, err)
            continue
        c.train_loss, c.train_accuracy = m.get("train_loss"), m.get("train_accuracy")
        c.train_examples, c.fit_seconds = n, m.get("fit_seconds")
        weights.append(n)
        losses.append(c.train_loss)
        accuracies.append(c.train_accuracy)
    total = sum(weights)
    if collected and total > 0:

        def mean(values: list) -> float | None:
            if any(v is None for v in values):
                return None
            return float(sum(w * v for w, v in zip(weights, values, strict=True)) / total)

        record.train = {"loss": mean(losses), "accuracy": mean(accuracies), "examples": total}
    return len(collected)


class SecureAggregation:
    """SecAgg+ for :func:`pollen.server.rounds.run_rounds` (``RoundSettings.train``).

    Holds the run's SecAgg+ settings and the clients' training-example counts
    (asked once per client). :meth:`train_phase` is a
    :class:`pollen.server.phases.TrainPhase`.

    Args:
        cfg: The run config (``secagg-*`` settings).
    """

    def __init__(self, cfg: RunConfig) -> None:
        workflow_counts(cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold)  # check
        self.protocol = SecAggSettings.of(cfg)
        #: Node id -> training examples (learned before the node's first round).
        self.train_examples: dict[int, int] = {}
        self._warned_norm = False

    def train_phase(
        self,
        ctx: RoundContext,
        arrays: ArrayRecord,
        config: dict,
        *,
        max_update_norm: float = 0.0,
        min_valid: int = 1,
    ) -> ArrayRecord:
        """Sample with ``ctx.strategy``, train under SecAgg+, return the new global arrays.

        ``max_update_norm`` is not checked (single updates are masked; it is logged once).
        """
        grid, rnd, timeout, clients = ctx.grid, ctx.rnd, ctx.timeout, ctx.clients
        if max_update_norm > 0 and not self._warned_norm:
            log(
                INFO,
                "SecAgg+: max-update-norm (%g) is not checked: single updates are masked; "
                "only the aggregate's shapes and finiteness are",
                max_update_norm,
            )
            self._warned_norm = True
        with clients.sampling(grid, rnd, timeout) as view:
            train_config = ConfigRecord(dict(config))
            sampled = list(ctx.strategy.configure_train(rnd, arrays, train_config, view))
        nodes = [m.metadata.dst_node_id for m in sampled]
        # The strategy's own train config (server-round, learning-rate, anything it adds).
        config = dict(sampled[0].content["config"]) if sampled else dict(config)
        learn_names(grid, nodes, clients.names, min(timeout, 15))
        learn_train_examples(grid, nodes, self.train_examples, timeout)
        known = [self.train_examples[n] for n in nodes if n in self.train_examples]
        max_weight = float(max(known)) if known else 1000.0
        p = self.protocol
        shares, thr = resolve_protocol(p.num_shares, p.reconstruction_threshold, len(nodes))
        dp = ctx.strategy if isinstance(ctx.strategy, ClientLevelDP) else None
        if dp is not None:  # distributed DP: each client adds a share of the noise
            config, max_weight, p = _distributed_dp(dp, config, p, thr, rnd)
        log(
            INFO,
            "Round %d: SecAgg+ over %d clients, %d shares, threshold %d, max weight %g",
            rnd,
            len(nodes),
            shares,
            thr,
            max_weight,
        )
        start = time.perf_counter()
        new, wrapped = secure_train_phase(
            ctx, nodes, arrays, config, p, max_weight=max_weight, min_valid=min_valid
        )
        if dp is not None:
            dp.account_secure_round(rnd, len(wrapped.collected), thr)
        log(INFO, "Round %d: secure aggregation took %.1f s", rnd, time.perf_counter() - start)
        return new


def _distributed_dp(
    dp: ClientLevelDP, config: dict, protocol: SecAggSettings, shares: int, rnd: int
) -> tuple[dict, float, SecAggSettings]:
    """The train config, weight bound and protocol of a round under distributed DP.

    Every client adds noise of std ``z * C / sqrt(shares)`` (``shares``: the
    round's reconstruction threshold, the fewest clients a completed round
    sums), weighs 1 (``max_weight`` 1: SecAgg+'s weight factor is then exactly
    1 for everyone), and SecAgg+'s clipping range is widened where it would
    clip the noisy values (:func:`pollen.server.distributed_dp.clipping_range_for`).
    """
    std = dp.client_noise_std(shares)
    wanted = clipping_range_for(dp.clipping_norm, std, protocol.clipping_range)
    if wanted > protocol.clipping_range:
        log(
            INFO,
            "Round %d: distributed DP: SecAgg+ clipping range %g widened to %.4g "
            "(clipping norm %g + %g x client noise std %.4g) so no noisy value is clipped",
            rnd, protocol.clipping_range, wanted, dp.clipping_norm, RANGE_SIGMAS, std,
        )  # fmt: skip
    log(
        INFO,
        "Round %d: distributed DP: every client clips to %g and adds noise of std %.4g "
        "(z %g, sized for the %d clients a completed round sums at least)",
        rnd, dp.clipping_norm, std, dp.noise_multiplier, shares,
    )  # fmt: skip
    return (
        {**config, **dp.noise_config(shares)},
        1.0,
        dataclasses.replace(protocol, clipping_range=wanted),
    )
