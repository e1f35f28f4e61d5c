"""Fault tolerance: injected faults, resume options, and end-to-end faults.

Unit tests first, then end-to-end runs with real processes over loopback
(marked ``e2e``):

a. a client killed during round 1's local training: the run completes with the
   others and the history names the client and the round;
b. a client sending NaN updates and one whose model does not fit the
   federation's (simulation): both are named with their reason, the run
   completes with the honest client;
c. the server killed after round 1's checkpoint: ``pollen server --resume``
   finishes the run, the clients (never restarted) rejoin and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pollen_cmd
from flwr.serverapp.strategy import FedAdam, FedAvg
from server_fakes import _global, _history
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen.client.faults import FAULTS, corrupt, fault_of
from pollen.config import FAULT_KINDS, RunConfig
from pollen.deploy.processes import descendants, is_running
from pollen.errors import PollenError
from pollen.server.aggregation import validate_update
from pollen.server.checkpoint import load_checkpoint, save_checkpoint

# --- fault injection ---------------------------------------------------------------------------


def test_fault_kinds_are_documented() -> None:
    assert set(FAULTS) == set(FAULT_KINDS)


def test_fault_of_node_config_and_run_config() -> None:
    assert fault_of({"fault": "nan"}, "") == "nan"
    assert fault_of({"fault": "scale", "partition-id": 1}, "nan@1") == "scale"
    assert fault_of({"partition-id": 1}, "nan@1,2") == "nan"
    assert fault_of({"partition-id": 0}, "nan@1,2") == ""
    assert fault_of({}, "nan@0") == ""


@pytest.mark.parametrize("bad", ["nan", "nan@", "boom@1", "nan@x"])
def test_fault_config_is_validated(bad: str) -> None:
    with pytest.raises(PollenError, match="Invalid fault"):
        RunConfig(fault=bad).validate()


def test_corrupt_produces_what_validation_rejects() -> None:
    g = _global()
    w = [a + 0.001 if a.dtype.kind == "f" else a for a in g]
    assert "NaN" in validate_update(g, corrupt("nan", g, w), 0)
    scaled = corrupt("scale", g, w)
    np.testing.assert_allclose(scaled[0] - g[0], 1000 * (w[0] - g[0]), rtol=1e-3)
    assert "exceeds" in validate_update(g, scaled, 1.0)
    flipped = corrupt("signflip", g, w)
    np.testing.assert_allclose(flipped[1] - g[1], -(w[1] - g[1]), rtol=1e-4, atol=1e-6)
    noisy = corrupt("noise", g, w)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(noisy, g, strict=True))
    assert "exceeds" in validate_update(g, noisy, 1.0)
    np.testing.assert_array_equal(noisy[2], g[2])  # integer arrays are left alone


# --- pollen server --resume: options -----------------------------------------------------------


def _saved_run(tmp_path: Path, status: str = "running") -> Path:
    from pollen.server.history import write_status

    run = tmp_path / "run"
    cfg = RunConfig(model="cnn", num_classes=3, num_rounds=4, local_epochs=2, out=str(run))
    save_checkpoint(run, 2, {"0": np.zeros(2)}, FedAvg(), _history(2), cfg.to_mapping())
    write_status(run, status)
    return run


def _server_args(*argv: str):
    from pollen.cli.app import build_parser

    return build_parser().parse_args(["server", *argv])


def test_resume_takes_the_saved_options(tmp_path: Path) -> None:
    from pollen.cli.runs import resume_config

    run = _saved_run(tmp_path)
    cfg = resume_config(_server_args("--resume", str(run), "--model", "cnn"), "server")
    assert cfg.resume and cfg.out == str(run)
    assert (cfg.model, cfg.num_classes, cfg.num_rounds, cfg.local_epochs) == ("cnn", 3, 4, 2)
    changed = resume_config(
        _server_args("--resume", str(run), "--min-clients", "1", "--round-timeout", "30"),
        "server",
    )
    assert changed.min_clients == 1 and changed.round_timeout == 30.0


def test_resume_refuses_conflicting_options(tmp_path: Path) -> None:
    from pollen.cli.runs import resume_config

    run = _saved_run(tmp_path)
    with pytest.raises(PollenError) as err:
        resume_config(_server_args("--resume", str(run), "--epochs", "5", "--lr", "0.1"), "server")
    assert "--epochs 5 (the run has 2)" in str(err.value)
    assert "--lr 0.1 (the run has 0.001)" in str(err.value)


def test_resume_refuses_completed_and_missing_runs(tmp_path: Path) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="completed")
    assert main(["server", "--resume", str(run), "--address", "127.0.0.1:1"]) == 2
    assert main(["server", "--resume", str(tmp_path / "nothing"), "--address", "127.0.0.1:1"]) == 2


def test_resume_messages(tmp_path: Path, capsys) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="completed")
    main(["server", "--resume", str(run), "--address", "127.0.0.1:1"])
    assert (
        "has already completed (2 rounds); there is nothing to continue" in capsys.readouterr().err
    )
    main(["server", "--resume", str(tmp_path / "nothing"), "--address", "127.0.0.1:1"])
    assert "there is no checkpoint there" in capsys.readouterr().err


def test_a_new_run_does_not_overwrite_an_unfinished_one(tmp_path: Path, capsys) -> None:
    from pollen.cli.app import main

    run = _saved_run(tmp_path, status="interrupted")
    assert main(["server", "--out", str(run), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (last completed round 2, status interrupted)" in err
    assert f"--resume {run}" in err


def test_simulate_resume_keeps_the_number_of_clients(tmp_path: Path) -> None:
    from pollen.cli.runs import SIMULATION_FILE, _simulated_clients

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(PollenError, match="not a run of `pollen simulate`"):
        _simulated_clients(run, 2)
    (run / SIMULATION_FILE).write_text('{"clients": 3}\n')
    assert _simulated_clients(run, 2) == 3  # 2 = the default: not given
    assert _simulated_clients(run, 3) == 3
    with pytest.raises(PollenError, match="simulated 3 clients, not 4"):
        _simulated_clients(run, 4)


# --- end to end ---------------------------------------------------------------------------------

CNN = ("--model", "cnn", "--num-classes", "3", "--lr", "0.003", "--bn-calibration-examples", "32")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (its own sessions included): a crash."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Fleet:
    """Server and client processes of one test, with logs, cleaned up afterwards."""

    def __init__(self, tmp_path: Path, env: dict) -> None:
        self.tmp, self.env = tmp_path, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 - closed in close()
        self.files.append(log)
        proc = subprocess.Popen(
            pollen_cmd(*args),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Like a command started from a terminal: Ctrl-C is not ignored. A shell that
            # runs pytest in the background (`.ci/run &`) sets SIGINT to "ignore", which
            # every child inherits; Python then never raises KeyboardInterrupt.
            preexec_fn=_default_sigint,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()
        for f in self.files:
            f.close()


@pytest.fixture
def fleet(tmp_path, pollen_env):
    f = Fleet(tmp_path, pollen_env)
    yield f
    f.close()


def _server(fleet: Fleet, port: int, run: Path, *extra: str, name: str = "server"):
    return fleet.start(
        name, "server", "--address", f"127.0.0.1:{port}", "--out", str(run), *CNN, *extra
    )


def _client(fleet: Fleet, port: int, data: Path, i: int, n: int, name: str, *extra: str):
    return fleet.start(
        name,
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data),
        "--partition-id",
        str(i),
        "--num-partitions",
        str(n),
        "--name",
        name,
        *extra,
    )


def _read_history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.mark.e2e
def test_a_client_killed_mid_training_is_recorded_and_the_run_goes_on(fleet, tmp_path, tiny_data):
    from conftest import free_port

    # Flower's 30-s heartbeat: the dead victim leaves the node list after 60 s, not 120 s,
    # so round 2 is less likely to wait for it until --round-timeout (test time only).
    fleet.env = {**fleet.env, "POLLEN_SUPERNODE_HEARTBEAT": "30"}
    port, run = free_port(), tmp_path / "run"
    server = _server(
        fleet, port, run, "--rounds", "2", "--min-clients", "2", "--epochs", "25",
        "--round-timeout", "40",
    )  # fmt: skip
    for i, name in enumerate(("alice", "bob", "victim")):
        # --verbose: the victim's console shows Keras's per-epoch lines (the default keeps
        # only each round's final bar), which say when its training runs.
        _client(fleet, port, tiny_data, i, 3, name, *(("--verbose",) if name == "victim" else ()))
    # Kill the victim (its whole process tree: a crash) once its round-1 training runs.
    _wait_for(lambda: "Epoch 1/25" in fleet.log("victim"), 150, "the victim's training")
    _kill_tree(fleet.procs["victim"].pid)
    assert server.wait(timeout=240) == 0, fleet.log("server")[-4000:]
    for name in ("alice", "bob"):
        assert fleet.procs[name].wait(timeout=60) == 0, fleet.log(name)[-3000:]

    assert _status(run)["status"] == "completed"
    rounds = _read_history(run)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    first = {c["name"]: c for c in rounds[0]["clients"]}
    assert first["victim"]["error"].startswith("train: "), first["victim"]
    assert first["victim"]["train_examples"] is None
    for name in ("alice", "bob"):
        assert first[name]["error"] is None and first[name]["train_examples"] == 24
    assert rounds[0]["train"]["examples"] == 48
    assert "victim" in fleet.log("server")  # the failure is logged with the client's name


@pytest.mark.e2e
def test_nan_updates_and_a_foreign_model_are_rejected_and_named(tmp_path, tiny_data, pollen_env):
    run = tmp_path / "run"
    proc = subprocess.run(
        pollen_cmd(
            "simulate", "--clients", "3", "--min-clients", "1", "--rounds", "2", *CNN,
            "--data-dir", str(tiny_data), "--out", str(run), "--fault", "nan@1 arch@2",
        ),
        env=pollen_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    rounds = _read_history(run)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        clients = {c["name"]: c for c in r["clients"]}
        assert clients["partition-0"]["error"] is None
        assert clients["partition-1"]["error"] == (
            "train: rejected: update has NaN/inf values (array 0)"
        )
        arch = clients["partition-2"]["error"]
        assert arch.startswith("train: ") and "does not match this client's model" in arch
        assert "Every client must build the same architecture" in arch
        assert "<class" not in arch  # readable, not Flower's repr
        # Only the honest client's update is in the aggregate.
        assert r["train"]["examples"] == clients["partition-0"]["train_examples"] == 24
    assert "update of client partition-1 rejected" in output
    assert "does not match this client's model" in output  # the client's side says it too
    assert np.isfinite(rounds[-1]["server"]["loss"])


@pytest.mark.e2e
def test_a_killed_server_resumes_and_its_clients_rejoin(fleet, tmp_path, tiny_data):
    from conftest import free_port

    port, run = free_port(), tmp_path / "run"
    first = _server(
        fleet, port, run, "--rounds", "2", "--min-clients", "2", "--strategy", "fedadam"
    )
    for i in range(2):
        _client(fleet, port, tiny_data, i, 2, f"c{i}", "--connect-timeout", "120")
    manifest = run / "checkpoint" / "manifest.json"
    _wait_for(manifest.exists, 180, "round 1's checkpoint")
    _kill_tree(first.pid)
    first.wait()
    assert _status(run)["status"] == "running"  # killed: nobody wrote a final status
    saved = json.loads(manifest.read_text())["round"]
    assert saved >= 1

    second = fleet.start(
        "resumed", "server", "--resume", str(run), "--address", f"127.0.0.1:{port}"
    )
    assert second.wait(timeout=300) == 0, fleet.log("resumed")[-4000:]
    for i in range(2):  # never restarted by the test
        assert fleet.procs[f"c{i}"].wait(timeout=60) == 0, fleet.log(f"c{i}")[-3000:]
        assert "joining the server again" in fleet.log(f"c{i}")

    assert _status(run)["status"] == "completed"
    history = _read_history(run)
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert {c["name"] for c in r["clients"]} == {"c0", "c1"}
        assert all(c["error"] is None for c in r["clients"])
    assert f"Resuming after round {saved} of 2" in fleet.log("resumed")
    ckpt = load_checkpoint(run)
    assert ckpt.round == 2 and isinstance(ckpt.strategy, FedAdam)

    # Resuming a completed run is refused with a clear message.
    again = subprocess.run(
        pollen_cmd("server", "--resume", str(run), "--address", f"127.0.0.1:{free_port()}"),
        env=fleet.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2
    assert "has already completed" in again.stderr


def _signal_state(pid: int) -> str:
    """The SigBlk/SigIgn/SigCgt masks of every thread of ``pid`` (Linux /proc)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        keep = ("SigBlk", "SigIgn", "SigCgt")
        masks = [line.replace("\t", "") for line in status if line.startswith(keep)]
        lines.append(f"thread {task.name}: " + " ".join(masks))
    return "; ".join(lines) or "no /proc"


@pytest.mark.e2e
def test_ctrl_c_stops_the_server_cleanly_and_says_how_to_resume(fleet, tmp_path, tiny_data):
    from conftest import free_port

    port, run = free_port(), tmp_path / "run"
    server = _server(fleet, port, run, "--rounds", "5", "--min-clients", "1")
    _client(fleet, port, tiny_data, 0, 1, "solo")
    _wait_for((run / "checkpoint" / "manifest.json").exists, 180, "round 1's checkpoint")
    tree = descendants(server.pid)
    assert len(tree) > 3  # pollen, flwr run, SuperLink, SuperExec, server app, ...
    # What the server process does with signals, for the failure message.
    signals = _signal_state(server.pid)
    server.send_signal(signal.SIGINT)
    # By design the shutdown may take ~50 s: the relay drains for up to 15 s, the
    # SuperLink gets 15 s before SIGKILL, the server app 20 s to release the folder.
    try:
        code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"pollen server did not stop within 120 s of Ctrl-C ({signals}):\n"
            + fleet.log("server")[-3000:]
        )
    assert code == 130, f"({signals})\n" + fleet.log("server")[-3000:]
    time.sleep(2)
    alive = [p for p in tree if is_running(p)]
    assert not alive, f"left behind: {alive}"
    status = _status(run)
    assert status["status"] == "interrupted"
    assert status["last_completed_round"] >= 1
    assert f"pollen server --resume {run}" in fleet.log("server")
    assert load_checkpoint(run).round == status["last_completed_round"]
