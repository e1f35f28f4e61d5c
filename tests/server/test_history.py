"""Tests for pollen.server.history: history.json/csv, metrics.png, status.json, model.keras."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pollen.files import atomic_write
from pollen.server.history import (
    CSV_COLUMNS,
    ClientRound,
    History,
    RoundRecord,
    plot_history,
    read_history,
    read_status,
    save_model,
    write_history,
    write_status,
)


def _history(server: bool = True) -> History:
    def server_metrics(loss: float, acc: float) -> dict:
        return {"loss": loss, "accuracy": acc, "examples": 500} if server else {}

    return History(
        config={"model": "cnn", "num-rounds": 2, "learning-rate": 0.001, "server-eval": server},
        rounds=[
            RoundRecord(
                round=1,
                seconds=10.5,
                train={"loss": 2.1, "accuracy": 0.25, "examples": 300},
                evaluate={"loss": 2.0, "accuracy": 0.3, "examples": 60},
                server=server_metrics(1.9, 0.35),
                clients=[
                    ClientRound(
                        node_id=11,
                        name="alice",
                        train_loss=2.2,
                        train_accuracy=0.2,
                        train_examples=100,
                        fit_seconds=4.5,
                        eval_loss=2.05,
                        eval_accuracy=0.25,
                        eval_examples=20,
                    ),
                    ClientRound(
                        node_id=22,
                        name="bob",
                        train_loss=2.05,
                        train_accuracy=0.275,
                        train_examples=200,
                        fit_seconds=7.25,
                        eval_loss=1.975,
                        eval_accuracy=0.325,
                        eval_examples=40,
                    ),
                ],
                bytes_sent=1000,
                bytes_received=900,
            ),
            RoundRecord(
                round=2,
                seconds=9.75,
                train={"loss": 1.5, "accuracy": 0.5, "examples": 100},
                evaluate={"loss": 1.6, "accuracy": 0.45, "examples": 20},
                server=server_metrics(1.4, 0.55),
                clients=[
                    ClientRound(
                        node_id=11,
                        name="alice",
                        train_loss=1.5,
                        train_accuracy=0.5,
                        train_examples=100,
                        fit_seconds=4.0,
                        eval_loss=1.6,
                        eval_accuracy=0.45,
                        eval_examples=20,
                    ),
                    ClientRound(node_id=22, name="bob", error='train: Out of memory, "x"'),
                ],
                bytes_sent=1000,
                bytes_received=450,
            ),
        ],
        elapsed_seconds=21.5,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


# --- history.json / history.csv ----------------------------------------------------------------


def test_history_json_round_trip(tmp_path: Path) -> None:
    history = _history()
    write_history(tmp_path, history)
    again = read_history(tmp_path)
    assert again.to_dict() == history.to_dict()
    assert again == history  # dataclass equality, with ClientRound objects rebuilt
    assert isinstance(again.rounds[0].clients[0], ClientRound)
    assert json.loads((tmp_path / "history.json").read_text())["rounds"][1]["round"] == 2
    assert _leftovers(tmp_path) == []


def test_history_csv_rows(tmp_path: Path) -> None:
    write_history(tmp_path, _history())
    with open(tmp_path / "history.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["round"], r["scope"]) for r in rows] == [
        ("1", "aggregate"),
        ("1", "server"),
        ("1", "alice"),
        ("1", "bob"),
        ("2", "aggregate"),
        ("2", "server"),
        ("2", "alice"),
        ("2", "bob"),
    ]
    by = {(int(r["round"]), r["scope"]): r for r in rows}

    agg = by[(1, "aggregate")]
    assert float(agg["train_loss"]) == 2.1 and float(agg["train_accuracy"]) == 0.25
    assert int(agg["train_examples"]) == 300 and int(agg["eval_examples"]) == 60
    assert float(agg["eval_loss"]) == 2.0 and float(agg["eval_accuracy"]) == 0.3
    assert float(agg["seconds"]) == 10.5
    assert int(agg["bytes_sent"]) == 1000 and int(agg["bytes_received"]) == 900
    assert agg["error"] == ""

    srv = by[(2, "server")]
    assert float(srv["eval_loss"]) == 1.4 and float(srv["eval_accuracy"]) == 0.55
    assert int(srv["eval_examples"]) == 500
    assert srv["train_loss"] == "" and srv["bytes_sent"] == ""

    bob1 = by[(1, "bob")]
    assert float(bob1["train_loss"]) == 2.05 and int(bob1["train_examples"]) == 200
    assert float(bob1["eval_accuracy"]) == 0.325 and float(bob1["seconds"]) == 7.25
    assert bob1["error"] == ""

    bob2 = by[(2, "bob")]
    assert bob2["error"] == 'train: Out of memory, "x"'  # quoted correctly by the csv module
    assert bob2["train_loss"] == "" and bob2["eval_accuracy"] == ""


def test_history_csv_without_server_rows(tmp_path: Path) -> None:
    write_history(tmp_path, _history(server=False))
    with open(tmp_path / "history.csv", newline="") as f:
        scopes = [r["scope"] for r in csv.DictReader(f)]
    assert scopes == ["aggregate", "alice", "bob"] * 2


def test_write_history_overwrites(tmp_path: Path) -> None:
    write_history(tmp_path, _history())
    shorter = _history()
    shorter.rounds = shorter.rounds[:1]
    write_history(tmp_path, shorter)
    assert len(read_history(tmp_path).rounds) == 1
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 4


# --- metrics.png -------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5_000  # two axes with lines, not an empty canvas
    from PIL import Image

    with Image.open(path) as img:
        img.verify()


@pytest.mark.parametrize("server", [True, False], ids=["with-server", "without-server"])
def test_plot_history_writes_png(tmp_path: Path, server: bool) -> None:
    plot_history(tmp_path, _history(server=server))
    _assert_png(tmp_path / "metrics.png")
    assert _leftovers(tmp_path) == []


def test_plot_history_with_missing_values(tmp_path: Path) -> None:
    history = _history()
    history.rounds[1].train = {}
    history.rounds[0].server = {}
    plot_history(tmp_path, history)
    _assert_png(tmp_path / "metrics.png")


# --- atomic_write ------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, "first")
    atomic_write(target, b"second \xe2\x9c\x93")
    assert target.read_bytes() == b"second \xe2\x9c\x93"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "status.json"
    atomic_write(target, "old content")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, "new content that must not appear")
    monkeypatch.undo()
    assert target.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_atomic_write_failure_while_writing(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "history.json"
    atomic_write(target, "old")

    def broken_fsync(fd):
        raise OSError("no space left")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="no space left"):
        atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """Run folders are shared (a server's results, read by its users): honour the umask."""
    old_umask = os.umask(0o022)
    try:
        write_history(tmp_path, _history())
        write_status(tmp_path, "completed")
        plot_history(tmp_path, _history())
        (tmp_path / "reference.txt").write_text("written the ordinary way")
    finally:
        os.umask(old_umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes["reference.txt"] == oct(0o644)
    assert modes == dict.fromkeys(modes, oct(0o644))


# --- status.json -------------------------------------------------------------------------------


def test_status_round_trip(tmp_path: Path) -> None:
    write_status(tmp_path, "running")
    assert read_status(tmp_path) == {"status": "running", "error": None}
    write_status(tmp_path, "failed", error="Round 2: boom", rounds=1, final_server_accuracy=0.5)
    assert read_status(tmp_path) == {
        "status": "failed",
        "error": "Round 2: boom",
        "rounds": 1,
        "final_server_accuracy": 0.5,
    }


def test_read_status_missing_or_corrupt(tmp_path: Path) -> None:
    assert read_status(tmp_path / "does-not-exist") is None
    assert read_status(tmp_path) is None
    (tmp_path / "status.json").write_text('{"status": "runn')
    assert read_status(tmp_path) is None


# --- model.keras -------------------------------------------------------------------------------


def test_save_model_loads_and_predicts_the_same(tmp_path: Path) -> None:
    import keras

    from pollen.models.registry import build_model

    model = build_model("cnn", num_classes=4, seed=1)
    # Non-default BatchNorm statistics, so a save that lost them would predict differently.
    weights = model.get_weights()
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in weights])
    run = tmp_path / "run"
    path = save_model(run, model)
    assert path == run / "model.keras"
    assert sorted(p.name for p in run.iterdir()) == ["model.keras"]

    loaded = keras.saving.load_model(path)
    x = rng.integers(0, 256, (5, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    save_model(run, model)  # overwriting works and still leaves a single file
    assert sorted(p.name for p in run.iterdir()) == ["model.keras"]


def test_saved_model_gets_ordinary_permissions(tmp_path: Path) -> None:
    from pollen.models.registry import build_model

    old_umask = os.umask(0o022)
    try:
        path = save_model(tmp_path, build_model("cnn", num_classes=2, seed=0))
    finally:
        os.umask(old_umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_target_accuracy_status_and_summary(capsys) -> None:
    from pollen.cli.runs import _print_summary
    from pollen.config import RunConfig
    from pollen.server.app import _target_status

    history = History(config={}, elapsed_seconds=42.5)
    history.rounds = [
        RoundRecord(round=1, server={"accuracy": 0.5}),
        RoundRecord(round=2, server={"accuracy": 0.81}),
    ]
    assert _target_status(RunConfig(), history) == {}
    reached = _target_status(RunConfig().replace(target_accuracy=0.8), history)
    assert reached == {"target_accuracy": {"target": 0.8, "reached_round": 2, "seconds": 42.5}}
    missed = _target_status(RunConfig().replace(target_accuracy=0.9), history)
    assert missed["target_accuracy"]["reached_round"] is None
    _print_summary(Path("/run"), {"rounds": 2, "elapsed_seconds": 42.5, **reached})
    assert (
        "target accuracy 0.8 reached after round 2, 42.5 s into the run" in capsys.readouterr().out
    )
