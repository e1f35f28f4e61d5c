"""Checks of what a client sends, made before anything of it is aggregated or recorded.

A client is a stranger to the server: each reply is checked here, whole,
before the round's aggregation sees any of it, and a reply that fails a
check raises :class:`Invalid`, whose message becomes *that* client's
``rejected: <reason>`` in the history; the round goes on with the others.

What a reply must be (Pollen's own client, :mod:`pollen.client.app`, always is):

- Weights (train replies): the global record's keys, and what
  :func:`pollen.server.aggregation.validate_update` checks (array count,
  shapes, dtypes, finite values, ``--max-update-norm``).
- Example counts: ``num-examples`` is an integer (an ``int``, or a ``float``
  equal to one) from 1 to :data:`MAX_EXAMPLES`; so is
  ``calibration-examples`` with BatchNorm statistics. No client's count then
  weighs more than :data:`WEIGHT_CAP_FACTOR` times the median count of the
  round's valid replies (:func:`capped`, with 3 replies or more): a client
  cannot buy the aggregate by claiming more data than it has, and the
  weights stay positive, so the weighted mean stays among the validated
  updates.
- Metrics: only the keys Pollen's client sends pass on to the strategy
  (:data:`TRAIN_METRICS`, :data:`EVALUATE_METRICS`), each a finite number
  in its range (:data:`METRIC_RANGES`: accuracies in [0, 1], losses and
  seconds in [0, :data:`MAX_METRIC`]); others are dropped. A value that is
  no number, not finite or out of its range rejects the reply, like any
  other impossible content: a client that sends it is broken or hostile,
  and its weights are not to be trusted either. Flower's aggregation needs
  every reply to carry the same keys (else ``InconsistentMessageReplies``
  ends the run), so the strategy gets the keys all valid replies share
  (:func:`shared_metrics`): a client that leaves out an optional metric
  leaves it out of the round's aggregate, not the run.
- BatchNorm statistics (``bn-stats`` of evaluate replies): keys among the
  model's own moving means and variances, whole pairs, the global arrays'
  shapes and dtypes, finite, variances >= 0, and within
  ``--max-update-norm`` of the global statistics in L2 norm, like an update
  of those arrays (:func:`checked_batchnorm_stats`). Under a robust strategy
  (:func:`is_robust`: a :class:`pollen.server.strategies.StrategyEntry`
  marked ``robust``) they are combined by the coordinate-wise median, not
  weighted by counts the clients chose. The merged statistics are checked
  the same way before they replace the global ones
  (:func:`merged_batchnorm_problem`).
- Initial weights (:func:`initial_arrays_problem`: the keys, shapes and
  dtypes of the model the run config names, finite values within
  :data:`INITIAL_VALUE_FACTOR` times a fresh initialisation's) and class
  names (:func:`class_names`) from the client that starts the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pollen.protocol import NUM_EXAMPLES_KEY, UNIT_WEIGHT_KEY
from pollen.server.aggregation import (
    batchnorm_stats_problem,
    merge_batchnorm_stats,
    validate_update,
)
from pollen.server.history import printable
from pollen.server.strategies import STRATEGIES

#: Largest example count a reply may state (``num-examples``, ``calibration-examples``).
MAX_EXAMPLES = 10**9

#: With 3 valid replies or more, no count weighs more than this many times their median.
WEIGHT_CAP_FACTOR = 10

#: Metric key of an evaluate reply: the images its BatchNorm statistics were measured on.
CALIBRATION_KEY = "calibration-examples"

#: Optional metrics of a train reply that pass on to the strategy (besides the weights).
TRAIN_METRICS = ("train_loss", "train_accuracy", "fit_seconds", "dp_epsilon")

#: Optional metrics of an evaluate reply that pass on to the strategy (besides the weights).
EVALUATE_METRICS = ("eval_loss", "eval_accuracy", "eval_seconds")

#: Largest loss or duration (seconds) a metric may state: far above any real one.
MAX_METRIC = 1e6

#: The range of each metric that passes on to the strategy, ends included.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, MAX_METRIC),
    "train_accuracy": (0.0, 1.0),
    "fit_seconds": (0.0, MAX_METRIC),
    "dp_epsilon": (0.0, MAX_METRIC),  # --dp example: the client's accountant so far
    "eval_loss": (0.0, MAX_METRIC),
    "eval_accuracy": (0.0, 1.0),
    "eval_seconds": (0.0, MAX_METRIC),
}

#: No value of an initial floating-point array may exceed this many times the
#: largest magnitude of the same array freshly initialised (or of 1, whichever is
#: larger). Twice what an honest client can send: a whitened first convolution
#: (:func:`pollen.models.whitening.whitening_kernel`) holds unit vectors divided by
#: ``sqrt(variance + 5e-4)``, at most ``1 / sqrt(5e-4)`` ~= 44.7 (images of one colour).
INITIAL_VALUE_FACTOR = 100.0

#: Bounds of the class names of the client that starts the run.
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 100


class Invalid(ValueError):
    """A reply that is not accepted; the message is the reason, phrased for the history."""


@dataclass
class Checked:
    """A reply that passed its checks.

    Attributes:
        node: The node that sent it.
        msg: The reply (its content is replaced by :func:`to_strategy`).
        examples: Its ``num-examples``.
        metrics: Its allowed metrics, finite numbers.
        arrays: Its weights (train replies).
        bn_stats: Its BatchNorm statistics by key, in the model's pair order.
        calibration: Its ``calibration-examples`` (with ``bn_stats``).
    """

    node: int
    msg: Message
    examples: int
    metrics: dict[str, float]
    arrays: ArrayRecord | None = None
    bn_stats: dict[str, np.ndarray] | None = None
    calibration: int = 0


# --- counts and metrics ------------------------------------------------------------------


def example_count(metrics: Mapping, key: str) -> int:
    """``metrics[key]`` as an example count: an integer from 1 to :data:`MAX_EXAMPLES`.

    Raises:
        Invalid: It is missing, not an integer (a float must equal one), or out of range.
    """
    if key not in metrics:
        raise Invalid(f"metrics have no {key}")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{key} is not a number")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise Invalid(f"{key} {value!r} is not an integer")
    if not 1 <= value <= MAX_EXAMPLES:
        raise Invalid(f"{key} {int(value)} is outside 1..{MAX_EXAMPLES}")
    return int(value)


def checked_metrics(content: RecordDict, allowed: Sequence[str]) -> tuple[int, dict[str, float]]:
    """``num-examples`` and the ``allowed`` metrics of a reply's ``metrics`` record.

    Keys not allowed are dropped; an allowed one must be a finite number.

    Raises:
        Invalid: No ``metrics`` record, a bad ``num-examples``, or a bad allowed value.
    """
    record = content.metric_records.get("metrics")
    if record is None:
        raise Invalid("reply has no metrics")
    return example_count(record, NUM_EXAMPLES_KEY), checked_values(record, allowed)


def checked_values(record: Mapping, allowed: Sequence[str]) -> dict[str, float]:
    """The ``allowed`` keys ``record`` has, each a finite number in range; the others dropped.

    A key of :data:`METRIC_RANGES` must lie in its range.

    Raises:
        Invalid: An allowed key holds something else.
    """
    metrics: dict[str, float] = {}
    for key in allowed:
        if key not in record:
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"metric {key} is not a number")
        if not math.isfinite(value):
            raise Invalid(f"metric {key} is {value}")
        low, high = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not low <= value <= high:
            raise Invalid(f"metric {key} {value:.4g} is outside {low:g}..{high:g}")
        metrics[key] = value
    return metrics


def capped(counts: Sequence[int]) -> list[int]:
    """Aggregation weights from example counts: each at most :data:`WEIGHT_CAP_FACTOR` x median.

    With fewer than 3 counts the median is no majority's, so they stay as
    they are (two clients of unequal data weigh as before). With more, a
    client that claims far more examples than the round's median client
    weighs :data:`WEIGHT_CAP_FACTOR` times it at most.
    """
    if len(counts) < 3:
        return list(counts)
    cap = max(1, int(WEIGHT_CAP_FACTOR * float(np.median(counts))))
    return [min(n, cap) for n in counts]


def shared_metrics(replies: Sequence[Checked]) -> list[str]:
    """The metric keys every reply in ``replies`` carries, in the first one's order."""
    if not replies:
        return []
    common = set.intersection(*(set(r.metrics) for r in replies))
    return [k for k in replies[0].metrics if k in common]


def to_strategy(replies: Sequence[Checked], weights: Sequence[int], *, train: bool) -> None:
    """Give each reply the content the strategy aggregates, and nothing else.

    ``arrays`` (train replies) and one ``metrics`` record: ``num-examples``
    (its weight), ``unit-weight`` 1 (the weight under DP, equal per client
    whatever a client says) and the :func:`shared_metrics`; the client's
    ``client`` record (its name) is kept.
    """
    keys = shared_metrics(replies)
    for r, weight in zip(replies, weights, strict=True):
        metrics = MetricRecord(
            {**{k: r.metrics[k] for k in keys}, NUM_EXAMPLES_KEY: weight, UNIT_WEIGHT_KEY: 1}
        )
        content = RecordDict({"metrics": metrics})
        if train and r.arrays is not None:
            content["arrays"] = r.arrays
        info = r.msg.content.config_records.get("client")
        if isinstance(info, ConfigRecord):
            content["client"] = info
        r.msg.content = content


# --- train replies -----------------------------------------------------------------------


def checked_train_reply(
    node: int,
    msg: Message,
    global_arrays: ArrayRecord,
    global_np: list[np.ndarray],
    max_norm: float,
) -> Checked:
    """A train reply's weights and metrics, checked.

    Raises:
        Invalid: No weights, keys other than the global record's, an update
            :func:`validate_update` rejects, or bad metrics (:func:`checked_metrics`).
    """
    content = msg.content
    arrays = content.array_records.get("arrays")
    if arrays is None:
        raise Invalid("reply has no weights")
    examples, metrics = checked_metrics(content, TRAIN_METRICS)
    same_count = len(arrays) == len(global_arrays)  # else validate_update says how many
    if same_count and list(arrays.keys()) != list(global_arrays.keys()):
        raise Invalid("update's array keys differ from the global model's")
    reason = validate_update(global_np, _decoded(arrays), max_norm)
    if reason is not None:
        raise Invalid(reason)
    return Checked(node, msg, examples, metrics, arrays=arrays)


def _decoded(arrays: ArrayRecord) -> list[np.ndarray]:
    """``arrays`` as numpy arrays.

    Raises:
        Invalid: An array's bytes do not decode as the array it claims to be.
    """
    try:
        return arrays.to_numpy_ndarrays()
    except Exception as err:  # noqa: BLE001 - whatever the bytes are, the reply is bad
        raise Invalid(f"weights do not decode ({type(err).__name__})") from None


# --- evaluate replies and BatchNorm statistics -------------------------------------------


def checked_evaluate_reply(
    node: int,
    msg: Message,
    global_stats: Mapping[str, np.ndarray] | None,
    pairs: Sequence[tuple[str, str]] | None,
    max_norm: float = 0.0,
) -> Checked:
    """An evaluate reply's metrics and (with ``pairs``) BatchNorm statistics, checked.

    Args:
        node: The node that sent it.
        msg: The reply.
        global_stats: The BatchNorm statistics of the global arrays the
            client evaluated, by key (:func:`global_batchnorm_stats`).
        pairs: The model's ``(moving mean, moving variance)`` keys; None:
            statistics are not used (any sent are ignored).
        max_norm: ``--max-update-norm``: bound on the statistics' L2
            distance from ``global_stats``; 0 = none.

    Raises:
        Invalid: Bad metrics, or bad statistics (:func:`checked_batchnorm_stats`).
    """
    examples, metrics = checked_metrics(msg.content, EVALUATE_METRICS)
    checked = Checked(node, msg, examples, metrics)
    sent = msg.content.array_records.get("bn-stats")
    if pairs is None or global_stats is None or sent is None or len(sent) == 0:
        return checked
    checked.calibration = example_count(msg.content["metrics"], CALIBRATION_KEY)
    checked.bn_stats = checked_batchnorm_stats(sent, global_stats, pairs, max_norm)
    return checked


def global_batchnorm_stats(
    arrays: ArrayRecord, pairs: Sequence[tuple[str, str]]
) -> dict[str, np.ndarray]:
    """The BatchNorm statistics of the global ``arrays``, by key (decoded once a round)."""
    return {key: arrays[key].numpy() for pair in pairs for key in pair}


def checked_batchnorm_stats(
    sent: ArrayRecord,
    global_stats: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    max_norm: float = 0.0,
) -> dict[str, np.ndarray]:
    """A client's BatchNorm statistics, checked against the model's and the global ones.

    Every key must be a moving mean or variance of the model (``pairs``),
    with its partner; each array has the global array's shape and dtype and
    finite values, variances are >= 0, and all of them together lie within
    ``max_norm`` (``--max-update-norm``; 0 = no bound) of the global
    statistics in L2 norm, as an update of those arrays must
    (:func:`pollen.server.aggregation.batchnorm_stats_problem`). Without
    that bound a client could send means of 1e20, finite in float32, whose
    merged variance overflows to inf.

    Returns:
        The statistics by key, in the order of ``pairs``.

    Raises:
        Invalid: What is wrong, for the history.
    """
    keys = set(sent.keys())
    known = {k for pair in pairs for k in pair}
    foreign = sorted(keys - known)
    if foreign:
        shown = ", ".join(printable(k, 20) for k in foreign[:3])
        raise Invalid(f"bn-stats has keys that are no BatchNorm statistics of the model ({shown})")
    out: dict[str, np.ndarray] = {}
    for mean_key, var_key in pairs:
        if (mean_key in keys) != (var_key in keys):
            raise Invalid(f"bn-stats has a mean or a variance without its pair ({mean_key})")
        if mean_key not in keys:
            continue
        for key in (mean_key, var_key):
            a, g = _decoded(ArrayRecord(array_dict={key: sent[key]}))[0], global_stats[key]
            if a.shape != g.shape or a.dtype != g.dtype:
                raise Invalid(
                    f"bn-stats {key} is {a.dtype}{list(a.shape)}, "
                    f"the global array is {g.dtype}{list(g.shape)}"
                )
            out[key] = a
    reason = batchnorm_stats_problem(out, global_stats, _variances(pairs), max_norm)
    if reason is not None:
        raise Invalid(f"bn-stats {reason}")
    return out


def _variances(pairs: Sequence[tuple[str, str]]) -> set[str]:
    return {var_key for _, var_key in pairs}


def merged_batchnorm_problem(
    merged: Mapping[str, np.ndarray],
    global_stats: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    max_norm: float,
) -> str | None:
    """What is wrong with the round's merged statistics, or None.

    The checks of a client's statistics, on the merged ones in their own
    dtype: a merge in float64 of valid statistics may still overflow
    float32, or (the spread of the clients' means adds to the merged
    variance) land farther from the global statistics than ``max_norm``.
    """
    return batchnorm_stats_problem(merged, global_stats, _variances(pairs), max_norm)


def merged_batchnorm_stats(
    replies: Sequence[Checked], pairs: Sequence[tuple[str, str]], *, robust: bool
) -> dict[str, np.ndarray]:
    """The round's BatchNorm statistics from the checked replies that carry them.

    Each pair is combined over the replies that sent it: by the law of total
    variance weighted by the :func:`capped` calibration counts
    (:func:`merge_batchnorm_stats`), or, ``robust``, by the coordinate-wise
    median of the means and of the variances (the count a client states then
    carries no weight).
    """
    sent = [(r.bn_stats, r.calibration) for r in replies if r.bn_stats]
    weights = capped([n for _, n in sent])
    out: dict[str, np.ndarray] = {}
    for mean_key, var_key in pairs:
        have = [i for i, (s, _) in enumerate(sent) if mean_key in s]
        if not have:
            continue
        stats = [{k: sent[i][0][k] for k in (mean_key, var_key)} for i in have]
        if robust:
            for key in (mean_key, var_key):
                stacked = np.stack([s[key] for s in stats])
                out[key] = np.median(stacked, axis=0).astype(stacked.dtype)
        else:
            out.update(merge_batchnorm_stats(stats, [weights[i] for i in have], [mean_key]))
    return out


def is_robust(strategy: object) -> bool:
    """Whether ``strategy`` (or the one a DP wrapper holds) is robust.

    Robust: an instance of the Flower class of a
    :data:`pollen.server.strategies.STRATEGIES` entry marked ``robust``.
    """
    robust = tuple(entry.flower for entry in STRATEGIES.values() if entry.robust)
    inner = getattr(strategy, "strategy", strategy)
    return bool(robust) and (isinstance(strategy, robust) or isinstance(inner, robust))


def pairs_of(keys: Iterable[str]) -> list[tuple[str, str]]:
    """``(moving mean, moving variance)`` key pairs of a model's BatchNorm statistics.

    ``keys`` are the statistics' keys in the order of the model's weights
    (:func:`pollen.models.registry.batchnorm_stat_indices`): each layer's
    moving mean, then its moving variance.
    """
    keys = list(keys)
    return list(zip(keys[0::2], keys[1::2], strict=False))


# --- the client that starts the run ------------------------------------------------------


@dataclass(frozen=True)
class ModelReference:
    """The run's model freshly initialised, as the initial weights are checked against it.

    Attributes:
        shapes: Each array's shape, in the order of the model's weights.
        dtypes: Each array's dtype.
        bounds: Largest magnitude each array may hold (infinite for
            non-floating arrays): :data:`INITIAL_VALUE_FACTOR` times the
            larger of 1 and the fresh array's largest magnitude.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    bounds: tuple[float, ...]

    @classmethod
    def of(cls, weights: Sequence[np.ndarray]) -> ModelReference:
        """The reference of a freshly initialised model's ``weights`` (``get_weights()``)."""
        weights = [np.asarray(w) for w in weights]
        return cls(
            shapes=tuple(w.shape for w in weights),
            dtypes=tuple(w.dtype for w in weights),
            bounds=tuple(
                INITIAL_VALUE_FACTOR * max(1.0, float(np.abs(w).max(initial=0.0)))
                if np.issubdtype(w.dtype, np.floating)
                else math.inf
                for w in weights
            ),
        )


def initial_arrays_problem(arrays: object, reference: ModelReference) -> str | None:
    """What is wrong with a client's initial weights, or None.

    They must be what the run's model (``reference``) is: an ArrayRecord
    keyed ``"0"``, ``"1"``, ... with its number of arrays, each of its shape
    and dtype, with finite values and none beyond its bound
    (:class:`ModelReference`). There is no global model yet to bound the
    distance from, as an update's is; the value bound keeps a start whose
    first forward pass overflows out, while every client can still start
    the run from the weights it initialised and whitened itself.
    """
    if not isinstance(arrays, ArrayRecord) or len(arrays) == 0:
        return "no weights"
    if len(arrays) != len(reference.shapes):
        return f"{len(arrays)} arrays, the run's model has {len(reference.shapes)}"
    if list(arrays.keys()) != [str(i) for i in range(len(arrays))]:
        return 'arrays are not keyed "0", "1", ...'
    for i, a in enumerate(arrays.values()):
        shape, dtype = reference.shapes[i], reference.dtypes[i]
        if tuple(a.shape) != shape or a.dtype != str(dtype):
            return f"array {i} is {a.dtype}{list(a.shape)}, the model's is {dtype}{list(shape)}"
    for i, a in enumerate(arrays.values()):
        try:
            value = a.numpy()
        except Exception:  # noqa: BLE001 - a record that does not decode is a bad one
            return f"array {i} does not decode"
        if value.shape != reference.shapes[i] or value.dtype != reference.dtypes[i]:
            return f"array {i} does not decode as the model's {reference.dtypes[i]}"
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if not np.isfinite(value).all():
            return f"array {i} has NaN/inf values"
        largest = float(np.abs(value).max(initial=0.0))
        if largest > reference.bounds[i]:
            return f"array {i} holds {largest:.4g}, beyond its bound {reference.bounds[i]:.4g}"
    return None


def class_names(value: object) -> list[str] | None:
    """The class names a client gave, each :func:`printable`; None if they are no list of names.

    At most :data:`MAX_CLASSES` names of at most :data:`MAX_CLASS_NAME_CHARS` characters.
    """
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CLASSES:
        return None
    if not all(isinstance(v, str) for v in value):
        return None
    return [printable(v, MAX_CLASS_NAME_CHARS) for v in value]
