"""Registry models built at the run's image size (``build_model(..., image_size=)``)."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.errors import PollenError
from pollen.models.registry import MODELS, ModelSpec, build_model
from pollen.models.whitening import WHITEN_PIXELS, whiten_first_conv


@pytest.mark.parametrize("name", ["cnn", "fastnet", "mobilenetv2"])
def test_models_are_built_for_the_image_size_with_the_same_weight_shapes(name: str) -> None:
    small = build_model(name, num_classes=5, seed=0)
    model = build_model(name, num_classes=5, seed=0, image_size=(48, 64))
    assert small.input_shape == (None, 32, 32, 3)
    assert model.input_shape == (None, 48, 64, 3)
    # Global pooling before the head: the weights do not depend on the size.
    assert [w.shape for w in model.get_weights()] == [w.shape for w in small.get_weights()]
    probs = np.asarray(model.predict(np.zeros((2, 48, 64, 3), np.uint8), verbose=0))
    assert probs.shape == (2, 5)


def test_a_builder_without_input_shape_refuses_other_sizes(monkeypatch) -> None:
    def build(num_classes: int, seed: int):
        return build_model("cnn", num_classes, seed)

    monkeypatch.setitem(MODELS, "fixed32", ModelSpec(build, "a model built for 32x32 only"))
    assert build_model("fixed32", 3, 0).input_shape == (None, 32, 32, 3)
    with pytest.raises(PollenError, match="'fixed32' is built for 32x32 images only.*96x96"):
        build_model("fixed32", 3, 0, image_size=(96, 96))


def test_whitening_looks_at_a_bounded_number_of_pixels_whatever_the_size() -> None:
    model = build_model("fastnet", num_classes=3, seed=0, image_size=(64, 64))
    images = np.random.default_rng(0).integers(0, 256, (600, 64, 64, 3), dtype=np.uint8)
    used = whiten_first_conv(model, MODELS["fastnet"].whiten, images)
    assert used == WHITEN_PIXELS // (64 * 64) == 500
    assert whiten_first_conv(model, MODELS["fastnet"].whiten, images[:10]) == 10
