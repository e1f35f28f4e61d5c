"""Benchmark: the same model and recipe trained centrally, one process, all the data.

The yardstick for a federated run: the registry model trained on the whole
training set for as many epochs as the federation's rounds x local epochs,
with Pollen's local-training recipe (the registry model's optimizer, batch
size, learning rate and run-wide schedule, augmentation, preferred Keras
backend and input pipeline). Prints test accuracy and wall time after every epoch.

Usage:
    python benchmarks/centralized.py [--data-dir PATH] [--epochs 3] [--model mobilenetv2]
        [--batch-size B] [--lr LR] [--lr-schedule S] [--json OUT.json]
    (batch size, lr and schedule default to the model's recipe)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine, resolve_data  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the model's recipe")
    parser.add_argument("--lr", type=float, default=0.0, help="0 = the model's recipe")
    parser.add_argument("--lr-schedule", default="auto", help="auto = the model's recipe")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pollen.config import RunConfig
    from pollen.models.registry import MODELS, select_backend

    cfg = RunConfig.from_mapping(
        {"model": args.model, "batch-size": args.batch_size, "learning-rate": args.lr,
         "lr-schedule": args.lr_schedule}
    )  # fmt: skip
    args.batch_size, args.lr, args.lr_schedule = cfg.batch_size, cfg.learning_rate, cfg.lr_schedule
    print(f"backend {select_backend(args.model)}: batch {args.batch_size}, lr {args.lr}, "
          f"schedule {args.lr_schedule}")  # fmt: skip
    from pollen.data.load import load_dataset
    from pollen.models.registry import build_model, find_layer
    from pollen.models.whitening import whiten_first_conv
    from pollen.training.compile import compile_model
    from pollen.training.evaluate import evaluate
    from pollen.training.local import RunSchedule, fit

    ds = load_dataset(resolve_data(args.data_dir))
    spec = MODELS[args.model]
    model = build_model(args.model, ds.num_classes, args.seed, fastest_layout=True)
    if spec.whiten:  # the same start as a federation's (there: one client's images)
        whiten_first_conv(model, spec.whiten, ds.x_train, seed=args.seed)
        find_layer(model, spec.whiten).trainable = not spec.freeze_whitened
    model = compile_model(model, args.lr, spec.recipe)
    steps = math.ceil(len(ds.y_train) / args.batch_size)
    rows = []
    start = time.perf_counter()
    print(f"centralized {args.model}: {len(ds.y_train)} train / {len(ds.y_test)} test images")
    for epoch in range(1, args.epochs + 1):
        schedule = RunSchedule(args.lr, (epoch - 1) * steps, args.epochs * steps, args.lr_schedule)
        result = fit(
            model, ds.x_train, ds.y_train, epochs=1, batch_size=args.batch_size,
            seed=args.seed * 1000 + epoch, augment=MODELS[args.model].augment, verbose=2,
            schedule=schedule,
        )  # fmt: skip
        loss, acc = evaluate(model, ds.x_test, ds.y_test, flip_tta=spec.flip_tta)
        # single view too where the model evaluates with flip TTA (comparable either way)
        single = evaluate(model, ds.x_test, ds.y_test)[1] if spec.flip_tta else acc
        rows.append(
            {
                "epoch": epoch,
                "test_accuracy": acc,
                "test_accuracy_single_view": single,
                "test_loss": loss,
                "epoch_seconds": result.seconds,
                "images_per_second": result.num_examples / result.seconds,
                "elapsed_seconds": time.perf_counter() - start,
            }
        )
        print(
            f"epoch {epoch}: test acc {acc:.4f} (single view {single:.4f}), loss {loss:.4f}, "
            f"epoch {result.seconds:.0f} s "
            f"({rows[-1]['images_per_second']:.0f} img/s)",
            flush=True,
        )
    print(f"machine: {machine()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "epochs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
