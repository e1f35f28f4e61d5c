"""Tests for pollen.training.finetune: the freeze schedule, trainable flags, learning rates."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pollen.config import FINE_TUNE_LR_FACTOR, RunConfig
from pollen.errors import PollenError
from pollen.models.registry import find_layer
from pollen.training.compile import build_client_model
from pollen.training.finetune import (
    apply_round,
    backbone_frozen,
    round_learning_rate,
    set_trainable,
)
from pollen.training.local import ProximalTerm, fit

X = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
Y = np.arange(16, dtype=np.int64) % 3


def _config(**changes) -> RunConfig:
    values = {"model": "mobilenetv2", "num_classes": 3, "num_rounds": 4, "image_size": "32"}
    return RunConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_client_model("mobilenetv2", 3, 0)


def _trainable_names(model: keras.Model) -> set[str]:
    return {v.path.split("/")[-2] for v in model.trainable_variables}


def test_defaults_follow_weights() -> None:
    plain = _config()
    assert plain.freeze_rounds == 0 and plain.whiten
    tuned = _config(weights="/models/model.keras")
    assert tuned.freeze_rounds == 0 and not backbone_frozen(tuned, 1)
    assert tuned.fine_tune_lr == pytest.approx(tuned.learning_rate * FINE_TUNE_LR_FACTOR)
    assert not tuned.whiten  # the first convolution comes from the file
    assert RunConfig.from_mapping(tuned.to_mapping()) == tuned  # as the clients see it


def test_config_refuses_bad_combinations() -> None:
    with pytest.raises(PollenError, match="freeze-rounds needs --weights"):
        _config(freeze_rounds=2).validate()
    with pytest.raises(PollenError, match="no ImageNet weights"):
        RunConfig(model="cnn", weights="imagenet").validate()
    with pytest.raises(PollenError, match="Invalid weights"):
        _config(weights="/models/model.pt").validate()
    with pytest.raises(PollenError, match="fine-tune-lr must be positive"):
        _config(weights="imagenet", fine_tune_lr=-1.0).validate()


def test_schedule_per_round() -> None:
    cfg = _config(weights="imagenet", freeze_rounds=2, learning_rate=0.01, fine_tune_lr=0.002)
    frozen = [backbone_frozen(cfg, r) for r in (1, 2, 3, 4)]
    assert frozen == [True, True, False, False]
    rates = [round_learning_rate(cfg, r, cfg.learning_rate) for r in (1, 2, 3, 4)]
    assert rates == [0.01, 0.01, 0.002, 0.002]
    plain = _config(learning_rate=0.01)
    assert not backbone_frozen(plain, 1) and round_learning_rate(plain, 3, 0.01) == 0.01


def test_trainable_flags(model) -> None:
    assert set_trainable(model, "predictions", backbone=False)
    assert _trainable_names(model) == {"predictions"}
    assert not set_trainable(model, "predictions", backbone=False)  # no change, no recompile
    assert set_trainable(model, "predictions", backbone=True, batchnorm=False)
    names = _trainable_names(model)
    assert {"predictions", "Conv1", "block_16_project"} <= names
    assert not any(isinstance(find_layer(model, n), keras.layers.BatchNormalization) for n in names)
    set_trainable(model, "predictions", backbone=True, batchnorm=True)
    assert "bn_Conv1" in _trainable_names(model)


def test_rounds_train_what_the_schedule_says(model) -> None:
    """Round 1 moves only the head (BN statistics kept); round 2 moves the backbone too."""
    cfg = _config(weights="imagenet", freeze_rounds=1, keras_verbose=0)
    ProximalTerm.of(model).anchor(0.01)  # a FedProx term is taken off when the phase changes
    conv, bn, head = (find_layer(model, n) for n in ("Conv1", "bn_Conv1", "predictions"))

    def snapshot():
        return [np.array(w) for layer in (conv, bn, head) for w in layer.get_weights()]

    apply_round(model, cfg, 1)
    before = snapshot()
    fit(model, X, Y, epochs=1, batch_size=8, seed=0, verbose=0)
    after = snapshot()
    # Conv1 has no bias: its kernel, then bn_Conv1's four arrays, then the head's two.
    assert all(np.array_equal(a, b) for a, b in zip(before[:5], after[:5], strict=True))
    assert not np.array_equal(before[5], after[5])  # the head kernel trained

    apply_round(model, cfg, 2)
    assert not hasattr(model, "_pollen_proximal")
    before = snapshot()
    fit(model, X, Y, epochs=1, batch_size=8, seed=0, verbose=0)
    after = snapshot()
    assert not np.array_equal(before[0], after[0])  # Conv1's kernel trained
    bn_stats = slice(1, 5)  # bn_Conv1: gamma, beta, moving mean, moving variance
    assert all(np.array_equal(a, b) for a, b in zip(before[bn_stats], after[bn_stats], strict=True))
