"""pollen export: every format predicts as model.keras does, and carries its class names."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES

from pollen.errors import PollenError
from pollen.inference.evaluate import evaluate
from pollen.inference.export import FORMATS, default_out, export_model
from pollen.inference.predict import predict
from pollen.inference.runtimes import open_model

SIZE = 16  # the tiny model's input: smaller than the 32x32 images, so every reader resizes


def tiny_model(name: str = "tiny"):
    """A small CNN on raw 0-255 pixels of 16x16x3 (uncompiled)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return keras.Model(inputs, outputs, name=name)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path) -> None:
    """Decoded-array caches go to the test's folder, not the user's cache."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """``run/model.keras`` + classes.json, trained on tiny_data until it tells classes apart."""
    from pollen.data.load import load_dataset

    ds = load_dataset(
        tiny_data, image_size=(SIZE, SIZE), cache_dir=tmp_path_factory.mktemp("cache")
    )
    assert tuple(ds.class_names) == CLASSES
    model = tiny_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x_train = ds.x_train.astype("float32")
    model.fit(x_train, ds.y_train, epochs=40, batch_size=24, verbose=0)
    predicted = model.predict(ds.x_test.astype("float32"), verbose=0).argmax(axis=1)
    # Not a constant classifier: the top class differs between images, so comparing top
    # classes across formats means something.
    assert set(predicted.tolist()) == {0, 1, 2}, predicted
    run = tmp_path_factory.mktemp("trained") / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "classes.json").write_text(json.dumps(list(ds.class_names)))
    return run / "model.keras"


@pytest.fixture(scope="module")
def exports(trained) -> dict[str, Path]:
    """Each format exported once, to its default place beside the model."""
    out = {}
    for fmt in FORMATS:
        path, exported, difference = export_model(trained, fmt)
        assert path == default_out(trained, fmt) and path.exists()
        assert difference <= 1e-4
        assert exported.classes == CLASSES
        out[fmt] = path
    return out


def _parse(lines: list[str]) -> list[tuple[str, list[str], list[float]]]:
    """``path: a (0.5), b (0.3)`` lines -> (path, classes, probabilities)."""
    parsed = []
    for line in lines:
        path, _, rest = line.partition(": ")
        shown = re.findall(r"(\w+) \((\d\.\d{3})\)", rest)
        parsed.append((path, [c for c, _ in shown], [float(p) for _, p in shown]))
    return parsed


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_predicts_the_same_top_classes(trained, exports, tiny_data, fmt) -> None:
    folders = [tiny_data / "test", tiny_data / "train" / "banana"]
    want, _ = predict(trained, folders, top=3)
    got, _ = predict(exports[fmt], folders, top=3)
    assert len(got) == len(want) == 24 + 24
    for (path_w, names_w, p_w), (path_g, names_g, p_g) in zip(
        _parse(want), _parse(got), strict=True
    ):
        assert path_g == path_w
        assert names_g == names_w  # same top-1 and same top-3 order
        assert p_g == pytest.approx(p_w, abs=2e-3)
    assert {names[0] for _, names, _ in _parse(got)} == set(CLASSES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_names_travel_inside_the_export(exports, tmp_path, fmt) -> None:
    # Copied alone, away from classes.json, the export still knows its classes.
    alone = tmp_path / exports[fmt].name
    if exports[fmt].is_dir():
        shutil.copytree(exports[fmt], alone)
    else:
        shutil.copy(exports[fmt], alone)
    model = open_model(alone)
    assert model.classes == CLASSES
    assert model.image_size == (SIZE, SIZE) and model.channels == 3
    assert model.format == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_export_scores_as_the_model_does(trained, exports, tiny_data, tmp_path, fmt) -> None:
    _, want, _ = evaluate(trained, tiny_data, tmp_path / "keras")
    _, got, png = evaluate(exports[fmt], tiny_data, tmp_path / fmt)
    np.testing.assert_array_equal(got.confusion, want.confusion)
    assert got.accuracy > 0.5
    assert png.read_bytes().startswith(b"\x89PNG")


def test_flip_tta_travels_with_the_export(tmp_path) -> None:
    # A registry model that predicts with flip-TTA keeps doing so once exported.
    from pollen.models.registry import MODELS

    name = next(n for n, spec in MODELS.items() if spec.flip_tta)
    model_path = tmp_path / "model.keras"
    tiny_model(name=f"pollen_{name}").save(model_path)
    source = open_model(model_path)
    assert source.info.flip_tta and source.info.model == name
    out, exported, difference = export_model(model_path, "tflite")
    assert exported.info.flip_tta and exported.info.model == name
    assert difference <= 1e-4
    # The flip really is applied: a mirrored image gets the same probabilities.
    x = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3))
    np.testing.assert_allclose(
        exported.probabilities(x), exported.probabilities(x[:, :, ::-1]), atol=1e-6
    )


def test_export_refuses_to_overwrite_without_force(trained, exports) -> None:
    before = exports["onnx"].read_bytes()
    with pytest.raises(PollenError, match="already exists: pass --force"):
        export_model(trained, "onnx")
    assert exports["onnx"].read_bytes() == before
    out, _, _ = export_model(trained, "savedmodel", force=True)
    assert (out / "saved_model.pb").is_file() and (out / "pollen.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize(
    ("model", "fmt", "out", "phrase"),
    [
        ("missing.keras", "onnx", None, "No model at"),
        ("model.keras", "tflite", "model.lite", "must end in .tflite"),
        ("model.keras", "pdf", None, "Unknown export format 'pdf'"),
        ("model.tflite", "onnx", None, "pollen export reads a model.keras"),
    ],
)
def test_export_bad_input_is_one_paragraph(trained, exports, model, fmt, out, phrase) -> None:
    run = trained.parent
    with pytest.raises(PollenError, match=re.escape(phrase)) as err:
        export_model(run / model, fmt, run / out if out else None)
    assert "\n" not in str(err.value)


def test_export_command(trained, tmp_path, capsys) -> None:
    from pollen.cli.app import main

    out = tmp_path / "exported" / "tiny.onnx"
    argv = ["export", "--model", str(trained), "--format", "onnx", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx; input 16x16x3; 3 classes: apple, banana, cherry)" in printed
    assert main(argv) == 2  # exists now
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_tflite_runs_without_litert_too(exports, monkeypatch) -> None:
    # Without ai-edge-litert, TensorFlow's own (deprecated) interpreter reads the file.
    x = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3))
    with_litert = open_model(exports["tflite"]).probabilities(x)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    assert open_model(exports["tflite"]).classes == CLASSES  # TensorFlow's schema reads it
    np.testing.assert_allclose(
        open_model(exports["tflite"]).probabilities(x), with_litert, atol=1e-6
    )
