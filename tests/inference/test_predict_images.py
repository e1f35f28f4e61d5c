"""Image files from folders, labels from folder names, and chunked classification."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pollen.errors import PollenError
from pollen.inference.predict import classify, folder_labels, image_files
from pollen.inference.runtimes import open_model


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (9, 11, 3), np.uint8)).save(path)
    return path


def test_image_files_expands_folders_in_order(tmp_path) -> None:
    b = _png(tmp_path / "d" / "b" / "1.png", 1)
    a = _png(tmp_path / "d" / "a" / "2.png", 2)
    a2 = _png(tmp_path / "d" / "a" / "sub" / "3.jpg", 3)
    _png(tmp_path / "d" / ".git" / "4.png", 4)
    (tmp_path / "d" / "a" / "README").write_text("no image")
    given = _png(tmp_path / "given.png", 5)
    assert image_files([given, tmp_path / "d"]) == [given, a, a2, b]
    with pytest.raises(PollenError, match="does not exist"):
        image_files([tmp_path / "nope.png"])


def test_folder_labels_match_class_names(tmp_path) -> None:
    files = [tmp_path / "cat" / "1.png", tmp_path / "x" / "dog" / "2.png"]
    np.testing.assert_array_equal(folder_labels(files, ["dog", "cat"]), [1, 0])
    with pytest.raises(PollenError, match="folder name\\(s\\) x are not classes"):
        folder_labels([*files, tmp_path / "x" / "3.png"], ["dog", "cat"])


def test_classify_in_chunks_equals_all_at_once(tmp_path) -> None:
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(tmp_path / "m.keras")
    model = open_model(tmp_path / "m.keras")
    files = [_png(tmp_path / "img" / f"{i}.png", i) for i in range(5)]
    whole = classify(model, files)
    assert whole.shape == (5, 2)
    np.testing.assert_allclose(classify(model, files, chunk=2), whole, atol=1e-6)
    assert classify(model, []).shape == (0, 2)
