"""The confusion matrix and the figures read from it."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.inference.metrics import class_table, confusion_table, score, summary_lines


def test_score_counts_true_rows_and_predicted_columns() -> None:
    s = score(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 0, 0]), ["a", "b", "c"])
    np.testing.assert_array_equal(s.confusion, [[2, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert s.total == 6
    assert s.accuracy == pytest.approx(3 / 6)
    np.testing.assert_allclose(s.recall, [2 / 3, 1 / 2, 0.0])
    # Class c was never predicted: its precision is undefined, not 0.
    np.testing.assert_allclose(s.precision[:2], [2 / 4, 1 / 2])
    assert np.isnan(s.precision[2])


def test_a_class_without_images_has_no_recall() -> None:
    s = score(np.array([0, 0]), np.array([0, 1]), ["a", "b"])
    assert np.isnan(s.recall[1]) and s.precision[1] == 0.0
    assert class_table(s)[2].split() == ["b", "0", "0.0%", "-"]


def test_no_images_is_nan_not_an_error() -> None:
    s = score(np.array([], dtype=int), np.array([], dtype=int), ["a"])
    assert s.total == 0 and np.isnan(s.accuracy)


def test_tables_are_aligned_and_complete() -> None:
    s = score(np.array([0, 1, 1]), np.array([0, 1, 0]), ["cat", "elephant"])
    table = confusion_table(s)
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    assert table[1].split() == ["cat", "1", "0"]
    assert table[2].split() == ["elephant", "1", "1"]
    lines = summary_lines(s, precision=False)
    assert lines[0] == "accuracy: 66.7% (2 of 3 images)"
    assert ["cat", "1", "100.0%"] in [line.split() for line in lines]
    assert ["elephant", "2", "50.0%"] in [line.split() for line in lines]
