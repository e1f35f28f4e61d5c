"""Benchmark for a GPU machine: time to 90% and to 94% test accuracy of a 2-client federation.

Runs where Keras has torch and/or JAX on an accelerator; TensorFlow and Flower
are not needed there (batches come from :class:`pollen.training.pipeline.DeviceBatches`).
Two stages, each variant in its own process (Keras fixes its backend and dtype
policy per process):

1. **probe** -- Pollen's local training (``pollen.training.local.fit``, the model's
   recipe) for ``--probe-steps`` steps under every variant: each installed
   backend (torch, eager; JAX, whose train step XLA compiles) in ``float32``
   and in Keras's ``mixed_bfloat16``. Images/s after a warm-up pass that holds
   the compilation.
2. **run** -- the federation on the fastest variant, once for each entry of
   ``--rounds`` that fits in what is left of ``--budget``: ``--clients`` IID clients
   (``pollen.data.partition``: flwr-datasets' partitioner, as ``pollen simulate``).
   Every round, each client loads the global weights, resets its optimizer and
   trains one local epoch on the run-wide learning-rate schedule; the server
   averages the weights by example counts (FedAvg); each client re-estimates
   the BatchNorm statistics of the new global model on 2,000 local images and
   evaluates it on its local test share; the server merges the statistics and
   scores the model on the whole test set (with flip TTA). The same steps and
   Pollen functions as ``pollen simulate``'s client and server apps.

The federation runs in one process, without Flower's transport: Flower's
simulation engine needs Ray, whose wheel (74 MB) is larger than the working
tree the device machine here accepts (64 MiB), and that machine cannot install
packages. Clients train one after the other on the one GPU. Times count from
the start of the run's process (imports, data from the cache, model builds
included). Simulation's transport overhead on a CPU was measured at 1.03 of
the clients' own time (docs/performance.md#summary).

Usage:
    python benchmarks/gpu.py [--data-dir PATH] [--model fastnet-wide] [--rounds 16]
        [--clients 2] [--targets 0.90,0.94] [--variants torch:float32,...]
        [--probe-steps 100] [--budget 540] [--train-limit N] [--json OUT.json]

``--rounds`` is a list (``12,24``): the learning-rate schedule spans a run's
rounds, so each entry is a run of its own; a run starts only if the previous
one's pace says it ends within ``--budget`` seconds of this script's start.
A run stops early once it has reached every target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference import machine, resolve_data  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")


def _elapsed() -> float:
    return time.perf_counter() - START


def _setup_keras(precision: str) -> str:
    """Import Keras under this process's backend; set the dtype policy. Returns the device."""
    import keras

    keras.config.set_dtype_policy(precision)
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    return backend


def _load(data: str | None, train_limit: int, seed: int):
    from pollen.data.load import load_dataset

    ds = load_dataset(data)
    if 0 < train_limit < len(ds.y_train):  # a seeded random subset (the arrays are class-sorted)
        import dataclasses

        import numpy as np

        pick = np.sort(np.random.default_rng(seed).choice(len(ds.y_train), train_limit, False))
        ds = dataclasses.replace(ds, x_train=ds.x_train[pick], y_train=ds.y_train[pick])
    return ds


def probe(args: argparse.Namespace) -> dict:
    """Images/s of Pollen's local training of ``args.model`` under this process's variant."""
    device = _setup_keras(args.precision)
    from pollen.config import RunConfig
    from pollen.models.registry import MODELS
    from pollen.training.compile import build_client_model
    from pollen.training.local import fit

    cfg = RunConfig(model=args.model)  # defaults + recipe (validation would import Flower)
    ds = _load(args.data_dir, cfg.batch_size * args.probe_steps, cfg.seed)
    model = build_client_model(args.model, ds.num_classes, cfg.seed, whitened=True)  # stem frozen
    x, y = ds.x_train, ds.y_train
    kw = dict(epochs=1, batch_size=cfg.batch_size, augment=MODELS[args.model].augment, verbose=0)
    warm = fit(model, x, y, seed=1, **kw)  # compiles (JAX) and warms the kernels' caches
    timed = fit(model, x, y, seed=2, **kw)
    return {
        "device": device,
        "warmup_seconds": warm.seconds,
        "steps": math.ceil(len(y) / cfg.batch_size),
        "images_per_second": timed.num_examples / timed.seconds,
    }


def run(args: argparse.Namespace, emit) -> dict:
    """The federation (see the module docstring); ``emit(record)`` after every round."""
    device = _setup_keras(args.precision)

    from pollen.config import RunConfig
    from pollen.data.partition import partition_dataset
    from pollen.models.registry import MODELS, build_model
    from pollen.models.whitening import whiten_first_conv
    from pollen.server.aggregation import merge_batchnorm_stats, weighted_mean
    from pollen.training.compile import build_client_model, compile_model
    from pollen.training.evaluate import calibrate_batchnorm, evaluate
    from pollen.training.local import RunSchedule, fit, reset_optimizer

    cfg = RunConfig(model=args.model, num_rounds=args.rounds)
    spec = MODELS[args.model]
    ds = _load(args.data_dir, args.train_limit, cfg.seed)
    parts = [partition_dataset(ds, args.clients, k, seed=cfg.seed) for k in range(args.clients)]
    whitened = bool(spec.whiten and cfg.whiten)
    models = [build_client_model(args.model, ds.num_classes, cfg.seed, whitened=whitened)
              for _ in parts]  # fmt: skip
    if whitened:  # client 0 provides the initial weights, as in pollen simulate
        whiten_first_conv(models[0], spec.whiten, parts[0].x_train, seed=cfg.seed)
    global_weights = models[0].get_weights()
    server = compile_model(build_model(args.model, ds.num_classes, cfg.seed), 0.001, spec.recipe,
                           schedulable=False)  # fmt: skip
    flip_tta = cfg.tta and spec.flip_tta
    counts = [len(p.y_train) for p in parts]
    setup_seconds = _elapsed()
    print(f"[run] {device}, setup {setup_seconds:.1f} s: {counts} training images", flush=True)
    rounds, reached = [], {}
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        updates = []
        for k, (model, part) in enumerate(zip(models, parts, strict=True)):
            model.set_weights(global_weights)
            reset_optimizer(model, cfg.learning_rate)
            steps = cfg.local_epochs * math.ceil(counts[k] / cfg.batch_size)
            schedule = RunSchedule(cfg.learning_rate, (rnd - 1) * steps, args.rounds * steps,
                                   cfg.lr_schedule)  # fmt: skip
            fit(model, part.x_train, part.y_train, epochs=cfg.local_epochs,
                batch_size=cfg.batch_size, seed=cfg.seed * 1000 + rnd, augment=spec.augment,
                verbose=0, schedule=schedule)  # fmt: skip
            updates.append(model.get_weights())
        global_weights = [
            weighted_mean([u[i] for u in updates], counts) for i in range(len(global_weights))
        ]
        t1 = time.perf_counter()
        stats, used, local = [], [], []
        for model, part in zip(models, parts, strict=True):
            model.set_weights(global_weights)
            idx, arrays, n = calibrate_batchnorm(model, part.x_train,
                                                 max_examples=cfg.bn_calibration_examples,
                                                 seed=cfg.seed)  # fmt: skip
            local.append(evaluate(model, part.x_test, part.y_test, flip_tta=flip_tta)[1])
            if arrays:
                stats.append({str(i): a for i, a in zip(idx, arrays, strict=True)})
                used.append(n)
        if stats:
            merged = merge_batchnorm_stats(stats, used, list(stats[0])[0::2])
            for key, value in merged.items():
                global_weights[int(key)] = value
        t2 = time.perf_counter()
        server.set_weights(global_weights)
        loss, accuracy = evaluate(server, ds.x_test, ds.y_test, flip_tta=flip_tta)
        t3 = time.perf_counter()
        elapsed = _elapsed()  # one reading: the round's time and any target it reached agree
        for target in args.targets:
            if accuracy >= target and target not in reached:
                reached[target] = elapsed
        record = {
            "round": rnd,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "client_accuracy": local,
            "elapsed": elapsed,
            "round_seconds": t3 - t0,
            "phase_seconds": {"train": t1 - t0, "evaluate": t2 - t1, "server": t3 - t2},
        }
        rounds.append(record)
        emit(record)
        if len(reached) == len(args.targets) or _elapsed() > args.max_seconds:
            break
    return {
        "device": device,
        "setup_seconds": setup_seconds,
        "rounds": rounds,
        "seconds_to_target": {f"{t:.2f}": reached.get(t) for t in args.targets},
        "wall_seconds": _elapsed(),
    }


def _worker(args: argparse.Namespace) -> int:
    def emit(record: dict) -> None:
        print(f"[run] round {record['round']}: test accuracy {record['test_accuracy']:.4f} at "
              f"{record['elapsed']:.1f} s (round {record['round_seconds']:.1f} s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in record["phase_seconds"].items()) + ")",
              flush=True)  # fmt: skip

    result = probe(args) if args.worker == "probe" else run(args, emit)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _spawn(
    args: argparse.Namespace, stage: str, variant: str, timeout: float, rounds: int = 1
) -> dict:
    """Run one stage for one variant in a fresh process; return its result or the error."""
    backend, precision = variant.split(":")
    cmd = [sys.executable, __file__, "--worker", stage, "--precision", precision,
           "--model", args.model, "--rounds", str(rounds), "--clients", str(args.clients),
           "--targets", ",".join(str(t) for t in args.targets),
           "--probe-steps", str(args.probe_steps), "--max-seconds", str(timeout),
           "--train-limit", str(args.train_limit)]  # fmt: skip
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")  # fmt: skip
    start = time.perf_counter()
    result: dict = {"variant": variant}
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("RESULT "):
                result.update(json.loads(line[7:]))
            elif line.startswith("[run]"):
                print("   ", line.rstrip(), flush=True)
            if time.perf_counter() - start > timeout + 60:  # a run ends its last round first
                proc.kill()
                result["error"] = f"stopped after {timeout + 60:.0f} s"
                break
        proc.wait()
        if proc.returncode and "error" not in result:
            result["error"] = f"exit {proc.returncode}: " + " | ".join(lines[-6:])[-800:]
    except OSError as exc:
        result["error"] = str(exc)
    result["process_seconds"] = time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="fastnet-wide")
    parser.add_argument("--rounds", default="12,24", help="rounds of each run, e.g. 12,24")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--targets", default="0.90,0.94", help="test accuracies to time")
    parser.add_argument("--variants", default="", help="backend:precision,...; default all")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--probe-timeout", type=float, default=150.0)
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole script; runs stop after the round "
                             "that passes it")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all training images")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=["probe", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.targets = [float(t) for t in args.targets.split(",") if t]
    if args.worker:
        args.rounds = int(args.rounds)
        return _worker(args)
    rounds_list = [int(r) for r in args.rounds.split(",") if r]

    print(f"machine: {machine()}", flush=True)
    args.data_dir = resolve_data(args.data_dir)
    from pollen.data.load import load_dataset

    t = time.perf_counter()
    ds = load_dataset(args.data_dir)  # decodes once into Pollen's cache
    print(f"data: {len(ds.y_train)} train / {len(ds.y_test)} test images "
          f"({time.perf_counter() - t:.1f} s)", flush=True)  # fmt: skip
    from pollen.data.partition import partition_dataset

    partition_dataset(ds, args.clients, 0)  # fails here, not after the probes, if it cannot
    variants = [v for v in args.variants.split(",") if v] or [
        f"{b}:{p}" for b in ("torch", "jax") if importlib.util.find_spec(b) for p in PRECISIONS
    ]
    probes = []
    for variant in variants:
        result = _spawn(args, "probe", variant, args.probe_timeout)
        probes.append(result)
        print(f"probe {variant:22s} " + (
            f"{result['images_per_second']:8.0f} images/s (warm-up {result['warmup_seconds']:.1f}"
            f" s, {result['device']})" if "images_per_second" in result
            else f"failed: {result['error']}"), flush=True)  # fmt: skip
    ok = [p for p in probes if "images_per_second" in p]
    if not ok:
        print("no variant trained; nothing to run", file=sys.stderr)
        return 1
    best = max(ok, key=lambda p: p["images_per_second"])["variant"]
    runs: list[dict] = []
    for rounds in rounds_list:
        left = args.budget - _elapsed() - 15
        if runs and runs[-1].get("rounds"):
            last = runs[-1]
            pace = (last["wall_seconds"] - last["setup_seconds"]) / len(last["rounds"])
            if last["setup_seconds"] + pace * rounds > left:
                print(f"run of {rounds} rounds skipped: about {pace:.0f} s a round, "
                      f"{left:.0f} s left", flush=True)  # fmt: skip
                continue
        print(f"run: {args.model}, {args.clients} clients, up to {rounds} rounds on {best}",
              flush=True)  # fmt: skip
        runs.append({"num_rounds": rounds, **_spawn(args, "run", best, left, rounds)})
    summary = {"machine": machine(), "model": args.model, "variant": best, "probes": probes,
               "runs": runs}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    failed = False
    for run_ in runs:
        print(f"\n{args.model} on {best}, {run_['num_rounds']} rounds ({run_.get('device')}):")
        print(f"{'round':>5} {'accuracy':>9} {'elapsed s':>10} {'round s':>8}")
        for r in run_.get("rounds", []):
            print(f"{r['round']:5d} {r['test_accuracy']:9.4f} {r['elapsed']:10.1f} "
                  f"{r['round_seconds']:8.1f}")  # fmt: skip
        for target, seconds in run_.get("seconds_to_target", {}).items():
            print(f"time to {float(target):.0%}: " + ("not reached" if seconds is None
                                                      else f"{seconds:.1f} s"))  # fmt: skip
        if "error" in run_:
            failed = True
            print(f"run failed: {run_['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
