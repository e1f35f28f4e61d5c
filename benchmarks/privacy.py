"""Benchmark: test accuracy vs the differential-privacy budget epsilon.

Client-level DP needs many clients: by default 100 simulated clients (IID
split of CIFAR-10, 500 training images each), 10% of them sampled per round,
the GroupNorm CNN (``cnn-gn``: no moving statistics to noise), and for each
budget a ``pollen simulate --dp --dp-epsilon E`` run (Pollen picks the
noise multiplier), plus one run without DP. Prints the server's test
accuracy after the last round, the noise multiplier used and the epsilon
actually spent (at delta 1e-5).

Usage:
    python benchmarks/privacy.py [--data-dir PATH] [--clients 100] [--fraction 0.1]
        [--rounds 20] [--epsilons 100,30,10,3] [--clip 1.0] [--out DIR]

Writes ``privacy.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, machine, resolve_data, simulate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilons", default="100,30,10,3")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--model", default="cnn-gn")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more `pollen simulate` options after --")
    args = parser.parse_args()

    data = resolve_data(args.data_dir)
    out = args.out or ROOT / "runs" / f"bench-privacy-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    sampled = max(int(args.clients * args.fraction), 1)
    base = [
        "--clients", str(args.clients), "--fraction-train", str(args.fraction),
        "--min-clients", str(sampled), "--rounds", str(args.rounds), "--model", args.model,
        "--client-threads", "1", *args.extra,
    ]  # fmt: skip
    runs: list[tuple[str, list[str]]] = [("no DP", [])]
    for eps in args.epsilons.split(","):
        runs.append((f"epsilon {eps}", ["--dp", "--dp-epsilon", eps, "--dp-clip", str(args.clip)]))

    results = []
    for label, opts in runs:
        run_dir = out / label.replace(" ", "-")
        history, wall = simulate(base + opts, run_dir, data)
        if history is None:
            results.append({"run": label, "options": opts, "status": "failed"})
            continue
        last = history["rounds"][-1]
        results.append(
            {
                "run": label,
                "options": opts,
                "test_accuracy": [r["server"].get("accuracy") for r in history["rounds"]],
                "final_accuracy": last["server"].get("accuracy"),
                "epsilon_spent": last.get("privacy", {}).get("epsilon"),
                "noise_multiplier": last.get("privacy", {}).get("noise_multiplier"),
                "wall_seconds": round(wall, 1),
                "status": "completed",
            }
        )

    print()
    print(f"Privacy benchmark, {time.strftime('%Y-%m-%d')}, machine: {machine()}")
    print(
        f"{args.clients} clients IID, {sampled} sampled per round, {args.rounds} rounds, model "
        f"{args.model}, clipping norm {args.clip}, delta 1e-5; data {data or 'CIFAR-10'}"
    )
    print("| run | noise multiplier z | epsilon spent | final test acc | wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        if r["status"] != "completed":
            print(f"| {r['run']} | - | - | failed | - |")
            continue
        z = f"{r['noise_multiplier']:.3g}" if r["noise_multiplier"] else "-"
        eps = f"{r['epsilon_spent']:.3g}" if r["epsilon_spent"] else "-"
        print(f"| {r['run']} | {z} | {eps} | {r['final_accuracy']:.3f} | {r['wall_seconds']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "results": results}
    (out / "privacy.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
