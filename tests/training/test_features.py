"""Fixed features (pollen.training.features): split, memory and disk cache, evaluation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pollen.models.registry import FIXED_FEATURES
from pollen.training import features as feat
from pollen.training.evaluate import evaluate


def _model(seed: int = 0) -> keras.Model:
    """Pixels -> fixed scaling + flatten (no weights) -> a softmax classifier."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Flatten(name=FIXED_FEATURES)(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(feat, "_MEMORY", {})
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path))


def test_split_gives_the_fixed_transform_and_the_head_that_shares_weights() -> None:
    model = _model()
    transform, head = feat.split_fixed(model)
    x = _images(5)
    features = transform.predict(x, verbose=0)
    np.testing.assert_allclose(features, x.reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(head.predict(features, verbose=0), model.predict(x, verbose=0))
    assert feat.split_fixed(model) is feat.split_fixed(model)  # built once per model
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert feat.split_fixed(plain) is None


def test_features_are_computed_once_then_read_from_disk(tmp_path, monkeypatch) -> None:
    transform = feat.split_fixed(_model())[0]
    x = _images(7)
    calls = []
    real = transform.predict
    monkeypatch.setattr(transform, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = feat.cached_features(transform, x)
    assert len(calls) == 1 and first.dtype == np.float32
    assert feat.cached_features(transform, x.copy()) is first  # memory: same images, new array
    files = list((tmp_path / "features").glob("*.npy"))
    assert len(files) == 1
    monkeypatch.setattr(feat, "_MEMORY", {})  # another process: the disk copy, memory-mapped
    again = feat.cached_features(transform, x.copy())
    assert len(calls) == 1 and isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, first)
    feat.cached_features(transform, _images(7, seed=1))  # other images: computed
    assert len(calls) == 2


def test_a_damaged_cache_file_is_recomputed(tmp_path) -> None:
    transform = feat.split_fixed(_model())[0]
    x = _images(3)
    first = np.array(feat.cached_features(transform, x))
    (path,) = (tmp_path / "features").glob("*.npy")
    path.write_bytes(b"not a numpy file")
    feat._MEMORY.clear()
    np.testing.assert_allclose(feat.cached_features(transform, x), first)


def test_disk_cache_is_bounded_oldest_first(tmp_path, monkeypatch) -> None:
    transform = feat.split_fixed(_model())[0]
    one = 4 * 4 * 3 * 4 * 10  # bytes of ten images' features
    monkeypatch.setattr(feat, "MAX_DISK_BYTES", 2 * one + 500)
    for seed in range(4):
        feat.cached_features(transform, _images(10, seed=seed))
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2


def test_evaluate_goes_through_cached_features_and_agrees_with_keras(monkeypatch) -> None:
    model = _model(2)
    model.get_layer("classifier").set_weights(
        [np.random.default_rng(0).normal(0, 0.05, (48, 3)), np.zeros(3)]
    )
    x = _images(40)
    y = np.random.default_rng(1).integers(0, 3, 40).astype(np.int64)
    keras_loss, keras_acc = model.evaluate(x, y, verbose=0)
    loss, acc = evaluate(model, x, y)
    assert acc == pytest.approx(keras_acc)
    assert loss == pytest.approx(keras_loss, rel=1e-4)
    assert len(feat._MEMORY) == 1  # the transform ran once, through the cache
