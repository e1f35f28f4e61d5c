"""Benchmark: the reference configuration on real CIFAR-10, through `pollen simulate`.

Reference configuration: 2 clients, IID halves of CIFAR-10, 3 rounds, 1 local
epoch, batch 32, MobileNetV2(32x32x3, 10 classes, weights=None), Adam.
Prints the global model's test accuracy per round (server-side, 10,000
test images), wall time per round and per local epoch, and the machine.

Usage:
    python benchmarks/reference.py [--data-dir PATH] [--rounds 3] [--clients 2]
        [--model mobilenetv2] [--out DIR] [-- extra pollen simulate options]

``--data-dir`` takes anything ``pollen simulate`` takes, or a ``.tar.gz`` of an
image folder (such as the JPEG copy of CIFAR-10), which is unpacked once into
the cache. Default: ``../shared/data/cifar10-jpg.tar.gz`` beside the checkout,
else CIFAR-10 from its official archive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_COPY = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def machine() -> str:
    """One line describing this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def resolve_data(path: str | None) -> str | None:
    """Unpack an image-folder ``.tar.gz`` once; pass anything else through."""
    if path is None:
        if not SHARED_COPY.exists():
            return None
        path = str(SHARED_COPY)
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name.endswith(".tar.gz") and p.name != "cifar-10-python.tar.gz":
        from pollen.data.cache import default_cache_dir

        target = default_cache_dir() / "unpacked" / p.name.removesuffix(".tar.gz")
        if not target.exists():
            tmp = target.with_suffix(".partial")
            tmp.mkdir(parents=True, exist_ok=True)
            with tarfile.open(p) as tar:
                tar.extractall(tmp, filter="data")
            tmp.rename(target)
        inner = [d for d in target.iterdir() if d.is_dir()]
        return str(inner[0] if len(inner) == 1 and (inner[0] / "train").is_dir() else target)
    return str(p)


def simulate(options: list[str], out: Path, data: str | None) -> tuple[dict | None, float]:
    """Run ``pollen simulate OPTIONS --out OUT``; return (history or None on failure, wall s)."""
    cmd = [sys.executable, "-m", "pollen.cli", "simulate", *options, "--out", str(out)]
    cmd += ["--data-dir", data] if data else []
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    history = out / "history.json"
    if rc != 0 or not history.exists():
        return None, wall
    return json.loads(history.read_text()), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more `pollen simulate` options after --")
    args = parser.parse_args()

    data = resolve_data(args.data_dir)
    out = args.out or ROOT / "runs" / f"bench-reference-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    cmd = [
        sys.executable, "-m", "pollen.cli", "simulate",
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--model", args.model,
        "--epochs", "1", "--batch-size", "32", "--partition", "iid", "--out", str(out),
        *(["--data-dir", data] if data else []), *args.extra,
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"pollen simulate failed with exit code {rc}", file=sys.stderr)
        return rc

    history = json.loads((out / "history.json").read_text())
    print()
    print(f"Reference benchmark, {time.strftime('%Y-%m-%d')}, machine: {machine()}")
    print(f"data: {data or 'CIFAR-10 (official archive)'}; run folder: {out}")
    print(f"{'round':>5} {'test acc':>9} {'round s':>8} {'local epoch s (per client)':>28}")
    for r in history["rounds"]:
        fits = ", ".join(f"{c['fit_seconds']:.0f}" for c in r["clients"] if c["fit_seconds"])
        print(f"{r['round']:>5} {r['server']['accuracy']:>9.4f} {r['seconds']:>8.1f} {fits:>28}")
    print(f"whole run (start to finish, incl. start-up): {wall:.0f} s")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": cmd,
        "wall_seconds": wall,
        "rounds": [
            {
                "round": r["round"],
                "test_accuracy": r["server"]["accuracy"],
                "round_seconds": r["seconds"],
                "local_epoch_seconds": [c["fit_seconds"] for c in r["clients"]],
            }
            for r in history["rounds"]
        ],
    }
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
