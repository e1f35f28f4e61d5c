"""The ``scatternet`` model: fixed ScatterNet features, GroupNorm, a linear head."""

from __future__ import annotations

import keras
import numpy as np

from pollen.models.registry import MODELS, batchnorm_stat_indices, build_model
from pollen.models.scatternet import HEAD_INPUT
from pollen.training.dp_sgd import trainable_part
from pollen.training.features import cached_features, split_fixed


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def test_registered_without_batchnorm() -> None:
    assert "scatternet" in MODELS
    model = build_model("scatternet", num_classes=10)
    assert batchnorm_stat_indices(model) == []
    transform, head = split_fixed(model)
    assert transform.weights == []  # the transform is fixed: no weights at all
    assert model.get_layer(HEAD_INPUT).output.shape[1:] == (15552,)
    shapes = sorted(tuple(w.shape) for w in model.trainable_weights)
    assert shapes == [(10,), (15552, 10)]  # the linear classifier only


def test_features_and_head_give_the_models_output(tmp_path) -> None:
    model = build_model("scatternet", num_classes=4, seed=3)
    model.get_layer("classifier").set_weights(
        [np.random.default_rng(1).normal(0, 0.01, (15552, 4)), np.zeros(4)]
    )
    x = _images(6)
    transform, head = split_fixed(model)
    features = np.asarray(transform.predict(x, verbose=0))
    assert features.shape == (6, 15552)
    per_group = features.reshape(6, 8, 8, 81, 3)  # GroupNorm: each image's groups standardised
    np.testing.assert_allclose(per_group.mean(axis=(1, 2, 4)), 0.0, atol=1e-4)
    # the same image gives the same features whatever the model's weights: data-independent
    other = build_model("scatternet", num_classes=4, seed=9)
    np.testing.assert_allclose(
        np.asarray(split_fixed(other)[0].predict(x, verbose=0)), features, rtol=1e-5, atol=1e-6
    )
    full = model.predict(x, verbose=0)
    np.testing.assert_allclose(head.predict(features, verbose=0), full, atol=1e-6)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), full, atol=1e-6)


def test_dp_trains_the_head_on_features_computed_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path))
    model = build_model("scatternet", num_classes=3)
    x = _images(4)
    head, (inputs,) = trainable_part(model, x)
    assert inputs.shape == (4, 15552)
    again_head, (again,) = trainable_part(model, x)
    assert again is inputs and again_head is head  # cached: computed once per array
    transform = split_fixed(model)[0]
    assert cached_features(transform, x.copy()) is inputs  # same images
    assert cached_features(transform, x[::-1].copy()) is not inputs
    # With mirror views: the same features first, then the mirror images' (also cached).
    _, (same, mirrored) = trainable_part(model, x, mirror=True)
    assert same is inputs
    assert mirrored is cached_features(transform, np.ascontiguousarray(x[:, :, ::-1]))
    assert not np.allclose(mirrored, inputs)
    head.get_layer("classifier").kernel.assign(np.ones((15552, 3), np.float32))
    assert np.all(np.asarray(model.get_layer("classifier").kernel) == 1.0)  # shared weights
