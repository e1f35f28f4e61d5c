"""Evaluation, prediction and BatchNorm calibration batch fewer large images at once."""

from __future__ import annotations

import numpy as np

from pollen.training.evaluate import calibrate_batchnorm, images_per_pass


def _images(n: int, side: int) -> np.ndarray:
    return np.zeros((n, side, side, 3), np.uint8)


def test_images_per_pass_keeps_the_pixels_of_a_32x32_batch() -> None:
    assert images_per_pass(256, _images(1, 32)) == 256
    assert images_per_pass(256, _images(1, 16)) == 256  # never larger than asked
    assert images_per_pass(256, _images(1, 64)) == 64
    assert images_per_pass(256, _images(1, 96)) == 28
    assert images_per_pass(256, _images(1, 224)) == 8  # at least 8
    assert images_per_pass(4, _images(1, 224)) == 4


def test_calibration_runs_large_images_in_small_chunks() -> None:
    from pollen.models.registry import build_model

    model = build_model("cnn", num_classes=3, seed=0, image_size=(128, 128))
    seen: list[int] = []
    original = model.__call__

    class Recording:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, x, training=False):
            seen.append(len(x))
            return original(x, training=training)

    x = np.random.default_rng(0).integers(0, 256, (40, 128, 128, 3), dtype=np.uint8)
    indices, stats, used = calibrate_batchnorm(Recording(), x, max_examples=40)
    assert used == 40 and len(stats) == len(indices) > 0
    assert max(seen) <= images_per_pass(256, x) == 16 and sum(seen) == 40
