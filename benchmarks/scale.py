"""Benchmark: federations of many clients, one table per setting (docs/scale.md).

``--tables sim`` (the default) runs ``pollen simulate`` for every configuration of
``--clients`` (clients defined) times ``--sampled`` (clients a round samples: 10 and 100
by default; ``--fraction-train`` is sampled / clients) and prints one row each:

- seconds per round: round 1 (its clients load data and build their model) and the
  mean of the later rounds, from the run's ``history.json`` (``seconds``);
- peak RSS of the whole process tree (``pollen`` and every process under it: the
  SuperLink, the simulation with its server app, Ray and its workers), sampled every
  0.25 s (:class:`TreeMemory`);
- the federation overhead of the later rounds: round seconds over the sampled clients'
  own compute (their ``fit_seconds`` + ``eval_seconds``, from the history) divided by
  the clients that run at once (the cores: one client a core). 1.0 would be a round
  that is only its clients' training and evaluation; what is above is sending,
  scheduling, aggregating and waiting.
- start-up: seconds from the command to round 1's start (whole wall time minus the
  rounds).

The table ends with the machine and the date. One function per table (:data:`TABLES`):
another table (e.g. deployed clients) is one more function there.

Usage:
    python benchmarks/scale.py [--tables sim] [--clients 100 1000 10000] [--sampled 10 100]
        [--rounds 3] [--model cnn] [--data-dir PATH] [--json OUT.json]

Defaults: the CIFAR-10 JPEG folder of the shared archive (``benchmarks/reference.py``
``resolve_data``), ``--no-server-eval`` (the central evaluation is the same whatever the
clients; it would only add noise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402
from scale_deploy import print_deploy, table_deploy  # noqa: E402


class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled in a thread.

    psutil (not ``/proc`` parsing by hand): it walks the tree and reads each RSS
    portably. Processes that end between the walk and the read are skipped.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        """Bytes resident in the tree now."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)


def run_simulation(
    clients: int, sampled: int, args: argparse.Namespace, out: Path
) -> dict[str, float | int | str]:
    """One ``pollen simulate`` of ``clients`` with ``sampled`` a round; its figures."""
    fraction = sampled / clients
    cmd = [
        sys.executable,
        "-m",
        "pollen.cli",
        "simulate",
        "--clients",
        str(clients),
        "--fraction-train",
        repr(fraction),
        "--rounds",
        str(args.rounds),
        "--model",
        args.model,
        "--no-server-eval",
        "--out",
        str(out),
        *(["--data-dir", args.data_dir] if args.data_dir else []),
        *args.extra,
    ]
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid) as memory:
            code = proc.wait()
    wall = time.perf_counter() - start
    row: dict[str, float | int | str] = {"clients": clients, "sampled": sampled}
    history = out / "history.json"
    if code != 0 or not history.is_file():
        tail = log.read_text(errors="replace").splitlines()[-5:]
        return {**row, "error": f"exit {code}: " + " | ".join(tail)}
    rounds = json.loads(history.read_text())["rounds"]
    later = rounds[1:] or rounds
    parallel = max(1, min(sampled, os.cpu_count() or 1))
    compute = [
        sum((c.get("fit_seconds") or 0) + (c.get("eval_seconds") or 0) for c in r["clients"])
        for r in later
    ]
    round_s = sum(r["seconds"] for r in later) / len(later)
    ideal = sum(compute) / len(compute) / parallel
    return {
        **row,
        "round1_s": round(rounds[0]["seconds"], 2),
        "round_s": round(round_s, 2),
        "overhead": round(round_s / ideal, 2) if ideal > 0 else math.nan,
        "peak_rss_mb": round(memory.peak / 2**20),
        "startup_s": round(wall - sum(r["seconds"] for r in rounds), 1),
        "wall_s": round(wall, 1),
    }


def table_sim(args: argparse.Namespace) -> list[dict]:
    """Simulated clients: every ``--clients`` x ``--sampled`` (sampled <= clients)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="pollen-scale-") as tmp:
        for clients in args.clients:
            for sampled in args.sampled:
                if sampled > clients:
                    continue
                out = Path(tmp) / f"sim-{clients}-{sampled}"
                row = run_simulation(clients, sampled, args, out)
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


TABLES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "sim": table_sim,
    "deploy": table_deploy,  # benchmarks/scale_deploy.py
}
"""The tables ``--tables`` can name, each one function returning its rows."""

COLUMNS = (
    ("clients", "clients"),
    ("sampled", "sampled/round"),
    ("round1_s", "round 1 s"),
    ("round_s", "later rounds s"),
    ("overhead", "overhead x"),
    ("peak_rss_mb", "peak RSS MB"),
    ("startup_s", "start-up s"),
    ("wall_s", "whole run s"),
)


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['clients']} | {row['sampled']} | failed: {row['error']} |"
    return "| " + " | ".join(str(row.get(key, "")) for key, _ in COLUMNS) + " |"


def print_table(name: str, rows: list[dict], args: argparse.Namespace) -> None:
    """The rows as a Markdown table, with what was run, the machine and the date."""
    print(f"\n### {name}: pollen simulate --model {args.model} --rounds {args.rounds}")
    print("| " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print(_format_row(row))
    print(f"\nMachine: {machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tables", default="sim", help="comma-separated: " + ",".join(TABLES))
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--sampled", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--deployed-clients", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--data-dir", default=None, help="default: the shared CIFAR-10 JPEGs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "extra", nargs="*", help="more pollen simulate options (after --), e.g. -- --epochs 2"
    )
    args = parser.parse_args(argv)
    args.data_dir = resolve_data(args.data_dir)
    results = {}
    for name in args.tables.split(","):
        if name not in TABLES:
            parser.error(f"unknown table {name!r}; choose from {', '.join(TABLES)}")
        results[name] = TABLES[name](args)
        (print_deploy if name == "deploy" else print_table)(name, results[name], args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "tables": results}, indent=2))


if __name__ == "__main__":
    main()
