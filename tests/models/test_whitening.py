"""Tests for pollen.models.whitening and the clients that whiten (and freeze) the first conv."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.models.registry import MODELS, build_model
from pollen.models.whitening import whiten_first_conv, whitening_kernel

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


def _smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Images with strongly correlated neighbouring pixels, like photographs."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 8, 8, 3))
    noise = 0.1 * rng.normal(size=(n, 32, 32, 3))
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + noise


def test_whitening_kernel_gives_uncorrelated_unit_variance_components() -> None:
    images = _smooth_images(40)
    kernel = whitening_kernel(images, 3, 8, eps=0.0)
    assert kernel.shape == (3, 3, 3, 8) and kernel.dtype == np.float32
    patches = np.lib.stride_tricks.sliding_window_view(images, (3, 3), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 27)
    out = (patches - patches.mean(axis=0)) @ kernel.reshape(27, 8).astype(np.float64)
    np.testing.assert_allclose(np.cov(out[:, :4], rowvar=False, bias=True), np.eye(4), atol=1e-3)
    np.testing.assert_allclose(out[:, 4:], -out[:, :4], atol=1e-4)  # the negated half
    # The top components: no other unit direction of the patches has more variance.
    centred = patches - patches.mean(axis=0)
    top = np.linalg.norm(kernel.reshape(27, 8)[:, 0].astype(np.float64)) ** -2
    largest = np.linalg.eigvalsh(centred.T @ centred / len(centred))[-1]
    assert top == pytest.approx(largest, rel=1e-3)


def test_whitening_kernel_rejects_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="cannot whiten"):
        whitening_kernel(_smooth_images(2), 3, 7)
    with pytest.raises(ValueError, match="cannot whiten"):
        whitening_kernel(_smooth_images(2), 1, 8)  # 1x1x3 patches have 3 components, not 4


def test_whiten_first_conv_sets_fastnets_stem_from_the_scaled_images() -> None:
    model = build_model("fastnet", num_classes=10, seed=0)
    images = RNG_IMAGES.astype(np.uint8)
    assert whiten_first_conv(model, MODELS["fastnet"].whiten, images[:0]) == 0
    before = model.get_layer("stem_conv").get_weights()[0]
    assert whiten_first_conv(model, MODELS["fastnet"].whiten, images, max_images=5) == 5
    after = model.get_layer("stem_conv").get_weights()[0]
    assert after.shape == before.shape and not np.allclose(after, before)
    pick = np.sort(np.random.default_rng(0).choice(len(images), 5, replace=False))
    expected = whitening_kernel(images[pick].astype(np.float32) / 127.5 - 1.0, 3, 24)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
    mobilenet = build_model("mobilenetv2", num_classes=10, seed=0)
    assert whiten_first_conv(mobilenet, MODELS["mobilenetv2"].whiten, images) == len(images)


def test_the_client_giving_initial_weights_whitens_fastnets_stem_except_under_dp(
    tiny_data, flower_task
) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    def initial_reply(**overrides):
        cfg = RunConfig(model="fastnet", data_dir=str(tiny_data), **overrides)
        msg = Message(RecordDict({"config": ConfigRecord({"request": "initial-arrays"})}),
                      dst_node_id=7, message_type=MessageType.QUERY)  # fmt: skip
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                          node_config={"partition-id": 0, "num-partitions": 2})  # fmt: skip
        reply = client_app.query(msg, context)
        return reply.content["client"], reply.content["arrays"].to_numpy_ndarrays()

    info, _ = initial_reply(dp=True)  # the server must not see statistics of the data
    assert "whitened-images" not in info
    info, _ = initial_reply(whiten=False)  # --no-whiten
    assert "whitened-images" not in info
    info, arrays = initial_reply()
    assert info["whitened-images"] > 0
    data = client_app.load_client_data(
        client_app.client_data_spec(
            RunConfig(model="fastnet", data_dir=str(tiny_data)),
            {"partition-id": 0, "num-partitions": 2},
        )  # fmt: skip
    )
    model = build_model("fastnet", num_classes=10, seed=0)
    whiten_first_conv(model, "stem_conv", data.x_train, seed=RunConfig().seed)
    stem = model.get_layer("stem_conv").get_weights()[0]
    assert any(a.shape == stem.shape and np.allclose(a, stem, atol=1e-5) for a in arrays)


def test_clients_keep_fastnets_whitened_stem_frozen_and_train_it_when_not_whitened(
    tiny_data, flower_task
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    model = build_model("fastnet", num_classes=10, seed=0)
    stem = [w.path for w in model.weights].index(model.get_layer("stem_conv").kernel.path)
    global_weights = model.get_weights()

    def trained(**overrides) -> list[np.ndarray]:
        # One step on the tiny partition: a constant rate (one-cycle would start at 0).
        cfg = RunConfig(model="fastnet", data_dir=str(tiny_data), lr_schedule="constant",
                        **overrides)  # fmt: skip
        content = RecordDict({"arrays": ArrayRecord(global_weights),
                              "config": ConfigRecord({"server-round": 1})})  # fmt: skip
        msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                          node_config={"partition-id": 0, "num-partitions": 2})  # fmt: skip
        return client_app.train(msg, context).content["arrays"].to_numpy_ndarrays()

    frozen = trained()
    np.testing.assert_array_equal(frozen[stem], global_weights[stem])
    others = [i for i in range(len(frozen)) if i != stem]
    assert any(not np.allclose(frozen[i], global_weights[i]) for i in others)  # the rest trains
    trainable = trained(whiten=False)  # a random first layer must train
    assert not np.allclose(trainable[stem], global_weights[stem])
