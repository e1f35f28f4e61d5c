"""What travels with a model file: its class names and whether it predicts with flip-TTA.

A ``model.keras`` written by a run finds its class names in ``classes.json`` beside it
(:func:`class_names_for`). An exported model carries a :class:`ModelInfo` inside itself,
so that copying the one file (or folder) is enough:

- SavedModel: a ``pollen.json`` file in the SavedModel folder (TensorFlow ignores it);
- TFLite: a metadata entry named ``pollen`` in the flatbuffer (the place TFLite keeps
  named metadata, as ``min_runtime_version``);
- ONNX: a ``pollen`` entry of the model's ``metadata_props``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollen.data.cifar10 import CIFAR10_CLASSES
from pollen.errors import PollenError
from pollen.models.registry import MODELS

#: Name of the metadata entry (TFLite, ONNX) that holds a :class:`ModelInfo`.
METADATA_KEY = "pollen"
#: The file inside a SavedModel folder that holds a :class:`ModelInfo`.
SAVEDMODEL_FILE = "pollen.json"


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction needs besides the network.

    Attributes:
        classes: Name of each output, in output order.
        flip_tta: Average each image's probabilities with those of its mirror image, as
            the run evaluated the model (see docs/performance.md#flip-tta).
        model: The registry name of the architecture ("" when unknown).
    """

    classes: tuple[str, ...]
    flip_tta: bool = False
    model: str = ""

    def to_json(self) -> str:
        """This info as one JSON object."""
        return json.dumps(
            {"classes": list(self.classes), "flip_tta": self.flip_tta, "model": self.model}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelInfo | None:
        """The info a :meth:`to_json` text holds; None for anything else."""
        try:
            body = json.loads(text)
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("classes"), list):
            return None
        return cls(
            classes=tuple(str(c) for c in body["classes"]),
            flip_tta=bool(body.get("flip_tta", False)),
            model=str(body.get("model", "")),
        )


def default_class_names(num_classes: int) -> list[str]:
    """Names for a model that came without any: CIFAR-10's for 10 classes, else numbers."""
    if num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return [f"class {i}" for i in range(num_classes)]


def class_names_for(model_path: Path, num_classes: int) -> list[str]:
    """Class names for a ``model.keras``: ``classes.json`` beside it, else the defaults.

    A model with more outputs than ``classes.json`` names (a server left at the default
    ``--num-classes`` 10 while its clients brought fewer classes) keeps the data's names
    for the outputs they cover; the untrained rest are called ``unused <i>``.
    """
    names_file = model_path.parent / "classes.json"
    if names_file.is_file():
        try:
            names = json.loads(names_file.read_text())
        except (ValueError, OSError):
            names = None
        if isinstance(names, list) and 0 < len(names) <= num_classes:
            rest = [f"unused {i}" for i in range(len(names), num_classes)]
            return [str(n) for n in names] + rest
    return default_class_names(num_classes)


def keras_model_info(model: Any, model_path: Path) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded Keras model read from ``model_path``.

    Registry models are named ``pollen_<registry name>``; their flip-TTA setting is the
    registry's, so a prediction matches the run's evaluation.
    """
    name = str(model.name).removeprefix("pollen_")
    spec = MODELS.get(name)
    num_classes = int(model.output_shape[-1])
    return ModelInfo(
        classes=tuple(class_names_for(model_path, num_classes)),
        flip_tta=bool(spec and spec.flip_tta),
        model=name if spec else "",
    )


def checked_info(info: ModelInfo | None, num_classes: int, where: Path) -> ModelInfo:
    """``info`` if it names ``num_classes`` classes; default names when there is none.

    Raises:
        PollenError: ``info`` names another number of classes than the model has.
    """
    if info is None:
        return ModelInfo(classes=tuple(default_class_names(num_classes)))
    if len(info.classes) != num_classes:
        raise PollenError(
            f"The model {where} has {num_classes} outputs but its embedded metadata names "
            f"{len(info.classes)} classes. Export it again with pollen export."
        )
    return info


def write_tflite_metadata(path: Path, info: ModelInfo) -> None:
    """Add ``info`` to the TFLite flatbuffer ``path`` as the metadata entry ``pollen``."""
    # TensorFlow's own flatbuffer reader and writer for the TFLite schema: no extra package.
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(info.to_json().encode(), dtype=np.uint8)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers)
    model.buffers.append(buffer)
    model.metadata = [m for m in model.metadata or [] if m.name != METADATA_KEY.encode()]
    model.metadata.append(entry)
    flatbuffer_utils.write_model(model, str(path))


def read_tflite_metadata(data: bytes) -> ModelInfo | None:
    """The :class:`ModelInfo` in a TFLite flatbuffer's bytes; None without one."""
    try:  # LiteRT's copy of the schema reads it without loading TensorFlow (seconds)
        from ai_edge_litert.schema_py_generated import Model
    except ImportError:
        from tensorflow.lite.python.schema_py_generated import Model

    root = Model.GetRootAs(data, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() == METADATA_KEY.encode():
            blob = root.Buffers(entry.Buffer()).DataAsNumpy()
            return ModelInfo.from_json(bytes(blob)) if isinstance(blob, np.ndarray) else None
    return None


def write_onnx_metadata(path: Path, info: ModelInfo) -> None:
    """Add ``info`` to the ONNX model ``path`` as the ``metadata_props`` entry ``pollen``."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=info.to_json())
    onnx.save(model, str(path))
