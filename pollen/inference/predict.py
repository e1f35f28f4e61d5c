"""Classify image files and folders with any model file :func:`open_model` reads.

Images are decoded as training decoded them (:func:`pollen.data.decode.load_images`) at
the size the model's input shape says. A folder stands for every image file under it,
recursively (hidden files and folders left out). Labelled by their folders (an image in
``.../cat/x.jpg`` is a ``cat``), the predictions also give a confusion matrix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pollen.data.decode import image_extensions, load_images
from pollen.errors import PollenError
from pollen.inference.metrics import Scores, score, summary_lines
from pollen.inference.runtimes import Classifier, model_format, open_model


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """The image files ``inputs`` name: files as given, folders expanded recursively.

    A folder contributes every file under it whose extension Pillow reads, in sorted
    order; hidden files and folders (``.name``) are left out.

    Raises:
        PollenError: An input does not exist, or a folder holds no image file.
    """
    extensions = image_extensions()
    files: list[Path] = []
    for path in inputs:
        path = path.expanduser()
        if path.is_dir():
            found = _images_under(path, extensions)
            if not found:
                raise PollenError(
                    f"The folder {path} holds no image file (extensions Pillow reads, such "
                    "as .jpg and .png, in it or its subfolders). Check the path."
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PollenError(
                f"The image file {path} does not exist (or is not a file). Check the path."
            )
    return files


def _images_under(folder: Path, extensions: frozenset[str]) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(root) / n
            for n in sorted(names)
            if not n.startswith(".") and Path(n).suffix.lower() in extensions
        ]
    return found


def folder_labels(files: Sequence[Path], classes: Sequence[str]) -> np.ndarray:
    """The class index of each file, named by its parent folder.

    Raises:
        PollenError: A folder name is not one of ``classes``.
    """
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({f.parent.name for f in files} - set(index))
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise PollenError(
            f"--labels-from-folders takes each image's folder name as its class, but the "
            f"folder name(s) {shown} are not classes of the model, which knows: "
            f"{', '.join(classes)}. Put each image in a folder named after its class."
        )
    return np.array([index[f.parent.name] for f in files], dtype=np.int64)


def top_lines(
    paths: Sequence[Path], probs: np.ndarray, classes: Sequence[str], top: int
) -> list[str]:
    """One line per image: ``path: class (p), class (p), ...``, the ``top`` likeliest."""
    lines = []
    for path, p in zip(paths, probs, strict=True):
        best = np.argsort(p, kind="stable")[::-1][:top]
        lines.append(f"{path}: " + ", ".join(f"{classes[i]} ({p[i]:.3f})" for i in best))
    return lines


def classify(classifier: Classifier, files: Sequence[Path], chunk: int = 1024) -> np.ndarray:
    """Class probabilities ``(len(files), classes)`` of image files.

    The files are decoded ``chunk`` at a time, so a large folder never sits in memory whole.
    """
    parts = [np.zeros((0, len(classifier.classes)), dtype=np.float32)]
    for start in range(0, len(files), chunk):
        x = load_images(
            files[start : start + chunk],
            image_size=classifier.image_size,
            channels=classifier.channels,
        )
        parts.append(classifier.probabilities(x))
    return np.concatenate(parts)


def predict(
    model_path: Path,
    inputs: Sequence[Path],
    *,
    top: int = 3,
    labels_from_folders: bool = False,
) -> tuple[list[str], Scores | None]:
    """Classify image files and folders.

    Args:
        model_path: A ``model.keras``, or a model written by ``pollen export``.
        inputs: Image files and folders of images (searched recursively).
        top: How many classes to show per image.
        labels_from_folders: Also score the predictions against the images' folder names.

    Returns:
        ``(lines, scores)``: one line per image (``path: class (p), ...``), then, with
        ``labels_from_folders``, the accuracy, per-class accuracy and confusion matrix
        lines; ``scores`` is None without ``labels_from_folders``.

    Raises:
        PollenError: The model, an input or an image cannot be read, or a folder name is
            not one of the model's classes.
    """
    model_format(model_path)  # a missing model is reported before a missing image
    files = image_files(inputs)
    classifier = open_model(model_path)
    labels = folder_labels(files, classifier.classes) if labels_from_folders else None
    probs = classify(classifier, files)
    lines = top_lines(files, probs, classifier.classes, top)
    if labels is None:
        return lines, None
    scores = score(labels, probs.argmax(axis=1), classifier.classes)
    return [*lines, "", *summary_lines(scores, precision=False)], scores
