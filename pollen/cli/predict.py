"""``pollen predict``: classify image files with a saved global model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pollen.cli.options import PREDICT, add_options
from pollen.data.cifar10 import CIFAR10_CLASSES
from pollen.data.decode import load_images
from pollen.deploy.processes import without_native_notices
from pollen.errors import PollenError
from pollen.models.registry import MODELS


def add_parser(commands: Any) -> None:
    """Add ``predict`` to the subparsers ``commands`` of the ``pollen`` parser."""
    parser = commands.add_parser(
        PREDICT,
        help="classify images with a saved model",
        description="Print the top classes of image files.",
    )
    add_options(parser, PREDICT)
    parser.set_defaults(run=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """``pollen predict``: print one line per image; returns 0.

    Raises:
        PollenError: The model or an image cannot be read.
    """
    for line in predict(args.model, args.images, top=args.top):
        print(line)
    return 0


def class_names_for(model_path: Path, num_classes: int) -> list[str]:
    """Class names for a model: ``classes.json`` beside it, else CIFAR-10's, else numbers."""
    names_file = model_path.parent / "classes.json"
    if names_file.is_file():
        try:
            names = json.loads(names_file.read_text())
        except ValueError:
            names = None
        if isinstance(names, list) and len(names) == num_classes:
            return [str(n) for n in names]
    if num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return [f"class {i}" for i in range(num_classes)]


def predict(model_path: Path, images: Sequence[Path], *, top: int = 3) -> list[str]:
    """Classify image files with a saved model.

    Args:
        model_path: A ``model.keras`` written by a Pollen run.
        images: Image files in any format Pillow reads; resized to the model's input.
        top: How many classes to show per image.

    Returns:
        One line per image: ``path: class (p), class (p), ...``.

    Raises:
        PollenError: The model or an image cannot be read.
    """
    if not model_path.is_file():
        raise PollenError(
            f"No model at {model_path}: pass the model.keras file of a finished run, "
            "for example --model runs/<timestamp>/model.keras."
        )
    # Keras (and pollen.training, which imports it) load only here: `pollen --help`
    # and the other commands stay free of TensorFlow's start-up time.
    with without_native_notices():  # TensorFlow's load-time notices: see TF_LOAD_NOTICES
        import keras

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)  # no Lambda code
    except Exception as err:  # Keras raises many types for a bad file
        raise PollenError(
            f"Cannot load {model_path} as a Keras model ({type(err).__name__}: {err}). "
            "Pass a model.keras written by pollen."
        ) from None
    _, height, width, channels = model.input_shape
    x = load_images(images, image_size=(height, width), channels=channels)
    from pollen.training.evaluate import predict_proba  # imports Keras: see above

    # Registry models are named "pollen_<registry name>"; evaluate the way the run did.
    spec = MODELS.get(model.name.removeprefix("pollen_"))
    probs = predict_proba(model, x, flip_tta=bool(spec and spec.flip_tta))
    names = class_names_for(model_path, probs.shape[1])
    lines = []
    for path, p in zip(images, probs, strict=True):
        best = np.argsort(p)[::-1][:top]
        lines.append(f"{path}: " + ", ".join(f"{names[i]} ({p[i]:.3f})" for i in best))
    return lines
