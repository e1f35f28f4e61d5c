"""pollen predict on folders (and --labels-from-folders), pollen evaluate, pollen export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image

from pollen.cli.app import main


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """An untrained 16x16 model whose classes.json names the tiny_data classes."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    net = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    run = tmp_path_factory.mktemp("predict-run")
    net.save(run / "model.keras")
    (run / "classes.json").write_text(json.dumps(list(CLASSES)))
    return str(run / "model.keras")


def _image(path: Path, seed: int, size: tuple[int, int] = (20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_folders_are_searched_recursively(model, tmp_path, capsys) -> None:
    images = tmp_path / "images"
    wanted = [
        _image(images / "apple" / "1.png", 1),
        _image(images / "apple" / "deeper" / "2.jpg", 2),
        _image(images / "banana" / "3.png", 3, size=(64, 48)),
    ]
    _image(images / ".hidden" / "4.png", 4)
    _image(images / "apple" / ".5.png", 5)
    (images / "notes.txt").write_text("not an image")
    single = _image(tmp_path / "single.png", 6)
    rc, out, err = _run(capsys, "predict", "--model", model, str(images), str(single))
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in [*wanted, single]]
    for line in lines:
        assert len(re.findall(r"(apple|banana|cherry) \(\d\.\d{3}\)", line)) == 3


def test_labels_from_folders_scores_the_printed_predictions(model, tmp_path, capsys) -> None:
    images = tmp_path / "labelled"
    for i in range(6):
        _image(images / CLASSES[i % 2] / f"{i}.png", 10 + i)
    rc, out, err = _run(
        capsys, "predict", "--model", model, str(images), "--labels-from-folders", "--top", "1"
    )
    assert rc == 0, err
    lines = out.splitlines()
    per_image = [line for line in lines if line.startswith(str(images))]
    assert len(per_image) == 6
    truth = [CLASSES.index(Path(line.split(": ")[0]).parent.name) for line in per_image]
    guess = [CLASSES.index(line.split(": ")[1].split(" (")[0]) for line in per_image]
    right = sum(t == g for t, g in zip(truth, guess, strict=True))
    assert f"accuracy: {100 * right / 6:.1f}% ({right} of 6 images)" in lines
    rows = lines[lines.index(next(x for x in lines if x.startswith("true \\ predicted"))) + 1 :]
    matrix = np.array([[int(v) for v in row.split()[1:]] for row in rows])
    expected = np.zeros((3, 3), dtype=int)
    for t, g in zip(truth, guess, strict=True):
        expected[t, g] += 1
    np.testing.assert_array_equal(matrix, expected)


def test_an_unknown_folder_name_is_a_clear_error(model, tmp_path, capsys) -> None:
    _image(tmp_path / "apple" / "1.png", 1)
    _image(tmp_path / "durian" / "2.png", 2)
    rc, out, err = _run(capsys, "predict", "--model", model, str(tmp_path), "--labels-from-folders")
    assert rc == 2 and out == ""
    assert "durian are not classes of the model, which knows: apple, banana, cherry" in err
    assert len(err.strip().splitlines()) == 1


def test_a_folder_without_images_is_a_clear_error(model, tmp_path, capsys) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    rc, _, err = _run(capsys, "predict", "--model", model, str(tmp_path / "empty"))
    assert rc == 2 and "holds no image file" in err


def test_evaluate_prints_scores_and_writes_the_picture(model, tiny_data, tmp_path, capsys) -> None:
    argv = ["evaluate", "--model", model, "--data-dir", str(tiny_data), "--out", str(tmp_path)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    assert re.search(r"^accuracy: \d+\.\d% \(\d+ of 24 images\)$", out, re.M), out
    assert re.search(r"^apple +8 +(\d+\.\d%|-) +\d+\.\d%$", out, re.M), out
    png = tmp_path / "confusion.png"
    assert f"wrote {png}" in out and png.read_bytes().startswith(b"\x89PNG")
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "already exists: pass --force" in err
    assert _run(capsys, *argv, "--force")[0] == 0


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["export", "--model", "{tmp}/none.keras", "--format", "onnx"], "No model at"),
        (["evaluate", "--model", "{model}", "--data-dir", "{tmp}/none"], "does not exist"),
        (["predict", "--model", "{tmp}", "{model}"], "is not a SavedModel"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(model, tmp_path, capsys, argv, phrase) -> None:
    filled = [a.format(tmp=tmp_path, model=model) for a in argv]
    rc, _, err = _run(capsys, *filled)
    assert rc == 2 and phrase in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
