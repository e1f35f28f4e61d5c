"""Evaluate a model on the test split of a dataset.

It reports the accuracy and per-class precision and recall, and draws the confusion
matrix (``confusion.png``).

The dataset is any source :func:`pollen.data.load.load_dataset` reads (an image folder,
its archive, CIFAR-10), decoded at the size the model's input shape says. Its classes are
matched to the model's by name, so a test split may hold only some of the classes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pollen.data.load import load_dataset
from pollen.errors import PollenError
from pollen.files import atomic_write
from pollen.inference.metrics import Scores, score, summary_lines
from pollen.inference.runtimes import model_format, open_model

#: The picture :func:`evaluate` writes, in its ``out_dir``.
CONFUSION_FILE = "confusion.png"


def evaluate(
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    force: bool = False,
) -> tuple[list[str], Scores, Path]:
    """Score a model on a dataset's test split and draw its confusion matrix.

    Args:
        model_path: A ``model.keras``, or a model written by ``pollen export``.
        data_dir: A dataset :func:`~pollen.data.load.load_dataset` reads; its test split.
        out_dir: Folder of ``confusion.png`` (created if missing).
        force: Replace an existing ``confusion.png``.

    Returns:
        ``(lines, scores, png)``: the report to print (accuracy, per-class precision
        and recall, confusion matrix), the figures, and the picture's path.

    Raises:
        PollenError: The model or the data cannot be read, the test split is empty, a
            dataset class is not one of the model's, or ``confusion.png`` exists.
    """
    png = out_dir.expanduser() / CONFUSION_FILE
    if png.exists() and not force:
        raise PollenError(
            f"{png} already exists: pass --force to replace it, or another --out folder."
        )
    model_format(model_path.expanduser())  # a missing model is reported before the data
    classifier = open_model(model_path)
    ds = load_dataset(data_dir, image_size=classifier.image_size, channels=classifier.channels)
    if len(ds.y_test) == 0:
        raise PollenError(f"The dataset {data_dir} has no test images: nothing to evaluate.")
    labels = model_labels(ds.class_names, classifier.classes, data_dir)[ds.y_test]
    probs = classifier.probabilities(ds.x_test)
    scores = score(labels, probs.argmax(axis=1), classifier.classes)
    write_confusion_png(scores, png, title=f"{model_path.name} on {Path(data_dir).name}")
    return summary_lines(scores), scores, png


def model_labels(
    data_classes: Sequence[str], model_classes: Sequence[str], where: Path
) -> np.ndarray:
    """The model's class index of each dataset class, matched by name.

    Raises:
        PollenError: A dataset class is not one of the model's.
    """
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        raise PollenError(
            f"The dataset {where} has classes the model does not know: {', '.join(unknown[:5])}"
            f"{' and more' if len(unknown) > 5 else ''}. The model's classes are "
            f"{', '.join(model_classes)} (from classes.json beside model.keras, or embedded "
            "by pollen export): evaluate on data with those class folders."
        )
    return np.array([index[name] for name in data_classes], dtype=np.int64)


def write_confusion_png(scores: Scores, path: Path, *, title: str) -> None:
    """Draw the confusion matrix (colour: share of each true class; text: counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(scores.classes)
    rows = scores.confusion / np.maximum(scores.support[:, None], 1)
    side = min(4 + 0.5 * k, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), scores.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), scores.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: accuracy {100 * scores.accuracy:.1f}% of {scores.total} images")
    if k <= 30:  # beyond that the numbers no longer fit their cells
        for t in range(k):
            for p in range(k):
                colour = "white" if rows[t, p] > 0.5 else "black"
                ax.text(
                    p,
                    t,
                    str(int(scores.confusion[t, p])),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=8,
                )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
