"""Prediction with a saved global model: ``pollen predict``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pollen.errors import PollenError


def class_names_for(model_path: Path, num_classes: int) -> list[str]:
    """Class names for a model: ``classes.json`` beside it, else CIFAR-10's, else numbers."""
    from pollen.data.load import CIFAR10_CLASSES

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
    from pollen.deploy.runtime import without_native_notices

    with without_native_notices():  # TensorFlow's load-time notices: see TF_LOAD_NOTICES
        import keras
    import numpy as np

    from pollen.data.load import load_images

    try:
        model = keras.saving.load_model(model_path, compile=False)  # predicting only
    except Exception as err:  # Keras raises many types for a bad file
        raise PollenError(
            f"Cannot load {model_path} as a Keras model ({type(err).__name__}: {err}). "
            "Pass a model.keras written by pollen."
        ) from None
    _, height, width, channels = model.input_shape
    x = load_images(images, image_size=(height, width), channels=channels)
    from pollen.models.registry import MODELS
    from pollen.training.local import predict_proba

    # Registry models are named "pollen_<registry name>"; evaluate the way the run did.
    spec = MODELS.get(model.name.removeprefix("pollen_"))
    probs = predict_proba(model, x, flip_tta=bool(spec and spec.flip_tta))
    names = class_names_for(model_path, probs.shape[1])
    lines = []
    for path, p in zip(images, probs, strict=True):
        best = np.argsort(p)[::-1][:top]
        lines.append(f"{path}: " + ", ".join(f"{names[i]} ({p[i]:.3f})" for i in best))
    return lines
