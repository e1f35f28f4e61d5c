"""Tests for pollen.models.mobilenetv2, the reference model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import bn_layers as _bn_layers

from pollen.models.registry import build_model


@pytest.fixture(scope="module")
def mobilenet() -> tuple[keras.Model, keras.Model]:
    """(pollen's mobilenetv2, the reference keras.applications.MobileNetV2), built once."""
    model = build_model("mobilenetv2", num_classes=10, seed=0)
    reference = keras.applications.MobileNetV2(input_shape=(32, 32, 3), classes=10, weights=None)
    return model, reference


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
