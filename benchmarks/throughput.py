"""Benchmark: local training throughput of a Pollen client, side by side.

Three ways to run one local epoch of the same model on the same in-memory
arrays, in this one process (nothing else running), after one warm-up epoch
each (tracing excluded):

- ``naive``: the naive client — the stock ``keras.applications`` model built
  fresh, numpy arrays straight into ``model.fit(x, y, batch_size)``;
- ``plain fit``: Pollen's registry model, numpy arrays into ``model.fit``;
- ``pollen``: Pollen's client path, ``pollen.training.fit`` (``tf.data`` with
  prefetching, model kept between rounds).

Prints images per second and the ratios the accuracy-per-minute issue asks for
(pollen ≥ 1.0× plain fit, ≥ 1.5× naive).

Usage:
    python benchmarks/throughput.py [--data-dir PATH] [--model mobilenetv2] [--images 5000]
        [--threads 0] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0 = TensorFlow's default")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import keras

    from pollen.data import load_dataset
    from pollen.models import MODELS, build_model, compile_model
    from pollen.training import configure_threads, fit

    if args.threads:
        configure_threads(args.threads)
    ds = load_dataset(resolve_data(args.data_dir))
    x, y = ds.x_train[: args.images], ds.y_train[: args.images]
    n = len(y)

    def timed(run) -> float:
        run()  # warm-up: tracing and first-epoch costs
        start = time.perf_counter()
        run()
        return n / (time.perf_counter() - start)

    results = {}
    if args.model == "mobilenetv2":
        naive = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), classes=ds.num_classes, weights=None
        )
        naive.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        results["naive"] = timed(
            lambda: naive.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
        )
    model = compile_model(build_model(args.model, ds.num_classes), 1e-3)
    results["plain fit"] = timed(
        lambda: model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
    )
    model = compile_model(build_model(args.model, ds.num_classes), 1e-3)
    results["pollen"] = timed(
        lambda: fit(
            model,
            x,
            y,
            epochs=1,
            batch_size=args.batch_size,
            seed=0,
            augment=MODELS[args.model].augment,
            verbose=0,
        )  # fmt: skip
    )
    print(f"\nLocal throughput, {time.strftime('%Y-%m-%d')}, machine: {machine()}")
    threads = args.threads or "default"
    print(f"model {args.model}, {n} images, batch {args.batch_size}, threads {threads}")
    for name, ips in results.items():
        print(f"  {name:>10}: {ips:7.1f} images/s")
    ratios = {"pollen / plain fit": results["pollen"] / results["plain fit"]}
    if "naive" in results:
        ratios["pollen / naive"] = results["pollen"] / results["naive"]
    for name, r in ratios.items():
        print(f"  {name}: {r:.2f}x")
    if args.json:
        summary = {"machine": machine(), "images_per_second": results, "ratios": ratios}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
