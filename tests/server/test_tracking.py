"""Tests for pollen.server.tracking: TensorBoard event files and MLflow, read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.history import ClientRound, History, RoundRecord
from pollen.server.tracking import (
    RoundObservers,
    TensorBoardLog,
    absolute_uri,
    check_mlflow,
    resolve_mlflow,
    trackers,
)


def _record(rnd: int, *, dp: bool = False) -> RoundRecord:
    return RoundRecord(
        round=rnd,
        seconds=2.0 + rnd,
        train={"loss": 1.0 / rnd, "accuracy": 0.5 + 0.1 * rnd, "examples": 72},
        evaluate={"loss": 0.9 / rnd, "accuracy": 0.6, "examples": 24},
        server={"loss": 0.8 / rnd, "accuracy": 0.55 + 0.1 * rnd},
        clients=[
            ClientRound(1, "alice", train_loss=0.7, train_accuracy=0.8, fit_seconds=1.5),
            ClientRound(2, "../../evil name", error="timed out"),
        ],
        bytes_sent=1_500_000 * rnd,
        bytes_received=800_000,
        privacy={"epsilon": 0.5 * rnd, "delta": 1e-5} if dp else {},
        phase_seconds={"train": 1.5, "evaluate": 0.5},
    )


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_aggregate_round_client_and_privacy_scalars(tmp_path: Path) -> None:
    tb = TensorBoardLog(tmp_path)
    for rnd in (1, 2):
        tb.round_done(_record(rnd, dp=True), None, History(config={}), None)  # type: ignore[arg-type]
    tb.close(completed=True)
    main = _scalars(tmp_path / "tensorboard")
    assert main["train/loss"] == [(1, 1.0), (2, 0.5)]
    assert [v for _, v in main["server/accuracy"]] == pytest.approx([0.65, 0.75])
    assert main["round/seconds"] == [(1, 3.0), (2, 4.0)]
    assert main["round/bytes_sent"] == [(1, 1_500_000.0), (2, 3_000_000.0)]
    assert main["round/train_seconds"][0] == (1, 1.5)
    assert main["round/failed_clients"] == [(1, 1.0), (2, 1.0)]
    assert main["privacy/epsilon"] == [(1, 0.5), (2, 1.0)]
    # One sub-run per client (TensorBoard draws them over each other); names made safe.
    clients = sorted(p.name for p in (tmp_path / "tensorboard" / "clients").iterdir())
    assert clients == ["_.._evil_name", "alice"]
    alice = _scalars(tmp_path / "tensorboard" / "clients" / "alice")
    assert [v for _, v in alice["client/train_loss"]] == pytest.approx([0.7, 0.7])
    assert alice["client/failed"] == [(1, 0.0), (2, 0.0)]
    evil = _scalars(tmp_path / "tensorboard" / "clients" / "_.._evil_name")
    assert evil["client/failed"] == [(1, 1.0), (2, 1.0)] and "client/train_loss" not in evil


def test_a_run_without_dp_or_server_eval_writes_no_such_tags(tmp_path: Path) -> None:
    record = _record(1)
    record.server = {}
    tb = TensorBoardLog(tmp_path)
    tb.round_done(record, None, History(config={}), None)  # type: ignore[arg-type]
    tb.close(completed=True)
    tags = set(_scalars(tmp_path / "tensorboard"))
    assert "privacy/epsilon" not in tags and "server/accuracy" not in tags
    assert "train/accuracy" in tags


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> tuple[str, Path]:
    """A local MLflow store (SQLite) shared by this module's tests: its URI and folder."""
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}", folder


def _mlflow_run(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("pollen")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]
    return client, run


def test_mlflow_gets_params_metrics_and_the_final_model(
    tmp_path: Path, mlflow_store: tuple[str, Path]
) -> None:
    uri, store = mlflow_store
    run_dir = tmp_path / "run-ok"
    run_dir.mkdir()
    cfg = RunConfig(model="cnn", num_rounds=2, out=str(run_dir), mlflow_uri=uri)
    observers = RoundObservers(trackers(cfg, run_dir))
    assert len(observers.observers) == 2  # TensorBoard always, MLflow when asked
    with observers:
        for rnd in (1, 2):
            observers.round_done(_record(rnd), None, History(config={}), None)  # type: ignore[arg-type]
        (run_dir / "model.keras").write_bytes(b"final model")
        (run_dir / "history.json").write_text("{}")
    client, run = _mlflow_run(uri, "run-ok")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pollen.run_dir"] == str(run_dir)
    assert run.data.params["model"] == "cnn" and run.data.params["num-rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "server/accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.65), (2, 0.75)]
    assert run.data.metrics["client/alice/train_loss"] == pytest.approx(0.7)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"model.keras", "history.json"}
    local = client.download_artifacts(run.info.run_id, "model.keras", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == b"final model"
    # The artifacts sit beside the database, not in whatever folder the server app ran in.
    assert (store / "mlartifacts" / run.info.run_id).is_dir()


def test_a_failed_run_is_marked_failed_in_mlflow(
    tmp_path: Path, mlflow_store: tuple[str, Path]
) -> None:
    uri, _ = mlflow_store
    run_dir = tmp_path / "run-failed"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"a model of a failed run")
    cfg = RunConfig(model="cnn", out=str(run_dir), mlflow_uri=uri)
    with pytest.raises(RuntimeError), RoundObservers(trackers(cfg, run_dir)):
        raise RuntimeError("round 1 failed")
    client, run = _mlflow_run(uri, "run-failed")
    assert run.info.status == "FAILED"
    assert client.list_artifacts(run.info.run_id) == []


def test_an_unusable_mlflow_store_warns_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    import pollen.server.tracking as tracking

    warnings = []
    monkeypatch.setattr(tracking, "log", lambda level, msg, *args: warnings.append(msg % args))
    (tmp_path / "a-file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    tracker = tracking.MlflowLog(uri, tmp_path, {"model": "cnn"})
    tracker.round_done(_record(1), None, History(config={}), None)  # type: ignore[arg-type]
    tracker.close(completed=True)
    assert len(warnings) == 1 and "no more metrics go there" in warnings[0], warnings


def test_observers_are_told_in_order_and_closed() -> None:
    calls = []

    class Plain:  # no close(): a RoundObserver needs only round_done
        def round_done(self, record, arrays, history, strategy):
            calls.append(("plain", record.round))

    class Closing(Plain):
        def round_done(self, record, arrays, history, strategy):
            calls.append(("closing", record.round))

        def close(self, completed):
            calls.append(("closed", completed))

    with RoundObservers([Plain(), Closing()]) as observers:
        observers.round_done(_record(1), None, History(config={}), None)  # type: ignore[arg-type]
    assert calls == [("plain", 1), ("closing", 1), ("closed", True)]


def test_mlflow_uris_are_checked_and_made_absolute(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("http://mlflow.example.org:5000") == "http://mlflow.example.org:5000"
    cfg = resolve_mlflow(RunConfig(model="cnn", mlflow_uri="sqlite:///m.db"))
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'm.db'}"
    assert resolve_mlflow(RunConfig(model="cnn")).mlflow_uri == ""
    with pytest.raises(PollenError, match="not an MLflow tracking URI"):
        check_mlflow("mlflow.db")
