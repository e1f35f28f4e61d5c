"""The round loop: send the global weights, aggregate, evaluate, record.

Flower's ``Strategy.start`` runs rounds too, but offers no hook between
rounds; Pollen needs one to record per-client history, write outputs and a
checkpoint after every round, and stop at a target accuracy. So this loop
drives the strategy's own ``configure_*``/``aggregate_*`` methods through
the round's phases (:mod:`pollen.server.phases`), exactly as
``Strategy.start`` does, and calls :class:`RoundObserver` after each round.
The server's central evaluation runs beside the next round where it can
(:class:`BesideEvaluation`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Protocol

from flwr.app import ArrayRecord, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen.compress import Codec
from pollen.server.exchange import wait_for_quorum
from pollen.server.history import History, RoundRecord
from pollen.server.phases import (
    BatchNormKeys,
    RoundClients,
    RoundContext,
    TrainPhase,
    evaluate_phase,
    train_phase,
)
from pollen.server.privacy import example_privacy, privacy_record
from pollen.wire import HeldWeights, as_received

EvaluateFn = Callable[[int, ArrayRecord], "dict[str, float] | None"]


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


# --- the loop ------------------------------------------------------------------------


@dataclass
class RoundSettings:
    """Everything :func:`run_rounds` needs besides the grid, strategy and starting weights.

    Attributes:
        num_rounds: The last round to run.
        history: The run's history; each round is appended to it.
        timeout: Deadline of each exchange with clients (and of the quorum wait), seconds.
        train_config: Train config sent to the clients (e.g. ``learning-rate``).
        evaluate_fn: The server's central evaluation; None: none.
        observer: Told after each round (:class:`RoundObserver`).
        target_accuracy: Stop once the central accuracy reaches it; 0: never.
        first_round: The first round to run (a resumed run's next one).
        min_clients: Quorum to start a round, and valid updates a round needs.
        max_update_norm: Bound on an update's L2 norm, and on the L2 distance
            of clients' (and the merged) BatchNorm statistics from the global
            ones; 0: none.
        names: Client names by node id learned so far; filled in on the way.
        train: The train phase; None: :func:`train_phase`.
        bn_keys: The model's BatchNorm moving mean and variance keys, asked for
            when a client first sends statistics; only these take the
            clients' re-estimated ones. None: clients' statistics are ignored.
        release: Tells the clients that the run is over.
        held_weights: Clients keep evaluated weights; train messages carry what changed.
        sampling_seed: Seed of each round's client sample; None: Flower's unseeded draw.
        codec_down: Compression of the weights sent to clients (:mod:`pollen.compress`).
        example_dp: Under ``--dp example``: what each round's privacy record
            states beside the clients' largest epsilon
            (:func:`pollen.server.privacy.example_privacy`); None: not that DP.
    """

    num_rounds: int
    history: History
    timeout: float
    train_config: dict | None = None
    evaluate_fn: EvaluateFn | None = None
    observer: RoundObserver | None = None
    target_accuracy: float = 0.0
    first_round: int = 1
    min_clients: int = 1
    max_update_norm: float = 0.0
    names: dict[int, str] | None = None
    train: TrainPhase | None = None
    bn_keys: BatchNormKeys | None = None
    release: Callable[[], None] | None = None
    held_weights: bool = False
    sampling_seed: int | None = None
    codec_down: Codec | None = None
    example_dp: dict[str, Any] | None = None


def run_rounds(
    grid: Grid, strategy: Strategy, arrays: ArrayRecord, settings: RoundSettings
) -> ArrayRecord:
    """Run rounds ``settings.first_round..num_rounds``; return the final global arrays.

    Each round: the strategy samples clients and sends them ``arrays``; their
    updates are validated (:func:`pollen.server.aggregation.validate_update`)
    and the valid ones aggregated; the strategy samples clients to evaluate
    the new global model (with ``sampling_seed``, those that trained:
    :func:`pollen.server.sampling.seeded_sampling`), and they return
    re-estimated BatchNorm statistics, which replace the averaged ones
    (every reply is checked first: :mod:`pollen.server.replies`); the
    server evaluates centrally if ``evaluate_fn`` is given; the round is
    appended to ``history`` and ``observer.round_done`` is called.

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

    ``train`` replaces :func:`train_phase` (a :class:`TrainPhase`): secure
    aggregation passes ``pollen.server.secagg.SecureAggregation.train_phase``,
    under which the server sees only the aggregate. ``bn_keys=None``
    ignores the clients' BatchNorm statistics (per-client data statistics);
    so does a strategy with a DP accountant.

    ``held_weights``: the clients keep the weights of each evaluate message,
    and the next round's train message to a client that evaluated carries
    only the arrays that changed since (:class:`pollen.wire.HeldWeights`;
    with :func:`train_phase` only). For deployments: a simulated client's
    messages do not leave the process.

    Raises:
        PollenError: Fewer than ``min_clients`` clients are connected within
            ``timeout``, or fewer valid updates came back in a round.
    """
    return _RoundLoop(grid, strategy, settings).run(arrays)


class _RoundLoop:
    """The state :func:`run_rounds` carries from round to round."""

    def __init__(self, grid: Grid, strategy: Strategy, settings: RoundSettings) -> None:
        self.grid = grid
        self.strategy = strategy
        self.settings = settings
        self.names = settings.names if settings.names is not None else {}
        #: The previous round's central evaluation, still running beside this one.
        self.pending: BesideEvaluation | None = None
        self.gate = TrainSentGate(grid)
        use_held = settings.held_weights and settings.train is None
        self.held = HeldWeights() if use_held else None
        self.train: TrainPhase = settings.train or functools.partial(train_phase, held=self.held)
        self.bn_keys = functools.cache(settings.bn_keys) if settings.bn_keys else None

    def run(self, arrays: ArrayRecord) -> ArrayRecord:
        s = self.settings
        try:
            for rnd in range(s.first_round, s.num_rounds + 1):
                start = time.perf_counter()
                record, arrays = self.client_phases(rnd, arrays, start)
                if self.pending is not None:  # the previous round is recorded before this one
                    previous, self.pending = self.pending, None
                    previous.wait()
                if self.server_phase(record, self.recorded(arrays), start):
                    break
        except BaseException:
            if self.pending is not None:  # the completed round is still recorded and checkpointed
                self.gate.sent.set()
                self.pending.wait(quiet=True)
            raise
        if self.pending is not None:
            self.pending.wait()
        return arrays

    def client_phases(
        self, rnd: int, arrays: ArrayRecord, start: float
    ) -> tuple[RoundRecord, ArrayRecord]:
        """Round ``rnd``'s train and evaluate phases; return its record and new arrays."""
        s = self.settings
        record = RoundRecord(round=rnd)
        clients = RoundClients(self.names, s.sampling_seed)
        ctx = RoundContext(self.gate, self.strategy, rnd, s.timeout, record, clients, s.codec_down)
        # Flower's samplers wait for enough nodes forever: bound that wait here.
        wait_for_quorum(self.grid, s.min_clients, s.timeout, rnd)
        arrays = self.train(
            ctx,
            arrays,
            s.train_config or {},
            max_update_norm=s.max_update_norm,
            min_valid=s.min_clients,
        )
        record.privacy = privacy_record(self.strategy) or example_privacy(
            clients.by_node.values(), s.example_dp
        )
        failed = [n for n, c in clients.by_node.items() if c.error]
        record.phase_seconds["train"] = time.perf_counter() - start
        wait_for_quorum(self.grid, s.min_clients, s.timeout, rnd)
        ctx = dataclasses.replace(ctx, grid=self.grid)
        arrays = evaluate_phase(
            ctx, arrays, failed, self.bn_keys, self.held, max_update_norm=s.max_update_norm
        )
        record.phase_seconds["evaluate"] = (
            time.perf_counter() - start - sum(record.phase_seconds.values())
        )
        record.clients = clients.sorted()
        record.seconds = time.perf_counter() - start
        return record, arrays

    def recorded(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model a round evaluates, saves and checkpoints: the one the clients hold.

        With ``codec_down`` and clients' BatchNorm statistics, that is the
        weights as the clients decoded them (``codec_down``'s rounding) with the
        statistics merged from their re-estimates, which describe *those*
        weights: the server's exact weights with them scored 1.3 points lower
        on the reference model (docs/compression.md). The server keeps its
        exact weights for the next round, so the rounding never accumulates.
        """
        codec = self.settings.codec_down
        if codec is None or self.bn_keys is None:
            return arrays
        stats = set(self.bn_keys())
        weights = ArrayRecord(array_dict={k: a for k, a in arrays.items() if k not in stats})
        decoded = as_received(weights, codec) if len(weights) else weights
        return ArrayRecord(
            array_dict={k: a if k in stats else decoded[k] for k, a in arrays.items()}
        )

    def server_phase(self, record: RoundRecord, arrays: ArrayRecord, start: float) -> bool:
        """Evaluate centrally and record the round, beside the next one if it can.

        Returns:
            Whether the run stops here (the target accuracy is reached).
        """
        s, rnd = self.settings, record.round
        if s.evaluate_fn is None or s.target_accuracy > 0:
            if s.evaluate_fn is not None:
                record.server = s.evaluate_fn(rnd, arrays) or {}
                record.phase_seconds["server"] = time.perf_counter() - start - record.seconds
                record.seconds = time.perf_counter() - start
            self.finish(record, arrays, self.strategy)
            accuracy = record.server.get("accuracy", 0.0)
            if s.target_accuracy > 0 and accuracy >= s.target_accuracy:
                log(INFO, "Target accuracy %.3f reached after round %d", s.target_accuracy, rnd)
                return True
            return False
        last = rnd == s.num_rounds
        if last and s.release is not None:
            s.release()
        # The next round changes the strategy's state (FedOpt's moments, the DP
        # accountant): the round is recorded with its state as it is now.
        state = self.strategy if last else copy.deepcopy(self.strategy)
        self.gate = TrainSentGate(self.grid)  # the next round's
        after = None if last else self.gate.sent
        self.pending = BesideEvaluation(s.evaluate_fn, self.finish, record, arrays, state, after)
        return False

    def finish(self, record: RoundRecord, arrays: ArrayRecord, state: Strategy) -> None:
        """Record the round: history, console line, observer."""
        s = self.settings
        s.history.rounds.append(record)
        log(INFO, progress_line(record, s.num_rounds))
        if s.observer is not None:
            s.observer.round_done(record, arrays, s.history, state)


class TrainSentGate:
    """The grid for a round's train phase, noting when its training messages have left.

    The central evaluation beside the round starts then, not before, so that
    it does not compete with packing and sending the round's weights
    (see docs/performance.md#central-evaluation-beside-the-next-round).
    Everything but ``push_messages`` goes to ``grid``.
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


class BesideEvaluation:
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


# --- the console line ------------------------------------------------------------------


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
