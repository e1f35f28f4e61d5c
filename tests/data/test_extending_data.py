"""Run the "Add a data source" guide: its module and its SOURCES entry, on a tiny .npz."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pollen.data
from pollen.data import load
from pollen.errors import PollenError

DOCS = Path(__file__).resolve().parents[2] / "docs"
MODULE = "npz_arrays"


def _guide_blocks() -> dict[str, str]:
    """The guide's Python code blocks that start with a ``# pollen/data/<file>`` line."""
    for name in ("extending.md", "extending-data.md"):  # the guide may be merged into the first
        path = DOCS / name
        if path.is_file() and f"# pollen/data/{MODULE}.py" in path.read_text():
            blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
            return {b.split("\n", 1)[0][2:]: b for b in blocks if b.startswith("# pollen/data/")}
    raise AssertionError(f"no guide in {DOCS} shows pollen/data/{MODULE}.py")


@pytest.fixture
def sources_with_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """Perform the guide's two steps; return the new SOURCES."""
    blocks = _guide_blocks()
    assert not (Path(pollen.data.__file__).parent / f"{MODULE}.py").exists()
    # Step 1: one new module in pollen/data/ (here: a folder added to the package's path).
    folder = tmp_path / "pollen_data_extra"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(blocks[f"pollen/data/{MODULE}.py"])
    monkeypatch.setattr(pollen.data, "__path__", [*pollen.data.__path__, str(folder)])
    try:
        # Step 2: one entry in SOURCES, exactly as the guide writes load.py's lines.
        namespace = dict(vars(load))
        exec(blocks["pollen/data/load.py"], namespace)
        module = sys.modules[f"pollen.data.{MODULE}"]
        sources = namespace["SOURCES"]
        assert sources[:-1] == load.SOURCES, "the guide's SOURCES must be today's plus one"
        assert sources[-1] is module.SOURCE
        monkeypatch.setattr(load, "SOURCES", sources)
        yield sources
    finally:  # forget the toy module again
        sys.modules.pop(f"pollen.data.{MODULE}", None)
        if hasattr(pollen.data, MODULE):
            delattr(pollen.data, MODULE)


def _write_npz(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
        "y_test": np.array([2, 0]),
    }
    np.savez(path, **arrays)
    return arrays


def test_npz_source_before_its_entry(tmp_path: Path) -> None:
    _write_npz(tmp_path / "data.npz")
    with pytest.raises(
        PollenError, match="is a file but not a .csv manifest or a CIFAR-10 tar archive\\."
    ):
        load.load_dataset(tmp_path / "data.npz", cache_dir=tmp_path / "cache")


def test_npz_source_loads_through_load_dataset(sources_with_npz: tuple, tmp_path: Path) -> None:
    arrays = _write_npz(tmp_path / "data.npz")
    ds = load.load_dataset(tmp_path / "data.npz", image_size=(8, 8), cache_dir=tmp_path)
    for name, expected in arrays.items():
        np.testing.assert_array_equal(getattr(ds, name), expected)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.class_names == ("0", "1", "2")
    assert load.describe(ds) == "6 train / 2 test images of 8x8x3, 3 classes: 0, 1, 2"

    with pytest.raises(PollenError, match="not \\(32, 32, 3\\)"):
        load.load_dataset(tmp_path / "data.npz", cache_dir=tmp_path)


def test_npz_source_in_help_and_errors(sources_with_npz: tuple, tmp_path: Path) -> None:
    assert load.layouts_help().endswith(
        "; (7) a .npz file with the arrays x_train, y_train, x_test and y_test."
    )
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(PollenError) as info:
        load.load_dataset(tmp_path / "notes.txt", cache_dir=tmp_path)
    assert "a .csv manifest or a CIFAR-10 tar archive or a .npz file of arrays." in str(info.value)
    assert "(7) a .npz file" in str(info.value)
    # The sources before it still win for their own data.
    (tmp_path / "images/train/a").mkdir(parents=True)
    with pytest.raises(PollenError, match="no test/ folder"):
        load.load_dataset(tmp_path / "images", cache_dir=tmp_path)
