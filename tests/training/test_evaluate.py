"""Tests for pollen.training.evaluate: predictions, loss and accuracy, BatchNorm calibration."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import bn_layers as _bn_layers

from pollen.models.registry import batchnorm_stat_indices, build_model
from pollen.training.compile import compile_model
from pollen.training.evaluate import calibrate_batchnorm, evaluate, predict_proba

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    return build_model("cnn", num_classes=10, seed=0)


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

    indices, arrays, n = calibrate_batchnorm(model, x, max_examples=2000, seed=0, chunk_size=len(x))

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
    _, arrays, n = calibrate_batchnorm(model, RNG_IMAGES, chunk_size=16)  # 3 chunks
    assert n == len(RNG_IMAGES)
    conv0 = keras.Model(model.input, model.get_layer("conv0").output)
    feats = np.asarray(conv0(RNG_IMAGES.astype("float32"))).astype(np.float64)
    np.testing.assert_allclose(arrays[0], feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    within = np.mean([f.var(axis=(0, 1, 2)) for f in np.split(feats, 3)], axis=0)
    np.testing.assert_allclose(arrays[1], within, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(arrays[1], feats.var(axis=(0, 1, 2)), rtol=2e-2)


def test_calibrate_batchnorm_uses_a_seeded_subset() -> None:
    model = build_model("cnn", num_classes=3, seed=0)
    _, arrays, n = calibrate_batchnorm(model, RNG_IMAGES, max_examples=16, seed=9)
    assert n == 16
    pick = np.sort(np.random.default_rng(9).choice(len(RNG_IMAGES), 16, replace=False))
    conv0 = keras.Model(model.input, model.get_layer("conv0").output)
    feats = np.asarray(conv0(RNG_IMAGES[pick].astype("float32"))).astype(np.float64)
    np.testing.assert_allclose(arrays[0], feats.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_calibrate_batchnorm_off_changes_nothing(cnn) -> None:
    before = cnn.get_weights()
    indices, arrays, n = calibrate_batchnorm(cnn, RNG_IMAGES, max_examples=0)
    assert (arrays, n) == ([], 0) and len(indices) == 6
    indices, arrays, n = calibrate_batchnorm(cnn, RNG_IMAGES[:0])
    assert (arrays, n) == ([], 0)
    for a, b in zip(before, cnn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_returns_loss_and_accuracy() -> None:
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    y = np.arange(12, dtype=np.int64) % 3
    loss, acc = evaluate(model, RNG_IMAGES[:12], y, batch_size=5)
    assert np.isfinite(loss) and 0 <= acc <= 1
    assert acc * 12 == pytest.approx(round(acc * 12))


def test_flip_tta_averages_image_and_mirror_probabilities() -> None:
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    x, y = RNG_IMAGES[:12], np.arange(12, dtype=np.int64) % 3
    plain = np.asarray(model.predict(x.astype("float32"), verbose=0))
    mirror = np.asarray(model.predict(x[:, :, ::-1].astype("float32"), verbose=0))
    assert not np.allclose(plain, mirror, atol=1e-4)  # the cnn is not flip-invariant

    np.testing.assert_allclose(predict_proba(model, x, batch_size=5), plain, atol=1e-5)
    probs = predict_proba(model, x, flip_tta=True, batch_size=5)
    np.testing.assert_allclose(probs, (plain + mirror) / 2, atol=1e-5)

    loss, acc = evaluate(model, x, y, batch_size=5, flip_tta=True)
    assert loss == pytest.approx(float(-np.mean(np.log(probs[np.arange(12), y]))), rel=1e-5)
    assert acc == pytest.approx(float(np.mean(probs.argmax(1) == y)))
    # Without TTA the compiled loss and metric, as before.
    plain_loss, plain_acc = evaluate(model, x, y, batch_size=5)
    assert plain_acc == pytest.approx(float(np.mean(plain.argmax(1) == y)))
    assert plain_loss == pytest.approx(float(-np.mean(np.log(plain[np.arange(12), y]))), rel=1e-4)
