"""pollen evaluate: a model scored on a dataset's test split, and confusion.png."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from conftest import CLASSES

from pollen.errors import PollenError
from pollen.inference.evaluate import CONFUSION_FILE, evaluate


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path) -> None:
    """Decoded-array caches go to the test's folder, not the user's cache."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An untrained 24x24 model with the tiny_data classes (and one more) beside it."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    run = tmp_path_factory.mktemp("eval-run")
    model.save(run / "model.keras")
    (run / "classes.json").write_text(json.dumps([*CLASSES, "durian"]))
    return run / "model.keras"


def test_scores_the_test_split_and_draws_the_matrix(model_path, tiny_data, tmp_path) -> None:
    lines, scores, png = evaluate(model_path, tiny_data, tmp_path / "out")
    assert png == tmp_path / "out" / CONFUSION_FILE
    assert png.read_bytes().startswith(b"\x89PNG")
    assert scores.classes == (*CLASSES, "durian")
    # 8 test images of each tiny_data class; durian has none (its recall is "-").
    np.testing.assert_array_equal(scores.support, [8, 8, 8, 0])
    assert lines[0].startswith("accuracy: ") and lines[0].endswith(f"of {24} images)")
    assert "precision  recall" in lines[2]
    durian = next(line for line in lines if line.startswith("durian"))
    assert durian.split()[:2] == ["durian", "0"] and durian.split()[-1] == "-"


def test_reads_an_archive_too(model_path, tiny_data, tmp_path) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(tiny_data.rglob("*.png")):
            z.write(f, f.relative_to(tiny_data).as_posix())
    _, from_zip, _ = evaluate(model_path, archive, tmp_path / "a")
    _, from_folder, _ = evaluate(model_path, tiny_data, tmp_path / "b")
    np.testing.assert_array_equal(from_zip.confusion, from_folder.confusion)


def test_never_overwrites_confusion_png_silently(model_path, tiny_data, tmp_path) -> None:
    (tmp_path / CONFUSION_FILE).write_bytes(b"keep me")
    with pytest.raises(PollenError, match="already exists: pass --force"):
        evaluate(model_path, tiny_data, tmp_path)
    assert (tmp_path / CONFUSION_FILE).read_bytes() == b"keep me"
    evaluate(model_path, tiny_data, tmp_path, force=True)
    assert (tmp_path / CONFUSION_FILE).read_bytes().startswith(b"\x89PNG")


def test_a_class_the_model_does_not_know_is_an_error(model_path, tiny_data, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for split in ("train", "test"):
        shutil.copytree(data / split / "apple", data / split / "elderberry")
    with pytest.raises(PollenError, match="classes the model does not know: elderberry") as err:
        evaluate(model_path, data, tmp_path)
    assert "apple, banana, cherry, durian" in str(err.value)
    assert not (tmp_path / CONFUSION_FILE).exists()
