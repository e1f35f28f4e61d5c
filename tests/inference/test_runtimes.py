"""Opening model files: the format from the name, and one-paragraph errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pollen.errors import PollenError
from pollen.inference.runtimes import KERAS, ONNX, SAVEDMODEL, TFLITE, model_format, open_model


def test_format_follows_the_name(tmp_path) -> None:
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    for name, fmt in (("a.tflite", TFLITE), ("a.ONNX", ONNX), ("a.keras", KERAS), ("a.h5", KERAS)):
        (tmp_path / name).write_bytes(b"x")
        assert model_format(tmp_path / name) == fmt
    assert model_format(saved) == SAVEDMODEL


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("missing.keras", "No model at"),
        ("folder", "is not a SavedModel"),
        ("junk.tflite", "Cannot load {path} as a TFLite model"),
        ("junk.onnx", "Cannot load {path} as an ONNX model"),
        ("junk.keras", "Cannot load {path} as a Keras model"),
    ],
)
def test_bad_model_files_are_one_paragraph(tmp_path, name, phrase) -> None:
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif name.startswith("junk"):
        path.write_bytes(b"this is not a model at all\n" * 4)
    with pytest.raises(PollenError) as err:
        open_model(path)
    assert phrase.format(path=path) in str(err.value)
    assert "\n" not in str(err.value)


def _save(model, tmp_path, classes=None):
    path = tmp_path / "model.keras"
    model.save(path)
    if classes is not None:
        (tmp_path / "classes.json").write_text(json.dumps(classes))
    return path


def test_a_model_that_takes_no_images_is_refused(tmp_path) -> None:
    import keras

    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    with pytest.raises(PollenError, match="not images"):
        open_model(_save(model, tmp_path))


def test_keras_model_classes_from_classes_json_else_defaults(tmp_path) -> None:
    import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    path = _save(model, tmp_path)
    opened = open_model(path)
    assert opened.classes == ("class 0", "class 1", "class 2")
    assert (opened.image_size, opened.channels) == ((8, 8), 1)
    (tmp_path / "classes.json").write_text(json.dumps(["x", "y", "z"]))
    assert open_model(path).classes == ("x", "y", "z")
    probs = opened.probabilities(np.zeros((5, 8, 8, 1), dtype=np.uint8), batch_size=2)
    assert probs.shape == (5, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
