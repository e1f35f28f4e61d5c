"""Benchmark: the cost of secure aggregation (``--secagg``) per round.

Runs ``pollen simulate`` with and without ``--secagg`` for several client
counts (model ``cnn``, ``--client-threads 1``, no BatchNorm calibration in
either, so only the aggregation differs) and reads each run's
``history.json``. The table shows the mean round wall time (train phase,
secure or plain aggregation, client evaluation), the SecAgg+ overhead and
the bytes exchanged per round (SecAgg+ counts keys, ciphertexts and masked
vectors too).

Data: ``--data-dir`` (an image folder, or an image-folder ``.tar.gz`` such
as ``/work/shared/data/cifar10-jpg.tar.gz``), else a generated 10-class
folder of ``--per-class`` 32x32 training images per class.

Usage:
    python benchmarks/secagg_cost.py [--clients 2 5 10] [--rounds 2]
        [--data-dir PATH] [--per-class 60] [--json OUT.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402


def make_data(root: Path, per_class: int, classes: int = 10) -> Path:
    """A learnable 10-class image folder (noise plus a class-specific tint)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(per_class // 4, 4))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] += 40 + 12 * c
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def run_once(data: str, clients: int, rounds: int, secagg: bool, out: Path, classes: int) -> dict:
    """One ``pollen simulate`` run; returns per-round figures from its history."""
    cmd = [
        sys.executable, "-m", "pollen.cli", "simulate",
        "--clients", str(clients), "--rounds", str(rounds), "--model", "cnn",
        "--num-classes", str(classes), "--data-dir", data, "--out", str(out),
        "--client-threads", "1", "--bn-calibration-examples", "0", "--no-server-eval",
    ]  # fmt: skip
    if secagg:
        cmd.append("--secagg")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"pollen simulate failed ({clients} clients, secagg={secagg}):\n{tail}")
    history = json.loads((out / "history.json").read_text())
    rows = history["rounds"]
    return {
        "clients": clients,
        "secagg": secagg,
        "round_seconds": [r["seconds"] for r in rows],
        "mean_round_seconds": float(np.mean([r["seconds"] for r in rows])),
        "mean_fit_seconds": float(
            np.mean([c["fit_seconds"] or 0.0 for r in rows for c in r["clients"]])
        ),
        "bytes_sent_per_round": float(np.mean([r["bytes_sent"] for r in rows])),
        "bytes_received_per_round": float(np.mean([r["bytes_received"] for r in rows])),
        "final_eval_accuracy": rows[-1]["evaluate"].get("accuracy"),
        "process_seconds": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="image folder or .tar.gz")
    parser.add_argument("--per-class", type=int, default=60, help="generated data: train/class")
    parser.add_argument("--json", type=Path, default=Path("secagg_cost.json"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="secagg-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data_dir:
        data = resolve_data(args.data_dir)
        from pollen.data.load import load_dataset

        classes = load_dataset(data).num_classes
    else:
        data, classes = str(make_data(work / "data", args.per_class)), 10
    print(f"machine: {machine()}\ndata: {data} ({classes} classes), {args.rounds} rounds")
    results = []
    for n in args.clients:
        for secagg in (False, True):
            out = work / f"c{n}-{'secagg' if secagg else 'plain'}"
            r = run_once(str(data), n, args.rounds, secagg, out, classes)
            results.append(r)
            print(
                f"  {n:>3} clients {'secagg' if secagg else 'plain '}: "
                f"{r['mean_round_seconds']:.1f} s/round (rounds {r['round_seconds']})",
                flush=True,
            )
    header = (
        f"{'clients':>7} | {'plain s/round':>13} | {'secagg s/round':>14} | {'overhead':>8} | "
        f"{'last round plain/secagg':>23} | {'plain MB/round':>14} | {'secagg MB/round':>15}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    table = []
    for n in args.clients:
        plain = next(r for r in results if r["clients"] == n and not r["secagg"])
        sec = next(r for r in results if r["clients"] == n and r["secagg"])
        overhead = sec["mean_round_seconds"] - plain["mean_round_seconds"]

        def mb(r: dict) -> float:
            return (r["bytes_sent_per_round"] + r["bytes_received_per_round"]) / 1e6

        print(
            f"{n:>7} | {plain['mean_round_seconds']:>13.1f} | {sec['mean_round_seconds']:>14.1f} | "
            f"{overhead:>+7.1f}s | "
            f"{plain['round_seconds'][-1]:>10.1f} / {sec['round_seconds'][-1]:<10.1f} | "
            f"{mb(plain):>14.2f} | {mb(sec):>15.2f}"
        )
        table.append(
            {
                "clients": n,
                "plain_s_per_round": plain["mean_round_seconds"],
                "secagg_s_per_round": sec["mean_round_seconds"],
                "overhead_s": overhead,
                "plain_last_round_s": plain["round_seconds"][-1],
                "secagg_last_round_s": sec["round_seconds"][-1],
                "plain_mb_per_round": mb(plain),
                "secagg_mb_per_round": mb(sec),
            }
        )
    args.json.write_text(
        json.dumps(
            {
                "machine": machine(),
                "data": str(data),
                "rounds": args.rounds,
                "table": table,
                "runs": results,
            },
            indent=2,
        )  # fmt: skip
        + "\n"
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
