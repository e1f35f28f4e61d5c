"""Benchmark: one malicious client out of five, FedAvg vs the robust strategies.

Runs ``pollen simulate`` with 5 clients (IID split of CIFAR-10) for a clean
FedAvg baseline, then with ``--malicious 1 --attack ATTACK`` for FedAvg and
each robust strategy (``num-malicious-nodes 1`` where the strategy takes it),
and prints the server's test accuracy after the last round. Bulyan needs at
least 4f + 3 = 7 clients, so with 5 it is refused and shown as such.

Usage:
    python benchmarks/robustness.py [--data-dir PATH] [--rounds 3] [--attack signflip]
        [--model cnn] [--out DIR] [--strategies fedavg,fedmedian,...]

Writes ``robustness.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, machine, resolve_data, simulate  # noqa: E402

STRATEGIES = ("fedavg", "fedmedian", "trimmedmean", "krum", "multikrum", "bulyan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--attack", default="signflip", choices=("signflip", "noise", "scale"))
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    data = resolve_data(args.data_dir)
    out = args.out or ROOT / "runs" / f"bench-robustness-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    base = [
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--model", args.model,
        "--client-threads", "1", "--max-update-norm", "0",
    ]  # fmt: skip
    runs: list[tuple[str, list[str]]] = [("clean fedavg", ["--strategy", "fedavg"])]
    for name in args.strategies.split(","):
        opts = ["--strategy", name, "--malicious", "1", "--attack", args.attack]
        if name in ("krum", "multikrum", "bulyan"):
            opts += ["--num-malicious-nodes", "1"]
        if name == "multikrum":
            opts += ["--num-nodes-to-select", str(args.clients - 2)]
        runs.append((f"{name}, 1 malicious ({args.attack})", opts))

    results = []
    for label, opts in runs:
        run_dir = out / label.split(",")[0].replace(" ", "-")
        history, wall = simulate(base + opts, run_dir, data)
        accs = [r["server"].get("accuracy") for r in history["rounds"]] if history else []
        status = "completed" if history else _error(run_dir)
        results.append({"run": label, "options": opts, "test_accuracy": accs,
                        "wall_seconds": round(wall, 1), "status": status})  # fmt: skip

    print()
    print(f"Robustness benchmark, {time.strftime('%Y-%m-%d')}, machine: {machine()}")
    print(f"{args.clients} clients IID, {args.rounds} rounds, model {args.model}, "
          f"data {data or 'CIFAR-10'}; update-norm bound off (--max-update-norm 0)")  # fmt: skip
    print("| run | test acc per round | final | wall s |\n|---|---|---|---|")
    for r in results:
        accs = " / ".join(f"{a:.3f}" for a in r["test_accuracy"]) or r["status"]
        final = f"{r['test_accuracy'][-1]:.3f}" if r["test_accuracy"] else "-"
        print(f"| {r['run']} | {accs} | {final} | {r['wall_seconds']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "results": results}
    (out / "robustness.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _error(run_dir: Path) -> str:
    status = run_dir / "status.json"
    if status.exists():
        return "failed: " + json.loads(status.read_text()).get("error", "")[:160]
    return "refused before start (see the log above)"


if __name__ == "__main__":
    sys.exit(main())
