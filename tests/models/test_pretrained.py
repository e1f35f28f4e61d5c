"""Tests for pollen.models.pretrained: ImageNet weights and local weight files.

Every file is written by the tests themselves at 32x32 (tiny builds); the
network is never used (the download is monkeypatched, the cache is a temp dir).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from pollen.errors import PollenError
from pollen.models import pretrained
from pollen.models.efficientnet import IMAGENET_MEAN
from pollen.models.mobilenetv2 import mobilenetv2_imagenet_file
from pollen.models.pretrained import check_weights_source, load_pretrained
from pollen.models.registry import MODELS, build_model, find_layer


def _perturbed(model: keras.Model, seed: int) -> keras.Model:
    """``model`` with every float weight moved, so a load is visible (in place)."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [w + rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    return model


def _backbone_equal(a: keras.Model, b: keras.Model, head: str = "predictions") -> bool:
    """Whether every same-named weighted layer but ``head`` holds the same arrays."""
    layers_b = {layer.name: layer for layer in pretrained._leaves(b)}
    compared = 0
    for layer in pretrained._leaves(a):
        if layer.name == head or layer.name not in layers_b:
            continue
        compared += 1
        for x, y in zip(layer.get_weights(), layers_b[layer.name].get_weights(), strict=True):
            if not np.array_equal(x, y):
                return False
    return compared > 10


@pytest.fixture(scope="module")
def trained5() -> keras.Model:
    """A 5-class mobilenetv2 at 32x32 whose weights differ from any fresh build."""
    return _perturbed(build_model("mobilenetv2", num_classes=5, seed=1), seed=7)


def test_keras_file_same_classes_loads_everything(tmp_path, trained5) -> None:
    path = tmp_path / "model.keras"
    trained5.save(path)
    model = build_model("mobilenetv2", num_classes=5, seed=2)
    what = load_pretrained(model, "mobilenetv2", str(path))
    assert "freshly initialised" not in what
    for x, y in zip(model.get_weights(), trained5.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_keras_file_other_classes_loads_backbone_fresh_head(tmp_path, trained5) -> None:
    path = tmp_path / "model.keras"
    trained5.save(path)
    model = build_model("mobilenetv2", num_classes=3, seed=2)
    head_before = [np.array(w) for w in find_layer(model, "predictions").get_weights()]
    what = load_pretrained(model, "mobilenetv2", str(path))
    assert "'predictions' freshly initialised" in what
    assert _backbone_equal(model, trained5)
    for x, y in zip(find_layer(model, "predictions").get_weights(), head_before, strict=True):
        np.testing.assert_array_equal(x, y)  # the 3-class head is the fresh one


@pytest.mark.parametrize("classes", [5, 3])
def test_weights_h5_file_loads_backbone(tmp_path, trained5, classes) -> None:
    path = tmp_path / "model.weights.h5"
    trained5.save_weights(path)
    model = build_model("mobilenetv2", num_classes=classes, seed=2)
    what = load_pretrained(model, "mobilenetv2", str(path))
    assert _backbone_equal(model, trained5)
    assert ("freshly initialised" in what) == (classes != 5)


def _legacy_backbone_file(path: Path, seed: int) -> keras.Model:
    """Write a ``keras.applications`` MobileNetV2 backbone the way ImageNet files are stored."""
    keras.utils.set_random_seed(seed)
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None
    )
    _perturbed(backbone, seed)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return backbone


def test_imagenet_from_the_keras_cache(tmp_path, monkeypatch) -> None:
    """A cached ImageNet file loads without any download; the 10-class head stays fresh."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    name = mobilenetv2_imagenet_file((32, 32, 3))
    assert name == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert mobilenetv2_imagenet_file((96, 96, 3)).endswith("_1.0_96_no_top.h5")
    backbone = _legacy_backbone_file(tmp_path / "models" / name, seed=3)

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file must be used")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    model = build_model("mobilenetv2", num_classes=10, seed=0)
    what = load_pretrained(model, "mobilenetv2", "imagenet")
    assert what.startswith("ImageNet weights of MobileNetV2")
    assert _backbone_equal(model, backbone)


def test_legacy_h5_weights_file_as_path(tmp_path) -> None:
    backbone = _legacy_backbone_file(tmp_path / "backbone.h5", seed=4)
    model = build_model("mobilenetv2", num_classes=4, seed=0)
    load_pretrained(model, "mobilenetv2", str(tmp_path / "backbone.h5"))
    assert _backbone_equal(model, backbone)


def test_imagenet_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    """The server answers but the download fails: the error names the file and the folder."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "_unreachable", lambda url: None)

    def failing_download(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")  # noqa: TRY002

    monkeypatch.setattr(keras.utils, "get_file", failing_download)
    model = build_model("efficientnetb0", num_classes=10, seed=0)
    with pytest.raises(PollenError) as err:
        load_pretrained(model, "efficientnetb0", "imagenet")
    text = str(err.value)
    assert "efficientnetb0_notop.h5" in text
    assert f"{tmp_path / 'models'}/" in text
    assert "Name or service not known" in text


def test_imagenet_unreachable_fails_before_downloading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "_unreachable", lambda url: "no route to host")

    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download when the server does not answer")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    weights = MODELS["mobilenetv2"].imagenet
    with pytest.raises(PollenError, match="no route to host") as err:
        pretrained.imagenet_file(weights, (96, 96, 3))
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in str(err.value)


def test_unreachable_reports_a_refused_connection() -> None:
    """The probe itself: a closed local port is reported, quickly, never hangs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again once the block ends
    assert pretrained._unreachable(f"http://127.0.0.1:{port}/x.h5") is not None


def test_file_of_another_architecture_is_an_error(tmp_path) -> None:
    other = _perturbed(build_model("cnn", num_classes=10, seed=0), seed=1)
    other.save(tmp_path / "cnn.keras")
    other.save_weights(tmp_path / "cnn.weights.h5")
    for name in ("cnn.keras", "cnn.weights.h5"):
        model = build_model("mobilenetv2", num_classes=10, seed=0)
        with pytest.raises(PollenError, match="another architecture|does not fit"):
            load_pretrained(model, "mobilenetv2", str(tmp_path / name))


def test_shape_mismatch_outside_the_head_is_an_error(tmp_path) -> None:
    """Same layer names, another width (a 64x64-built model is fine; alpha is not)."""
    keras.utils.set_random_seed(0)
    narrow = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.5, include_top=False, weights=None
    )
    narrow.save(tmp_path / "narrow.keras")
    model = build_model("mobilenetv2", num_classes=10, seed=0)
    with pytest.raises(PollenError, match="of another shape"):
        load_pretrained(model, "mobilenetv2", str(tmp_path / "narrow.keras"))


def test_input_size_does_not_matter(tmp_path, trained5) -> None:
    """Convolution weights fit any input size: a 32x32 file starts a 64x64 model."""
    trained5.save(tmp_path / "model.keras")
    model = build_model("mobilenetv2", num_classes=5, seed=0, image_size=(64, 64))
    load_pretrained(model, "mobilenetv2", str(tmp_path / "model.keras"))
    assert _backbone_equal(model, trained5)


def test_bad_sources(tmp_path) -> None:
    assert check_weights_source("imagenet") == "imagenet"
    with pytest.raises(PollenError, match="not a Keras weights file"):
        check_weights_source(str(tmp_path / "w.pt"))
    with pytest.raises(PollenError, match="does not exist"):
        check_weights_source(str(tmp_path / "missing.keras"))
    (tmp_path / "junk.keras").write_text("not a zip")
    with pytest.raises(PollenError, match="Cannot load"):
        load_pretrained(build_model("cnn", 10, 0), "cnn", str(tmp_path / "junk.keras"))
    with pytest.raises(PollenError, match="no ImageNet weights"):
        load_pretrained(build_model("cnn", 10, 0), "cnn", "imagenet")


def test_non_finite_file_is_refused(tmp_path) -> None:
    model = build_model("cnn", num_classes=10, seed=0)
    weights = model.get_weights()
    weights[0][...] = np.nan
    model.set_weights(weights)
    model.save(tmp_path / "nan.keras")
    with pytest.raises(PollenError, match="NaN"):
        load_pretrained(build_model("cnn", 10, 1), "cnn", str(tmp_path / "nan.keras"))


def test_efficientnetb0_keeps_its_imagenet_standardisation(tmp_path) -> None:
    """The ImageNet mean/variance of its input layer survive a load of other values."""
    model = build_model("efficientnetb0", num_classes=4, seed=0)
    norm = next(
        layer
        for layer in pretrained._leaves(model)
        if isinstance(layer, keras.layers.Normalization)
    )
    np.testing.assert_allclose(np.ravel(norm.adapt_mean), IMAGENET_MEAN, rtol=1e-6)
    source = {layer.name: [w * 0 + 7 for w in layer.get_weights()] for layer in [norm]}
    source.update(pretrained._layer_weights(model))
    source[norm.name] = [np.full_like(w, 7.0) for w in norm.get_weights()]
    pretrained.copy_by_name(source, model, "predictions", "test", keep=("Normalization",))
    np.testing.assert_allclose(np.ravel(norm.adapt_mean), IMAGENET_MEAN, rtol=1e-6)


def test_server_sends_the_loaded_weights(tmp_path, trained5) -> None:
    """The server's round-1 arrays are the file's backbone with a fresh classifier."""
    from pollen.config import RunConfig
    from pollen.server.app import _pretrained_arrays
    from pollen.server.model_files import ModelFiles

    trained5.save(tmp_path / "model.keras")
    cfg = RunConfig(
        model="mobilenetv2", num_classes=3, image_size="32", weights=str(tmp_path / "model.keras")
    )
    arrays = _pretrained_arrays(ModelFiles(cfg)).to_numpy_ndarrays()
    model = build_model("mobilenetv2", num_classes=3, seed=9)
    assert [a.shape for a in arrays] == [tuple(w.shape) for w in model.weights]
    model.set_weights(arrays)
    assert _backbone_equal(model, trained5)
