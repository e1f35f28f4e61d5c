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
the work folder.

Usage:
    python benchmarks/compress.py [--models fastnet mobilenetv2] [--rounds 3]
        [--codecs none/none fp16/fp16 int8/int8 topk:0.05/none]
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


def run_once(args: argparse.Namespace, model: str, codecs: str, data: Path, out: Path) -> dict:
    """One ``pollen simulate`` run with ``codecs`` (``UP/DOWN``); per-client figures."""
    up, _, down = codecs.partition("/")
    cmd = [
        sys.executable, "-m", "pollen.cli", "simulate", "--model", model,
        "--clients", str(args.clients), "--rounds", str(args.rounds),
        "--data-dir", str(data), "--out", str(out), "--seed", str(args.seed),
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
        "up": float(np.mean([c["bytes_received"] for c in per_client])),
        "down": float(np.mean([c["bytes_sent"] for c in per_client])),
        "accuracy": rounds[-1]["server"].get("accuracy"),
        "client_accuracy": rounds[-1]["evaluate"].get("accuracy"),
        "seconds": wall,
    }


def table(results: list[dict]) -> str:
    """The results as a Markdown table, each run against its model's ``none/none`` run."""
    lines = [
        "| model | up/down codec | up MB/client/round | % of none | down MB/client/round "
        "| % of none | test accuracy | vs none (points) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = next(b for b in results if b["model"] == r["model"] and b["codecs"] == "none/none")
        acc, ref = r["accuracy"], base["accuracy"]
        lines.append(
            f"| {r['model']} | {r['codecs']} | {r['up'] / 1e6:.3f} | "
            f"{100 * r['up'] / base['up']:.1f} | {r['down'] / 1e6:.3f} | "
            f"{100 * r['down'] / base['down']:.1f} | {acc:.4f} | {100 * (acc - ref):+.2f} |"
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
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", default=None, help="default: the shared CIFAR-10 JPEGs")
    parser.add_argument("--train-per-class", type=int, default=250)
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
    data = subset(args.data_dir, work / "data", args.train_per_class, args.test_per_class)
    print(
        f"machine: {machine()}\ndata: {args.data_dir} subset, {args.train_per_class} train and "
        f"{args.test_per_class} test images per class; {args.clients} clients, {args.rounds} "
        f"rounds, seed {args.seed}",
        flush=True,
    )
    results = []
    for model in args.models:
        for codecs in args.codecs:
            out = work / f"{model}-{codecs.replace('/', '-').replace(':', '')}"
            r = run_once(args, model, codecs, data, out)
            results.append(r)
            print(
                f"  {model} {codecs}: up {r['up'] / 1e6:.3f} MB, down {r['down'] / 1e6:.3f} MB "
                f"per client per round, accuracy {r['accuracy']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    print("\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
