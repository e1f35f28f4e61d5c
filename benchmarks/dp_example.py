"""Benchmark: example-level DP (``--dp example``) test accuracy at epsilon 1, 3, 8.

For each budget and each federation (2 clients IID, 10 clients Dirichlet
alpha 0.5) one ``pollen simulate --dp example --model scatternet --dp-epsilon
E`` run on the CIFAR-10 JPEG copy (or a per-class subset of it, ``--train-per-class``
/ ``--test-per-class``, for a machine too slow for the whole set), delta 1e-5:
each client computes its fixed ScatterNet + GroupNorm features once (cached on
disk), then trains the linear head with DP-SGD (Poisson sampling, closed-form
per-example gradients clipped at ``--clip``, noise calibrated by each client's
RDP accountant to the budget). ``--data-dir`` takes a folder or the
``.tar.gz`` (default: ``../shared/data/cifar10-jpg.tar.gz`` beside the checkout).
Prints the server's test accuracy after the last round, the largest client
epsilon spent and the wall time of every run.

``--measure-vmap`` instead times per-example gradients of the linear head
with ``tf.vectorized_map`` (TensorFlow) and ``torch.func.vmap`` (torch), the
two backends installed here.

Usage:
    python benchmarks/dp_example.py [--data-dir PATH] [--train-per-class 0]
        [--test-per-class 0] [--rounds R] [--epochs E] [--epsilons 1,3,8]
        [--setups iid2,dir10] [--batch-size B] [--lr LR] [--clip 0.1] [--out DIR]

Rounds, epochs, batch size and learning rate default to each setup's measured
recipe (:data:`RECIPES`).
    python benchmarks/dp_example.py --measure-vmap

Writes ``dp_example.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ROOT, machine, resolve_data, simulate  # noqa: E402

SETUPS = {
    "iid2": ["--clients", "2", "--partition", "iid"],
    "dir10": ["--clients", "10", "--partition", "dirichlet", "--alpha", "0.5"],
}

#: The schedule measured best per setup (docs/privacy-example.md); flags override the
#: first four. Dirichlet clients hold ~5,000 images, so batch 1024 keeps the iid2 sample
#: rate (4096 / 25,000); shorter local training between averages limits client drift.
#: ``server``: the server's options by epsilon: at epsilon 8 server momentum (FedAvgM,
#: post-processing: no privacy cost) gained 1.7 points; at 3 and 1, with more noise,
#: it lost 1.3 and 5.9, so plain FedAvg there.
RECIPES = {
    "iid2": {"rounds": 10, "epochs": 6, "batch_size": 4096, "lr": 4.0},
    "dir10": {
        "rounds": 30,
        "epochs": 2,
        "batch_size": 1024,
        "lr": 2.0,
        "server": lambda eps: (
            ["--strategy", "fedavgm", "--server-momentum", "0.7"] if eps >= 8 else []
        ),
    },
}


def subset(data: Path, out: Path, train: int, test: int) -> Path:
    """A copy of the first ``train``/``test`` images of every class (0 = all of them).

    Copies, not links: Pollen reads no link that leads outside its data folder.
    """
    if train == 0 and test == 0:
        return data
    for split, n in (("train", train), ("test", test)):
        for folder in sorted((data / split).iterdir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[: n or None]:
                copy = target / image.name
                if not copy.exists():
                    shutil.copyfile(image, copy)
    return out


def measure_vmap(batch: int = 256, repeats: int = 5) -> dict[str, float]:
    """Seconds per ``batch`` per-example gradients of a 15552 -> 10 softmax layer, by framework."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(batch, 15552)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, batch)
    times: dict[str, float] = {}

    import tensorflow as tf

    w = tf.Variable(tf.zeros((15552, 10)))

    def one(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            logits = tf.matmul(xi[None], w)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(yi[None], logits)
        return tape.gradient(loss, w)

    run = tf.function(lambda a, b: tf.vectorized_map(one, (a, b)))
    run(x, y)
    start = time.perf_counter()
    for _ in range(repeats):
        run(x, y).numpy()
    times["tensorflow vectorized_map"] = (time.perf_counter() - start) / repeats

    import torch
    from torch.func import grad, vmap

    wt = torch.zeros(15552, 10)

    def loss_fn(weight, xi, yi):
        return torch.nn.functional.cross_entropy((xi[None] @ weight), yi[None])

    per_example = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    per_example(wt, xt, yt)
    start = time.perf_counter()
    for _ in range(repeats):
        per_example(wt, xt, yt)
    times["torch func.vmap"] = (time.perf_counter() - start) / repeats
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-per-class", type=int, default=0)
    parser.add_argument("--test-per-class", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="default: RECIPES")
    parser.add_argument("--epochs", type=int, default=None, help="default: RECIPES")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--setups", default="iid2,dir10")
    parser.add_argument("--batch-size", type=int, default=None, help="default: RECIPES")
    parser.add_argument("--lr", type=float, default=None, help="default: RECIPES")
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--measure-vmap", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.measure_vmap:
        for name, seconds in measure_vmap().items():
            print(f"{name}: {seconds * 1000:.1f} ms per 256 per-example gradients")
        return 0

    out = args.out or ROOT / "runs" / f"bench-dp-example-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()
    source = resolve_data(args.data_dir)
    if source is None:
        print("dp_example: no CIFAR-10 copy found; pass --data-dir PATH", file=sys.stderr)
        return 2
    data = subset(Path(source), out / "data", args.train_per_class, args.test_per_class)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = []
    for setup in args.setups.split(","):
        recipe = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v
                  for k, v in RECIPES[setup].items()}  # fmt: skip
        for eps in args.epsilons.split(","):
            opts = [
                *SETUPS[setup], "--rounds", str(recipe["rounds"]),
                "--epochs", str(recipe["epochs"]), "--model", "scatternet",
                "--batch-size", str(recipe["batch_size"]), "--lr", str(recipe["lr"]),
                "--dp", "example", "--dp-epsilon", eps,
                "--dp-clip", str(args.clip), "--dp-delta", "1e-5", "--client-threads", "1",
                *recipe.get("server", lambda _: [])(float(eps)),
            ]  # fmt: skip
            history, wall = simulate(opts, out / f"{setup}-eps{eps}", str(data))
            row = {"setup": setup, "epsilon": float(eps), "options": opts, "wall_seconds": wall}
            if history is None:
                results.append({**row, "status": "failed"})
                print(f"{setup} eps={eps}: failed ({wall:.0f} s)", flush=True)
                continue
            last = history["rounds"][-1]
            row |= {
                "status": "completed",
                "test_accuracy": [r["server"].get("accuracy") for r in history["rounds"]],
                "final_accuracy": last["server"].get("accuracy"),
                "privacy": last.get("privacy", {}),
                "client_epsilons": [c.get("dp_epsilon") for c in last["clients"]],
            }
            results.append(row)
            print(
                f"{setup} eps={eps}: test acc {row['final_accuracy']:.4f}, spent "
                f"{row['privacy'].get('epsilon', float('nan')):.3f}, {wall:.0f} s",
                flush=True,
            )
    body = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "runs": results}
    (out / "dp_example.json").write_text(json.dumps(body, indent=2) + "\n")
    print(f"\nExample-level DP, {body['date']}, {body['machine']}")
    print(f"{'setup':8} {'eps':>5} {'test acc':>9} {'spent':>7} {'wall s':>7}")
    for r in results:
        acc = r.get("final_accuracy")
        spent = r.get("privacy", {}).get("epsilon")
        print(
            f"{r['setup']:8} {r['epsilon']:5g} {'-' if acc is None else f'{acc:.4f}':>9} "
            f"{'-' if spent is None else f'{spent:.3f}':>7} {r['wall_seconds']:7.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
