"""The confusion matrix of a classifier and the figures read from it.

A few lines of NumPy (``bincount``) rather than scikit-learn: that would be a large
dependency for a matrix count and two divisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """A confusion matrix and what it says.

    Attributes:
        classes: Name of each class, the rows' and columns' order.
        confusion: ``int64 (K, K)``: ``confusion[t, p]`` images of class ``t`` predicted ``p``.
    """

    classes: tuple[str, ...]
    confusion: np.ndarray

    @property
    def total(self) -> int:
        """Number of images counted."""
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        """Fraction predicted right (nan for no images)."""
        return float(np.trace(self.confusion) / self.total) if self.total else float("nan")

    @property
    def support(self) -> np.ndarray:
        """Images of each true class."""
        return self.confusion.sum(axis=1)

    @property
    def recall(self) -> np.ndarray:
        """Per class: fraction of its images predicted as it (its accuracy); nan without any."""
        return _ratio(np.diag(self.confusion), self.support)

    @property
    def precision(self) -> np.ndarray:
        """Per class: fraction of the images predicted as it that are it; nan if none were."""
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(len(num), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def score(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> Scores:
    """Count the confusion matrix of true ``labels`` and ``predicted`` class indices."""
    k = len(classes)
    pairs = np.asarray(labels, dtype=np.int64) * k + np.asarray(predicted, dtype=np.int64)
    counts = np.bincount(pairs, minlength=k * k).reshape(k, k)
    return Scores(tuple(classes), counts)


def _percent(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.1f}%"


def confusion_table(scores: Scores) -> list[str]:
    """The confusion matrix as aligned text lines: rows true class, columns predicted."""
    names = list(scores.classes)
    corner = "true \\ predicted"
    first = max(len(corner), *(len(n) for n in names))
    width = max(*(len(n) for n in names), len(str(int(scores.confusion.max(initial=0)))))
    head = corner.ljust(first) + "".join(f" {n:>{width}}" for n in names)
    rows = [
        f"{name:<{first}}" + "".join(f" {int(c):>{width}}" for c in row)
        for name, row in zip(names, scores.confusion, strict=True)
    ]
    return [head, *rows]


def class_table(scores: Scores, *, precision: bool = True) -> list[str]:
    """Per-class recall (accuracy on the class), optionally precision, and image counts."""
    width = max(5, *(len(n) for n in scores.classes))
    head = f"{'class':<{width}}  images  " + ("precision  recall" if precision else "accuracy")
    lines = [head]
    for i, name in enumerate(scores.classes):
        line = f"{name:<{width}}  {int(scores.support[i]):>6}  "
        if precision:
            line += f"{_percent(scores.precision[i]):>9}  {_percent(scores.recall[i]):>6}"
        else:
            line += f"{_percent(scores.recall[i]):>8}"
        lines.append(line)
    return lines


def summary_lines(scores: Scores, *, precision: bool = True) -> list[str]:
    """Accuracy, the per-class table and the confusion matrix, ready to print."""
    right = int(np.trace(scores.confusion))
    return [
        f"accuracy: {_percent(scores.accuracy)} ({right} of {scores.total} images)",
        "",
        *class_table(scores, precision=precision),
        "",
        "confusion matrix (rows: true class, columns: predicted class):",
        *confusion_table(scores),
    ]
