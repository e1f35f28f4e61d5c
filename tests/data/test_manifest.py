"""CSV manifests as a data source (pollen.data.manifest), through load_dataset."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pollen.data import manifest
from pollen.data.load import SOURCES, load_dataset
from pollen.errors import PollenError

COLOURS = {"red": 0, "green": 1, "blue": 2}


def _image(path: Path, channel: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> str:
    """Write a PNG tinted in ``channel`` at ``path``; return its name relative to the root."""
    pixels = np.random.default_rng(seed).integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., channel] += 180
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.name


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _data(root: Path, per_class: tuple[int, int] = (3, 1)) -> list[list[str]]:
    """Images under ``root/img/`` and their ``[path, label, split]`` rows."""
    rows = []
    for label, channel in COLOURS.items():
        for split, n in zip(("train", "test"), per_class, strict=True):
            for i in range(n):
                rel = f"img/{label}-{split}-{i}.png"
                _image(root / rel, channel, seed=len(rows))
                rows.append([rel, label, split])
    return rows


def test_one_csv_with_a_split_column_loads_resized_with_sorted_class_names(tmp_path) -> None:
    rows = _data(tmp_path)
    csv_file = _write_csv(tmp_path / "labels.csv", ["split", "Path", "label", "note"],
                          [[s, p, lab, "x"] for p, lab, s in rows])  # fmt: skip
    ds = load_dataset(csv_file, image_size=(24, 48), cache_dir=tmp_path / "cache")
    assert ds.class_names == ("blue", "green", "red")
    assert ds.x_train.shape == (9, 24, 48, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (3, 24, 48, 3)
    # Rows keep their file order; labels index the sorted names; tints survive the resize.
    expected = [ds.class_names.index(lab) for _, lab, s in rows if s == "train"]
    assert ds.y_train.tolist() == expected
    assert (ds.x_train.mean(axis=(1, 2)).argmax(axis=1) == [COLOURS[n] for n in
            np.array(ds.class_names)[ds.y_train]]).all()  # fmt: skip


def test_a_folder_with_train_and_test_csv_is_a_manifest(tmp_path) -> None:
    rows = _data(tmp_path)
    for split in ("train", "test"):
        _write_csv(tmp_path / f"{split}.csv", ["path", "label"],
                   [[p, lab] for p, lab, s in rows if s == split])  # fmt: skip
    ds = load_dataset(tmp_path, cache_dir=tmp_path / "cache")
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes) == (9, 3, 3)
    (tmp_path / "test.csv").unlink()
    with pytest.raises(PollenError, match="has no test.csv") as info:
        load_dataset(tmp_path, cache_dir=tmp_path / "cache")
    assert "Pollen accepts" in str(info.value)


def test_the_manifest_is_offered_first_and_cached_per_size(tmp_path, monkeypatch) -> None:
    assert SOURCES[0] is manifest.SOURCE
    csv_file = _write_csv(tmp_path / "m.csv", ["path", "label", "split"], _data(tmp_path))
    small = load_dataset(csv_file, image_size=(32, 32), cache_dir=tmp_path / "cache")
    big = load_dataset(csv_file, image_size=(64, 64), cache_dir=tmp_path / "cache")
    assert small.x_train.shape[1:3] == (32, 32) and big.x_train.shape[1:3] == (64, 64)
    assert len(list((tmp_path / "cache" / "arrays").glob("manifest-*.npz"))) == 2

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(manifest, "decode_files", fail)
    again = load_dataset(csv_file, image_size=(64, 64), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.x_train, big.x_train)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r[4].__setitem__(0, "img/nope.png"), "nope.png on line 6 of .* does not exist"),
        (lambda r: r[1].__setitem__(1, " "), "label of img/red-train-1.png is empty on line 3"),
        (lambda r: r[2].__setitem__(2, "valid"), "on line 4 .* is 'valid': write train or test"),
        (lambda r: r[3].__setitem__(1, "purple"), "label\\(s\\) purple that no training row has"),
        (
            lambda r: r.append(["img/red-train-0.png", "red", "test"]),
            "both a training image \\(line 2 .*\\) and a test image \\(line 14",
        ),
        (
            lambda r: r.__setitem__(slice(0, 2), []),
            "red in the training rows of .* have a single training image",
        ),
        (lambda r: r[0].__setitem__(0, "../outside.png"), "outside the manifest's folder"),
        (lambda r: r[0].__setitem__(0, "img/link.png"), "img/link.png on line 2 .* is outside"),
    ],
)
def test_bad_rows_are_refused_naming_the_file_and_line(tmp_path, edit, message) -> None:
    root = tmp_path / "data"
    rows = _data(root)
    _image(tmp_path / "outside.png", 0)
    (root / "img/link.png").symlink_to(tmp_path / "outside.png")
    edit(rows)
    csv_file = _write_csv(root / "m.csv", ["path", "label", "split"], rows)
    with pytest.raises(PollenError, match=message) as info:
        load_dataset(csv_file, cache_dir=tmp_path / "cache")
    text = str(info.value)
    assert str(csv_file) in text and "\n" not in text


def test_a_link_to_an_image_inside_the_folder_is_read(tmp_path) -> None:
    rows = _data(tmp_path)
    (tmp_path / "img/alias.png").symlink_to(tmp_path / rows[0][0])
    rows.append(["img/alias.png", rows[0][1], "train"])
    ds = load_dataset(_write_csv(tmp_path / "m.csv", ["path", "label", "split"], rows),
                      cache_dir=tmp_path / "cache")  # fmt: skip
    np.testing.assert_array_equal(ds.x_train[-1], ds.x_train[0])


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["path", "label"], [["a.png", "x"]], "no split column: its header row has 'path'"),
        (["file", "class", "split"], [], "no path or label column"),
        (None, [], "is empty: it needs a header row"),
        (["path", "label", "split"], [["img/red-train-0.png", "red", "train"]], "no test images"),
    ],
)
def test_a_manifest_without_its_columns_or_splits_says_what_it_needs(
    tmp_path, header, rows, message
) -> None:
    _data(tmp_path)
    csv_file = tmp_path / "m.csv"
    if header is None:
        csv_file.write_text("")
    else:
        _write_csv(csv_file, header, rows)
    with pytest.raises(PollenError, match=message):
        load_dataset(csv_file, cache_dir=tmp_path / "cache")


def test_a_corrupt_image_and_a_non_utf8_manifest_are_named(tmp_path) -> None:
    rows = _data(tmp_path)
    (tmp_path / "img/red-train-0.png").write_bytes(b"not a png")
    csv_file = _write_csv(tmp_path / "m.csv", ["path", "label", "split"], rows)
    with pytest.raises(PollenError, match="red-train-0.png cannot be read"):
        load_dataset(csv_file, cache_dir=tmp_path / "cache")
    csv_file.write_bytes(b"path,label,split\n\xff\xfe,x,train\n")
    with pytest.raises(PollenError, match="m.csv is not UTF-8 text"):
        load_dataset(csv_file, cache_dir=tmp_path / "cache")


def test_a_spreadsheet_export_with_bom_quotes_and_blank_lines_loads(tmp_path) -> None:
    rows = _data(tmp_path)
    (tmp_path / "img/red, dark.png").write_bytes((tmp_path / rows[0][0]).read_bytes())
    lines = ["path,label,split", *(",".join(r) for r in rows), "", '"img/red, dark.png",red,train']
    (tmp_path / "m.csv").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    ds = load_dataset(tmp_path / "m.csv", cache_dir=tmp_path / "cache")
    assert len(ds.x_train) == 10


def test_a_class_missing_from_test_is_a_warning_naming_it(tmp_path, caplog) -> None:
    rows = [r for r in _data(tmp_path) if not (r[1] == "blue" and r[2] == "test")]
    csv_file = _write_csv(tmp_path / "m.csv", ["path", "label", "split"], rows)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(csv_file, cache_dir=tmp_path / "cache")
    assert ds.num_classes == 3 and set(ds.y_test.tolist()) == {1, 2}
    assert "blue" in caplog.text and "no test images" in caplog.text
    assert str(csv_file) in caplog.text
