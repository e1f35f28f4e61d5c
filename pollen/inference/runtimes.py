"""Open any model file Pollen reads as one :class:`Classifier`.

The format follows from the path: a folder holding ``saved_model.pb`` is a SavedModel
(run by TensorFlow), ``*.tflite`` runs on LiteRT (the ``ai-edge-litert`` package, else
TensorFlow's own ``tf.lite.Interpreter``), ``*.onnx`` on ONNX Runtime, and ``*.keras``
(or any other name) on Keras. Every one takes ``float32`` pixels 0-255 of shape
``(N, H, W, C)`` and returns class probabilities: the model's input shape decides the
image size.

Keras, TensorFlow and the runtimes load only when a model is opened: ``pollen --help``
and the other commands stay free of their start-up time. Their load-time notices on
standard error are the caller's to hold back (the CLI does, see ``pollen.cli.predict``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollen.errors import PollenError
from pollen.inference.metadata import (
    METADATA_KEY,
    SAVEDMODEL_FILE,
    ModelInfo,
    checked_info,
    keras_model_info,
    read_tflite_metadata,
)

#: The formats :func:`open_model` reads, as ``pollen export --format`` names them.
KERAS, SAVEDMODEL, TFLITE, ONNX = "keras", "savedmodel", "tflite", "onnx"

_NAMES = {KERAS: "a Keras", SAVEDMODEL: "a SavedModel", TFLITE: "a TFLite", ONNX: "an ONNX"}

#: How to install a runtime that is missing (the ``export`` extra of pyproject.toml).
INSTALL_HINT = "pip install 'pollen-fl[export]' (or pip install tf2onnx onnxruntime ai-edge-litert)"


@dataclass(frozen=True)
class Classifier:
    """A model ready to classify images.

    Attributes:
        path: The file (or SavedModel folder) it was read from.
        format: One of :data:`KERAS`, :data:`SAVEDMODEL`, :data:`TFLITE`, :data:`ONNX`.
        image_size: ``(height, width)`` the model takes.
        channels: 3 (RGB) or 1 (greyscale).
        info: Class names and flip-TTA setting.
        run: ``float32 (N, H, W, C)`` pixels 0-255 -> ``(N, classes)`` probabilities.
        keras_model: The ``keras.Model`` of a :data:`KERAS` file (what export converts).
    """

    path: Path
    format: str
    image_size: tuple[int, int]
    channels: int
    info: ModelInfo
    run: Callable[[np.ndarray], np.ndarray]
    keras_model: Any = None

    @property
    def classes(self) -> tuple[str, ...]:
        """Name of each class, in output order."""
        return self.info.classes

    def probabilities(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Class probabilities of images, averaged with their mirror images under flip-TTA.

        Args:
            x: Images, ``(N, H, W, C)`` of the model's size, any numeric dtype (0-255).
            batch_size: Images per forward pass.

        Returns:
            ``float32`` probabilities, ``(N, classes)``.
        """
        parts = []
        for start in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
            probs = self.run(batch)
            if self.info.flip_tta:
                probs = 0.5 * (probs + self.run(np.ascontiguousarray(batch[:, :, ::-1])))
            parts.append(np.asarray(probs, dtype=np.float32))
        if not parts:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(parts)


def model_format(path: Path) -> str:
    """The format of the model at ``path``, from its name (a folder: SavedModel).

    Raises:
        PollenError: Nothing is at ``path``, or it is a folder but no SavedModel.
    """
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return SAVEDMODEL
        raise PollenError(
            f"The folder {path} is not a SavedModel (it has no saved_model.pb). Pass a "
            "model.keras, a .tflite or .onnx file, or a folder written by pollen export."
        )
    if not path.is_file():
        raise PollenError(
            f"No model at {path}: pass the model.keras file of a finished run (for example "
            "--model runs/<timestamp>/model.keras) or a model written by pollen export."
        )
    # Any other name is tried as Keras (``.h5`` and renamed files included).
    return {".tflite": TFLITE, ".onnx": ONNX}.get(path.suffix.lower(), KERAS)


def open_model(path: Path) -> Classifier:
    """Open the model at ``path`` in whichever format it is (see :func:`model_format`).

    Raises:
        PollenError: The model is missing, unreadable, not an image classifier, or its
            runtime is not installed.
    """
    path = path.expanduser()
    fmt = model_format(path)
    opener = {
        KERAS: _open_keras,
        SAVEDMODEL: _open_savedmodel,
        TFLITE: _open_tflite,
        ONNX: _open_onnx,
    }
    with _unreadable(path, fmt):
        return opener[fmt](path)


@contextlib.contextmanager
def _unreadable(path: Path, fmt: str) -> Iterator[None]:
    """Turn a runtime's own error about a bad file into one PollenError paragraph."""
    try:
        yield
    except PollenError:
        raise
    except ImportError as err:  # a runtime's own dependency is missing
        raise PollenError(
            f"Reading {path} needs the package {err.name or err}, which is not installed: "
            f"{INSTALL_HINT}."
        ) from None
    except Exception as err:  # each runtime raises its own types for a bad file
        raise PollenError(
            f"Cannot load {path} as {_NAMES[fmt]} model ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no details'}). "
            "Pass a model.keras written by pollen or a model written by pollen export."
        ) from None


def _image_shape(shape: Any, path: Path) -> tuple[tuple[int, int], int]:
    """``((height, width), channels)`` of an input shape ``(batch, H, W, C)``."""
    dims = list(shape)
    ok = len(dims) == 4 and all(isinstance(d, int | np.integer) and d > 0 for d in dims[1:])
    if not ok or int(dims[3]) not in (1, 3):
        raise PollenError(
            f"The model {path} takes inputs of shape {tuple(dims)}, not images (batch, "
            "height, width, 1 or 3 channels): Pollen classifies images only."
        )
    return (int(dims[1]), int(dims[2])), int(dims[3])


def _open_keras(path: Path) -> Classifier:
    import keras

    from pollen.models.scatternet import scattering_layer_class

    scattering_layer_class()  # registers the scatternet model's own layer for loading
    model = keras.saving.load_model(path, compile=False, safe_mode=True)  # no Lambda code
    size, channels = _image_shape(model.input_shape, path)

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))

    info = keras_model_info(model, path)
    return Classifier(path, KERAS, size, channels, info, run, keras_model=model)


def _open_savedmodel(path: Path) -> Classifier:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    serve = loaded.signatures["serving_default"]
    _, specs = serve.structured_input_signature
    if len(specs) != 1:
        raise PollenError(f"The SavedModel {path} takes {len(specs)} inputs; an image model one.")
    ((input_name, spec),) = specs.items()
    size, channels = _image_shape(spec.shape.as_list(), path)
    ((output_name, out_spec),) = serve.structured_outputs.items()
    info_file = path / SAVEDMODEL_FILE
    info = ModelInfo.from_json(info_file.read_text()) if info_file.is_file() else None

    def run(x: np.ndarray) -> np.ndarray:
        return serve(**{input_name: tf.constant(x)})[output_name].numpy()

    info = checked_info(info, int(out_spec.shape[-1]), path)
    return Classifier(path, SAVEDMODEL, size, channels, info, run)


def _tflite_interpreter(path: Path) -> Any:
    """LiteRT's interpreter; TensorFlow's deprecated copy where ai-edge-litert is missing."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():  # its deprecation notice: LiteRT is the fix
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def _open_tflite(path: Path) -> Classifier:
    interpreter = _tflite_interpreter(path)
    (inp,) = interpreter.get_input_details()
    out = interpreter.get_output_details()[0]
    size, channels = _image_shape([int(d) for d in inp["shape_signature"]], path)
    info = checked_info(read_tflite_metadata(path.read_bytes()), int(out["shape"][-1]), path)

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(inp["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return np.array(interpreter.get_tensor(out["index"]))

    return Classifier(path, TFLITE, size, channels, info, run)


def _open_onnx(path: Path) -> Classifier:
    try:
        import onnxruntime
    except ImportError:
        raise PollenError(
            f"Reading {path} needs ONNX Runtime, which is not installed: {INSTALL_HINT}."
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    size, channels = _image_shape([-1, *inp.shape[1:]], path)
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    num_classes = session.get_outputs()[0].shape[-1]
    info = checked_info(ModelInfo.from_json(text) if text else None, int(num_classes), path)

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {inp.name: x})[0])

    return Classifier(path, ONNX, size, channels, info, run)
