"""DP-SGD on one client (``--dp example``): Poisson batches, per-example clipping, Gaussian noise.

Abadi et al. (2016): each step draws a batch by Poisson sampling (every local
example joins with probability ``q``, :func:`poisson_batches`), computes one
gradient per example, clips each to L2 norm ``C`` (all the model's trainable
arrays together, :func:`clip_and_sum`), sums them, adds Gaussian noise of
standard deviation ``z * C`` to every coordinate (:func:`add_noise`) and divides
by the *expected* batch size ``q * N`` (a fixed denominator, so the batch's
actual size is not released). The optimizer (SGD with momentum) then applies
that noisy mean gradient. :mod:`pollen.training.accountant` turns ``(q, z,
steps)`` into ``(epsilon, delta)``.

Per-example gradients:

- of a linear softmax classifier (one ``Dense`` layer with a softmax on flat
  inputs, what ``scatternet`` trains on its fixed features) in closed form
  (:func:`linear_gradient`): example ``i``'s gradient is ``x_i (p_i - e_y)^T``
  (kernel) and ``p_i - e_y`` (bias), so its norm is ``|x_i| |p_i - e_y|``
  (bias included) and the clipped sum is one matrix product. Nothing is
  approximated; it is what the general path computes (``tests/training``), a
  hundred times faster, and it runs on any Keras backend (NumPy);
- of any other model, from the framework's vectorising map over a
  single-example gradient (``tf.vectorized_map`` on the TensorFlow backend,
  Keras's default; see docs/privacy-example.md for the measurement), in
  micro-batches of fixed size so one traced function serves every Poisson
  batch whatever its size (padding examples carry weight 0).

A model with a fixed prefix (:mod:`pollen.training.features`, e.g. ScatterNet)
trains only the layers after it, on features computed once.

Augmentation multiplicity (De et al. 2022, "Unlocking high-accuracy differentially
private image classification through scale"): with ``DPSettings.mirror`` an
example's gradient is the *mean* of its gradients on the image and on its mirror
image, clipped as one. Each sampled example still adds one gradient of norm at
most ``C``, so the sensitivity, and the accounting, are unchanged; the mirror
image is not a second example.

The batches and the noise are drawn from the operating system's entropy, never
from the run's seed: anyone who knows the seed (the server sends it) could
otherwise regenerate the noise and subtract it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from pollen.errors import PollenError
from pollen.training.accountant import SAMPLING, epsilon_spent, sample_rate
from pollen.training.features import cached_features, split_fixed

#: Examples per vectorised per-example-gradient call (memory: this many gradient copies).
MICROBATCH = 128


def poisson_batches(n: int, q: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches of indices into ``range(n)``; each index joins each batch with prob. ``q``.

    The batch sizes vary (binomial(n, q)); some may be empty. This is the
    sampling the accountant's ``PoissonSampledDpEvent`` assumes.
    """
    return [np.flatnonzero(rng.random(n) < q) for _ in range(steps)]


def clip_and_sum(per_example: list, clip: float, weights):
    """Sum of per-example gradients, each first scaled to L2 norm at most ``clip``.

    Args:
        per_example: One tensor per trainable array, each ``(B, *shape)``.
        clip: The clipping norm C (all arrays of one example together).
        weights: ``(B,)`` 1 for a real example, 0 for padding.

    Returns:
        ``(summed, norms)``: one ``shape`` tensor per array, and the ``(B,)``
        norms before clipping.
    """
    from keras import ops

    squares = [
        ops.sum(ops.reshape(ops.square(g), (ops.shape(g)[0], -1)), axis=1) for g in per_example
    ]
    norms = ops.sqrt(ops.sum(ops.stack(squares, axis=1), axis=1))
    scale = ops.minimum(1.0, clip / (norms + 1e-12)) * weights
    summed = [
        ops.sum(g * ops.reshape(scale, (-1,) + (1,) * (len(g.shape) - 1)), axis=0)
        for g in per_example
    ]
    return summed, norms


def add_noise(
    summed: list[np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``summed`` plus independent Gaussian noise of std ``noise_multiplier * clip`` each."""
    std = noise_multiplier * clip
    return [
        np.asarray(s, np.float32) + rng.normal(0.0, std, np.shape(s)).astype(np.float32)
        for s in summed
    ]


def linear_softmax_layer(model: keras.Model) -> keras.layers.Dense | None:
    """The model's only layer if it is a ``Dense`` softmax classifier on flat inputs, else None."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(layers) != 1 or not isinstance(layers[0], keras.layers.Dense):
        return None
    dense = layers[0]
    if len(model.inputs[0].shape) != 2 or not dense.use_bias:
        return None
    if dense.activation is not keras.activations.softmax:
        return None
    return dense


def views_of(x: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """``x`` as a tuple of views of the same examples (one array: a single view)."""
    return (x,) if isinstance(x, np.ndarray) else tuple(x)


def linear_gradient(
    kernel: np.ndarray,
    bias: np.ndarray,
    x: np.ndarray | Sequence[np.ndarray],
    y: np.ndarray,
    clip: float,
) -> tuple[list[np.ndarray], np.ndarray, float, float]:
    """Clipped per-example gradient sum of softmax cross-entropy of ``x @ kernel + bias``.

    With several views of each example (``x`` a sequence of ``V`` arrays), an
    example's gradient is the mean over its views, ``(1/V) sum_v x_v g_v^T``,
    whose squared norm is ``(1/V^2) sum_{v,w} (x_v.x_w + 1)(g_v.g_w)`` (bias
    included); its loss is the mean of the views' and its prediction the arg-max
    of their mean probabilities.

    Returns:
        ``([kernel sum, bias sum], norms before clipping, loss sum, correct)``,
        as :meth:`DPSGD.gradient`.
    """
    xs = [np.asarray(v, np.float32).reshape(len(v), -1) for v in views_of(x)]
    rows = np.arange(len(y))
    gs, mean_probs, loss = [], 0.0, 0.0
    for xv in xs:
        logits = xv @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        loss += float(-np.log(np.clip(probs[rows, y], 1e-7, 1.0)).sum()) / len(xs)
        mean_probs = mean_probs + probs / len(xs)
        g = probs.copy()
        g[rows, y] -= 1.0  # d loss_i / d logits_i, for this view
        gs.append(g)
    squares = np.zeros(len(y), np.float64)
    for v, (xv, gv) in enumerate(zip(xs, gs, strict=True)):
        for xw, gw in zip(xs[v:], gs[v:], strict=True):
            term = (np.einsum("ij,ij->i", xv, xw) + 1.0) * np.einsum("ij,ij->i", gv, gw)
            squares += term if xw is xv else 2.0 * term
    norms = np.sqrt(np.maximum(squares, 0.0)) / len(xs)
    scale = (np.minimum(1.0, clip / (norms + 1e-12)) / len(xs))[:, None].astype(np.float32)
    kernel_sum = sum(xv.T @ (gv * scale) for xv, gv in zip(xs, gs, strict=True))
    bias_sum = sum((gv * scale).sum(axis=0) for gv in gs)
    correct = float(np.sum(np.asarray(mean_probs).argmax(axis=1) == y))
    return [kernel_sum, bias_sum], norms, loss, correct


def _per_example_fn(model: keras.Model):
    """A traced ``(x, y, weights) -> (clipped grad sum, norms, loss sum, correct)``.

    ``x`` is ``(B, V, ...)``: ``V`` views of each of ``B`` examples; an example's
    gradient and loss are the means over its views.
    """
    import tensorflow as tf

    variables = model.trainable_variables

    def one(args):
        x, y = args  # x: (V, ...) the views of one example
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            labels = tf.fill([tf.shape(x)[0]], y)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probs))
        grads = tape.gradient(loss, variables)
        mean = tf.reduce_mean(probs, axis=0)
        correct = tf.cast(tf.equal(tf.argmax(mean, output_type=tf.int64), y), tf.float32)
        return grads, loss, correct

    @tf.function(reduce_retracing=True)
    def run(x, y, weights, clip):
        grads, losses, correct = tf.vectorized_map(one, (x, y))
        summed, norms = clip_and_sum(grads, clip, weights)
        return summed, norms, tf.reduce_sum(losses * weights), tf.reduce_sum(correct * weights)

    return run


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD settings for a round.

    Attributes:
        clip: Per-example L2 clipping norm C.
        noise_multiplier: z: the noise std is ``z * C``.
        batch_size: Expected batch size ``q * N`` (the sample rate follows from it).
        steps: DP-SGD steps this round.
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        mirror: Augmentation multiplicity with the mirror image: each example's
            gradient is the mean of its gradients on the image and on the image
            flipped left to right, clipped as one (the accounting is unchanged).
            For models whose classes look the same mirrored (``flip_tta``).
        seed: Seed of the sampling and noise, for tests only: ``None`` (what
            clients use) draws them from the operating system's entropy.
    """

    clip: float
    noise_multiplier: float
    batch_size: int
    steps: int
    learning_rate: float
    momentum: float = 0.9
    mirror: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class PrivateFit:
    """What a round of DP-SGD produced (the FitResult fields plus the privacy spent so far)."""

    loss: float
    accuracy: float
    num_examples: int
    seconds: float
    epsilon: float
    delta: float
    sample_rate: float
    noise_multiplier: float
    steps: int


class DPSGD:
    """DP-SGD for a Keras model with softmax outputs and integer labels (TensorFlow backend).

    Args:
        model: The model to train in place (its trainable weights).
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.velocity = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
        self.dense = linear_softmax_layer(model)
        if self.dense is not None:  # closed form, any backend
            return
        if keras.backend.backend() != "tensorflow":
            raise PollenError(
                f"--dp example runs DP-SGD on Keras's TensorFlow backend only (its per-example "
                f"gradients use tf.vectorized_map); this process uses "
                f"{keras.backend.backend()!r}. Unset KERAS_BACKEND (or set it to tensorflow) "
                "on the clients, or use client-level DP (--dp client)."
            )
        self.run = _per_example_fn(model)

    def gradient(
        self, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray, clip: float
    ) -> tuple[list[np.ndarray], np.ndarray, float, float]:
        """Sum of clipped per-example gradients of a batch, unclipped norms, loss sum, correct.

        ``x`` is one array, or a sequence of views of the same examples (each
        example's gradient is then the mean over its views, clipped as one).
        """
        if self.dense is not None:
            kernel, bias = (np.asarray(w, np.float32) for w in self.dense.get_weights())
            return linear_gradient(kernel, bias, x, np.asarray(y, np.int64), clip)
        views = views_of(x)
        total = None
        norms, loss, correct = [], 0.0, 0.0
        for start in range(0, len(y), MICROBATCH):
            xb = np.stack([v[start : start + MICROBATCH] for v in views], axis=1)
            yb = y[start : start + MICROBATCH]
            pad = MICROBATCH - len(xb)
            weights = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            summed, n, lsum, csum = self.run(
                xb.astype(np.float32), yb.astype(np.int64), weights, np.float32(clip)
            )
            summed = [np.asarray(s) for s in summed]
            total = summed if total is None else [a + b for a, b in zip(total, summed, strict=True)]
            norms.append(np.asarray(n)[: MICROBATCH - pad])
            loss, correct = loss + float(lsum), correct + float(csum)
        if total is None:  # an empty Poisson batch: only noise is released
            total = [np.zeros(v.shape, np.float32) for v in self.model.trainable_variables]
        return total, np.concatenate(norms) if norms else np.zeros(0), loss, correct

    def train(
        self, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray, settings: DPSettings
    ) -> tuple[float, float, int]:
        """Run ``settings.steps`` DP-SGD steps; return mean loss, accuracy, examples seen.

        ``x``: the examples, or a sequence of views of them (see :meth:`gradient`).
        """
        views = views_of(x)
        rng = np.random.default_rng(settings.seed)
        q = sample_rate(len(y), settings.batch_size)
        expected = q * len(y)
        loss = correct = 0.0
        seen = 0
        variables = self.model.trainable_variables
        for batch in poisson_batches(len(y), q, settings.steps, rng):
            summed, _, lsum, csum = self.gradient(
                [v[batch] for v in views], y[batch], settings.clip
            )
            noisy = add_noise(summed, settings.clip, settings.noise_multiplier, rng)
            for i, (v, g) in enumerate(zip(variables, noisy, strict=True)):
                self.velocity[i] = settings.momentum * self.velocity[i] + g / expected
                v.assign(np.asarray(v.numpy()) - settings.learning_rate * self.velocity[i])
            loss, correct, seen = loss + lsum, correct + csum, seen + len(batch)
        return loss / max(seen, 1), correct / max(seen, 1), seen


def trainable_part(
    model: keras.Model, x: np.ndarray, *, mirror: bool = False
) -> tuple[keras.Model, tuple[np.ndarray, ...]]:
    """The model DP-SGD trains and its inputs' views: the head on cached fixed features, else all.

    Args:
        model: The whole model.
        x: Images ``(N, H, W, C)``.
        mirror: Add the mirror images (flipped left to right) as a second view.

    Returns:
        ``(trained model, views)``: one array per view, ``N`` rows each.
    """
    images = (x, x[:, :, ::-1]) if mirror else (x,)
    split = split_fixed(model)
    if split is None:
        return model, images
    transform, head = split
    return head, tuple(cached_features(transform, np.ascontiguousarray(v)) for v in images)


def train_private(  # parameters: the round's place in the run is part of the accounting
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    settings: DPSettings,
    *,
    steps_before: int,
    delta: float,
) -> PrivateFit:
    """One round of DP-SGD on local data; the privacy spent includes the earlier rounds.

    Args:
        model: The (global) model, trained in place.
        x: ``uint8`` images ``(N, H, W, C)``.
        y: ``int64`` labels ``(N,)``.
        settings: This round's DP-SGD settings.
        steps_before: DP-SGD steps this client ran in earlier rounds of the run.
        delta: The delta of the reported (epsilon, delta).
    """
    start = time.perf_counter()
    trained, inputs = trainable_part(model, x, mirror=settings.mirror)
    sgd = getattr(trained, "_pollen_dpsgd", None)
    if sgd is None:
        sgd = DPSGD(trained)
        trained._pollen_dpsgd = sgd
    sgd.velocity = [np.zeros_like(v) for v in sgd.velocity]  # new global weights: fresh momentum
    loss, accuracy, _ = sgd.train(inputs, y, settings)
    q = sample_rate(len(x), settings.batch_size)
    total = steps_before + settings.steps
    return PrivateFit(
        loss=loss,
        accuracy=accuracy,
        num_examples=len(x),
        seconds=time.perf_counter() - start,
        epsilon=epsilon_spent(settings.noise_multiplier, q, total, delta),
        delta=delta,
        sample_rate=q,
        noise_multiplier=settings.noise_multiplier,
        steps=total,
    )


__all__ = [
    "SAMPLING",
    "DPSGD",
    "DPSettings",
    "PrivateFit",
    "train_private",
    "poisson_batches",
    "views_of",
]
