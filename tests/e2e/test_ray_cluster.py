"""End-to-end: ``pollen simulate --ray-address`` on an existing Ray cluster (docs/scale.md).

The test starts its own two-node Ray cluster on loopback: a head (``ray start --head``)
and a second node (``ray start --address``), one CPU and a small object store each, in a
private temporary folder. A 2-client simulation then runs its clients on that cluster,
one client per node (each client reserves one CPU), which the test sees from the Ray
worker processes that play the clients: each is a child of a different node's raylet.

The cluster is stopped by the ids of the processes this test started (and those under
its temporary folder), never with ``ray stop``, which would stop every Ray instance on
the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, pollen_cmd

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE = str(80 * 2**20)  # bytes: a small store per node (Ray's minimum is 75 MiB)


def _ray_node(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    """``ray start ... --block``: the node lives as long as this process (its own session)."""
    argv = [
        RAY,
        "start",
        *args,
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--object-store-memory",
        OBJECT_STORE,
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--block",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _ours(temp_dir: Path) -> list:
    """The processes of this test's cluster: those whose command line names its folder."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _stop(nodes: list[subprocess.Popen], temp_dir: Path) -> None:
    """End the cluster: each ``ray start --block`` (it stops its node), then leftovers."""
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)  # the group of a process this test started
    for node in nodes:
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
    for proc in _ours(temp_dir):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _wait_for_nodes(address: str, count: int, timeout: float = 120.0) -> None:
    """Until the cluster at ``address`` has ``count`` live nodes."""
    script = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", script, address],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
        if out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not get {count} nodes: {out.stderr[-2000:]}")


class ClientParents:
    """Watches the Ray workers that play clients; records which raylet started each."""

    def __init__(self) -> None:
        self.parents: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline", "ppid"]):
                try:
                    cmdline = " ".join(proc.info["cmdline"] or ())
                    if cmdline.startswith("ray::ClientAppActor"):
                        self.parents.add(proc.info["ppid"])
                except psutil.Error:
                    pass
            self.stop.wait(0.5)


def test_simulate_runs_its_clients_on_an_existing_ray_cluster(
    tiny_data, pollen_env, tmp_path
) -> None:
    temp_dir = Path(tempfile.mkdtemp(prefix="pr-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [
        _ray_node(
            ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
            + ["--include-dashboard", "false"],
            temp_dir,
            tmp_path / "head.log",
        )
    ]
    watcher = ClientParents()
    try:
        _wait_for_nodes(address, 1)
        nodes.append(
            _ray_node(
                ["--address", address, "--node-ip-address", "127.0.0.1"],
                temp_dir,
                tmp_path / "worker.log",
            )
        )
        _wait_for_nodes(address, 2)
        raylets = {p.pid for p in _ours(temp_dir) if p.name() == "raylet"}
        assert len(raylets) == 2, "one raylet per node"
        watcher.thread.start()
        run = tmp_path / "run"
        proc = subprocess.run(
            pollen_cmd(
                "simulate",
                "--clients",
                "2",
                "--rounds",
                "1",
                "--model",
                "cnn",
                "--no-server-eval",
                "--data-dir",
                str(tiny_data),
                "--ray-address",
                address,
                "--out",
                str(run),
            ),
            env=pollen_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        watcher.stop.set()
        watcher.thread.join()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "completed"
        history = json.loads((run / "history.json").read_text())
        clients = history["rounds"][0]["clients"]
        assert sorted(c["name"] for c in clients) == ["partition-0", "partition-1"]
        assert all(c["error"] is None and c["train_examples"] for c in clients)
        # Each node has one CPU and each client reserves one: a client ran on each node.
        # (Other Ray instances on the machine have client workers of their own.)
        assert raylets <= watcher.parents, (watcher.parents, raylets)
    finally:
        watcher.stop.set()
        _stop(nodes, temp_dir)
    assert not [p for p in _ours(temp_dir) if p.is_running()], "the cluster is stopped"
