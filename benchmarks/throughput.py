"""Benchmark: local training throughput of a Pollen client, side by side.

Three ways to run one local epoch of the same model on the same in-memory
arrays, after one warm-up epoch each (tracing excluded):

- ``naive``: the naive client — the stock ``keras.applications`` model built
  fresh, numpy arrays straight into ``model.fit(x, y, batch_size)``, the
  framework's default thread pools;
- ``plain fit``: Pollen's registry model, numpy arrays into ``model.fit``,
  threads set as a Pollen client sets them;
- ``pollen``: Pollen's client path, ``pollen.training.local.fit`` (``tf.data`` with
  prefetching under TensorFlow, ``DeviceBatches`` under torch; model kept
  between rounds), threads as a Pollen client sets them.

With ``--clients 1`` (default) each runs in this one process, nothing else
running. With ``--clients N`` each way runs in N processes at once, the
setup of N simulated clients sharing this machine: every process trains on
its own arrays, the timed epochs start together (after every process's
warm-up), and the figure is the sum of their images per second. There the
naive processes keep the framework's default pools (each as many threads as
cores) and oversubscribe the CPU; Pollen's get ``cores / N`` threads each
(``pollen.backend.configure_threads``).

Prints images per second and the ratios the accuracy-per-minute issue asks for
(pollen ≥ 1.0× plain fit, ≥ 1.5× naive).

Usage:
    python benchmarks/throughput.py [--data-dir PATH] [--model mobilenetv2] [--images 5000]
        [--clients 1] [--threads 0] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402

WAYS = ("naive", "plain fit", "pollen")


def measure(way: str, args: argparse.Namespace, index: int = 0, barrier: Path | None = None):
    """Images per second of one timed local epoch the ``way`` given, in this process.

    Args:
        way: One of :data:`WAYS`.
        args: Parsed options (model, images, batch size, threads, clients).
        index: This process's place among ``args.clients``: it trains on the
            ``index``-th slice of ``args.images`` training images.
        barrier: Folder where the processes of one way meet after their
            warm-up (each writes ``ready-<index>``, then waits for all).
    """
    import keras

    from pollen.backend import configure_threads
    from pollen.data.load import load_dataset
    from pollen.models.registry import MODELS, build_model
    from pollen.training.compile import compile_model
    from pollen.training.local import fit

    if way != "naive":  # the naive client keeps the framework's default pools
        configure_threads(args.threads, args.clients)
    ds = load_dataset(resolve_data(args.data_dir))
    x = ds.x_train[index * args.images : (index + 1) * args.images]
    y = ds.y_train[index * args.images : (index + 1) * args.images]

    if way == "naive":
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), classes=ds.num_classes, weights=None
        )
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])

        def run() -> None:
            model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
    else:
        model = compile_model(build_model(args.model, ds.num_classes), 1e-3)
        if way == "plain fit":

            def run() -> None:
                model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
        else:

            def run() -> None:
                fit(
                    model, x, y, epochs=1, batch_size=args.batch_size, seed=0,
                    augment=MODELS[args.model].augment, verbose=0,
                )  # fmt: skip

    run()  # warm-up: tracing and first-epoch costs
    if barrier is not None:
        (barrier / f"ready-{index}").touch()
        while len(list(barrier.glob("ready-*"))) < args.clients:
            time.sleep(0.05)
    start = time.perf_counter()
    run()
    return len(y) / (time.perf_counter() - start)


def measure_together(way: str, args: argparse.Namespace) -> float:
    """Sum of images per second of ``args.clients`` processes running ``way`` at once."""
    with tempfile.TemporaryDirectory() as tmp:
        worker = [sys.executable, __file__, "--worker", way, "--barrier", tmp]
        procs = [
            subprocess.Popen(
                [*worker, "--index", str(i), *_shared_options(args)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(args.clients)
        ]
        outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a {way} worker failed (exit codes {[p.returncode for p in procs]})")
    return sum(float(out.strip().splitlines()[-1]) for out in outputs)


def _shared_options(args: argparse.Namespace) -> list[str]:
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    return [*data, "--model", args.model, "--images", str(args.images),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--clients", str(args.clients)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--images", type=int, default=5000, help="per process")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1, help="processes training at once")
    parser.add_argument(
        "--threads", type=int, default=0, help="Pollen's intra-op threads; 0 = cores / clients"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data_dir:
        args.data_dir = resolve_data(args.data_dir)

    if args.worker:  # one of --clients processes: print its figure on the last line
        print(measure(args.worker, args, args.index, args.barrier), flush=True)
        return 0
    ways = WAYS if args.model == "mobilenetv2" else WAYS[1:]
    if args.clients == 1:
        # In this process, one after the other (the naive model first, as before).
        results = {way: measure(way, args) for way in ways}
    else:
        results = {way: measure_together(way, args) for way in ways}

    print(f"\nLocal throughput, {time.strftime('%Y-%m-%d')}, machine: {machine()}")
    threads = args.threads or "cores / clients"
    print(
        f"model {args.model}, {args.images} images per process, batch {args.batch_size}, "
        f"{args.clients} process(es) at once, Pollen threads {threads}"
    )
    for name, ips in results.items():
        print(f"  {name:>10}: {ips:7.1f} images/s")
    ratios = {"pollen / plain fit": results["pollen"] / results["plain fit"]}
    if "naive" in results:
        ratios["pollen / naive"] = results["pollen"] / results["naive"]
    for name, r in ratios.items():
        print(f"  {name}: {r:.2f}x")
    if args.json:
        summary = {
            "machine": machine(),
            "clients": args.clients,
            "images_per_process": args.images,
            "images_per_second": results,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
