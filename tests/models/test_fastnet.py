"""Tests for pollen.models.fastnet: fastnet and fastnet-wide."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.models.registry import MODELS, batchnorm_stat_indices, build_model

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


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
