"""Tests for pollen.models.cnn: cnn and cnn-gn."""

from __future__ import annotations

import keras
import pytest
from conftest import bn_layers as _bn_layers

from pollen.models.registry import batchnorm_stat_indices, build_model


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    return build_model("cnn", num_classes=10, seed=0)


def test_cnn_batchnorm_momentum(cnn) -> None:
    assert [layer.momentum for layer in _bn_layers(cnn)] == [0.9, 0.9, 0.9]


def test_cnn_gn_has_no_moving_statistics() -> None:
    """Every array of cnn-gn is trainable: DP noise and SecAgg+ clipping touch weights only."""
    model = build_model("cnn-gn", num_classes=10, seed=0)
    assert batchnorm_stat_indices(model) == []
    assert len(model.get_weights()) == len(model.trainable_weights)
