"""Export a ``model.keras`` as a SavedModel, a TFLite file or an ONNX file.

Keras 3 writes all three (``keras.Model.export``: ``tf_saved_model``, ``litert`` through
TensorFlow's TFLite converter, ``onnx`` through ``tf2onnx``) on the TensorFlow backend, on
a CPU. The class names and flip-TTA setting go inside the exported file
(:mod:`pollen.inference.metadata`), and the export is checked: the exported model is
opened with its own runtime and must give the probabilities of ``model.keras`` on a few
random images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pollen.errors import PollenError
from pollen.files import atomic_path
from pollen.inference.metadata import (
    SAVEDMODEL_FILE,
    ModelInfo,
    write_onnx_metadata,
    write_tflite_metadata,
)
from pollen.inference.runtimes import (
    INSTALL_HINT,
    KERAS,
    ONNX,
    SAVEDMODEL,
    TFLITE,
    Classifier,
    model_format,
    open_model,
)

#: The formats ``pollen export`` writes.
FORMATS = (SAVEDMODEL, TFLITE, ONNX)
_KERAS_NAME = {SAVEDMODEL: "tf_saved_model", TFLITE: "litert", ONNX: "onnx"}
_SUFFIX = {TFLITE: ".tflite", ONNX: ".onnx"}
#: Largest difference of a probability between model.keras and its export that passes.
TOLERANCE = 1e-3


def default_out(model_path: Path, fmt: str) -> Path:
    """Where an export goes without ``--out``: beside the model, named after it."""
    if fmt == SAVEDMODEL:
        return model_path.with_name(f"{model_path.stem}_savedmodel")
    return model_path.with_suffix(_SUFFIX[fmt])


def export_model(
    model_path: Path, fmt: str, out: Path | None = None, *, force: bool = False
) -> tuple[Path, Classifier, float]:
    """Export ``model_path`` in format ``fmt`` and check the export.

    Args:
        model_path: A ``model.keras`` (class names from ``classes.json`` beside it).
        fmt: One of :data:`FORMATS`.
        out: The file (SavedModel: folder) to write; default :func:`default_out`.
        force: Replace an existing ``out``.

    Returns:
        ``(out, classifier, difference)``: where the export is, the export opened for
        prediction, and the largest difference of a probability between it and
        ``model.keras`` on 8 random images.

    Raises:
        PollenError: Bad arguments, an unreadable model, a missing converter, or an
            export that predicts differently from the model.
    """
    if fmt not in FORMATS:
        raise PollenError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    model_path = model_path.expanduser()
    out = (out or default_out(model_path, fmt)).expanduser()
    _check_arguments(model_path, fmt, out, force)
    source = open_model(model_path)
    keras_model = source.keras_model
    # A loaded model that was never called has no traced graph for the ONNX converter.
    keras_model(np.zeros((1, *source.image_size, source.channels), dtype=np.float32))
    if fmt == ONNX:
        _require("tf2onnx", "Exporting to ONNX needs tf2onnx")
    try:
        if fmt == SAVEDMODEL:
            _write_savedmodel(keras_model, source.info, out)
        else:
            _write_file(keras_model, source.info, fmt, out)
    except PollenError:
        raise
    except Exception as err:  # the converters raise many types
        raise PollenError(
            f"Exporting {model_path} as {fmt} failed ({type(err).__name__}: "
            f"{str(err).strip()[:300]}). Try another --format."
        ) from None
    exported = open_model(out)
    difference = _difference(source, exported)
    if not difference <= TOLERANCE:
        raise PollenError(
            f"The export {out} predicts differently from {model_path} (probabilities differ "
            f"by up to {difference:.3g} on random images; at most {TOLERANCE} passes). "
            "Report this with the model; another --format may work meanwhile."
        )
    return out, exported, difference


def _check_arguments(model_path: Path, fmt: str, out: Path, force: bool) -> None:
    if model_format(model_path) != KERAS:
        raise PollenError(
            f"pollen export reads a model.keras, not {model_path}: pass the model.keras of "
            "a run (its classes.json beside it gives the class names)."
        )
    wanted = _SUFFIX.get(fmt)
    if wanted and out.suffix.lower() != wanted:
        raise PollenError(
            f"A {fmt} export is a {wanted} file: --out {out} must end in {wanted} "
            "(pollen predict tells the format from the name)."
        )
    if out.exists() and not force:
        raise PollenError(f"{out} already exists: pass --force to replace it, or another --out.")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise PollenError(
            f"pollen export runs on Keras's TensorFlow backend, not {keras.backend.backend()}: "
            "run it with KERAS_BACKEND=tensorflow (the model file is the same on every backend)."
        )


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PollenError(f"{what}, which is not installed: {INSTALL_HINT}.")


def _write_file(model: Any, info: ModelInfo, fmt: str, out: Path) -> None:
    """Write a one-file export atomically: the converter and the metadata, then a rename."""
    with atomic_path(out, suffix=_SUFFIX[fmt]) as tmp:
        with warnings.catch_warnings():
            # Keras's tf2onnx shim asks NumPy 2 for np.object: a FutureWarning, not ours.
            warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
            model.export(str(tmp), format=_KERAS_NAME[fmt], verbose=False)
        if fmt == TFLITE:
            write_tflite_metadata(tmp, info)
        else:
            write_onnx_metadata(tmp, info)


def _write_savedmodel(model: Any, info: ModelInfo, out: Path) -> None:
    """Write a SavedModel folder beside ``out``, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        target = tmp / "model"
        model.export(str(target), format="tf_saved_model", verbose=False)
        (target / SAVEDMODEL_FILE).write_text(info.to_json() + "\n")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _difference(source: Classifier, exported: Classifier, n: int = 8) -> float:
    """Largest probability difference of two classifiers on ``n`` seeded random images."""
    shape = (n, *source.image_size, source.channels)
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    return float(np.max(np.abs(source.probabilities(x) - exported.probabilities(x))))
