"""CSV manifests: a list of image files and their labels, ``path,label[,split]``.

Two layouts, both with a header row naming the columns (in any order; other columns are
ignored, names are matched without regard to case):

* one ``.csv`` file with the columns ``path``, ``label`` and ``split`` (``train`` or
  ``test`` on every row); ``--data-dir labels.csv``;
* a folder holding ``train.csv`` and ``test.csv``, each with ``path`` and ``label``;
  ``--data-dir folder/``.

A ``path`` is relative to the folder of the CSV file that names it (an absolute path is
taken as it is) and must stay inside that folder once links are followed: a manifest
someone else wrote cannot make Pollen read a file outside its own folder, just as an image
folder cannot (:func:`pollen.data.image_folder._inside`). Class names are the sorted
distinct labels of the training rows (label ``i`` is the ``i``-th). Every problem names the
CSV file and its line: a missing file, an empty label, a split that is neither ``train``
nor ``test``, an image in both splits.

Images are decoded by :func:`pollen.data.decode.decode_files` and cached as ``.npz`` (see
:mod:`pollen.data.cache`), keyed by the CSV files and every image's size and modification
time. The CSV is read with Python's :mod:`csv` module (quoting, commas in names, a UTF-8
byte-order mark from spreadsheet programs).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pollen.data.cache import cache_file, cached, file_signature
from pollen.data.dataset import Dataset, LayoutError, LoadOptions, Source
from pollen.data.decode import decode_files, header_size
from pollen.data.image_folder import check_class_sizes
from pollen.errors import PollenError

__all__ = ["SOURCE", "read_manifest"]

#: The two files of a manifest folder.
TRAIN_CSV, TEST_CSV = "train.csv", "test.csv"
#: Most rows Pollen reads from one manifest (a bound on what a bad file can make it list).
MAX_ROWS = 10_000_000
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Row:
    """One image of a manifest: its file, label and split, and where the CSV names it."""

    file: Path
    label: str
    split: str
    where: str  # "line 7 of /data/labels.csv"


def read_manifest(csv_file: Path, split: str | None = None) -> list[Row]:
    """Read and check the rows of ``csv_file``.

    Args:
        csv_file: The CSV file.
        split: The split of every row (a ``train.csv`` or ``test.csv``); ``None``: the
            file has a ``split`` column.

    Returns:
        The rows, in file order, with resolved, existing files.

    Raises:
        PollenError: The file cannot be read, a column is missing, or a row is bad
            (naming the file and line).
    """
    base = csv_file.parent
    real_base = base.resolve()
    try:
        with csv_file.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            columns = _columns(csv_file, header, split is None)
            rows = [
                _row(csv_file, reader.line_num, values, columns, split, base, real_base)
                for values in _bounded(csv_file, reader)
                if any(v.strip() for v in values)  # blank lines are skipped
            ]
    except UnicodeDecodeError as exc:
        raise PollenError(
            f"The manifest {csv_file} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
            "Save it as CSV in UTF-8 (spreadsheet programs offer 'CSV UTF-8')."
        ) from None
    except csv.Error as exc:
        raise PollenError(
            f"The manifest {csv_file} is not valid CSV ({exc}). Check its quoting, or save "
            "it again as CSV from a spreadsheet program."
        ) from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise PollenError(f"Could not read the manifest {csv_file}: {reason}.") from None
    return rows


def _bounded(csv_file: Path, reader):
    for i, values in enumerate(reader):
        if i >= MAX_ROWS:
            raise PollenError(
                f"The manifest {csv_file} has more than {MAX_ROWS:,} rows (see "
                "pollen.data.manifest.MAX_ROWS). Split the data among clients."
            )
        yield values


def _columns(csv_file: Path, header: list[str] | None, with_split: bool) -> dict[str, int]:
    """Column positions of ``path``, ``label`` (and ``split``) in the header row."""
    needed = ("path", "label", "split") if with_split else ("path", "label")
    if header is None:
        raise PollenError(
            f"The manifest {csv_file} is empty: it needs a header row ({','.join(needed)}) "
            "and one row per image."
        )
    names = [h.strip().lower() for h in header]
    missing = [n for n in needed if n not in names]
    if missing:
        found = ", ".join(repr(h) for h in header) or "nothing"
        split_note = (
            " (the split column says train or test on every row; or write train.csv and "
            "test.csv into one folder and pass the folder)"
            if "split" in missing
            else ""
        )
        raise PollenError(
            f"The manifest {csv_file} has no {' or '.join(missing)} column: its header row "
            f"has {found}. Its first row must name the columns {', '.join(needed)}"
            f"{split_note}."
        )
    return {n: names.index(n) for n in needed}


def _row(  # parameters: one row needs the file, its line, the header and the folder
    csv_file: Path,
    line: int,
    values: list[str],
    columns: dict[str, int],
    split: str | None,
    base: Path,
    real_base: Path,
) -> Row:
    where = f"line {line} of {csv_file}"

    def cell(name: str) -> str:
        i = columns[name]
        return values[i].strip() if i < len(values) else ""

    path_text, label = cell("path"), cell("label")
    if not path_text:
        raise PollenError(f"The image path is empty on {where}. Give every row a path.")
    if not label:
        raise PollenError(
            f"The label of {path_text} is empty on {where}. Give every image its class name, "
            "or remove the row."
        )
    row_split = split if split is not None else cell("split").lower()
    if row_split not in _SPLITS:
        raise PollenError(
            f"The split of {path_text} on {where} is {cell('split')!r}: write train or test."
        )
    file = base / Path(path_text).expanduser()
    real = file.resolve()
    if not real.is_relative_to(real_base):
        raise PollenError(
            f"The image {path_text} on {where} is outside the manifest's folder {base} (it "
            f"leads to {real}). Pollen reads only images inside the folder of the CSV file: "
            "move the images there, or the CSV file to a folder that holds them."
        )
    if not real.is_file():
        raise PollenError(
            f"The image {path_text} on {where} does not exist (looked for {file}). Paths are "
            f"relative to the CSV file's folder {base}; fix the path or remove the row."
        )
    return Row(file, label, row_split, where)


def _group(rows: list[Row], split: str) -> dict[str, list[Row]]:
    """``{label: rows}`` of one split, labels sorted."""
    classes: dict[str, list[Row]] = {}
    for row in rows:
        if row.split == split:
            classes.setdefault(row.label, []).append(row)
    return dict(sorted(classes.items()))


def _check(csv_files: list[Path], rows: list[Row]) -> None:
    """Refuse a manifest whose splits cannot train and test a model (naming its file)."""
    named = " and ".join(str(f) for f in csv_files)
    train, test = _group(rows, "train"), _group(rows, "test")
    for split, classes in (("train", train), ("test", test)):
        if not classes:
            raise PollenError(
                f"The manifest {named} has no {split} images: Pollen needs rows of both "
                "splits (train to learn from, test to measure the model on held-out images)."
            )
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise PollenError(
            f"The test rows of {named} have label(s) {', '.join(unknown)} that no training "
            f"row has (first on {test[unknown[0]][0].where}). Test labels must be among the "
            f"training labels ({', '.join(train)}); fix the labels or remove those rows."
        )
    seen = {row.file.resolve(): row for row in rows if row.split == "train"}
    for row in rows:
        first = seen.get(row.file.resolve())
        if row.split == "test" and first is not None:
            raise PollenError(
                f"The image {row.file} is both a training image ({first.where}) and a test "
                f"image ({row.where}): the test accuracy would then be measured on images "
                "the model learnt. Keep each image in one split."
            )
    check_class_sizes(train, test, f"the training rows of {named}", f"the test rows of {named}")


def _load(path: Path, options: LoadOptions) -> Dataset:
    size, channels = options.image_size, options.channels
    if path.is_dir():
        csv_files = [path / TRAIN_CSV, path / TEST_CSV]
        missing = [f.name for f in csv_files if not f.is_file()]
        if missing:
            raise LayoutError(
                f"The manifest folder {path} has no {' or '.join(missing)}. A manifest folder "
                f"holds both {TRAIN_CSV} and {TEST_CSV} (columns path,label)."
            )
        rows = read_manifest(csv_files[0], "train") + read_manifest(csv_files[1], "test")
    else:
        csv_files = [path]
        rows = read_manifest(path)
    _check(csv_files, rows)
    class_names = tuple(sorted({row.label for row in rows if row.split == "train"}))
    label_of = {name: i for i, name in enumerate(class_names)}
    train = [row for row in rows if row.split == "train"]
    test = [row for row in rows if row.split == "test"]
    key = {
        "size": size,
        "channels": channels,
        "csv": [[str(f), *file_signature(f)] for f in csv_files],
        "files": [[str(r.file), r.label, r.split, *file_signature(r.file)] for r in rows],
    }

    def build() -> Dataset:
        x_train = decode_files([r.file for r in train], size, channels, "Decoding training images")
        x_test = decode_files([r.file for r in test], size, channels, "Decoding test images")
        return Dataset(
            x_train,
            np.array([label_of[r.label] for r in train], np.int64),
            x_test,
            np.array([label_of[r.label] for r in test], np.int64),
            class_names,
        )

    return cached(cache_file(options.cache_dir, "manifest", path, size, channels, key), build)


def _recognise(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir() and ((path / TRAIN_CSV).is_file() or (path / TEST_CSV).is_file()):
        if not (path / "train").is_dir() and not (path / "test").is_dir():
            return path
    return None


def _native_size(path: Path) -> tuple[int, int] | None:
    """The size of the manifest's first training image (its header only)."""
    try:
        if path.is_dir():
            rows = read_manifest(path / TRAIN_CSV, "train")
        else:
            rows = [row for row in read_manifest(path) if row.split == "train"]
    except PollenError:
        return None  # loading the manifest reports what is wrong with it
    return header_size(rows[0].file) if rows else None


SOURCE = Source(
    layout=(
        "a CSV manifest: a .csv file with the columns path,label,split (split: train or "
        "test), or a folder with train.csv and test.csv (columns path,label), image paths "
        "relative to the CSV file's folder"
    ),
    load=_load,
    recognise=_recognise,
    native_size=_native_size,
    file_kind="a .csv manifest",
)
"""A CSV manifest (one file with a split column, or a folder with train.csv and test.csv)."""
