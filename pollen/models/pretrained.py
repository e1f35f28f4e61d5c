"""Pretrained starting weights for a registry model: ImageNet, or a local Keras file.

:func:`load_pretrained` fills a freshly built registry model with

- ``"imagenet"``: the ``keras.applications`` ImageNet weights of its backbone
  (:class:`pollen.models.registry.ImagenetWeights`), downloaded once with a
  progress bar into the Keras cache (``~/.keras/models``, or ``$KERAS_HOME/models``);
  offline, a clear error names the file and the folder to put it in;
- a path to a ``.keras`` or ``.h5`` full model, or to a ``.h5`` /
  ``.weights.h5`` weights file: every layer is copied by name (a Pollen
  ``model.keras`` of the same registry model, or a ``keras.applications``
  model, match), and the classifier (``ModelSpec.head``) stays freshly
  initialised where the file's has another class count.

Layers are copied by name rather than by position so a file may hold a
different classifier, or no classifier at all. Any other layer missing
from the file or of another shape is an error: silently training from a
partly random backbone would waste the whole run.

Only the server (or ``pollen simulate``) reads these files; clients receive
the resulting arrays as the run's initial weights (docs/security.md).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from pollen.compat.keras import flatten_layers
from pollen.errors import PollenError
from pollen.models.registry import MODELS, ImagenetWeights

if TYPE_CHECKING:  # keras is imported where weights are loaded
    import keras

#: Suffixes of the files ``weights = PATH`` accepts.
WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".h5")
#: Seconds to wait for the download server to answer before calling the machine offline.
CONNECT_TIMEOUT = 5.0


def keras_cache_dir() -> Path:
    """The Keras cache folder: ``$KERAS_HOME``, else ``~/.keras`` (as Keras reads it)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()


def check_weights_source(source: str) -> str:
    """``"imagenet"``, ``""``, or ``source`` as the absolute path of an existing weights file.

    Raises:
        PollenError: Not ``imagenet`` and not an existing ``.keras``/``.h5`` file.
    """
    if source in ("", "imagenet"):
        return source
    path = Path(source).expanduser().resolve()
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise PollenError(
            f"--weights {source}: not a Keras weights file. Give imagenet, or a path to a "
            ".keras or .h5 model, or a .weights.h5 / .h5 weights file."
        )
    if not path.is_file():
        raise PollenError(
            f"--weights {path} does not exist: give imagenet, or the path of a .keras or .h5 "
            "file (for example the model.keras of an earlier run)."
        )
    return str(path)


def load_pretrained(model: keras.Model, model_name: str, source: str) -> str:
    """Load ``source`` (``"imagenet"`` or a file path) into registry model ``model_name``.

    Args:
        model: A freshly built ``model_name`` (any input size); changed in place.
        model_name: Its registry name.
        source: ``"imagenet"`` or the path of a ``.keras``/``.h5``/``.weights.h5`` file.

    Returns:
        One line saying what was loaded (for the server's log).

    Raises:
        PollenError: The model has no ImageNet weights, they cannot be
            downloaded, the file is unreadable or holds another architecture,
            or it holds non-finite values.
    """
    spec = MODELS[model_name]
    if source == "imagenet":
        if spec.imagenet is None:
            with_imagenet = ", ".join(n for n, s in MODELS.items() if s.imagenet is not None)
            raise PollenError(
                f"Model {model_name!r} has no ImageNet weights: use --model {with_imagenet}, "
                "or give --weights a .keras/.h5 file."
            )
        fresh = _load_imagenet(model, spec.imagenet, spec.head)
        what = f"ImageNet weights of {spec.imagenet.application}"
    else:
        fresh = _load_file(model, Path(check_weights_source(source)), spec.head)
        what = f"weights from {source}"
    for v in model.weights:
        if not np.all(np.isfinite(np.asarray(v))):
            raise PollenError(
                f"--weights {source} holds NaN or infinite values ({v.path}): it cannot "
                "start a run. Use another file."
            )
    head = f"; classifier {spec.head!r} freshly initialised ({fresh})" if fresh else ""
    return f"{what}{head}"


# --- ImageNet ----------------------------------------------------------------------------


def imagenet_file(weights: ImagenetWeights, input_shape: tuple[int, int, int]) -> Path:
    """The ImageNet weight file for ``input_shape``, downloaded into the Keras cache if missing.

    The download shows Keras's progress bar. Before it starts, one TCP
    connection with a :data:`CONNECT_TIMEOUT` second timeout checks that the
    download server answers, so an offline machine fails at once instead of
    hanging in ``urlretrieve`` (which has no timeout).

    Raises:
        PollenError: The file is not in the cache and cannot be downloaded;
            the message names the file and the folder to put it in.
    """
    import keras

    name = weights.file_name(input_shape)
    folder = keras_cache_dir() / "models"
    if (folder / name).is_file():
        return folder / name
    origin = weights.url + name
    problem = _unreachable(origin)
    if problem is None:
        try:
            path = keras.utils.get_file(
                name,
                origin,
                cache_dir=str(keras_cache_dir()),
                cache_subdir="models",
                file_hash=weights.file_hash or None,
            )
            return Path(path)
        except Exception as err:  # noqa: BLE001 - Keras raises a bare Exception on failure
            problem = f"{type(err).__name__}: {err}"
    raise PollenError(
        f"Cannot download the ImageNet weights of {weights.application} ({problem}). On a "
        f"machine without internet access, download {origin} elsewhere and put the file "
        f"{name} in {folder}/ (the Keras cache; $KERAS_HOME/models if KERAS_HOME is set), "
        "or give --weights the path of a .keras/.h5 file."
    )


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server cannot be reached within :data:`CONNECT_TIMEOUT`, or None."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as err:
        return f"{parts.hostname} unreachable: {err}"


def _load_imagenet(model: keras.Model, weights: ImagenetWeights, head: str) -> str:
    """Copy ``weights``' backbone into ``model`` by layer name; return the fresh-head note."""
    import keras

    input_shape = tuple(int(d) for d in model.input_shape[1:])
    path = imagenet_file(weights, input_shape)
    build = getattr(keras.applications, weights.application)
    try:
        backbone = build(include_top=False, weights=str(path), input_shape=input_shape)
    except Exception as err:  # noqa: BLE001 - a damaged download: say which file
        raise PollenError(
            f"Cannot read {path} ({type(err).__name__}: {err}). Delete it and run again to "
            "download it anew."
        ) from None
    return copy_by_name(_layer_weights(backbone), model, head, str(path), keep=weights.keep)


# --- local files -------------------------------------------------------------------------


def _load_file(model: keras.Model, path: Path, head: str) -> str:
    """Load a ``.keras``/``.h5`` model or weights file into ``model``; return the head note."""
    if path.name.endswith(".weights.h5"):
        return _load_weights_file(model, path, head)
    if path.suffix == ".h5" and not _is_full_h5_model(path):
        return copy_by_name(_h5_layer_weights(path), model, head, str(path))
    import keras

    try:  # safe_mode: a file cannot run Python code (no Lambda layers)
        source = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file
        raise PollenError(
            f"Cannot load --weights {path} as a Keras model ({type(err).__name__}: {err}). "
            "Give a .keras file written by Keras (e.g. an earlier run's model.keras)."
        ) from None
    return copy_by_name(_layer_weights(source), model, head, str(path))


def _is_full_h5_model(path: Path) -> bool:
    """Whether a legacy ``.h5`` file holds a whole model (else it holds weights only)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    except OSError as err:
        raise PollenError(f"Cannot read --weights {path} as an HDF5 file: {err}.") from None


def _h5_layer_weights(path: Path) -> dict[str, list[np.ndarray]]:
    """Arrays per layer name of a legacy weights-only ``.h5`` (``save_weights`` in TF 2).

    Read with h5py, in the layout Keras's legacy HDF5 format writes (root
    attribute ``layer_names``, per layer ``weight_names``): the format
    ``keras.applications`` weight files use.
    """
    import h5py

    def text(value) -> str:
        return value.decode("utf8") if isinstance(value, bytes) else str(value)

    try:
        with h5py.File(path, "r") as f:
            return {
                text(name): [
                    np.asarray(f[text(name)][text(w)])
                    for w in f[text(name)].attrs.get("weight_names", [])
                ]
                for name in f.attrs["layer_names"]
            }
    except (OSError, KeyError) as err:
        raise PollenError(
            f"Cannot read --weights {path}: not a Keras weights file ({err})."
        ) from None


def _load_weights_file(model: keras.Model, path: Path, head: str) -> str:
    """Load a Keras 3 ``.weights.h5`` (saved from a model of this architecture).

    The format addresses weights by the model's structure, not by layer
    name, so the file must come from the same registry model. Where only the
    classifier's shape differs, the rest loads and the classifier stays fresh.
    """
    import warnings

    before = {layer.name: [np.array(w) for w in layer.get_weights()] for layer in _leaves(model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per skipped layer; we report below
        try:
            model.load_weights(path)
            return ""
        except Exception:  # noqa: BLE001, S110 - shapes differ somewhere: find out where below
            pass
        try:
            model.load_weights(path, skip_mismatch=True)
        except Exception as err:  # noqa: BLE001 - Keras raises many types for a bad file
            raise PollenError(
                f"Cannot load --weights {path} ({type(err).__name__}: {err}). Give a file "
                "saved from the same --model, or a .keras model."
            ) from None
    unloaded = [
        layer.name
        for layer in _leaves(model)
        if before[layer.name]
        and all(
            np.array_equal(a, b)
            for a, b in zip(before[layer.name], layer.get_weights(), strict=True)
        )
    ]
    others = [name for name in unloaded if name != head]
    if others:
        raise PollenError(
            f"--weights {path} does not fit this model: {len(others)} layers did not load "
            f"(e.g. {', '.join(others[:3])}). A .weights.h5 file must come from the same "
            "--model; give a .keras file to change models."
        )
    return "the file's has another shape" if head in unloaded else ""


# --- copying by layer name -----------------------------------------------------------------


def _leaves(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` (nested ones included) that hold weights themselves."""
    import keras

    return [
        layer
        for layer in flatten_layers(model)
        if layer.weights and not isinstance(layer, keras.Model)
    ]


def _layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """Arrays per layer name of every weighted layer of ``model``."""
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in _leaves(model)}


def copy_by_name(
    source: dict[str, list[np.ndarray]],
    model: keras.Model,
    head: str,
    origin: str,
    *,
    keep: tuple[str, ...] = (),
) -> str:
    """Set every weighted layer of ``model`` from the same-named arrays in ``source``.

    Args:
        source: Arrays per layer name (a file's or a backbone's).
        model: Target; changed in place.
        head: Name of ``model``'s classifier: missing from ``source`` or of
            another shape, it keeps its fresh initialisation.
        origin: What ``source`` came from (for messages).
        keep: Class names of layers that keep ``model``'s own values.

    Returns:
        ``""`` when the classifier was loaded too, else why it stayed fresh.

    Raises:
        PollenError: A layer other than the classifier is missing from
            ``source`` or has other shapes there (nothing is changed then).
    """
    plan, missing, mismatched, fresh = [], [], [], ""
    for layer in _leaves(model):
        if type(layer).__name__ in keep:
            continue
        own = [tuple(w.shape) for w in layer.weights]
        theirs = source.get(layer.name)
        got = [tuple(a.shape) for a in theirs] if theirs is not None else None
        if got == own:
            plan.append((layer, theirs))
        elif layer.name == head:
            fresh = "the file has none" if got is None else f"the file's has shapes {got}"
        elif got is None:
            missing.append(layer.name)
        else:
            mismatched.append(f"{layer.name} {got} instead of {own}")
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"{len(missing)} layers missing (e.g. {', '.join(missing[:3])})")
        if mismatched:
            detail.append(f"{len(mismatched)} of another shape (e.g. {mismatched[0]})")
        raise PollenError(
            f"--weights {origin} holds another architecture than {model.name}: "
            f"{'; '.join(detail)}. Give a file saved from the same --model (for example an "
            "earlier run's model.keras), or imagenet."
        )
    if not plan:
        raise PollenError(f"--weights {origin} holds no weights of {model.name}.")
    for layer, arrays in plan:
        layer.set_weights(arrays)
    return fresh
