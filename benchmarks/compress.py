"""Benchmark: compressed updates (``--compress``, ``--compress-down``) against ``none``.

One run of ``pollen simulate`` per model and codec pair, with the same
data, seed, clients and rounds, and a table of what each sent and how well
the model learned:

- bytes per client per round, up (what a client sends: its update and its
  BatchNorm statistics) and down (what the server sends it: the weights to
  train and the weights to evaluate), as the run's ``history.json`` records
  them (the arrays as they travelled, packed and compressed), and as a
  percentage of the ``none`` run's;
- the server's test accuracy of the global model after the last round
  (central evaluation on the data's test split), and its difference from
  ``none`` in points.

Data: a class-balanced subset of an image folder or ``.tar.gz`` (default the CIFAR-10
JPEG copy ``../shared/data/cifar10-jpg.tar.gz`` beside the checkout, unpacked once):
``--train-per-class`` and ``--test-per-class`` images of each class are copied into
the work folder; ``--train-per-class 0`` uses the whole data set as it is.

With several ``--seeds`` every codec runs once per seed and is compared with the
``none`` run *of the same seed* (paired): a run repeats to the digit on one machine,
so the paired difference is the codec's alone, while different seeds (different
partitions, initial weights and batch orders) differ by a point or more.

Usage:
    python benchmarks/compress.py [--models fastnet mobilenetv2] [--rounds 3]
        [--codecs none/none fp16/fp16 int8/int8 topk:0.05/none] [--seeds 42 1 2]
        [--train-per-class 250] [--test-per-class 50] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402


def subset(source: Path, target: Path, train: int, test: int) -> Path:
    """Copy the first ``train``/``test`` images (by name) of each class of ``source``."""
    for split, n in (("train", train), ("test", test)):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            out = target / split / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:n]:
                if not (out / image.name).exists():
                    shutil.copyfile(image, out / image.name)
    return target


def run_once(
    args: argparse.Namespace, model: str, codecs: str, data: Path, out: Path, seed: int
) -> dict:
    """One ``pollen simulate`` run with ``codecs`` (``UP/DOWN``); per-client figures."""
    up, _, down = codecs.partition("/")
    cmd = [
        sys.executable, "-m", "pollen.cli", "simulate", "--model", model,
        "--clients", str(args.clients), "--rounds", str(args.rounds),
        "--data-dir", str(data), "--out", str(out), "--seed", str(seed),
        "--compress", up, "--compress-down", down or "none", *args.extra,
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    for attempt in (1, 2):  # a run whose Flower runtime hangs (seen on an overloaded machine)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # pollen simulate stops its SuperLink and simulation on SIGTERM
            output, _ = proc.communicate()
            print(f"  {model} {codecs}: no result in {args.timeout:g} s, try {attempt}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            continue
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = output.decode(errors="replace")[-3000:]
            raise SystemExit(f"pollen simulate failed ({model}, {codecs}):\n{tail}")
        break
    else:
        raise SystemExit(f"pollen simulate hung twice ({model}, {codecs})")
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    per_client = [c for r in rounds for c in r["clients"]]
    return {
        "model": model,
        "codecs": codecs,
        "seed": seed,
        "up": float(np.mean([c["bytes_received"] for c in per_client])),
        "down": float(np.mean([c["bytes_sent"] for c in per_client])),
        "accuracy": rounds[-1]["server"].get("accuracy"),
        "client_accuracy": rounds[-1]["evaluate"].get("accuracy"),
        "seconds": wall,
    }


def table(results: list[dict]) -> str:
    """The results as a Markdown table, each codec pair against ``none/none``.

    Bytes are means over the seeds; each seed's accuracy is compared with the
    ``none/none`` run of the same seed.
    """
    seeds = sorted({r["seed"] for r in results}, key=[r["seed"] for r in results].index)
    head = " / ".join(str(s) for s in seeds)
    lines = [
        "| model | up/down codec | up MB/client/round | % of none | down MB/client/round "
        f"| % of none | test accuracy (seed {head}) | vs none, points (mean; per seed) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pairs = sorted(
        {(r["model"], r["codecs"]) for r in results},
        key=[(r["model"], r["codecs"]) for r in results].index,
    )
    for model, codecs in pairs:
        runs = [r for r in results if (r["model"], r["codecs"]) == (model, codecs)]
        base = {r["seed"]: r for r in results if (r["model"], r["codecs"]) == (model, "none/none")}
        up = np.mean([r["up"] for r in runs]) / np.mean([b["up"] for b in base.values()])
        down = np.mean([r["down"] for r in runs]) / np.mean([b["down"] for b in base.values()])
        diffs = [100 * (r["accuracy"] - base[r["seed"]]["accuracy"]) for r in runs]
        accs = " / ".join(f"{r['accuracy']:.4f}" for r in runs)
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(
            f"| {model} | {codecs} | {np.mean([r['up'] for r in runs]) / 1e6:.3f} | "
            f"{100 * up:.1f} | {np.mean([r['down'] for r in runs]) / 1e6:.3f} | "
            f"{100 * down:.1f} | {accs} | {np.mean(diffs):+.2f}"
            + (f"; {per_seed} |" if len(runs) > 1 else " |")
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fastnet", "mobilenetv2"])
    parser.add_argument(
        "--codecs",
        nargs="+",
        default=["none/none", "fp16/fp16", "int8/int8", "topk:0.05/none"],
        help="UP/DOWN pairs of --compress and --compress-down; none/none first",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--data-dir", default=None, help="default: the shared CIFAR-10 JPEGs")
    parser.add_argument(
        "--train-per-class", type=int, default=250, help="0: the whole data set as it is"
    )
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more pollen simulate options, after --")
    args = parser.parse_args()
    if "none/none" not in args.codecs:
        args.codecs.insert(0, "none/none")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="compress-"))
    source = resolve_data(args.data_dir)
    if source is None:
        print("compress: no CIFAR-10 copy found; pass --data-dir PATH", file=sys.stderr)
        return 2
    args.data_dir = Path(source)
    if args.train_per_class > 0:
        data = subset(args.data_dir, work / "data", args.train_per_class, args.test_per_class)
        what = (
            f"subset, {args.train_per_class} train and {args.test_per_class} test images per class"
        )
    else:
        data, what = args.data_dir, "whole"
    seeds = " ".join(str(s) for s in args.seeds)
    print(
        f"machine: {machine()}\ndata: {args.data_dir} {what}; {args.clients} clients, "
        f"{args.rounds} rounds, seeds {seeds}",
        flush=True,
    )
    results = []
    for model in args.models:
        for seed in args.seeds:
            for codecs in args.codecs:
                name = f"{model}-{codecs.replace('/', '-').replace(':', '')}-seed{seed}"
                r = run_once(args, model, codecs, data, work / name, seed)
                results.append(r)
                print(
                    f"  {model} {codecs} seed {seed}: up {r['up'] / 1e6:.3f} MB, down "
                    f"{r['down'] / 1e6:.3f} MB per client per round, accuracy "
                    f"{r['accuracy']:.4f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
