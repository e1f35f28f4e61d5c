"""DP-SGD (``--dp example``): per-example clipping, noise, sampling, accountant, refusals."""

from __future__ import annotations

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_accounting import rdp

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.strategies import check_config
from pollen.training.accountant import (
    MAX_NOISE_MULTIPLIER,
    epsilon_spent,
    example_noise,
    noise_for_budget,
    sample_rate,
    steps_per_round,
)
from pollen.training.dp_sgd import (
    DPSGD,
    DPSettings,
    _per_example_fn,
    add_noise,
    linear_softmax_layer,
    poisson_batches,
    train_private,
)


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 6)).astype(np.float32) * 3.0
    x[np.arange(n), y] += 4.0  # learnable: the label's coordinate is large
    return x, y.astype(np.int64)


def _own_gradient(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """One example's gradient, computed alone (no vectorisation)."""
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y[None], model(x[None]))[0]
    return [np.asarray(g) for g in tape.gradient(loss, model.trainable_variables)]


def test_per_example_gradients_are_clipped_to_the_bound_one_by_one() -> None:
    model = _model()
    x, y = _data(40)
    clip = 0.05
    sgd = DPSGD(model)
    summed, norms, _, _ = sgd.gradient(x, y, clip)
    own = [_own_gradient(model, x[i], y[i]) for i in range(len(x))]
    own_norms = np.array([np.sqrt(sum(float(np.sum(g**2)) for g in gs)) for gs in own])
    np.testing.assert_allclose(norms, own_norms, rtol=1e-4)
    assert (own_norms > clip).all()  # every example needs clipping here
    expected = [
        sum(gs[k] * min(1.0, clip / n) for gs, n in zip(own, own_norms, strict=True))
        for k in range(4)
    ]
    for got, want in zip(summed, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    for i in range(len(x)):  # measured: each example alone contributes at most the bound
        single, _, _, _ = sgd.gradient(x[i : i + 1], y[i : i + 1], clip)
        norm = np.sqrt(sum(float(np.sum(g**2)) for g in single))
        assert norm <= clip * (1 + 1e-5)


def test_small_gradients_are_left_alone() -> None:
    model = _model()
    x, y = _data(5)
    summed, norms, _, _ = DPSGD(model).gradient(x, y, 1e6)
    own = [_own_gradient(model, x[i], y[i]) for i in range(len(x))]
    for k, got in enumerate(summed):
        np.testing.assert_allclose(got, sum(gs[k] for gs in own), rtol=1e-4, atol=1e-7)
    assert (norms < 1e6).all()


def _linear(seed: int = 0, features: int = 6) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))


def test_linear_softmax_closed_form_equals_per_example_gradients() -> None:
    model = _linear()
    model.layers[-1].set_weights(
        [np.random.default_rng(2).normal(0, 0.3, (6, 3)), np.array([0.1, -0.2, 0.05])]
    )
    x, y = _data(30)
    sgd = DPSGD(model)
    assert sgd.dense is model.layers[-1]  # the closed form is used
    clip = 0.5
    summed, norms, loss, correct = sgd.gradient(x, y, clip)
    own = [_own_gradient(model, x[i], y[i]) for i in range(len(x))]
    own_norms = np.array([np.sqrt(sum(float(np.sum(g**2)) for g in gs)) for gs in own])
    np.testing.assert_allclose(norms, own_norms, rtol=1e-4)
    assert (own_norms > clip).sum() > 5 and (own_norms < clip).sum() > 0  # both cases occur
    for k in range(2):
        want = sum(gs[k] * min(1.0, clip / n) for gs, n in zip(own, own_norms, strict=True))
        np.testing.assert_allclose(summed[k], want, rtol=1e-4, atol=1e-6)
    # and the general (vectorised) path gives the same sums, loss and accuracy
    general = _per_example_fn(model)(
        x[:, None].astype(np.float32), y, np.ones(len(x), np.float32), np.float32(clip)
    )
    for got, want in zip(summed, general[0], strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(float(general[2]), rel=1e-4)
    assert correct == float(general[3])


def _mean_gradient(model: keras.Model, views: list[np.ndarray], y: np.ndarray) -> list[np.ndarray]:
    """One example's gradient averaged over its views, computed view by view."""
    grads = [_own_gradient(model, v, y) for v in views]
    return [np.mean([g[k] for g in grads], axis=0) for k in range(len(grads[0]))]


@pytest.mark.parametrize("build", [_linear, _model], ids=["closed form", "general"])
def test_with_two_views_each_example_adds_its_clipped_mean_gradient(build) -> None:
    """Augmentation multiplicity: the mean over an example's views is clipped as one
    gradient, so one example still moves the sum by at most the bound (measured)."""
    model = build()
    if build is _linear:
        model.layers[-1].set_weights(
            [np.random.default_rng(2).normal(0, 0.3, (6, 3)), np.array([0.1, -0.2, 0.05])]
        )
    x, y = _data(24)
    other = x[:, ::-1].copy()  # a second view of each example (here: reversed features)
    sgd = DPSGD(model)
    assert (sgd.dense is not None) == (build is _linear)
    own = [_mean_gradient(model, [x[i], other[i]], y[i]) for i in range(len(x))]
    own_norms = np.array([np.sqrt(sum(float(np.sum(g**2)) for g in gs)) for gs in own])
    clip = float(np.median(own_norms))
    summed, norms, loss, correct = sgd.gradient([x, other], y, clip)
    np.testing.assert_allclose(norms, own_norms, rtol=1e-4)
    assert (own_norms > clip).sum() > 3 and (own_norms < clip).sum() > 0  # both cases occur
    for k, got in enumerate(summed):
        want = sum(gs[k] * min(1.0, clip / n) for gs, n in zip(own, own_norms, strict=True))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    for i in range(len(x)):  # each example alone: at most the bound, whatever its views
        single, _, _, _ = sgd.gradient([x[i : i + 1], other[i : i + 1]], y[i : i + 1], clip)
        assert np.sqrt(sum(float(np.sum(g**2)) for g in single)) <= clip * (1 + 1e-5)
    # one view twice is that view alone
    for got, want in zip(
        sgd.gradient([x, x], y, clip)[0], sgd.gradient(x, y, clip)[0], strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    probs = (model.predict(x, verbose=0) + model.predict(other, verbose=0)) / 2
    assert correct == float(np.sum(probs.argmax(axis=1) == y))  # the views' mean prediction
    assert loss > 0


def test_mirror_views_train_and_keep_the_accounting() -> None:
    """``mirror``: the image and its mirror image are views of one example; the privacy
    spent is that of the same steps without them."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 64).astype(np.int64)
    inputs = keras.Input((4, 4, 3))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(flat))
    base = dict(clip=1.0, noise_multiplier=1.0, batch_size=16, steps=4, learning_rate=0.1, seed=1)
    plain = train_private(model, x, y, DPSettings(**base), steps_before=0, delta=1e-5)
    mirrored = train_private(
        model, x, y, DPSettings(**base, mirror=True), steps_before=0, delta=1e-5
    )
    assert mirrored.epsilon == plain.epsilon and mirrored.steps == plain.steps


def test_only_a_single_softmax_dense_layer_takes_the_closed_form() -> None:
    assert linear_softmax_layer(_model()) is None  # two layers
    inputs = keras.Input((4,))
    relu = keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs))
    assert linear_softmax_layer(relu) is None
    no_bias = keras.Model(inputs, keras.layers.Dense(3, "softmax", use_bias=False)(inputs))
    assert linear_softmax_layer(no_bias) is None


def test_noise_and_batches_are_unseeded_unless_a_test_asks() -> None:
    x, y = _data(200, 3)
    settings = DPSettings(clip=1.0, noise_multiplier=1.0, batch_size=50, steps=3, learning_rate=0.1)
    assert settings.seed is None  # what clients use: the OS's entropy
    weights = []
    for _ in range(2):
        model = _linear(4)
        train_private(model, x, y, settings, steps_before=0, delta=1e-5)
        weights.append(model.get_weights()[0])
    assert not np.allclose(weights[0], weights[1])  # nobody can regenerate the noise
    seeded = DPSettings(**{**settings.__dict__, "seed": 7})
    again = []
    for _ in range(2):
        model = _linear(4)
        train_private(model, x, y, seeded, steps_before=0, delta=1e-5)
        again.append(model.get_weights()[0])
    np.testing.assert_array_equal(again[0], again[1])


def test_noise_has_the_configured_standard_deviation() -> None:
    rng = np.random.default_rng(0)
    zeros = [np.zeros((300, 300), np.float32), np.zeros(10_000, np.float32)]
    noisy = add_noise(zeros, clip=0.5, noise_multiplier=3.0, rng=rng)
    values = np.concatenate([a.ravel() for a in noisy])
    assert abs(values.std() - 1.5) < 0.02
    assert abs(values.mean()) < 0.02


def test_poisson_batches_sample_each_example_with_probability_q() -> None:
    batches = poisson_batches(1000, 0.1, 400, np.random.default_rng(0))
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 100) < 2
    assert sizes.std() > 5  # sizes vary (binomial), not a fixed batch
    counts = np.bincount(np.concatenate(batches), minlength=1000)
    assert abs(counts.mean() / 400 - 0.1) < 0.005


@pytest.mark.parametrize(
    ("z", "q", "steps", "delta"), [(1.1, 0.01, 10_000, 1e-5), (3.0, 0.2, 50, 1e-5)]
)
def test_accountant_figure_equals_the_library(z: float, q: float, steps: int, delta: float) -> None:
    accountant = rdp.RdpAccountant()  # the library's own, the step composed `steps` times
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(step, steps)
    assert epsilon_spent(z, q, steps, delta) == pytest.approx(accountant.get_epsilon(delta), 1e-9)


def test_noise_for_budget_is_the_smallest_within_budget() -> None:
    q, steps, delta = 0.1, 200, 1e-5
    for epsilon in (1.0, 3.0, 8.0):
        z = noise_for_budget(epsilon, delta, q, steps)
        assert epsilon_spent(z, q, steps, delta) <= epsilon
        assert epsilon_spent(z - 1e-3, q, steps, delta) > epsilon * 0.999


def test_refusals() -> None:
    with pytest.raises(PollenError, match="--dp-epsilon"):
        noise_for_budget(1e-9, 1e-5, 1.0, 10**6)  # impossible even at the largest noise
    with pytest.raises(PollenError, match="needs a noise level"):
        example_noise(0.0, 0.0, 1e-5, 1000, 100, 50)
    with pytest.raises(PollenError, match="more than --dp-epsilon"):
        example_noise(1.0, 0.5, 1e-5, 1000, 100, 50)
    assert example_noise(1.0, 0.0, 1e-5, 1000, 100, 50) > 0.5
    assert epsilon_spent(MAX_NOISE_MULTIPLIER, 0.1, 10, 1e-5) < 0.01
    with pytest.raises(PollenError, match="needs a noise level"):
        check_config(RunConfig(dp="example"))
    with pytest.raises(PollenError, match="dp must be"):
        RunConfig.from_mapping({"dp": "examples"})


def test_dp_values_old_and_new() -> None:
    assert RunConfig.from_mapping({"dp": True}).dp == "client"
    assert RunConfig.from_mapping({"dp": "false"}).dp == ""
    assert RunConfig.from_mapping({"dp": "example"}).dp == "example"
    check_config(RunConfig(dp="example", dp_epsilon=3.0))


def test_train_private_learns_and_reports_the_accountant() -> None:
    model = _model(1)
    x, y = _data(600, 1)
    before = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    steps = steps_per_round(len(x), 100, 3)
    settings = DPSettings(
        clip=1.0, noise_multiplier=0.8, batch_size=100, steps=steps, learning_rate=0.5, seed=1
    )
    fit = train_private(model, x, y, settings, steps_before=steps, delta=1e-5)
    after = float(np.mean(np.argmax(model.predict(x, verbose=0), 1) == y))
    assert after > max(before, 0.6)
    q = sample_rate(len(x), 100)
    assert fit.sample_rate == q
    assert fit.steps == 2 * steps
    assert fit.epsilon == epsilon_spent(0.8, q, 2 * steps, 1e-5)


def test_clients_train_with_unseeded_noise(monkeypatch) -> None:
    from types import SimpleNamespace

    import pollen.training.dp_sgd as dp_sgd
    from pollen.client.app import train_example_dp

    seen = []
    monkeypatch.setattr(dp_sgd, "train_private", lambda *a, **k: seen.append(a[3]))
    cfg = RunConfig(dp="example", dp_epsilon=3.0, seed=5, num_rounds=2, batch_size=10)
    data = SimpleNamespace(x_train=np.zeros((100, 6)), y_train=np.zeros(100, np.int64))
    train_example_dp(cfg, _linear(), data, server_round=1, lr=0.1)
    assert seen[0].seed is None  # never derived from the run's seed, which the server knows
