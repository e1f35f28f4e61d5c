"""Tests for pollen.models.registry and pollen.training.local on random data (small CNN where possible)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pollen.client.app import check_architecture
from pollen.errors import PollenError
from pollen.models.registry import (
    MODELS,
    batchnorm_stat_indices,
    build_model,
    find_layer,
    whiten_first_conv,
    whitening_kernel,
)
from pollen.training import local as training
from pollen.training.compile import build_client_model, compile_model

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


def _bn_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """All BatchNormalization layers, including those inside nested models."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _bn_layers(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


@pytest.fixture(scope="module")
def mobilenet() -> tuple[keras.Model, keras.Model]:
    """(pollen's mobilenetv2, the reference keras.applications.MobileNetV2), built once."""
    model = build_model("mobilenetv2", num_classes=10, seed=0)
    reference = keras.applications.MobileNetV2(input_shape=(32, 32, 3), classes=10, weights=None)
    return model, reference


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    return build_model("cnn", num_classes=10, seed=0)


@pytest.fixture
def registry_model(request, mobilenet, cnn) -> keras.Model:
    built = {"mobilenetv2": mobilenet[0], "cnn": cnn}
    return built.get(request.param) or build_model(request.param, num_classes=10, seed=0)


# --- the registry ------------------------------------------------------------------------------


def test_registry_has_the_documented_models() -> None:
    assert {"mobilenetv2", "cnn"} <= set(MODELS)
    for spec in MODELS.values():
        assert callable(spec.build) and spec.description


@pytest.mark.parametrize("registry_model", sorted(MODELS), indirect=True)
def test_model_maps_pixels_to_probabilities(registry_model: keras.Model) -> None:
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    probs = np.asarray(registry_model(x, training=False))
    assert probs.shape == (2, 10)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert registry_model.input_shape == (None, 32, 32, 3)


def test_mobilenetv2_is_exactly_the_reference(mobilenet) -> None:
    model, reference = mobilenet
    assert model.count_params() == reference.count_params()
    assert model.count_params() > 2_257_984  # MobileNetV2 body + a 10-class head
    assert [tuple(w.shape) for w in model.weights] == [tuple(w.shape) for w in reference.weights]
    # All weights live in the nested MobileNetV2; the pixel rescaling in front has none.
    weighted = [layer for layer in model.layers if layer.weights]
    assert len(weighted) == 1 and isinstance(weighted[0], keras.Model)


def test_mobilenetv2_rescales_pixels_to_pm1(mobilenet) -> None:
    model, _ = mobilenet
    base = model.layers[-1]
    assert isinstance(base, keras.Model)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(model(x, training=False)),
        np.asarray(base(x / 127.5 - 1.0, training=False)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_mobilenetv2_batchnorm_momentum(mobilenet) -> None:
    model, reference = mobilenet
    layers = _bn_layers(model)
    assert len(layers) == len(_bn_layers(reference)) > 40
    assert {layer.momentum for layer in layers} == {0.9}


def test_mobilenetv2_residual_blocks_start_as_the_identity(mobilenet) -> None:
    model, reference = mobilenet
    base = model.layers[-1]
    adds = [layer for layer in base.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 10  # MobileNetV2's residual blocks
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    for add in adds:
        # inputs: the block's input (the shortcut) and its branch, ending in <block>_project_BN
        probe = keras.Model(base.inputs, [*add.input, add.output])
        shortcut, branch, out = (np.asarray(t) for t in probe(x, training=False))
        assert add.input[1]._keras_history.operation.name == add.name[: -len("add")] + "project_BN"
        np.testing.assert_array_equal(branch, 0.0)
        np.testing.assert_allclose(out, shortcut)
    # Only those scales start at 0: every other BatchNorm keeps Keras's gamma of 1.
    zeroed = {add.name[: -len("add")] + "project_BN" for add in adds}
    for layer in _bn_layers(model):
        np.testing.assert_array_equal(np.asarray(layer.gamma), 0.0 if layer.name in zeroed else 1.0)
    assert all(np.all(np.asarray(layer.gamma) == 1.0) for layer in _bn_layers(reference))


def test_cnn_batchnorm_momentum(cnn) -> None:
    assert [layer.momentum for layer in _bn_layers(cnn)] == [0.9, 0.9, 0.9]


def test_same_seed_same_initial_weights() -> None:
    a = build_model("cnn", num_classes=5, seed=3)
    b = build_model("cnn", num_classes=5, seed=3)
    c = build_model("cnn", num_classes=5, seed=4)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert [w.shape for w in wa] == [w.shape for w in wb] == [w.shape for w in wc]
    assert [w.dtype for w in wa] == [w.dtype for w in wb]
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(wa, wc, strict=True))


# --- BatchNorm statistics ------------------------------------------------------------------------


def _check_stat_indices(model: keras.Model) -> list[int]:
    indices = batchnorm_stat_indices(model)
    weights = model.weights
    bn = _bn_layers(model)
    assert len(indices) == 2 * len(bn) > 0
    assert indices == sorted(indices)
    for mean_i, var_i in zip(indices[0::2], indices[1::2], strict=True):
        assert var_i == mean_i + 1  # the variance directly follows its mean
        assert weights[mean_i].path.endswith("moving_mean"), weights[mean_i].path
        assert weights[var_i].path.endswith("moving_variance"), weights[var_i].path
        assert tuple(weights[mean_i].shape) == tuple(weights[var_i].shape)
        assert len(weights[mean_i].shape) == 1
    stat_paths = {weights[i].path for i in indices}
    assert stat_paths == {
        v.path for layer in bn for v in (layer.moving_mean, layer.moving_variance)
    }
    return indices


def test_batchnorm_stat_indices_cnn(cnn) -> None:
    indices = _check_stat_indices(cnn)
    shapes = [cnn.get_weights()[i].shape for i in indices]
    assert shapes == [(32,), (32,), (64,), (64,), (128,), (128,)]


def test_batchnorm_stat_indices_mobilenetv2(mobilenet) -> None:
    _check_stat_indices(mobilenet[0])


def test_calibrate_batchnorm_sets_exact_batch_statistics() -> None:
    model = build_model("cnn", num_classes=3, seed=0)
    # Move the weights away from the initial ones so the statistics are not trivial.
    rng = np.random.default_rng(5)
    model.set_weights(
        [w + rng.normal(0, 0.02, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    before = model.get_weights()
    bn_layers = _bn_layers(model)
    momenta = [layer.momentum for layer in bn_layers]
    x = RNG_IMAGES

    indices, arrays, n = training.calibrate_batchnorm(
        model, x, max_examples=2000, seed=0, chunk_size=len(x)
    )

    assert n == len(x)
    assert indices == batchnorm_stat_indices(model)
    after = model.get_weights()
    for i, arr in zip(indices, arrays, strict=True):
        np.testing.assert_array_equal(arr, after[i])
    # Only the statistics changed ...
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if i in indices:
            assert not np.allclose(a, b), f"statistic {i} was not re-estimated"
        else:
            np.testing.assert_array_equal(a, b)
    # ... the momenta are back ...
    assert [layer.momentum for layer in bn_layers] == momenta
    # ... and bn0 holds the exact per-channel mean/variance (ddof=0) of its inputs.
    conv0 = keras.Model(model.input, model.get_layer("conv0").output)
    feats = np.asarray(conv0(x.astype("float32"))).astype(np.float64)
    bn0 = model.get_layer("bn0")
    np.testing.assert_allclose(
        np.asarray(bn0.moving_mean), feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(bn0.moving_variance), feats.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5
    )


def test_calibrate_batchnorm_in_chunks_averages_their_statistics() -> None:
    model = build_model("cnn", num_classes=3, seed=0)
    _, arrays, n = training.calibrate_batchnorm(model, RNG_IMAGES, chunk_size=16)  # 3 chunks
    assert n == len(RNG_IMAGES)
    conv0 = keras.Model(model.input, model.get_layer("conv0").output)
    feats = np.asarray(conv0(RNG_IMAGES.astype("float32"))).astype(np.float64)
    np.testing.assert_allclose(arrays[0], feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    within = np.mean([f.var(axis=(0, 1, 2)) for f in np.split(feats, 3)], axis=0)
    np.testing.assert_allclose(arrays[1], within, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(arrays[1], feats.var(axis=(0, 1, 2)), rtol=2e-2)


def test_calibrate_batchnorm_uses_a_seeded_subset() -> None:
    model = build_model("cnn", num_classes=3, seed=0)
    _, arrays, n = training.calibrate_batchnorm(model, RNG_IMAGES, max_examples=16, seed=9)
    assert n == 16
    pick = np.sort(np.random.default_rng(9).choice(len(RNG_IMAGES), 16, replace=False))
    conv0 = keras.Model(model.input, model.get_layer("conv0").output)
    feats = np.asarray(conv0(RNG_IMAGES[pick].astype("float32"))).astype(np.float64)
    np.testing.assert_allclose(arrays[0], feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_calibrate_batchnorm_off_changes_nothing(cnn) -> None:
    before = cnn.get_weights()
    indices, arrays, n = training.calibrate_batchnorm(cnn, RNG_IMAGES, max_examples=0)
    assert (arrays, n) == ([], 0) and len(indices) == 6
    indices, arrays, n = training.calibrate_batchnorm(cnn, RNG_IMAGES[:0])
    assert (arrays, n) == ([], 0)
    for a, b in zip(before, cnn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# --- input pipeline ----------------------------------------------------------------------------


def _batches(ds) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(ds, training.DeviceBatches):
        ds = [ds[i] for i in range(len(ds))]
    return [(np.asarray(xb), np.asarray(yb)) for xb, yb in ds]


#: Both input paths: ``tf.data`` (CPU) and :class:`~pollen.training.local.DeviceBatches` (accelerators).
BOTH_PATHS = pytest.mark.parametrize("on_device", [False, True], ids=["tf.data", "device"])


@BOTH_PATHS
def test_make_dataset_batches(on_device: bool) -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    batches = _batches(training.make_dataset(x, y, 4, on_device=on_device))
    assert [b[0].shape for b in batches] == [(4, 32, 32, 3), (4, 32, 32, 3), (2, 32, 32, 3)]
    assert all(b[0].dtype == np.uint8 for b in batches)  # the model casts
    assert all(np.issubdtype(b[1].dtype, np.integer) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_make_dataset_runs_on_one_private_thread_without_the_autotuner() -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    for ds in (training.make_dataset(x, y, 4), training.make_dataset(x, y, 4, augment=True)):
        options = ds.options()
        assert options.autotune.enabled is False
        assert options.threading.private_threadpool_size == 1
        assert options.threading.max_intra_op_parallelism == 1


@BOTH_PATHS
def test_make_dataset_augment_keeps_shapes_changes_pixels(on_device: bool) -> None:
    x, y = RNG_IMAGES[:10], np.arange(10, dtype=np.int64)
    batches = _batches(training.make_dataset(x, y, 4, augment=True, seed=1, on_device=on_device))
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
    ds = training.make_dataset(x, y, 12, augment=True, seed=3, on_device=on_device)
    (got, _), *_ = _batches(ds)
    pad = training.MAX_SHIFT
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
        ds = training.make_dataset(x, y, 8, shuffle=True, seed=seed, on_device=on_device)
        return np.concatenate([b[1] for b in _batches(ds)])

    first, again, other = order(3), order(3), order(4)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(np.sort(first), y)  # a permutation: nothing lost or repeated
    assert not np.array_equal(first, y)
    assert not np.array_equal(first, other)


# --- fit and the optimizer ---------------------------------------------------------------------


def test_fit_and_reset_optimizer() -> None:
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    x = RNG_IMAGES[:32]
    x = np.concatenate([x, x[::-1]])  # 64 images
    y = np.random.default_rng(2).integers(0, 2, 64).astype(np.int64)

    result = training.fit(model, x, y, epochs=1, batch_size=16, seed=0, verbose=0)
    assert isinstance(result, training.FitResult)
    assert result.num_examples == 64
    assert np.isfinite(result.loss) and result.loss > 0
    assert 0 <= result.accuracy <= 1 and result.seconds > 0

    opt = model.optimizer
    schedule_state = {id(v) for v in opt._learning_rate.state}
    moments = [v for v in opt.variables if id(v) not in schedule_state]
    assert any(np.any(np.asarray(v) != 0) for v in moments), "fit left no optimizer state"

    training.reset_optimizer(model, 0.0125)
    for v in moments:
        assert not np.any(np.asarray(v)), f"{v.path} not reset"
    assert float(opt.learning_rate) == pytest.approx(0.0125)

    # The model still trains after the reset (the traced train step is reused).
    again = training.fit(model, x, y, epochs=1, batch_size=16, seed=1, verbose=0)
    assert np.isfinite(again.loss)
    assert int(opt.iterations) == 4


def test_fit_evaluate_and_predict_run_on_device_batches(monkeypatch) -> None:
    """The accelerator path gives the same evaluation as tf.data and trains."""
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    x, y = RNG_IMAGES[:20], np.arange(20, dtype=np.int64) % 3
    host = training.evaluate(model, x, y, batch_size=6)
    host_tta = training.predict_proba(model, x, flip_tta=True, batch_size=6)
    monkeypatch.setattr(training, "feeds_on_device", lambda: True)
    assert isinstance(training.make_dataset(x, y, 6), training.DeviceBatches)
    np.testing.assert_allclose(training.evaluate(model, x, y, batch_size=6), host, rtol=1e-5)
    np.testing.assert_allclose(
        training.predict_proba(model, x, flip_tta=True, batch_size=6), host_tta, atol=1e-6
    )
    result = training.fit(model, x, y, epochs=2, batch_size=8, seed=0, augment=True, verbose=0)
    assert np.isfinite(result.loss) and int(model.optimizer.iterations) == 6


def test_optimizer_tracks_the_schedule_state() -> None:
    """JAX's compiled train step sees only tracked state: the schedule must be part of it."""
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    step_lr = model.optimizer._learning_rate
    tracked = {id(v) for v in model.optimizer.variables}
    assert step_lr.state and all(id(v) in tracked for v in step_lr.state)


NO_TENSORFLOW_CHECK = """
import importlib.util
assert importlib.util.find_spec("tensorflow") is None  # as on a GPU machine with torch only
import numpy as np
from pollen.training import local as training
from pollen.models.registry import build_model, MODELS
from pollen.training.compile import compile_model
assert training.feeds_on_device()
from pollen.backend import configure_threads
assert configure_threads(1, 2) == 1
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
y = (np.arange(40) % 4).astype(np.int64)
spec = MODELS["fastnet"]
model = compile_model(build_model("fastnet", 4, 1, fastest_layout=True), 0.1, spec.recipe)
for rnd in (1, 2):
    sched = training.RunSchedule(0.1, (rnd - 1) * 5, 10, "onecycle")
    r = training.fit(model, x, y, epochs=1, batch_size=8, seed=rnd, augment=True, verbose=0,
                     schedule=sched)
    assert np.isfinite(r.loss)
lr = float(model.optimizer.learning_rate)
assert abs(lr - training.schedule_value(0.1, 10, 10, "onecycle")) < 1e-6, lr
loss, acc = training.evaluate(model, x, y, flip_tta=True)
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
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=f"{repo}{os.pathsep}{shadow}")
    _run_check(NO_TENSORFLOW_CHECK, env, "-S")


TORCH_CPU_CHECK = """
import sys
import numpy as np
from pollen.training import local as training
from pollen.training.compile import build_client_model
assert training.feeds_on_device()
from pollen.backend import configure_threads
assert configure_threads(1, 2) == 1
import torch
assert torch.get_num_threads() == 1
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
y = (np.arange(24) % 3).astype(np.int64)
model = build_client_model("cnn", 3, 0)
assert np.isfinite(training.fit(model, x, y, epochs=1, batch_size=8, seed=0, augment=True,
                                verbose=0).loss)
training.calibrate_batchnorm(model, x, max_examples=16)
loss, acc = training.evaluate(model, x, y, flip_tta=True)
assert np.isfinite(loss) and np.isfinite(training.evaluate(model, x, y)[0])
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
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, KERAS_BACKEND="torch", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    _run_check(TORCH_CPU_CHECK, env)


def test_evaluate_returns_loss_and_accuracy() -> None:
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    y = np.arange(12, dtype=np.int64) % 3
    loss, acc = training.evaluate(model, RNG_IMAGES[:12], y, batch_size=5)
    assert np.isfinite(loss) and 0 <= acc <= 1
    assert acc * 12 == pytest.approx(round(acc * 12))


def test_flip_tta_averages_image_and_mirror_probabilities() -> None:
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    x, y = RNG_IMAGES[:12], np.arange(12, dtype=np.int64) % 3
    plain = np.asarray(model.predict(x.astype("float32"), verbose=0))
    mirror = np.asarray(model.predict(x[:, :, ::-1].astype("float32"), verbose=0))
    assert not np.allclose(plain, mirror, atol=1e-4)  # the cnn is not flip-invariant

    np.testing.assert_allclose(training.predict_proba(model, x, batch_size=5), plain, atol=1e-5)
    probs = training.predict_proba(model, x, flip_tta=True, batch_size=5)
    np.testing.assert_allclose(probs, (plain + mirror) / 2, atol=1e-5)

    loss, acc = training.evaluate(model, x, y, batch_size=5, flip_tta=True)
    assert loss == pytest.approx(float(-np.mean(np.log(probs[np.arange(12), y]))), rel=1e-5)
    assert acc == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    # Without TTA the compiled loss and metric, as before.
    plain_loss, plain_acc = training.evaluate(model, x, y, batch_size=5)
    assert plain_acc == pytest.approx(float(np.mean(plain.argmax(1) == y)))
    assert plain_loss == pytest.approx(float(-np.mean(np.log(plain[np.arange(12), y]))), rel=1e-4)


def test_flip_tta_is_on_for_models_trained_with_flips_and_the_reference() -> None:
    assert MODELS["fastnet"].flip_tta and MODELS["fastnet"].augment
    # MobileNetV2 trains without flips; mirror images help it all the same (CIFAR-10).
    assert MODELS["mobilenetv2"].flip_tta and not MODELS["mobilenetv2"].augment
    assert not MODELS["cnn"].flip_tta


# --- client architecture check ------------------------------------------------------------------


def test_check_architecture(cnn) -> None:
    weights = cnn.get_weights()
    check_architecture(cnn, weights)  # matching weights pass
    check_architecture(cnn, [w + 1 for w in weights])  # values do not matter

    with pytest.raises(PollenError, match=f"{len(weights) - 1} arrays received, {len(weights)}"):
        check_architecture(cnn, weights[:-1])

    wrong = list(weights)
    wrong[5] = np.zeros((3, 3, 32, 65), np.float32)
    with pytest.raises(PollenError, match=r"\barray 5\b") as err:
        check_architecture(cnn, wrong)
    assert "same architecture" in str(err.value)

    other = build_model("cnn", num_classes=4, seed=0).get_weights()
    with pytest.raises(PollenError, match=rf"\barray {len(weights) - 2}\b"):
        check_architecture(cnn, other)


def test_cnn_gn_has_no_moving_statistics() -> None:
    """Every array of cnn-gn is trainable: DP noise and SecAgg+ clipping touch weights only."""
    model = build_model("cnn-gn", num_classes=10, seed=0)
    assert batchnorm_stat_indices(model) == []
    assert len(model.get_weights()) == len(model.trainable_weights)


def test_proximal_term_keeps_local_training_near_the_global_weights() -> None:
    from pollen.training.compile import compile_model
    from pollen.training.local import ProximalTerm, fit

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    model = compile_model(build_model("cnn-gn", num_classes=3, seed=0), 1e-2)
    start = [w.copy() for w in model.get_weights()]

    def drift() -> float:
        return float(
            np.sqrt(
                sum(((a - b) ** 2).sum() for a, b in zip(model.get_weights(), start, strict=True))
            )
        )

    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    plain = drift()
    model.set_weights(start)
    training.reset_optimizer(model, 1e-2)
    ProximalTerm.of(model).anchor(100.0)
    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    assert drift() < 0.5 * plain
    assert ProximalTerm.of(model) is ProximalTerm.of(model)  # installed once
    model.set_weights(start)
    training.reset_optimizer(model, 1e-2)
    ProximalTerm.of(model).anchor(0.0)  # mu 0 = plain training again
    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    assert drift() == pytest.approx(plain, rel=0.05)


# --- the recommended fast model and its recipe --------------------------------------------------


def test_fastnet_size_and_recipe() -> None:
    model = build_model("fastnet", num_classes=10, seed=0)
    assert 250_000 < model.count_params() < 350_000
    recipe = MODELS["fastnet"].recipe
    assert (recipe.optimizer, recipe.batch_size, recipe.lr_schedule) == ("sgd", 64, "onecycle")
    assert MODELS["fastnet"].augment
    assert len(batchnorm_stat_indices(model)) == 2 * 7  # stem + 3 blocks x 2 convs


def test_fastnet_layouts_give_the_same_function() -> None:
    """Under TensorFlow the fastest layout is channels-last: the very same model."""
    a = build_model("fastnet", num_classes=4, seed=1)
    b = build_model("fastnet", num_classes=4, seed=1, fastest_layout=True)
    assert [w.shape for w in a.get_weights()] == [w.shape for w in b.get_weights()]
    np.testing.assert_allclose(a.predict(RNG_IMAGES[:4], verbose=0),
                               b.predict(RNG_IMAGES[:4], verbose=0), atol=1e-6)  # fmt: skip


TORCH_LAYOUT_CHECK = """
import numpy as np, keras
from pollen.models.registry import build_model
assert keras.backend.backend() == "torch"
x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
last = build_model("fastnet", num_classes=4, seed=1)
first = build_model("fastnet", num_classes=4, seed=1, fastest_layout=True)
assert first.get_layer("to_channels_first") is not None
first.set_weights(last.get_weights())
np.testing.assert_allclose(first.predict(x, verbose=0), last.predict(x, verbose=0), atol=1e-5)
print("same")
"""


def test_fastnet_channels_first_under_torch_is_the_same_function() -> None:
    """Clients train channels-first under torch; the server's channels-last model agrees."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install torch): TensorFlow-only setup")
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", TORCH_LAYOUT_CHECK], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


def _smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Images with strongly correlated neighbouring pixels, like photographs."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 8, 8, 3))
    noise = 0.1 * rng.normal(size=(n, 32, 32, 3))
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + noise


def test_whitening_kernel_gives_uncorrelated_unit_variance_components() -> None:
    images = _smooth_images(40)
    kernel = whitening_kernel(images, 3, 8, eps=0.0)
    assert kernel.shape == (3, 3, 3, 8) and kernel.dtype == np.float32
    patches = np.lib.stride_tricks.sliding_window_view(images, (3, 3), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 27)
    out = (patches - patches.mean(axis=0)) @ kernel.reshape(27, 8).astype(np.float64)
    np.testing.assert_allclose(np.cov(out[:, :4], rowvar=False, bias=True), np.eye(4), atol=1e-3)
    np.testing.assert_allclose(out[:, 4:], -out[:, :4], atol=1e-4)  # the negated half
    # The top components: no other unit direction of the patches has more variance.
    centred = patches - patches.mean(axis=0)
    top = np.linalg.norm(kernel.reshape(27, 8)[:, 0].astype(np.float64)) ** -2
    largest = np.linalg.eigvalsh(centred.T @ centred / len(centred))[-1]
    assert top == pytest.approx(largest, rel=1e-3)


def test_whitening_kernel_rejects_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="cannot whiten"):
        whitening_kernel(_smooth_images(2), 3, 7)
    with pytest.raises(ValueError, match="cannot whiten"):
        whitening_kernel(_smooth_images(2), 1, 8)  # 1x1x3 patches have 3 components, not 4


def test_whiten_first_conv_sets_fastnets_stem_from_the_scaled_images() -> None:
    model = build_model("fastnet", num_classes=10, seed=0)
    images = RNG_IMAGES.astype(np.uint8)
    assert whiten_first_conv(model, MODELS["fastnet"].whiten, images[:0]) == 0
    before = model.get_layer("stem_conv").get_weights()[0]
    assert whiten_first_conv(model, MODELS["fastnet"].whiten, images, max_images=5) == 5
    after = model.get_layer("stem_conv").get_weights()[0]
    assert after.shape == before.shape and not np.allclose(after, before)
    pick = np.sort(np.random.default_rng(0).choice(len(images), 5, replace=False))
    expected = whitening_kernel(images[pick].astype(np.float32) / 127.5 - 1.0, 3, 24)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
    mobilenet = build_model("mobilenetv2", num_classes=10, seed=0)
    assert whiten_first_conv(mobilenet, MODELS["mobilenetv2"].whiten, images) == len(images)


@pytest.mark.parametrize("kind", ["constant", "cosine", "onecycle"])
def test_step_learning_rate_computes_the_run_schedule_in_the_train_step(kind) -> None:
    step_lr = training.StepLearningRate(0.5)
    assert float(step_lr(123)) == pytest.approx(0.5)  # constant until a schedule is set
    step_lr.set(training.RunSchedule(0.2, 30, 100, kind), iteration=7)
    for step in range(7, 90, 3):  # optimizer steps 7.. are run steps 30..
        expected = training.schedule_value(0.2, 30 + step - 7, 100, kind)
        assert float(step_lr(step)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        step_lr.set(training.RunSchedule(0.2, 0, 10, "linear"), iteration=0)


def test_fit_follows_the_rounds_schedule_without_a_callback() -> None:
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    x = np.concatenate([RNG_IMAGES[:32], RNG_IMAGES[:32][::-1]])  # 64 images, 4 steps of 16
    y = np.random.default_rng(2).integers(0, 2, 64).astype(np.int64)
    schedule = training.RunSchedule(0.1, 40, 100, "onecycle")
    training.fit(model, x, y, epochs=1, batch_size=16, seed=0, verbose=0, schedule=schedule)
    opt = model.optimizer
    assert int(opt.iterations) == 4
    # The next step would be run step 44: the rate in force follows the schedule.
    assert float(opt.learning_rate) == pytest.approx(
        training.schedule_value(0.1, 44, 100, "onecycle"), abs=1e-6
    )
    training.fit(model, x, y, epochs=1, batch_size=16, seed=1, verbose=0,
                 schedule=training.RunSchedule(0.1, 44, 100, "onecycle"))  # fmt: skip
    assert float(opt.learning_rate) == pytest.approx(
        training.schedule_value(0.1, 48, 100, "onecycle"), abs=1e-6
    )


def test_onecycle_schedule_warms_up_then_decays_to_zero() -> None:
    values = [training.schedule_value(0.2, s, 100, "onecycle") for s in range(101)]
    assert values[0] == 0.0
    assert values[15] == pytest.approx(0.2)
    assert max(values) == pytest.approx(0.2)
    assert values[100] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(values[:15], values[1:16], strict=True))  # rising
    assert all(a >= b for a, b in zip(values[15:-1], values[16:], strict=True))  # falling


def test_recipe_compiles_sgd_with_label_smoothing() -> None:
    from pollen.models.registry import Recipe

    recipe = Recipe(optimizer="sgd", learning_rate=0.1, label_smoothing=0.2, weight_decay=5e-4)
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 0.1, recipe)
    assert isinstance(model.optimizer, keras.optimizers.SGD) and model.optimizer.nesterov
    y_true = np.array([0, 2])
    y_pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="float32")
    smoothed = np.array(
        [[1 - 0.2 + 0.2 / 3, 0.2 / 3, 0.2 / 3], [0.2 / 3, 0.2 / 3, 1 - 0.2 + 0.2 / 3]]
    )
    expected = -(smoothed * np.log(y_pred)).sum(axis=1)
    np.testing.assert_allclose(np.asarray(model.loss(y_true, y_pred)), expected, rtol=1e-5)
    plain = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    assert isinstance(plain.optimizer, keras.optimizers.Adam)
    assert plain.loss == "sparse_categorical_crossentropy"


def test_mobilenetv2_recipe_is_adam_at_the_reference_rate_with_a_faster_second_moment() -> None:
    from pollen.models.registry import Recipe

    recipe = MODELS["mobilenetv2"].recipe
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size) == ("adam", 1e-3, 32)
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3, recipe)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.optimizer.beta_2 == 0.99 and model.optimizer.beta_1 == 0.9
    model.train_on_batch(RNG_IMAGES[:8], np.arange(8) % 3)
    training.reset_optimizer(model, 1e-3)  # every round's fresh Adam keeps it
    assert model.optimizer.beta_2 == 0.99
    assert compile_model(build_model("cnn", 3, 0), 1e-3, Recipe()).optimizer.beta_2 == 0.999


def test_preferred_backend(monkeypatch) -> None:
    import importlib.util

    from pollen.models import registry as models

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert models.preferred_backend("mobilenetv2") == "tensorflow"
    assert models.preferred_backend("no-such-model") == "tensorflow"
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name == "torch" else real(name))  # fmt: skip
    assert models.preferred_backend("fastnet") == "tensorflow"  # torch missing: fall back
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())
    assert models.preferred_backend("fastnet") == "torch"
    assert models.preferred_backend("fastnet-wide") == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert models.preferred_backend("fastnet") == "jax"  # the user's choice wins
    # Keras is loaded in this process: its backend is fixed, whatever the model prefers.
    assert models.select_backend("fastnet") == keras.backend.backend()


def test_a_prepare_query_loads_the_data_and_builds_the_model(tiny_data, flower_task) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    client_app.get_model.cache_clear()
    client_app.load_client_data.cache_clear()
    cfg = RunConfig(model="cnn", num_classes=3, data_dir=str(tiny_data))
    msg = Message(RecordDict({"config": ConfigRecord({"request": "prepare"})}),
                  dst_node_id=7, message_type=MessageType.QUERY)  # fmt: skip
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config={"partition-id": 1, "num-partitions": 2})  # fmt: skip
    reply = client_app.query(msg, context)
    assert dict(reply.content["client"]) == {"name": "partition-1"}
    assert "arrays" not in reply.content  # nothing but the name goes back
    # Round 1's train message then finds both ready.
    assert client_app.get_model.cache_info().currsize == 1
    assert client_app.load_client_data.cache_info().currsize == 1


def test_the_client_giving_initial_weights_whitens_fastnets_stem_except_under_dp(
    tiny_data, flower_task
) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    def initial_reply(**overrides):
        cfg = RunConfig(model="fastnet", data_dir=str(tiny_data), **overrides)
        msg = Message(RecordDict({"config": ConfigRecord({"request": "initial-arrays"})}),
                      dst_node_id=7, message_type=MessageType.QUERY)  # fmt: skip
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                          node_config={"partition-id": 0, "num-partitions": 2})  # fmt: skip
        reply = client_app.query(msg, context)
        return reply.content["client"], reply.content["arrays"].to_numpy_ndarrays()

    info, _ = initial_reply(dp=True)  # the server must not see statistics of the data
    assert "whitened-images" not in info
    info, _ = initial_reply(whiten=False)  # --no-whiten
    assert "whitened-images" not in info
    info, arrays = initial_reply()
    assert info["whitened-images"] > 0
    data = client_app.load_client_data(
        client_app.client_data_spec(
            RunConfig(data_dir=str(tiny_data)), {"partition-id": 0, "num-partitions": 2}
        )  # fmt: skip
    )
    model = build_model("fastnet", num_classes=10, seed=0)
    whiten_first_conv(model, "stem_conv", data.x_train, seed=RunConfig().seed)
    stem = model.get_layer("stem_conv").get_weights()[0]
    assert any(a.shape == stem.shape and np.allclose(a, stem, atol=1e-5) for a in arrays)


def test_clients_keep_fastnets_whitened_stem_frozen_and_train_it_when_not_whitened(
    tiny_data, flower_task
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    model = build_model("fastnet", num_classes=10, seed=0)
    stem = [w.path for w in model.weights].index(model.get_layer("stem_conv").kernel.path)
    global_weights = model.get_weights()

    def trained(**overrides) -> list[np.ndarray]:
        # One step on the tiny partition: a constant rate (one-cycle would start at 0).
        cfg = RunConfig(model="fastnet", data_dir=str(tiny_data), lr_schedule="constant",
                        **overrides)  # fmt: skip
        content = RecordDict({"arrays": ArrayRecord(global_weights),
                              "config": ConfigRecord({"server-round": 1})})  # fmt: skip
        msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                          node_config={"partition-id": 0, "num-partitions": 2})  # fmt: skip
        return client_app.train(msg, context).content["arrays"].to_numpy_ndarrays()

    frozen = trained()
    np.testing.assert_array_equal(frozen[stem], global_weights[stem])
    others = [i for i in range(len(frozen)) if i != stem]
    assert any(not np.allclose(frozen[i], global_weights[i]) for i in others)  # the rest trains
    trainable = trained(whiten=False)  # a random first layer must train
    assert not np.allclose(trainable[stem], global_weights[stem])


def test_a_whitened_layer_is_frozen_inside_a_nested_model(monkeypatch) -> None:
    """MobileNetV2's Conv1 sits in the nested keras.applications model: freezing reaches it."""
    import dataclasses

    from pollen.models import registry as models

    spec = dataclasses.replace(MODELS["mobilenetv2"], freeze_whitened=True)
    monkeypatch.setitem(models.MODELS, "mobilenetv2", spec)
    frozen = build_client_model("mobilenetv2", 10, 0, whitened=True)
    free = build_client_model("mobilenetv2", 10, 0, whitened=False)
    conv1 = find_layer(frozen, MODELS["mobilenetv2"].whiten)
    assert conv1.kernel.path not in {w.path for w in frozen.trainable_weights}
    assert len(free.trainable_weights) == len(frozen.trainable_weights) + 1
    # The same arrays in the same order: the server and the clients exchange them by position.
    assert [w.path for w in frozen.weights] == [w.path for w in free.weights]
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        find_layer(frozen, "nope")


def test_an_unschedulable_compiled_model_saves_and_loads_with_plain_keras(tmp_path) -> None:
    """The server's model.keras must load where Pollen (and its schedule class) is absent."""
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3, schedulable=False)
    assert not isinstance(model.optimizer._learning_rate, training.StepLearningRate)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(RNG_IMAGES[:4], verbose=0),
                               model.predict(RNG_IMAGES[:4], verbose=0), atol=1e-6)  # fmt: skip
    trained = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    assert isinstance(trained.optimizer._learning_rate, training.StepLearningRate)
