"""The ``deploy`` table of ``benchmarks/scale.py``: many deployed clients against one server.

For each count of ``--deployed-clients`` (10, 25, 50 by default) this starts one
``pollen server`` and that many ``pollen client`` processes on loopback (tiny
generated data: a 3-class image folder split into one partition per client; the
``--model``; ``--rounds`` rounds; every client trains each round, and a round goes on
with :data:`MIN_CLIENT_SHARE` of them; the clients at a lower CPU priority,
:data:`CLIENT_NICENESS`) and reports:

- whether the run completed, how many clients exited 0, and how many updates each
  round aggregated;
- seconds per round from the run's ``history.json``: round 1 and the mean of the
  later rounds;
- peak RSS of the server's process tree (``pollen server``, its SuperLink, the relay
  and the server app), its peak thread count and its CPU seconds, sampled every 2 s
  with psutil;
- peak RSS of one client's process tree (the largest) and of all clients together;
- what the clients really take: the peak of their USS summed (memory no other process
  shares: RSS counts TensorFlow's shared libraries once per process, though the machine
  holds them once), sampled every 20 s, and the peak of the machine's used memory
  (``psutil.virtual_memory().used``) above what it was before the server started.

Memory is the limit on one machine: a client tree with TensorFlow loaded has an RSS of
several hundred MB, most of it shared libraries; ``--deployed-clients`` is what the
machine can hold. When the machine's available memory falls under
:data:`MIN_AVAILABLE_BYTES` the run is stopped (every process killed) before the
kernel's OOM killer picks a victim, perhaps not one of ours, and its row says
``out of memory`` with how many clients had started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

CLASSES = ("red", "green", "blue")

#: The clients run at this lower CPU priority (``nice``): on one machine they stand for
#: machines of their own, and 50 of them training at once on 2 cores otherwise starve
#: the server's relay and SuperLink, which then answer heartbeats and uploads too late
#: for Flower's windows (clients dropped as "Node Unavailable", upload sessions expired).
#: ``pollen client`` passes its niceness on to its SuperNode's session
#: (:func:`pollen.deploy.processes.keep_priority`): under Linux's autogroups a niceness
#: counts only within a session, and at 10 without that the SuperLink waited 135 s for
#: the CPU in its first 5 minutes and ran 20 s. The lowest priority, 19, leaves the
#: server's processes most of the CPU whenever they want it.
CLIENT_NICENESS = 19

#: The heartbeat interval the clients declare (``POLLEN_SUPERNODE_HEARTBEAT``; the server
#: takes a client for gone after twice that without one): a margin for clients that get
#: 1/25 of a core each while all of them start TensorFlow at once. With Flower's 30 s,
#: 14 of 50 were dropped in round 1 (2026-12-06); with Pollen's default 60 s none were
#: in the one run measured, before the niceness fix.
CLIENT_HEARTBEAT_SECONDS = 300

#: The server's ``--min-clients``: this share of the clients (rounded up). A fleet's
#: operator sets it below the fleet's size (docs/scale.md): a round then goes on
#: without a client that is late; every client that replies in time is still in it.
#: The table's ``updates`` column says how many updates each round aggregated.
MIN_CLIENT_SHARE = 0.9


def min_clients(clients: int) -> int:
    """The server's ``--min-clients`` for ``clients`` clients (:data:`MIN_CLIENT_SHARE`)."""
    return max(1, math.ceil(MIN_CLIENT_SHARE * clients))


#: Stop a run when the machine has less memory available than this.
MIN_AVAILABLE_BYTES = 1 << 30


def make_folder(root: Path, clients: int) -> Path:
    """A 3-class image folder with at least one train and test image per class per client."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", max(24, 2 * clients)), ("test", max(8, clients))):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] += 140
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _role(proc: psutil.Process) -> str:
    """A server-tree process's role, from its command line (for per-process figures)."""
    words = " ".join(proc.cmdline()[1:3])
    for role in ("flower-superlink", "flwr-serverapp", "pollen.cli"):
        if role in words:
            return role
    return proc.name()


def _rss_threads(pid: int, cpu: dict[int, float] | None = None) -> tuple[int, int]:
    """RSS and threads of ``pid``'s tree; with ``cpu``, each process's CPU seconds so far."""
    rss = threads = 0
    for p in _tree(pid):
        try:
            rss += p.memory_info().rss
            threads += p.num_threads()
            if cpu is not None:
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
                key = f"threads:{_role(p)}"
                cpu[key] = max(cpu.get(key, 0), p.num_threads())
        except psutil.NoSuchProcess:
            continue
    return rss, threads


class Peaks:
    """Peak RSS and threads of the server tree and of each client tree, in a thread."""

    def __init__(self, server: int, clients: list[int], interval: float = 2.0) -> None:
        self.server, self.clients, self.interval = server, clients, interval
        self.server_rss = self.server_threads = self.clients_rss = 0
        self.client_rss: dict[int, int] = {}
        self.clients_uss = self.machine_used = 0
        self.machine_before = psutil.virtual_memory().used
        self.out_of_memory = threading.Event()
        # CPU seconds of each server-tree process by pid; "threads:<role>": peak threads
        self.server_cpu: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _uss(self) -> int:
        """USS of every client tree summed (reads each process's smaps: slow, so sampled less).

        The kernel walks every page of a process for it: at 50 clients sampled every 5 s,
        with RSS every 0.5 s, this thread took a third of a core (68 s of system time in
        5 minutes) from the run it measured. Now RSS every 2 s, USS every 20 s.
        """
        total = 0
        for pid in self.clients:
            for p in _tree(pid):
                try:
                    total += p.memory_full_info().uss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return total

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval):
            ticks += 1
            if ticks % 10 == 1:
                self.clients_uss = max(self.clients_uss, self._uss())
            memory = psutil.virtual_memory()
            self.machine_used = max(self.machine_used, memory.used - self.machine_before)
            if memory.available < MIN_AVAILABLE_BYTES:
                self.out_of_memory.set()
            rss, threads = _rss_threads(self.server, self.server_cpu)
            self.server_rss = max(self.server_rss, rss)
            self.server_threads = max(self.server_threads, threads)
            total = 0
            for pid in self.clients:
                one = _rss_threads(pid)[0]
                self.client_rss[pid] = max(self.client_rss.get(pid, 0), one)
                total += one
            self.clients_rss = max(self.clients_rss, total)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pollen.cli", *args]


def _wait_port(port: int, timeout: float = 120.0) -> None:
    from pollen.deploy.processes import port_open

    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise RuntimeError("the server's port never opened")
        time.sleep(0.5)


def run_deployed(clients: int, rounds: int, model: str, work: Path) -> dict:
    """One server and ``clients`` clients on loopback; the row of the ``deploy`` table."""
    from pollen.deploy.processes import free_port

    data = make_folder(work / "data", clients)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env["POLLEN_CACHE_DIR"] = str(work / "cache")
    client_env = {**env, "POLLEN_SUPERNODE_HEARTBEAT": str(CLIENT_HEARTBEAT_SECONDS)}
    port, run = free_port(), work / "run"
    logs = work / "logs"
    logs.mkdir()
    server_args = ["--address", f"127.0.0.1:{port}", "--rounds", str(rounds), "--model", model]
    quorum = min_clients(clients)
    server_args += ["--num-classes", "3", "--min-clients", str(quorum), "--out", str(run)]
    server_args += ["--round-timeout", "900"]
    start = time.monotonic()
    procs: list[subprocess.Popen] = []
    with open(logs / "server.log", "w") as out:
        server = subprocess.Popen(_cmd("server", *server_args), env=env, stdout=out, stderr=out)
    procs.append(server)
    client_pids: list[int] = []  # Peaks reads this list as clients start
    peaks = Peaks(server.pid, client_pids)
    server_rc, codes = None, []
    try:
        _wait_port(port)
        for i in range(clients):
            if peaks.out_of_memory.is_set():
                break
            client_args = ["--server", f"127.0.0.1:{port}", "--data-dir", str(data)]
            client_args += ["--partition-id", str(i), "--num-partitions", str(clients)]
            client_args += ["--name", f"c{i:03d}", "--threads", "1"]
            client_args += ["--log-dir", str(logs / f"c{i:03d}-flower")]
            with open(logs / f"c{i:03d}.log", "w") as out:
                procs.append(
                    subprocess.Popen(
                        ["nice", "-n", str(CLIENT_NICENESS), *_cmd("client", *client_args)],
                        env=client_env,
                        stdout=out,
                        stderr=out,
                    )
                )
            client_pids.append(procs[-1].pid)
        deadline = time.monotonic() + 1800
        while server.poll() is None and not peaks.out_of_memory.is_set():
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        server_rc = server.poll()
        if server_rc is not None:
            codes = [p.wait(timeout=180) for p in procs[1:]]
    finally:
        peaks.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if server_rc is None:  # out of memory or past the deadline: what was measured so far
        why = "out of memory" if peaks.out_of_memory.is_set() else "timed out"
        return {
            "clients": clients,
            "status": f"stopped: {why} with {len(client_pids)} clients started",
            "clients_exit_0": 0,
            "client_tree_rss_mb_max": round(max(peaks.client_rss.values(), default=0) / 2**20),
            "all_clients_uss_mb": round(peaks.clients_uss / 2**20),
            "machine_used_mb": round(peaks.machine_used / 2**20),
            "wall_s": round(time.monotonic() - start, 1),
        }
    wall = time.monotonic() - start
    if not (run / "history.json").exists():  # the server stopped before a round ended
        return {
            "clients": clients,
            "status": f"failed (server exit {server_rc}, no round completed)",
            "clients_exit_0": sum(c == 0 for c in codes),
            "wall_s": round(wall, 1),
        }
    rounds = json.loads((run / "history.json").read_text())["rounds"]
    seconds = [r["seconds"] for r in rounds]
    status = json.loads((run / "status.json").read_text())["status"]
    return {
        "clients": clients,
        "status": status if server_rc == 0 else f"{status} (server exit {server_rc})",
        "clients_exit_0": sum(c == 0 for c in codes),
        "min_clients": quorum,
        "updates": [
            sum(c["train_examples"] is not None and not c["error"] for c in r["clients"])
            for r in rounds
        ],
        "round1_s": round(seconds[0], 1),
        "later_round_s": round(float(np.mean(seconds[1:])), 1) if len(seconds) > 1 else None,
        "server_tree_rss_mb": round(peaks.server_rss / 2**20),
        "server_tree_threads": peaks.server_threads,
        "server_cpu_s": round(sum(v for k, v in peaks.server_cpu.items() if isinstance(k, int)), 1),
        "server_threads_by_process": {
            k.split(":", 1)[1]: v for k, v in peaks.server_cpu.items() if isinstance(k, str)
        },
        "client_tree_rss_mb_max": round(max(peaks.client_rss.values(), default=0) / 2**20),
        "all_clients_rss_mb": round(peaks.clients_rss / 2**20),
        "all_clients_uss_mb": round(peaks.clients_uss / 2**20),
        "machine_used_mb": round(peaks.machine_used / 2**20),
        "wall_s": round(wall, 1),
    }


def table_deploy(args: argparse.Namespace) -> list[dict]:
    """The ``deploy`` table: one row per count of ``--deployed-clients``.

    A run that did not complete with every client exiting 0 keeps its logs and run
    folder under ``runs/scale-deploy-N-<time>/`` to read.
    """
    rows = []
    for clients in args.deployed_clients:
        with tempfile.TemporaryDirectory(prefix=f"pollen-deploy-{clients}-") as tmp:
            row = run_deployed(clients, args.rounds, args.model, Path(tmp))
            if row["status"] != "completed" or row["clients_exit_0"] != clients:
                keep = Path("runs") / f"scale-deploy-{clients}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.copytree(tmp, keep, ignore=shutil.ignore_patterns("data", "cache"))
                row["kept"] = str(keep)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


DEPLOY_COLUMNS = (
    ("clients", "clients"),
    ("status", "status"),
    ("clients_exit_0", "clients exit 0"),
    ("min_clients", "min clients"),
    ("updates", "updates per round"),
    ("round1_s", "round 1 s"),
    ("later_round_s", "later rounds s"),
    ("server_tree_rss_mb", "server tree peak RSS MB"),
    ("server_tree_threads", "server tree peak threads"),
    ("server_cpu_s", "server tree CPU s"),
    ("client_tree_rss_mb_max", "one client tree peak RSS MB"),
    ("all_clients_rss_mb", "all clients peak RSS MB"),
    ("all_clients_uss_mb", "all clients peak USS MB"),
    ("machine_used_mb", "machine memory used, peak MB"),
    ("wall_s", "whole run s"),
)


def print_deploy(name: str, rows: list[dict], args: argparse.Namespace) -> None:
    """The ``deploy`` rows as a Markdown table, with the machine and the date."""
    from datetime import UTC, datetime

    from reference import machine

    print(
        f"\n### {name}: pollen server + N pollen client, --model {args.model}, "
        f"--rounds {args.rounds}, loopback"
    )
    print("| " + " | ".join(title for _, title in DEPLOY_COLUMNS) + " |")
    print("|" + "---|" * len(DEPLOY_COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k, _ in DEPLOY_COLUMNS) + " |")
    print(f"\nMachine: {machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
