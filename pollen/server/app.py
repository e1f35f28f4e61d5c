"""The ServerApp: coordinates rounds and writes the run folder.

The server holds no model. It asks one client for initial weights, then
runs :func:`pollen.server.rounds.run_rounds` with the configured strategy, which
aggregates ``ArrayRecord`` s without knowing the architecture. Only the
optional central evaluation, ``model.keras`` and the list of the model's
BatchNorm statistics (which keys clients may re-estimate) build the model
from :mod:`pollen.models.registry`.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from pollen.compat.flower import (
    is_simulation_grid,
    quick_serverapp_pulls,
    quick_simulation_dispatch,
)
from pollen.compress import parse as parse_codec
from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.files import atomic_write
from pollen.server.checkpoint import RunLock, load_checkpoint, read_manifest, save_checkpoint
from pollen.server.console import tag_pollen_lines
from pollen.server.exchange import (
    announce_run_over,
    learn_names,
    request_initial_arrays,
    run_over_timeout,
    wait_for_clients,
)
from pollen.server.history import (
    History,
    RoundRecord,
    plot_history,
    read_history,
    read_status,
    write_history,
    write_status,
)
from pollen.server.live import LiveStatus, Observers
from pollen.server.model_files import ModelFiles
from pollen.server.phases import TrainPhase
from pollen.server.privacy import make_private, sample_size
from pollen.server.replies import ModelReference, class_names
from pollen.server.rounds import RoundSettings, run_rounds
from pollen.server.sampling import by_name, seeded_order, seeded_sample
from pollen.server.secagg import SecureAggregation
from pollen.server.strategies import check_config, check_sample_size, make_strategy
from pollen.server.tracking import RoundObservers, trackers

app = ServerApp()

#: Seconds to wait for ``min-clients`` to connect before giving up.
CONNECT_TIMEOUT = 600.0
#: Seconds the clients get to tell their names before round 1 (simulated clients
#: first start their workers). Nameless ones are ordered by node id.
START_NAMES_TIMEOUT = 120.0
#: Clients asked in turn for the initial weights before the run gives up.
INITIAL_ARRAYS_TRIES = 3


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run folder: ``cfg.out`` or ``./runs/<timestamp>``, made absolute."""
    out = cfg.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    return Path(out).expanduser().resolve()


class RunFolderWriter:
    """Writes history, plot, model and checkpoint into the run folder after every round.

    The checkpoint (:mod:`pollen.server.checkpoint`) comes last, so it never names a
    round whose history and model are not written yet.
    """

    def __init__(
        self, run_dir: Path, files: ModelFiles, config: dict | None = None, elapsed: float = 0.0
    ) -> None:
        self.run_dir = run_dir
        self.files = files
        self.config = config or {}
        self.started = time.perf_counter() - elapsed

    def round_done(
        self, record: RoundRecord, arrays: ArrayRecord, history: History, strategy
    ) -> None:
        """Persist everything a reader needs after ``record``'s round.

        ``strategy`` (as it stood at the end of the round) goes into the checkpoint.
        """
        history.elapsed_seconds = time.perf_counter() - self.started
        write_history(self.run_dir, history)
        plot_history(self.run_dir, history)
        self.files.save(self.run_dir, arrays)
        save_checkpoint(
            self.run_dir,
            record.round,
            {k: a.numpy() for k, a in arrays.items()},
            strategy,
            history,
            self.config,
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a whole federation as configured by ``context.run_config``."""
    # A reply is listed while its content is still on its way to the SuperLink.
    quick_serverapp_pulls()
    # Thousands of simulated clients: the engine must not scan them all for 10 messages.
    quick_simulation_dispatch(grid)
    tag_pollen_lines()  # the console of `pollen server`/`simulate` shows these lines only
    cfg = RunConfig.from_mapping(context.run_config)
    check_config(cfg)
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    if not lock.acquire(timeout=30.0):
        err = PollenError(
            f"Another pollen server (process {lock.holder() or 'unknown'}) is still writing "
            f"{run_dir}. Stop it first, then start this one again."
        )
        log(ERROR, "%s", err)
        announce_run_over(grid)
        raise err
    try:
        _run_and_report(grid, cfg, run_dir)
    finally:
        lock.release()


def _run_and_report(grid: Grid, cfg: RunConfig, run_dir: Path) -> None:
    previous = read_status(run_dir)
    if cfg.resume and previous is not None and previous.get("status") == "completed":
        err = PollenError(
            f"The run in {run_dir} has already completed; there is nothing to resume. "
            "Start a new run with another --out."
        )
        log(ERROR, "%s", err)
        announce_run_over(grid)
        raise err
    announced = False

    def release() -> None:  # tell the clients once, whichever way the run ends
        nonlocal announced
        if not announced:
            announced = True
            announce_run_over(grid, run_over_timeout(_round_seconds(run_dir), cfg.round_timeout))

    write_status(run_dir, "running")
    log(INFO, "Pollen run folder: %s", run_dir)
    history: History | None = None
    try:
        history = run_federation(grid, cfg, run_dir, release)
    except PollenError as err:
        write_status(run_dir, "failed", str(err), **_last_round(run_dir))
        log(ERROR, "%s", err)
        release()
        raise
    except Exception as err:
        write_status(run_dir, "failed", f"{type(err).__name__}: {err}", **_last_round(run_dir))
        log(ERROR, "%s", traceback.format_exc())
        release()
        raise
    final = history.rounds[-1] if history.rounds else None
    write_status(
        run_dir,
        "completed",
        rounds=len(history.rounds),
        elapsed_seconds=round(history.elapsed_seconds, 2),
        final_server_accuracy=final.server.get("accuracy") if final else None,
        **({"privacy": final.privacy} if final and final.privacy else {}),
        **_target_status(cfg, history),
    )
    release()


def _round_seconds(run_dir: Path) -> list[float]:
    """The seconds of the rounds recorded in ``run_dir`` so far (none: an empty list)."""
    try:
        return [r.seconds for r in read_history(run_dir).rounds]
    except (OSError, ValueError, TypeError):  # no history yet, or one this run cannot read
        return []


def _target_status(cfg: RunConfig, history: History) -> dict:
    """``{"target_accuracy": {...}}`` for status.json when the run had a target.

    ``reached_round`` is the first round whose server test accuracy reached
    the target (None if none did); ``seconds`` is the server's time from the
    start of the run to the end of that round (the run stops there).
    """
    if cfg.target_accuracy <= 0:
        return {}
    hit = next(
        (r for r in history.rounds if r.server.get("accuracy", 0.0) >= cfg.target_accuracy), None
    )
    return {
        "target_accuracy": {
            "target": cfg.target_accuracy,
            "reached_round": hit.round if hit else None,
            "seconds": round(history.elapsed_seconds, 2) if hit else None,
        }
    }


def _last_round(run_dir: Path) -> dict:
    """``{"last_completed_round": N}`` from the checkpoint, for status files."""
    try:
        manifest = read_manifest(run_dir)
    except PollenError:
        manifest = None
    return {"last_completed_round": manifest["round"] if manifest else 0}


@dataclass
class _Start:
    """Where the rounds start: a fresh run's or a checkpoint's state."""

    strategy: Strategy
    history: History
    arrays: ArrayRecord
    first_round: int


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, release: Callable[[], None] | None = None
) -> History:
    """Initialise from a client (or the checkpoint), run the rounds, write outputs.

    ``release`` tells the clients that the run is over; it is called after the
    last round's client phases, so they need not wait for the server's last
    central evaluation (see :func:`pollen.server.rounds.run_rounds`).

    With ``cfg.resume`` the run continues from ``run_dir``'s checkpoint: the
    global weights, the strategy (rebuilt from ``cfg``, given back its saved
    optimizer/DP state) and the history of the completed rounds are restored,
    and the rounds go on from the one after the last completed one.

    Returns:
        The history.
    """
    files = ModelFiles(cfg)
    evaluate_fn = files.evaluate if cfg.server_eval else None
    names: dict[int, str] = {}  # node id to client name, learned on the way
    config = cfg.replace(out=str(run_dir), resume=False).to_mapping()
    live = LiveStatus(run_dir, cfg.num_rounds, names)  # live.json, for the status page
    live.waiting()
    if cfg.resume:
        start = _resume(grid, cfg, run_dir, files)
    else:
        start = _start(grid, cfg, run_dir, files, names, History(config=config))
    live.begin(start.history, start.first_round)
    writer = RunFolderWriter(run_dir, files, config, start.history.elapsed_seconds)
    # The run folder first (the trackers' final model is its model.keras), then the trackers.
    observer = RoundObservers([Observers(writer, live), *trackers(cfg, run_dir)])
    settings = RoundSettings(
        num_rounds=cfg.num_rounds,
        history=start.history,
        timeout=cfg.round_timeout,
        train_config={"learning-rate": cfg.learning_rate},
        evaluate_fn=evaluate_fn,
        observer=observer,
        target_accuracy=cfg.target_accuracy,
        first_round=start.first_round,
        min_clients=cfg.min_clients,
        max_update_norm=cfg.max_update_norm,
        names=names,
        train=_secure_train_phase(cfg),
        bn_keys=None if cfg.secagg or cfg.dp else _batchnorm_keys(files),
        release=release,
        held_weights=not _simulated(grid),
        sampling_seed=cfg.seed,
        codec_down=parse_codec(cfg.compress_down, downlink=True),
        example_dp=_example_dp(cfg),
    )
    with observer:  # tells the trackers how the run ended
        run_rounds(grid, start.strategy, start.arrays, settings)
    return start.history


def _example_dp(cfg: RunConfig) -> dict[str, Any] | None:
    """What each round records of ``--dp example`` beside the clients' epsilon; None without it."""
    if cfg.dp != "example":
        return None
    return {
        "delta": cfg.dp_delta,
        "clipping_norm": cfg.dp_clip,
        "level": "example",
        "sampling": "poisson",
    }


def _resume(grid: Grid, cfg: RunConfig, run_dir: Path, files: ModelFiles) -> _Start:
    """The state of ``run_dir``'s checkpoint, its history and model rewritten to match it.

    Raises:
        PollenError: The checkpoint already holds every round, or too few
            clients connected.
    """
    ckpt = load_checkpoint(run_dir, cfg)  # the strategy rebuilt from cfg, given its saved state
    if ckpt.round >= cfg.num_rounds:
        raise PollenError(
            f"The run in {run_dir} has already completed all {cfg.num_rounds} rounds; "
            "there is nothing to resume. Start a new run with another --out."
        )
    history, strategy = ckpt.history, ckpt.strategy
    history.rounds = [r for r in history.rounds if r.round <= ckpt.round]
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in ckpt.arrays.items()})
    log(INFO, "Resuming after round %d of %d from %s", ckpt.round, cfg.num_rounds, run_dir)
    # A crash between writing these and the checkpoint may have left a later round.
    write_history(run_dir, history)
    files.save(run_dir, arrays)
    wait_for_clients(grid, cfg.min_clients, CONNECT_TIMEOUT)
    return _Start(strategy, history, arrays, ckpt.round + 1)


def _start(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    files: ModelFiles,
    names: dict[int, str],
    history: History,
) -> _Start:
    """A fresh run's state: its strategy, and initial weights from a client the seed picks.

    Writes ``classes.json`` when that client names its classes, and learns
    the connected clients' ``names``.

    Raises:
        PollenError: Too few clients, a sample too small for the strategy, no
            initial weights, or a broken test set (with ``server-eval``).
    """
    strategy = make_strategy(cfg)
    nodes = wait_for_clients(grid, cfg.min_clients, CONNECT_TIMEOUT)
    check_sample_size(cfg, sample_size(cfg, len(nodes)))
    if cfg.dp == "client":
        strategy = make_private(strategy, cfg, len(nodes))
        log(
            INFO,
            "Differential privacy: clipping norm %g, noise multiplier %g, %d clients "
            "per round, delta %g",
            strategy.clipping_norm,
            strategy.noise_multiplier,
            strategy.num_sampled_clients,
            cfg.dp_delta,
        )
    # Build the model the initial weights are checked against (and, with server-eval,
    # load the test split) while the client builds its own: the server's start-up
    # overlaps the client's, and a broken test set still fails before round 1. The
    # model is the one model.keras (or the central evaluation) needs anyway; the
    # freshly initialised model itself is not evaluated (chance level).
    pool = ThreadPoolExecutor(1, thread_name_prefix="pollen-prepare")
    reference = pool.submit(_model_reference, files)
    # --weights: the server loads them (clients never take a path from it) into the same
    # model, after the reference was taken; every client then starts from these arrays.
    pretrained = pool.submit(_pretrained_arrays, files) if cfg.weights else None
    prepared = pool.submit(files.prepare) if cfg.server_eval else None
    pool.shutdown(wait=False)  # the thread ends with prepare()
    arrays = _initial_arrays(grid, cfg, run_dir, nodes, names, reference.result)
    if pretrained is not None:
        arrays = pretrained.result()  # raises here what went wrong (e.g. offline)
    if prepared is not None:
        prepared.result()  # raises here what went wrong (e.g. a broken test set)
    return _Start(strategy, history, arrays, 1)


def _pretrained_arrays(files: ModelFiles) -> ArrayRecord:
    """Round 1's global weights from ``--weights`` (``pollen.models.pretrained``), logged.

    Loaded into the model the server builds anyway (its classifier, where the
    file's does not fit, as freshly initialised as a client's would be).
    """
    from pollen.models.pretrained import load_pretrained

    model = files.model
    what = load_pretrained(model, files.cfg.model, files.cfg.weights)
    log(INFO, "Initial weights: %s", what)
    return ArrayRecord(model.get_weights())


def _model_reference(files: ModelFiles) -> ModelReference:
    """The model the run config names, freshly initialised: what initial weights must be.

    Built from the model the server builds anyway (the one :func:`_batchnorm_keys`
    reads), before any weights are set on it.
    """
    model = files.eval_model if files.cfg.server_eval else files.model
    return ModelReference.of(model.get_weights())


def _initial_arrays(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    nodes: list[int],
    names: dict[int, str],
    reference: Callable[[], ModelReference],
) -> ArrayRecord:
    """Initial weights from a client the seed picks, while round 1's clients prepare.

    The run's seed orders the connected node ids (:func:`seeded_order`), not
    the names the clients choose, so no client gets itself picked by its
    name. (In a simulation the engine names the clients ``partition-N``, no
    stranger can join, and node ids change from run to run: there the order
    is by name, :func:`by_name`, so a simulation starts from the same
    client's weights every time.) The first client in that order gives the initial weights
    (fastnet's first layer is whitened on its images); weights that are not
    those of the model the run config names (``reference``: keys, shapes,
    dtypes, finite values within a bound,
    :func:`pollen.server.replies.initial_arrays_problem`), an error
    or no reply send the request on to the next one, up to
    :data:`INITIAL_ARRAYS_TRIES` clients. The clients round 1 will sample
    (all, unless fraction-train < 1) meanwhile load their data and build
    their model. The class names it gives go to ``classes.json``, made
    printable and bounded (:func:`class_names`).

    Raises:
        PollenError: None of the clients asked gave usable weights.
    """
    learn_names(grid, nodes, names, min(cfg.round_timeout, START_NAMES_TIMEOUT))
    round_one = seeded_sample(grid, names, cfg.seed, 1, sample_size(cfg, len(nodes)))
    failures = []
    order = by_name(nodes, names) if _simulated(grid) else seeded_order(nodes, cfg.seed)
    for first in order[:INITIAL_ARRAYS_TRIES]:
        prepare = round_one if not failures else ()
        try:
            arrays, info = request_initial_arrays(
                grid, first, cfg.round_timeout, reference=reference, prepare=prepare
            )
        except PollenError as err:
            log(WARNING, "%s Asking another client.", err)
            failures.append(str(err))
            continue
        _client_info(run_dir, info, names.get(first, f"node-{first}"))
        return arrays
    raise PollenError(" ".join(failures))


def _client_info(run_dir: Path, info: ConfigRecord, name: str) -> None:
    """Log the whitening, write ``classes.json``: what the first client says of itself."""
    whitened = info.get("whitened-images")
    if isinstance(whitened, int) and not isinstance(whitened, bool) and whitened > 0:
        log(
            INFO,
            "Initial weights from client %s: first convolution whitened on %d of its images",
            name,
            whitened,
        )
    if "classes" in info:
        classes = class_names(info["classes"])
        if classes is None:
            log(WARNING, "Client %s sent no usable class names; no classes.json written", name)
        else:
            atomic_write(run_dir / "classes.json", json.dumps(classes) + "\n")


def _batchnorm_keys(files: ModelFiles) -> Callable[[], list[str]]:
    """The model's BatchNorm statistic keys, from a model the server builds anyway.

    Read the first time a client sends statistics (round 1's evaluation):
    from the central evaluation's model (built before round 1) with
    ``server-eval``, else from the one ``model.keras`` is written with after
    every round (:class:`ModelFiles`), built a little earlier than it would be.
    """

    def keys() -> list[str]:
        from pollen.models.registry import batchnorm_stat_indices

        model = files.eval_model if files.cfg.server_eval else files.model
        return [str(i) for i in batchnorm_stat_indices(model)]

    return keys


def _secure_train_phase(cfg: RunConfig) -> TrainPhase | None:
    """SecAgg+'s train phase with ``--secagg`` (logged), else None (the plain one)."""
    if not cfg.secagg:
        return None
    train = SecureAggregation(cfg).train_phase
    log(
        INFO,
        "Secure aggregation (SecAgg+): num-shares %g, reconstruction-threshold %g, "
        "clipping range %g; BatchNorm re-estimation is off (bn-calibration-examples "
        "treated as 0: per-client statistics would reveal the clients' data)",
        cfg.secagg_num_shares,
        cfg.secagg_reconstruction_threshold,
        cfg.secagg_clipping_range,
    )
    return train


def _simulated(grid: Grid) -> bool:
    """Whether the clients are Flower's simulation engine's (their messages stay in memory)."""
    return is_simulation_grid(grid)
