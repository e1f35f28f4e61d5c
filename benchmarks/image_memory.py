r"""Peak resident memory of ONE client at several image sizes (``--image-size``).

For each size in ``--sizes`` a fresh process does what one deployed client does in its
first round, through Pollen's own client code (``pollen.client.app``): load its data (a
CSV manifest of ``--images`` training images and a fifth as many test images, decoded and
resized once, then cached), build the model at that size, whiten its first convolution
(the initial-weights reply), train one local epoch (``_train``, the train handler's body),
and evaluate (BatchNorm calibration and the test split, as the evaluate handler does).
The parent samples the resident memory (RSS) of that process and every process under it
every 50 ms with psutil and reports the peak; the child reports its RSS after each phase.

``--steps K`` stops local training after K batches (a Keras callback; everything else is
unchanged), for sizes where a whole epoch takes too long on a small machine: training's
memory is reached in the first steps, the remaining ones only take time.

The subset is copied (not linked: a manifest's images must lie inside its folder) from an
image folder ``--data-dir`` with ``train/<class>/*`` and ``test/<class>/*``, e.g. the
CIFAR-10 JPEG copy, into ``--work``, with the manifest ``manifest.csv`` (path,label,split).
Each size decodes into a fresh cache folder, so the decode is measured too.

Usage:
    python benchmarks/image_memory.py --data-dir /work/data/cifar10-jpg \\
        [--sizes 96,224] [--images 5000] [--steps 0] [--model mobilenetv2] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PHASE = "phase "  # prefix of the child's per-phase lines on stdout


def make_subset(data_dir: Path, work: Path, images: int, seed: int = 0) -> Path:
    """Copy ``images`` training and ``images // 5`` test images; return their manifest."""
    manifest = work / "manifest.csv"
    rng = random.Random(seed)
    rows = []
    for split, count in (("train", images), ("test", max(1, images // 5))):
        files = sorted((data_dir / split).glob("*/*"))
        files = [f for f in files if f.is_file() and not f.name.startswith(".")]
        if len(files) < count:
            raise SystemExit(f"{data_dir / split} has {len(files)} images, fewer than {count}")
        for f in rng.sample(files, count):
            rel = Path("images") / split / f.parent.name / f.name
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (work / rel).exists():
                shutil.copyfile(f, work / rel)
            rows.append([rel.as_posix(), f.parent.name, split])
    with manifest.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return manifest


def tree_rss(proc) -> int:
    """Resident bytes of ``proc`` and all its descendants (0 for any that are gone)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(args: argparse.Namespace, manifest: Path, size: int) -> dict:
    """Run one client at ``size`` in a child process; return its peak RSS and phases."""
    import psutil

    cache = args.work / f"cache-{size}"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--size",
           str(size), "--steps", str(args.steps), "--model", args.model, "--threads",
           str(args.threads)]  # fmt: skip
    env = {**os.environ, "POLLEN_CACHE_DIR": str(cache), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)  # noqa: S603
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode:
        raise SystemExit(f"the client at {size} px failed (exit {child.returncode})")
    phases = [json.loads(line[len(PHASE) :]) for line in out.splitlines() if line.startswith(PHASE)]
    return {"size": size, "peak_tree_rss": peak, "seconds": time.perf_counter() - start,
            "phases": phases}  # fmt: skip


def run_child(args: argparse.Namespace) -> None:
    """One client's first round at ``args.size``, printing RSS after each phase."""
    import resource

    import psutil

    me = psutil.Process()
    t0 = time.perf_counter()

    def phase(name: str, **extra: object) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        record = {"phase": name, "rss": me.memory_info().rss, "max_rss": peak,
                  "seconds": time.perf_counter() - t0, **extra}  # fmt: skip
        print(PHASE + json.dumps(record), flush=True)

    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig
    from pollen.models.registry import MODELS
    from pollen.models.whitening import whiten_first_conv

    cfg = RunConfig(model=args.model, data_dir=str(args.manifest), image_size=str(args.size),
                    num_rounds=1, keras_verbose=0, seed=0)  # fmt: skip
    node_config = {"data-dir": str(args.manifest), "threads": args.threads}  # a deployed client
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config=node_config)  # fmt: skip
    phase("start")
    data = client_app.load_client_data(client_app.client_data_spec(cfg, node_config))
    phase("data", train=list(data.x_train.shape), bytes=int(data.x_train.nbytes))
    _, model, _ = client_app._setup(RecordDict(), context)
    phase("model")
    if client_app.whitens(cfg):
        whiten_first_conv(model, MODELS[cfg.model].whiten, data.x_train, seed=cfg.seed)
    phase("whiten")
    if args.steps:
        _stop_fit_after(args.steps)
    content = RecordDict({"arrays": ArrayRecord(model.get_weights()),
                          "config": ConfigRecord({"server-round": 1})})  # fmt: skip
    reply = client_app._train(content, context)
    metrics = dict(reply["metrics"])
    phase("train", fit_seconds=metrics["fit_seconds"], examples=metrics["num-examples"])
    from pollen.training.evaluate import calibrate_batchnorm, evaluate

    calibrate_batchnorm(model, data.x_train, max_examples=cfg.bn_calibration_examples, seed=0)
    loss, accuracy = evaluate(model, data.x_test, data.y_test, flip_tta=cfg.tta)
    phase("evaluate", accuracy=accuracy)


def _stop_fit_after(steps: int) -> None:
    """Make every ``keras.Model.fit`` stop after ``steps`` batches (``--steps``)."""
    import keras

    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if batch + 1 >= steps:
                self.model.stop_training = True

    original = keras.Model.fit

    def fit(self, *a, **kw):
        kw["callbacks"] = [*(kw.get("callbacks") or []), StopAfter()]
        return original(self, *a, **kw)

    keras.Model.fit = fit


def main() -> None:
    """Parse the options; measure every size (or, with ``--child``, be one client)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/data/cifar10-jpg"))
    parser.add_argument("--sizes", default="96,224")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=0, help="0 = one whole epoch")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pollen-image-memory"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    from reference import machine

    args.work.mkdir(parents=True, exist_ok=True)
    manifest = make_subset(args.data_dir, args.work, args.images)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {' '.join(sys.argv)}\n# {when}; {machine()}")
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(args, manifest, size)
        results.append(r)
        steps = f"{args.steps} steps" if args.steps else "1 epoch"
        print(f"\n{size}x{size}, {args.model}, {args.images} train images, {steps}: peak RSS "
              f"of the client's process tree {r['peak_tree_rss'] / 2**20:,.0f} MiB "
              f"({r['seconds']:.0f} s)")  # fmt: skip
        for p in r["phases"]:
            extra = {k: v for k, v in p.items() if k not in ("phase", "rss", "max_rss", "seconds")}
            print(f"  after {p['phase']:<9} RSS {p['rss'] / 2**20:7,.0f} MiB, peak so far "
                  f"{p['max_rss'] / 2**20:7,.0f} MiB, {p['seconds']:6.1f} s  "
                  f"{extra or ''}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"when": when, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
