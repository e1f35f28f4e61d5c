"""Tests for pollen.training.pipeline: tf.data and device batches, on every backend path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pollen.models.registry import build_model
from pollen.training import pipeline
from pollen.training.compile import compile_model
from pollen.training.evaluate import evaluate, predict_proba
from pollen.training.local import fit
from pollen.training.pipeline import MAX_SHIFT, DeviceBatches, make_dataset

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


def _batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(ds, DeviceBatches):
        ds = [ds[i] for i in range(len(ds))]
    return [(np.asarray(xb), np.asarray(yb)) for xb, yb in ds]


#: Both input paths: ``tf.data`` (CPU) and :class:`~pollen.training.pipeline.DeviceBatches`
#: (accelerators).
BOTH_PATHS = pytest.mark.parametrize("on_device", [False, True], ids=["tf.data", "device"])


@BOTH_PATHS
def test_make_dataset_batches(on_device: bool) -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    batches = _batches(make_dataset(x, y, 4, on_device=on_device))
    assert [b[0].shape for b in batches] == [(4, 32, 32, 3), (4, 32, 32, 3), (2, 32, 32, 3)]
    assert all(b[0].dtype == np.uint8 for b in batches)  # the model casts
    assert all(np.issubdtype(b[1].dtype, np.integer) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_make_dataset_runs_on_one_private_thread_without_the_autotuner() -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    for ds in (make_dataset(x, y, 4), make_dataset(x, y, 4, augment=True)):
        options = ds.options()
        assert options.autotune.enabled is False
        assert options.threading.private_threadpool_size == 1
        assert options.threading.max_intra_op_parallelism == 1


@BOTH_PATHS
def test_make_dataset_augment_keeps_shapes_changes_pixels(on_device: bool) -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    batches = _batches(make_dataset(x, y, 4, augment=True, seed=1, on_device=on_device))
    assert [b[0].shape for b in batches] == [(4, 32, 32, 3), (4, 32, 32, 3), (2, 32, 32, 3)]
    got = np.concatenate([b[0] for b in batches])
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)  # labels stay put
    assert not np.array_equal(got, x)
    # Flips and shifts move pixels; they do not invent values.
    assert set(np.unique(got).astype(int)) <= set(np.unique(x).astype(int))


@BOTH_PATHS
def test_make_dataset_augment_flips_and_shifts_each_image_on_its_own(on_device: bool) -> None:
    x, y = RNG_IMAGES[:12], np.arange(12, dtype=np.int64)
    ds = make_dataset(x, y, 12, augment=True, seed=3, on_device=on_device)
    (got, _), *_ = _batches(ds)
    pad = MAX_SHIFT
    found = []
    for image, source in zip(got, x.astype(np.float32), strict=True):
        matches = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(
                image,
                np.pad(source[:, ::-1] if flip else source, ((pad, pad), (pad, pad), (0, 0)),
                       mode="reflect")[dy : dy + 32, dx : dx + 32],
            )
        ]  # fmt: skip
        assert matches, "an augmented image is not a flip + shift of its source"
        found.append(matches[0])
    assert len({m[1:] for m in found}) > 3  # the shifts differ between images of a batch
    assert {m[0] for m in found} == {False, True}


@BOTH_PATHS
def test_make_dataset_shuffle_is_seeded(on_device: bool) -> None:
    x, y = RNG_IMAGES[:40], np.arange(40, dtype=np.int64)

    def order(seed: int) -> np.ndarray:
        ds = make_dataset(x, y, 8, shuffle=True, seed=seed, on_device=on_device)
        return np.concatenate([b[1] for b in _batches(ds)])

    first, again, other = order(3), order(3), order(4)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(np.sort(first), y)  # a permutation: nothing lost or repeated
    assert not np.array_equal(first, y)
    assert not np.array_equal(first, other)


def test_fit_evaluate_and_predict_run_on_device_batches(monkeypatch) -> None:
    """The accelerator path gives the same evaluation as tf.data and trains."""
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    x, y = RNG_IMAGES[:20], np.arange(20, dtype=np.int64) % 3
    host = evaluate(model, x, y, batch_size=6)
    host_tta = predict_proba(model, x, flip_tta=True, batch_size=6)
    monkeypatch.setattr(pipeline, "feeds_on_device", lambda: True)
    assert isinstance(make_dataset(x, y, 6), DeviceBatches)
    np.testing.assert_allclose(evaluate(model, x, y, batch_size=6), host, rtol=1e-5)
    np.testing.assert_allclose(
        predict_proba(model, x, flip_tta=True, batch_size=6), host_tta, atol=1e-6
    )
    result = fit(model, x, y, epochs=2, batch_size=8, seed=0, augment=True, verbose=0)
    assert np.isfinite(result.loss) and int(model.optimizer.iterations) == 6


NO_TENSORFLOW_CHECK = """
import importlib.util
assert importlib.util.find_spec("tensorflow") is None  # as on a GPU machine with torch only
import numpy as np
from pollen.backend import feeds_on_device
from pollen.training.evaluate import evaluate
from pollen.training.local import RunSchedule, fit, schedule_value
from pollen.models.registry import build_model, MODELS
from pollen.training.compile import compile_model
assert feeds_on_device()
from pollen.backend import configure_threads
assert configure_threads(1, 2) == 1
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
y = (np.arange(40) % 4).astype(np.int64)
spec = MODELS["fastnet"]
model = compile_model(build_model("fastnet", 4, 1, fastest_layout=True), 0.1, spec.recipe)
for rnd in (1, 2):
    sched = RunSchedule(0.1, (rnd - 1) * 5, 10, "onecycle")
    r = fit(model, x, y, epochs=1, batch_size=8, seed=rnd, augment=True, verbose=0,
            schedule=sched)
    assert np.isfinite(r.loss)
lr = float(model.optimizer.learning_rate)
assert abs(lr - schedule_value(0.1, 10, 10, "onecycle")) < 1e-6, lr
loss, acc = evaluate(model, x, y, flip_tta=True)
assert np.isfinite(loss) and 0 <= acc <= 1
print("ok")
"""


def _torch_spec():
    """torch's import spec; skips the test where torch is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None:
        pytest.skip("torch is not installed (pip install torch): TensorFlow-only setup")
    return spec


def _run_check(script: str, env: dict, *flags: str) -> None:
    """Run ``script`` in a fresh Python under ``env``; it must exit 0 and print ``ok``."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *flags, "-c", script], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_training_runs_under_torch_without_tensorflow(tmp_path) -> None:
    """A GPU machine may have torch and no TensorFlow: batches then come from the device path.

    The check runs in a Python whose packages are this environment's minus TensorFlow.
    """
    import os

    site = Path(_torch_spec().origin).parents[1]
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("tensorflow", "_tensorflow", "tf_")):
            (shadow / entry.name).symlink_to(entry)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=f"{repo}{os.pathsep}{shadow}")
    _run_check(NO_TENSORFLOW_CHECK, env, "-S")


TORCH_CPU_CHECK = """
import sys
import numpy as np
from pollen.backend import feeds_on_device
from pollen.training.evaluate import calibrate_batchnorm, evaluate
from pollen.training.local import fit
from pollen.training.compile import build_client_model
assert feeds_on_device()
from pollen.backend import configure_threads
assert configure_threads(1, 2) == 1
import torch
assert torch.get_num_threads() == 1
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
y = (np.arange(24) % 3).astype(np.int64)
model = build_client_model("cnn", 3, 0)
assert np.isfinite(fit(model, x, y, epochs=1, batch_size=8, seed=0, augment=True,
                       verbose=0).loss)
calibrate_batchnorm(model, x, max_examples=16)
loss, acc = evaluate(model, x, y, flip_tta=True)
assert np.isfinite(loss) and np.isfinite(evaluate(model, x, y)[0])
assert "tensorflow" not in sys.modules, "a torch client imported TensorFlow"
print("ok")
"""


def test_torch_clients_never_import_tensorflow() -> None:
    """Under torch, batches come from the device path even on a CPU beside TensorFlow.

    TensorFlow's import is seconds of every simulated client's start that a
    torch client does not need.
    """
    import os

    _torch_spec()
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    _run_check(TORCH_CPU_CHECK, env)
