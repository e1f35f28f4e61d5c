"""Benchmark: federated fine-tuning from pretrained weights vs random initialisation.

The dataset is real and not 32x32: the Oxygen icon theme (Debian package
``oxygen-icon-theme``), its 64x64 PNG icons labelled by their category folder
(actions, apps, devices, mimetypes, places, status: the six with 50 or more
icons), drawn on white, split 75/25 by a hash of the icon's name.

ImageNet weights cannot be downloaded on a machine without internet access,
so the pretrained weights come from Pollen itself: ``mobilenetv2`` trained
with ``pollen simulate`` on a CIFAR-10 subset (JPEG folder) at the same image
size; its ``model.keras`` then starts the icon runs through ``--weights PATH``
(10-class head -> a fresh 6-class head). With internet access, pass
``--weights imagenet`` instead of pretraining (``--pretrained imagenet``).

Every run is ``pollen simulate`` with 2 clients (IID halves), the same rounds,
seed and recipe; the table lists the server's test accuracy per round.

Usage:
    python benchmarks/pretrained.py [--work DIR] [--rounds 4] [--size 64]
        [--pretrain-rounds 3] [--pretrain-per-class 300]
        [--pretrained PATH|imagenet] [--variant "--freeze-rounds 0" ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import machine  # noqa: E402

ICONS = Path("/usr/share/icons/oxygen/base")
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "places", "status")
CIFAR_JPG = Path("/work/data/cifar10-jpg")


def build_icon_folder(out: Path, size: int) -> Path:
    """The icon dataset as an image folder ``out/train|test/<class>/*.png`` (made once)."""
    from PIL import Image

    if (out / "train").is_dir():
        return out
    source = ICONS / f"{size}x{size}"
    if not source.is_dir():
        sys.exit(f"{source} missing: apt-get install oxygen-icon-theme")
    for label in ICON_CLASSES:
        for png in sorted((source / label).glob("*.png")):
            bucket = int(hashlib.sha256(png.stem.encode()).hexdigest(), 16) % 4
            split = "test" if bucket == 0 else "train"
            dest = out / split / label / png.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            icon = Image.open(png).convert("RGBA")
            white = Image.new("RGBA", icon.size, (255, 255, 255, 255))
            Image.alpha_composite(white, icon).convert("RGB").save(dest)
    return out


def build_cifar_subset(out: Path, per_class: int) -> Path:
    """``per_class`` training and ``per_class // 5`` test JPEGs per CIFAR-10 class (copies)."""
    if (out / "train").is_dir():
        return out
    if not CIFAR_JPG.is_dir():
        sys.exit(f"{CIFAR_JPG} missing: extract the CIFAR-10 JPEG archive there")
    for split, count in (("train", per_class), ("test", max(per_class // 5, 10))):
        for label_dir in sorted((CIFAR_JPG / split).iterdir()):
            dest = out / split / label_dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for jpg in sorted(label_dir.glob("*.jpg"))[:count]:
                shutil.copyfile(jpg, dest / jpg.name)  # Pollen refuses links
    return out


def simulate(args: list[str], out: Path) -> tuple[list[float], float]:
    """Run ``pollen simulate ARGS --out OUT``; return server accuracy per round and seconds."""
    if not (out / "history.json").exists():
        cmd = [sys.executable, "-m", "pollen.cli", "simulate", *args, "--out", str(out)]
        print("$", shlex.join(cmd[2:]), flush=True)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        log = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            sys.exit(f"run failed (exit {rc}); see {log}")
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    history = json.loads((out / "history.json").read_text())
    accuracy = [r["server"]["accuracy"] for r in history["rounds"]]
    return accuracy, float(history.get("elapsed_seconds", 0.0))


def inprocess(args: list[str], out: Path) -> tuple[list[float], float]:
    """The federation of ``pollen simulate ARGS`` in this process: Pollen's code, no Flower.

    For a machine too loaded for Flower's simulation runtime (its ServerApp
    process must answer heartbeats within a minute of starting). The same
    2 IID partitions (``partition_dataset``), the same initial weights (server
    load of ``--weights``; else client 0's initialisation with its first
    convolution whitened), the same client round as ``pollen.client.app``
    (``apply_round``, ``round_learning_rate``, ``reset_optimizer``, the run-wide
    schedule, ``fit``), FedAvg weighted by examples, BatchNorm statistics
    re-estimated per client and merged (``merge_batchnorm_stats``), then the
    server's test accuracy. Returns accuracy per round and seconds (cached in OUT).
    """
    result = out / "inprocess.json"
    if result.exists():
        saved = json.loads(result.read_text())
        return saved["accuracy"], saved["seconds"]
    flags = dict(zip(args[::2], args[1::2], strict=False))
    print("$ [in-process]", shlex.join(args), flush=True)
    from pollen.config import RunConfig

    cfg = RunConfig.from_mapping(
        {
            "model": flags["--model"],
            "num-classes": int(flags.get("--num-classes", 10)),
            "image-size": flags["--image-size"],
            "num-rounds": int(flags["--rounds"]),
            "seed": int(flags["--seed"]),
            "data-dir": flags["--data-dir"],
            "weights": flags.get("--weights", ""),
            "freeze-rounds": int(flags.get("--freeze-rounds", -1)),
            "fine-tune-lr": float(flags.get("--fine-tune-lr", 0.0)),
            "keras-verbose": 0,
        }
    )
    start = time.perf_counter()
    accuracy = _federate(cfg)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"accuracy": accuracy, "seconds": seconds, "config": vars(cfg)}))
    print(f"  {seconds:.0f} s: {accuracy}", flush=True)
    return accuracy, seconds


def _federate(cfg) -> list[float]:  # noqa: ANN001 - a pollen.config.RunConfig
    """Run ``cfg``'s rounds with 2 in-process clients; the test accuracy after each."""
    import math

    import numpy as np

    from pollen.data.load import load_dataset
    from pollen.data.partition import partition_dataset
    from pollen.models.pretrained import load_pretrained
    from pollen.models.registry import MODELS, batchnorm_stat_indices, build_model
    from pollen.models.whitening import whiten_first_conv
    from pollen.server.aggregation import merge_batchnorm_stats
    from pollen.training.compile import build_client_model
    from pollen.training.evaluate import calibrate_batchnorm, evaluate
    from pollen.training.finetune import apply_round, round_learning_rate
    from pollen.training.local import RunSchedule, fit, reset_optimizer

    spec = MODELS[cfg.model]
    ds = load_dataset(cfg.data_dir, image_size=cfg.image_hw)
    parts = [partition_dataset(ds, 2, i, seed=cfg.seed) for i in range(2)]
    model = build_client_model(cfg.model, cfg.num_classes, cfg.seed, image_size=cfg.image_hw)
    if cfg.weights:
        server = build_model(cfg.model, cfg.num_classes, image_size=cfg.image_hw)
        load_pretrained(server, cfg.model, cfg.weights)
        global_w = server.get_weights()
    else:
        if cfg.whiten and spec.whiten:
            whiten_first_conv(model, spec.whiten, parts[0].x_train, seed=cfg.seed)
        global_w = model.get_weights()
    bn_idx = batchnorm_stat_indices(model)
    means = [str(i) for i in bn_idx[::2]]
    accuracy = []
    for rnd in range(1, cfg.num_rounds + 1):
        trained, counts = [], []
        for part in parts:
            model.set_weights(global_w)
            apply_round(model, cfg, rnd)
            lr = round_learning_rate(cfg, rnd, cfg.learning_rate)
            reset_optimizer(model, lr)
            steps = cfg.local_epochs * math.ceil(len(part.y_train) / cfg.batch_size)
            schedule = RunSchedule(lr, (rnd - 1) * steps, cfg.num_rounds * steps, cfg.lr_schedule)
            fit(model, part.x_train, part.y_train, epochs=cfg.local_epochs,
                batch_size=cfg.batch_size, seed=cfg.seed * 1000 + rnd, augment=spec.augment,
                verbose=0, schedule=schedule)  # fmt: skip
            trained.append(model.get_weights())
            counts.append(len(part.y_train))
        global_w = [
            np.average(np.stack(ws), axis=0, weights=counts).astype(ws[0].dtype)
            for ws in zip(*trained, strict=True)
        ]
        stats, used = [], []
        for part in parts:
            model.set_weights(global_w)
            idx, arrays, n = calibrate_batchnorm(
                model, part.x_train, max_examples=cfg.bn_calibration_examples, seed=cfg.seed
            )
            stats.append({str(i): a for i, a in zip(idx, arrays, strict=True)})
            used.append(n)
        if stats[0] and all(used):
            for key, value in merge_batchnorm_stats(stats, used, means).items():
                global_w[int(key)] = value
        model.set_weights(global_w)
        flip_tta = cfg.tta and spec.flip_tta
        accuracy.append(float(evaluate(model, ds.x_test, ds.y_test, flip_tta=flip_tta)[1]))
        print(f"  round {rnd}: test accuracy {accuracy[-1]:.3f}", flush=True)
    return accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/pretrained-bench"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--pretrain-rounds", type=int, default=3)
    parser.add_argument("--pretrain-per-class", type=int, default=300)
    parser.add_argument("--pretrained", default="", help="imagenet or a .keras file to use")
    parser.add_argument("--variant", action="append", default=[], help="extra flags, one run")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the icon federations in this process (see inprocess) instead of simulate",
    )
    args = parser.parse_args()
    engine = inprocess if args.in_process else simulate
    work = args.work.resolve()
    size = str(args.size)
    icons = build_icon_folder(work / f"icons{size}", args.size)
    common = ["--model", args.model, "--clients", "2", "--image-size", size, "--seed", "42"]
    weights = args.pretrained
    if not weights:
        cifar = build_cifar_subset(
            work / f"cifar{args.pretrain_per_class}", args.pretrain_per_class
        )
        pre = [*common, "--data-dir", str(cifar), "--rounds", str(args.pretrain_rounds)]
        accuracy, seconds = simulate(pre, work / "pretrain")
        print(f"pretraining on CIFAR-10 subset: accuracy per round {accuracy} ({seconds:.0f} s)")
        weights = str(work / "pretrain" / "model.keras")
    icon_args = [*common, "--data-dir", str(icons), "--num-classes", str(len(ICON_CLASSES))]
    icon_args += ["--rounds", str(args.rounds)]
    runs = [("random init", []), (f"--weights {Path(weights).name}", ["--weights", weights])]
    runs += [(f"--weights + {v}", ["--weights", weights, *shlex.split(v)]) for v in args.variant]
    rows = []
    for i, (label, extra) in enumerate(runs):
        accuracy, seconds = engine([*icon_args, *extra], work / f"icons-run{i}")
        rows.append((label, accuracy, seconds))
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{date}, {machine()}")
    how = "in-process (pollen's client code, no Flower)" if args.in_process else "pollen simulate"
    print(f"{how} {shlex.join(icon_args)} [+ run flags]")
    header = " | ".join(f"round {r + 1}" for r in range(args.rounds))
    print(f"| run | {header} | seconds |")
    print("|---" * (args.rounds + 2) + "|")
    for label, accuracy, seconds in rows:
        cells = " | ".join(f"{a:.3f}" for a in accuracy)
        print(f"| {label} | {cells} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
