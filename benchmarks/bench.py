"""Benchmark suite: the accuracy-per-minute figures, one entry point.

Runs the configurations named in ``--configs`` (comma-separated, in this
order; default all) through the same ``pollen simulate`` a user runs, and
prints per configuration a table: test accuracy of the global model per
round (server side, the 10,000 test images), round and elapsed wall time,
federation overhead (round wall time / the slowest client's local fit +
evaluate time), local images/s, bytes per round; then the time to each
accuracy threshold reached. Everything is also written as JSON (``--json``).

- ``fast``: the recommended model, ``fastnet``, 2 clients IID, its recipe,
  up to ``--fast-rounds`` rounds, stopping at ``--target`` (time to 80%).
- ``reference``: the reference configuration (``mobilenetv2``, 2 clients IID,
  3 rounds, batch 32) and, side by side, the same model trained centrally
  for the same 3 epochs (``centralized.py``), at batch 32 (the yardstick of
  the "within 2 points" target) and at the clients' combined batch of 64
  (as many sequential steps as a client takes: what averaging the clients'
  gradients at every step would reach); then the verdict on both targets.
- ``throughput``: one local epoch, two clients training at once as in a
  simulation: Pollen's client path vs a plain ``model.fit`` of the same model
  vs the naive client (``throughput.py --clients 2``); ratios, so a noisy
  machine does not change the verdict.
- ``noniid``: 10 clients, Dirichlet alpha 0.5, ``fastnet``, ``--noniid-rounds``
  rounds, ``--noniid-fraction`` of the clients a round, each strategy of
  ``--noniid-strategies``. The runs share the seed, so every strategy trains the
  same clients in every round (``pollen.server.sampling.seeded_sampling``): a paired
  comparison.
- ``deployment``: the reference configuration on Flower's deployment runtime
  over loopback: ``pollen server`` and two ``pollen client`` processes on this
  machine (one thread each), ``--deploy-rounds`` rounds; the same table, so
  the federation overhead of a real deployment sits beside the simulation's.

Usage:
    python benchmarks/bench.py [--data-dir PATH]
        [--configs fast,reference,throughput,noniid,deployment]
        [--json bench.json] [--out runs/bench-DATE]

``--data-dir`` as in ``reference.py`` (default ``../shared/data/cifar10-jpg.tar.gz``
beside the checkout, else CIFAR-10 from its official archive).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import ROOT, machine, resolve_data, simulate  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
#: A round's phases as ``history.json`` times them (``RoundRecord.phase_seconds``);
#: ``server-beside`` ran beside the next round or after the last one.
PHASES = ("train", "evaluate", "server", "server-beside")
HERE = Path(__file__).resolve().parent


def run_figures(history: dict, wall: float) -> dict:
    """Per-round figures of one ``pollen simulate`` run and its time to thresholds.

    Args:
        history: The run's ``history.json``.
        wall: Wall seconds of the whole ``pollen simulate`` process.

    Returns:
        ``{"wall_seconds", "startup_seconds", "final_seconds", "rounds": [...],
        "time_to": {...}}``; ``final_seconds`` is what followed the last round
        (its central evaluation, when it ran after the clients were released).
        Each round has ``test_accuracy``, ``round_seconds``, ``elapsed_seconds``
        (since the process started, until the round's test accuracy was known),
        ``overhead`` (round / slowest client's fit + evaluate),
        ``overhead_without_server_eval`` (the same, less a central evaluation
        the round waited for), ``images_per_second`` (slowest client's local
        epoch), ``bytes`` (sent + received) and ``phase_seconds`` (see
        :data:`PHASES`).
    """
    rounds = history["rounds"]
    final = ((rounds[-1].get("phase_seconds") or {}).get("server-beside", 0.0)) if rounds else 0.0
    startup = max(0.0, wall - sum(r["seconds"] for r in rounds) - final)
    elapsed, rows = startup, []
    for r in rounds:
        elapsed += r["seconds"]
        # A central evaluation beside the next round tells the accuracy that much later.
        known = elapsed + (r.get("phase_seconds") or {}).get("server-beside", 0.0)
        busy = [
            (c.get("fit_seconds") or 0.0) + (c.get("eval_seconds") or 0.0) for c in r["clients"]
        ]
        speeds = [
            c["train_examples"] / c["fit_seconds"]
            for c in r["clients"]
            if c.get("fit_seconds") and c.get("train_examples")
        ]
        rows.append(
            {
                "round": r["round"],
                "test_accuracy": (r.get("server") or {}).get("accuracy"),
                "round_seconds": r["seconds"],
                "elapsed_seconds": known,
                "overhead": r["seconds"] / max(busy) if busy and max(busy) > 0 else None,
                # the same without the server's central evaluation (an extra job on the
                # server, not federation: deployed, it runs on the server's own cores)
                "overhead_without_server_eval": (
                    (r["seconds"] - (r.get("phase_seconds") or {}).get("server", 0.0)) / max(busy)
                    if busy and max(busy) > 0
                    else None
                ),
                "images_per_second": min(speeds) if speeds else None,
                "bytes": r.get("bytes_sent", 0) + r.get("bytes_received", 0),
                # train (incl. aggregation) / clients' evaluate / server's evaluation
                "phase_seconds": r.get("phase_seconds") or {},
            }
        )
    time_to = {}
    for t in THRESHOLDS:
        hit = next((x for x in rows if (x["test_accuracy"] or 0) >= t), None)
        if hit:
            time_to[f"{t:.0%}"] = {"round": hit["round"], "seconds": hit["elapsed_seconds"]}
    return {
        "wall_seconds": wall,
        "startup_seconds": startup,
        "final_seconds": final,
        "rounds": rows,
        "time_to": time_to,
    }


def reference_verdict(federated: dict, central: dict, combined: dict | None = None) -> dict:
    """The reference configuration's two accuracy targets, from the runs' figures.

    Args:
        federated: :func:`run_figures` of the federated run.
        central: ``centralized.py``'s JSON for the same model and recipe trained
            centrally for as many epochs as the federation has rounds.
        combined: The same at the clients' combined batch, or ``None``.

    Returns:
        ``{"federated", "central", "combined", "gap_points", "at_least_50",
        "within_2_points"}``: final test accuracies (fractions; ``combined``
        ``None`` when not run or failed), the federated run's shortfall from
        central training in percentage points (negative when it scores
        higher), and whether each target holds.
    """
    fed = federated["rounds"][-1]["test_accuracy"] or 0.0
    cen = central["epochs"][-1]["test_accuracy"]
    ok = combined and not combined.get("failed")
    gap = 100.0 * (cen - fed)
    return {
        "federated": fed,
        "central": cen,
        "combined": combined["epochs"][-1]["test_accuracy"] if ok else None,
        "gap_points": gap,
        "at_least_50": fed >= 0.5,
        "within_2_points": gap <= 2.0,
    }


def describe_verdict(verdict: dict) -> str:
    """One line on the reference targets from :func:`reference_verdict`'s dict."""
    gap = verdict["gap_points"]
    side = f"{gap:.1f} points under it" if gap >= 0 else f"{-gap:.1f} points over it"
    line = (
        f"federated after the last round {verdict['federated']:.2%}: >= 50% "
        f"{'met' if verdict['at_least_50'] else 'NOT met'}; centralized "
        f"{verdict['central']:.2%}, {side}: within 2 points "
        f"{'met' if verdict['within_2_points'] else 'NOT met'}"
    )
    if verdict["combined"] is not None:
        line += f" (centralized at the clients' combined batch: {verdict['combined']:.2%})"
    return line


def print_table(title: str, figures: dict) -> None:
    """Print one configuration's per-round table and its times to thresholds."""
    print(f"\n{title}")
    print(
        f"{'round':>5} {'test acc':>9} {'round s':>8} {'elapsed s':>10} {'overhead':>9} "
        f"{'w/o srv':>8} {'img/s':>7} {'MB/round':>9}  train/eval/server/beside s"
    )
    for r in figures["rounds"]:
        acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        ovh = f"{r['overhead']:.3f}" if r["overhead"] else "-"
        fed = r.get("overhead_without_server_eval")
        fed = f"{fed:.3f}" if fed else "-"
        ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-"
        phases = r.get("phase_seconds") or {}
        split = "/".join(f"{phases[k]:.0f}" if k in phases else "-" for k in PHASES)
        print(
            f"{r['round']:>5} {acc:>9} {r['round_seconds']:>8.1f} {r['elapsed_seconds']:>10.0f} "
            f"{ovh:>9} {fed:>8} {ips:>7} {r['bytes'] / 1e6:>9.1f}  {split}"
        )
    reached = ", ".join(
        f"{k} after round {v['round']} ({v['seconds']:.0f} s)"
        for k, v in figures["time_to"].items()
    )
    print(
        f"whole run {figures['wall_seconds']:.0f} s (start-up {figures['startup_seconds']:.0f} s, "
        f"after the last round {figures.get('final_seconds', 0.0):.0f} s); "
        f"reached: {reached or 'none of ' + ', '.join(f'{t:.0%}' for t in THRESHOLDS)}"
    )


def federated(name: str, options: list[str], out: Path, data: str | None) -> dict:
    """Run one ``pollen simulate`` configuration; print and return its figures."""
    history, wall = simulate(options, out / name, data)
    if history is None:
        print(f"{name}: pollen simulate failed (see its output above)", file=sys.stderr)
        return {"options": options, "failed": True, "wall_seconds": wall}
    figures = {"options": options, **run_figures(history, wall)}
    print_table(f"{name}: pollen simulate {' '.join(options)}", figures)
    return figures


def deployed(name: str, options: list[str], out: Path, data: str | None, clients: int = 2) -> dict:
    """Run ``pollen server OPTIONS`` and ``clients`` ``pollen client``s over loopback.

    The clients hold IID partitions of ``data`` and use one thread each; their
    output goes to ``out/name/client-I.log``. Prints and returns the figures
    of the server's ``history.json`` (wall time: the server process).
    """
    from pollen.deploy.processes import free_port

    run, port = out / name, free_port()
    run.mkdir(parents=True, exist_ok=True)
    data_args = ["--data-dir", data] if data else []
    cli = [sys.executable, "-m", "pollen.cli"]
    server_cmd = [*cli, "server", "--address", f"127.0.0.1:{port}", *options, "--out", str(run)]
    server_cmd += ["--test-data", data] if data else []
    print("$", " ".join(server_cmd), flush=True)
    start = time.perf_counter()
    server = subprocess.Popen(server_cmd)
    procs = []
    try:
        for i in range(clients):
            log = open(run / f"client-{i}.log", "wb")  # noqa: SIM115 - closed with the process
            client_cmd = [
                *cli, "client", "--server", f"127.0.0.1:{port}", *data_args,
                "--partition-id", str(i), "--num-partitions", str(clients), "--threads", "1",
            ]  # fmt: skip
            procs.append((subprocess.Popen(client_cmd, stdout=log, stderr=subprocess.STDOUT), log))
        rc = server.wait()
        wall = time.perf_counter() - start
    finally:
        if server.poll() is None:
            server.terminate()
        for proc, log in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
            log.close()
    history = run / "history.json"
    if rc != 0 or not history.exists():
        print(f"{name}: pollen server failed (see its output above)", file=sys.stderr)
        return {"options": options, "failed": True, "wall_seconds": wall}
    figures = {"options": options, **run_figures(json.loads(history.read_text()), wall)}
    print_table(f"{name}: pollen server {' '.join(options)} + {clients} pollen client", figures)
    return figures


def script(name: str, args: list[str], out: Path, label: str = "") -> dict:
    """Run a sibling benchmark script with ``--json out/LABEL.json``; return what it wrote.

    ``label`` names the JSON file (default: the script's ``name``), so one
    script can run twice with other arguments.
    """
    target = out / f"{label or name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(target)]
    print("$", " ".join(cmd), flush=True)
    if subprocess.call(cmd) != 0 or not target.exists():
        return {"failed": True}
    return json.loads(target.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--configs", default="fast,reference,throughput,noniid,deployment")
    parser.add_argument("--fast-rounds", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--fast-options", default="", help="more `pollen simulate` options")
    parser.add_argument("--noniid-rounds", type=int, default=20)
    parser.add_argument("--noniid-fraction", type=float, default=0.3)
    parser.add_argument("--noniid-strategies", default="fedavg,fedprox")
    parser.add_argument(
        "--noniid-options", default="", help="more `pollen simulate` options (e.g. --server-lr)"
    )
    parser.add_argument("--deploy-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench.json"))
    args = parser.parse_args()

    data = resolve_data(args.data_dir)
    out = (args.out or ROOT / "runs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_args = ["--data-dir", data] if data else []
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "configs": {}}
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in configs:
        if config == "fast":
            report["configs"]["fast"] = federated(
                "fast",
                ["--model", "fastnet", "--clients", "2", "--rounds", str(args.fast_rounds),
                 "--target-accuracy", str(args.target), *shlex.split(args.fast_options)],
                out, data,
            )  # fmt: skip
        elif config == "reference":
            fed = federated(
                "reference",
                ["--model", "mobilenetv2", "--clients", "2", "--rounds", "3"],
                out, data,
            )  # fmt: skip
            central = script("centralized", [*data_args, "--epochs", "3"], out)
            # the clients' combined batch: as many sequential steps as a client takes
            b64 = [*data_args, "--epochs", "3", "--batch-size", "64"]
            combined = script("centralized", b64, out, "centralized-b64")
            result = {"federated": fed, "centralized": central, "centralized_batch_64": combined}
            for label, run in (("", central), (" at batch 64", combined)):
                if not run.get("failed"):
                    accs = ", ".join(f"{e['test_accuracy']:.4f}" for e in run["epochs"])
                    print(f"centralized{label}, same model and recipe, per epoch: {accs}")
            if not fed.get("failed") and not central.get("failed"):
                verdict = result["verdict"] = reference_verdict(fed, central, combined)
                print(describe_verdict(verdict))
            report["configs"]["reference"] = result
        elif config == "throughput":
            # two clients sharing the machine, as in a simulation (see throughput.py)
            result = script(
                "throughput", [*data_args, "--model", "mobilenetv2", "--clients", "2"], out
            )
            report["configs"]["throughput"] = result
        elif config == "noniid":
            runs = {}
            for strategy in args.noniid_strategies.split(","):
                runs[strategy] = federated(
                    f"noniid-{strategy}",
                    ["--model", "fastnet", "--clients", "10", "--partition", "dirichlet",
                     "--alpha", "0.5", "--rounds", str(args.noniid_rounds),
                     "--fraction-train", str(args.noniid_fraction), "--strategy", strategy,
                     *shlex.split(args.noniid_options)],
                    out, data,
                )  # fmt: skip
            report["configs"]["noniid"] = runs
        elif config == "deployment":
            report["configs"]["deployment"] = deployed(
                "deployment",
                ["--model", "mobilenetv2", "--rounds", str(args.deploy_rounds)],
                out, data,
            )  # fmt: skip
        else:
            print(
                f"unknown configuration {config!r}: use fast, reference, throughput, noniid, "
                "deployment"
            )
            return 2
        args.json.write_text(json.dumps(report, indent=2) + "\n")  # after each: nothing lost
    print(f"\nmachine: {report['machine']}; JSON: {args.json}; run folders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
