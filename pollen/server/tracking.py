"""Metrics where people look: TensorBoard event files for every run, MLflow on request.

Both are :class:`pollen.server.rounds.RoundObserver` s, told after every round
beside the run folder's writer; :class:`RoundObservers` tells several in turn
and, as a context manager around the rounds, tells them when the run ends.

- :class:`TensorBoardLog` writes ``<run>/tensorboard/``: the aggregate metrics
  (``train/*``, ``evaluate/*``, ``server/*``), the round's time and bytes
  (``round/*``), DP epsilon (``privacy/epsilon``), and one sub-run per client
  (``tensorboard/clients/<name>/``, ``client/*``) so TensorBoard draws the
  clients over each other. ``tensorboard --logdir runs/`` shows them. Written
  with TensorBoard's record writer and protocol buffers (no TensorFlow import).
- :class:`MlflowLog` (run config ``mlflow-uri``, ``--mlflow URI``) logs the run
  config as parameters, the same metrics per round (step = round) and, at the
  end, ``model.keras`` and ``history.json`` as artifacts, to an MLflow run named
  after the run folder in the experiment ``pollen``.

A tracker that fails mid-run (an MLflow server that went away) logs one
warning and stops; the federation goes on.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from flwr.app import ArrayRecord
from flwr.common.logger import log

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.history import History, RoundRecord
from pollen.server.rounds import RoundObserver

__all__ = [
    "EXPERIMENT",
    "TENSORBOARD_DIR",
    "MlflowLog",
    "RoundObservers",
    "TensorBoardLog",
    "absolute_uri",
    "check_mlflow",
    "client_metrics",
    "resolve_mlflow",
    "round_metrics",
    "trackers",
]

#: The run folder's subfolder of TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"
#: The MLflow experiment Pollen's runs go to.
EXPERIMENT = "pollen"
#: Files of the run folder logged to MLflow as artifacts when the run ends.
MLFLOW_ARTIFACTS = ("model.keras", "history.json")


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The round's finite aggregate metrics by tag (``train/loss``, ``round/seconds``, ...)."""
    values: dict[str, Any] = {}
    for scope, metrics in (
        ("train", record.train),
        ("evaluate", record.evaluate),
        ("server", record.server),
    ):
        for key in ("loss", "accuracy"):
            values[f"{scope}/{key}"] = metrics.get(key)
    values["round/seconds"] = record.seconds
    for phase, seconds in record.phase_seconds.items():
        values[f"round/{phase}_seconds"] = seconds
    values["round/bytes_sent"] = record.bytes_sent
    values["round/bytes_received"] = record.bytes_received
    values["round/failed_clients"] = sum(1 for c in record.clients if c.error)
    if record.privacy:
        values["privacy/epsilon"] = record.privacy.get("epsilon")
    return _finite(values)


def client_metrics(record: RoundRecord) -> dict[str, dict[str, float]]:
    """Per client (by a file-safe name): its metrics of the round (``client/train_loss``, ...)."""
    out: dict[str, dict[str, float]] = {}
    for c in record.clients:
        values = {
            f"client/{key}": getattr(c, key)
            for key in (
                "train_loss",
                "train_accuracy",
                "train_examples",
                "fit_seconds",
                "eval_loss",
                "eval_accuracy",
                "eval_seconds",
            )
        }
        values["client/failed"] = 1.0 if c.error else 0.0
        out[_safe_name(c.name, c.node_id)] = _finite(values)
    return out


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def _safe_name(name: str, node_id: int) -> str:
    """A client's name as one path component and MLflow key part (names come from clients)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:64].lstrip(".")
    return safe or f"node-{node_id}"


class _EventFile:
    """One TensorBoard event file, written synchronously and flushed after every round.

    TensorBoard's own ``EventFileWriter`` opens its file through ``tf.io.gfile``
    and so imports TensorFlow where it is installed (tens of seconds on a busy
    machine, and the server app of a torch run has no other use for it); this
    writes the same records (:class:`RecordWriter`: TFRecord framing) to a
    plain file, named as TensorBoard names them.
    """

    def __init__(self, folder: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = folder / name
        self._records = RecordWriter(open(self.path, "ab"))  # noqa: SIM115 - closed in close()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write ``values`` (tag -> number) as scalars at ``step``."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(
            value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]
        )
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self) -> None:
        """Close the file."""
        self._records.close()


class TensorBoardLog:
    """Writes each round's metrics as TensorBoard scalars under ``<run>/tensorboard/``."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / TENSORBOARD_DIR
        self._main = _EventFile(self.folder)
        self._clients: dict[str, _EventFile] = {}

    def round_done(
        self, record: RoundRecord, arrays: ArrayRecord, history: History, strategy: Any
    ) -> None:
        """Write ``record``'s aggregate metrics and each client's, at step = round."""
        self._main.scalars(record.round, round_metrics(record))
        for name, values in client_metrics(record).items():
            if name not in self._clients:
                self._clients[name] = _EventFile(self.folder / "clients" / name)
            self._clients[name].scalars(record.round, values)

    def close(self, completed: bool) -> None:
        """Close the event files."""
        for writer in (self._main, *self._clients.values()):
            writer.close()


def check_mlflow(uri: str) -> None:
    """Refuse an MLflow URI this machine cannot use, before the run starts.

    Raises:
        PollenError: The ``mlflow`` package is missing, or ``uri`` has no scheme MLflow knows.
    """
    if not uri:
        return
    if importlib.util.find_spec("mlflow") is None:  # without importing it: seconds
        raise PollenError(
            f"--mlflow {uri} needs the mlflow package, which is not installed. Install it "
            "with `pip install 'pollen-fl[mlflow]'` (or `pip install mlflow`), or leave "
            "--mlflow out."
        )
    scheme = urlparse(uri).scheme
    if scheme not in ("file", "sqlite", "http", "https", "postgresql", "mysql", "databricks"):
        raise PollenError(
            f"--mlflow {uri!r} is not an MLflow tracking URI. Give one such as "
            "sqlite:///mlflow.db (a local database file), file:/path/mlruns or "
            "http://host:5000 (an MLflow server)."
        )


class MlflowLog:
    """Logs the run to MLflow: parameters at the start, metrics per round, the model at the end.

    The MLflow run is opened here, before the rounds (importing MLflow and
    setting up a new SQLite store take seconds of CPU, which in a background
    thread would compete with the first round's transfers). Each round's
    metrics and the artifacts are logged in one background thread, in order, so
    the rounds do not wait for them (tens of milliseconds each); :meth:`close`
    waits for them all.
    """

    def __init__(self, uri: str, run_dir: Path, config: Mapping[str, Any]) -> None:
        self.uri = uri
        self.run_dir = run_dir
        self.run_id = ""
        self._failed = False
        self._client: Any = None
        self._calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pollen-mlflow")
        self._guarded(lambda: self._open(dict(config)))

    def _open(self, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self._client.create_experiment(
                EXPERIMENT, artifact_location=_local_artifacts(self.uri)
            )
        run = self._client.create_run(
            experiment_id,
            run_name=self.run_dir.name,
            tags={"pollen.run_dir": str(self.run_dir)},
        )
        self.run_id = run.info.run_id
        params = [Param(str(k), str(v)[:500]) for k, v in sorted(config.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self._client.log_batch(self.run_id, params=params[i : i + 100])

    def round_done(
        self, record: RoundRecord, arrays: ArrayRecord, history: History, strategy: Any
    ) -> None:
        """Log ``record``'s aggregate and per-client metrics at step = round."""
        values = dict(round_metrics(record))
        for name, metrics in client_metrics(record).items():
            values.update({f"client/{name}/{k.split('/', 1)[1]}": v for k, v in metrics.items()})
        now, step = int(time.time() * 1000), record.round

        def send() -> None:
            from mlflow.entities import Metric

            batch = [Metric(k, v, now, step) for k, v in values.items()]
            for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
                self._client.log_batch(self.run_id, metrics=batch[i : i + 1000])

        self._submit(send)

    def close(self, completed: bool) -> None:
        """Log the final model and history as artifacts; mark the MLflow run finished or failed.

        Waits for every MLflow call to end.
        """
        if completed:
            for name in MLFLOW_ARTIFACTS:
                path = self.run_dir / name
                if path.is_file():
                    self._submit(lambda p=path: self._client.log_artifact(self.run_id, str(p)))
        status = "FINISHED" if completed else "FAILED"
        self._submit(lambda: self._client.set_terminated(self.run_id, status))
        self._calls.shutdown(wait=True)

    def _submit(self, call: Any) -> None:
        """Queue one MLflow call for the background thread (:meth:`_guarded`)."""
        self._calls.submit(self._guarded, call)

    def _guarded(self, call: Any) -> None:
        """Make one MLflow call; after the first failure, warn once and skip the rest."""
        if self._failed:
            return
        try:
            call()
        except Exception as err:  # MLflow raises many types (HTTP, SQL, file): all end it
            self._failed = True
            log(WARNING, "MLflow at %s failed (%s); no more metrics go there.", self.uri, err)


def _local_artifacts(uri: str) -> str | None:
    """For a local store (``sqlite:``, ``file:``): artifacts beside it, not in the cwd."""
    path = _local_path(uri)
    if path is None:
        return None
    folder = path.parent / "mlartifacts" if uri.startswith("sqlite:") else path / "artifacts"
    return folder.as_uri()


def _local_path(uri: str) -> Path | None:
    """The file (``sqlite:///PATH``) or folder (``file:PATH``) of a local store; None: not local."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri[len("sqlite:///") :]).expanduser().resolve()
    if parsed.scheme == "file":
        return Path(parsed.path).expanduser().resolve()
    return None


def absolute_uri(uri: str) -> str:
    """``uri`` with a local store's relative path made absolute (the server app runs elsewhere).

    ``sqlite:///mlflow.db`` names ``mlflow.db`` in the current folder; the server
    app, started by Flower, may run in another, so the command resolves it here.
    """
    path = _local_path(uri)
    if path is None:
        return uri
    return f"sqlite:///{path}" if uri.startswith("sqlite:") else path.as_uri()


class RoundObservers:
    """Several round observers told in turn; ``with`` it around the rounds to close them."""

    def __init__(self, observers: Iterable[RoundObserver]) -> None:
        self.observers: Sequence[RoundObserver] = list(observers)

    def round_done(
        self, record: RoundRecord, arrays: ArrayRecord, history: History, strategy: Any
    ) -> None:
        """Tell every observer, in order."""
        for observer in self.observers:
            observer.round_done(record, arrays, history, strategy)

    def __enter__(self) -> RoundObservers:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        for observer in self.observers:
            close = getattr(observer, "close", None)
            if close is not None:
                close(completed=kind is None)


def resolve_mlflow(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its MLflow URI checked (:func:`check_mlflow`) and made absolute.

    For the command that starts the run, before anything starts.

    Raises:
        PollenError: MLflow is not installed or the URI is not one.
    """
    if not cfg.mlflow_uri:
        return cfg
    check_mlflow(cfg.mlflow_uri)
    return cfg.replace(mlflow_uri=absolute_uri(cfg.mlflow_uri))


def trackers(cfg: RunConfig, run_dir: Path) -> list[RoundObserver]:
    """The run's trackers: TensorBoard always, MLflow with ``cfg.mlflow_uri``."""
    out: list[RoundObserver] = [TensorBoardLog(run_dir)]
    if cfg.mlflow_uri:
        check_mlflow(cfg.mlflow_uri)
        config = cfg.replace(out=str(run_dir), resume=False).to_mapping()
        out.append(MlflowLog(cfg.mlflow_uri, run_dir, config))
    return out
