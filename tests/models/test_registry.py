"""Tests for pollen.models.registry: the registry, building, backends, shared layer helpers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import bn_layers as _bn_layers

from pollen.models.registry import MODELS, batchnorm_stat_indices, build_model, find_layer
from pollen.training.compile import build_client_model

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


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


def test_flip_tta_is_on_for_models_trained_with_flips_and_the_reference() -> None:
    assert MODELS["fastnet"].flip_tta and MODELS["fastnet"].augment
    # MobileNetV2 trains without flips; mirror images help it all the same (CIFAR-10).
    assert MODELS["mobilenetv2"].flip_tta and not MODELS["mobilenetv2"].augment
    assert not MODELS["cnn"].flip_tta
    # scatternet (DP): mirror views in training (augmentation multiplicity) and evaluation
    assert MODELS["scatternet"].flip_tta


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
