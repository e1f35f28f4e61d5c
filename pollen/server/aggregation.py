"""Pure aggregation helpers: FedAvg's weighted mean, BatchNorm statistics, update checks.

Numpy in, numpy out: nothing here knows about Flower or Keras, so the server's
round phases (:mod:`pollen.server.phases`), the benchmarks and the tests use the same
arithmetic, and it imports on a machine without Flower installed (the GPU
benchmark's).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

__all__ = ["batchnorm_stats_problem", "merge_batchnorm_stats", "validate_update", "weighted_mean"]


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of equally shaped arrays (FedAvg's aggregation rule).

    Args:
        values: Arrays of one shape.
        weights: Non-negative weights, e.g. example counts; not all zero.

    Returns:
        ``sum_i w_i * values_i / sum_i w_i``, in float64 unless all inputs
        share a floating dtype.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    mean = np.tensordot(w / w.sum(), stacked, axes=1)
    dtype = np.result_type(*values)
    return mean.astype(dtype) if np.issubdtype(dtype, np.floating) else mean


def merge_batchnorm_stats(
    stats: Sequence[dict[str, np.ndarray]], counts: Sequence[int], mean_keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Combine per-client BatchNorm statistics into population statistics.

    Each client measured, under the same global weights, the mean ``m_i`` and
    variance ``v_i`` of every BatchNorm layer's inputs over ``n_i`` of its
    images. The statistics of all ``N = sum n_i`` images together are
    ``m = sum n_i m_i / N`` and ``v = sum n_i (v_i + m_i^2) / N - m^2`` (the law
    of total variance), which is what a single pass over all the data would
    have measured.

    Args:
        stats: Per client, arrays keyed like the global ArrayRecord.
        counts: Images each client used.
        mean_keys: Keys that hold moving means; the key that follows each in
            ``stats[0]``'s order is the matching moving variance.

    Returns:
        Combined arrays, same keys as ``stats[0]``, in their dtypes: a value
        beyond the dtype's range becomes inf (see :func:`batchnorm_stats_problem`).
    """
    keys = list(stats[0])
    out: dict[str, np.ndarray] = {}
    for mean_key in mean_keys:
        var_key = keys[keys.index(mean_key) + 1]
        means = [s[mean_key].astype(np.float64) for s in stats]
        variances = [s[var_key].astype(np.float64) for s in stats]
        m = weighted_mean(means, counts)
        second = weighted_mean([v + mi**2 for v, mi in zip(variances, means, strict=True)], counts)
        with np.errstate(over="ignore"):  # inf where it overflows: the caller checks
            out[mean_key] = m.astype(stats[0][mean_key].dtype)
            out[var_key] = np.maximum(second - m**2, 0.0).astype(stats[0][var_key].dtype)
    return out


def validate_update(
    global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray], max_norm: float
) -> str | None:
    """Check a client's returned weights before they are aggregated.

    An update must have as many arrays as the global model, each with the
    global array's shape and dtype, hold only finite values, and (if
    ``max_norm > 0``) differ from the global weights by at most ``max_norm``
    in L2 norm over all floating-point arrays together.

    Args:
        global_arrays: The global model's arrays the client was sent.
        update: The arrays the client returned, in the same order.
        max_norm: Bound on ``||update - global||_2``; 0 = no bound.

    Returns:
        ``None`` if the update is acceptable, else the reason, phrased for the
        history (for example ``"update has NaN/inf values (array 3)"``).
    """
    if len(update) != len(global_arrays):
        return f"update has {len(update)} arrays, the global model has {len(global_arrays)}"
    for i, (g, u) in enumerate(zip(global_arrays, update, strict=True)):
        g, u = np.asarray(g), np.asarray(u)
        if u.shape != g.shape:
            return f"array {i} has shape {u.shape}, the global model's has {g.shape}"
        if u.dtype != g.dtype:
            return f"array {i} has dtype {u.dtype}, the global model's has {g.dtype}"
    squared = 0.0
    for i, (g, u) in enumerate(zip(global_arrays, update, strict=True)):
        u = np.asarray(u)
        if not np.issubdtype(u.dtype, np.floating):
            continue
        if not np.isfinite(u).all():
            return f"update has NaN/inf values (array {i})"
        diff = u.astype(np.float64) - np.asarray(g, dtype=np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = float(np.sqrt(squared))
    if max_norm > 0 and not norm <= max_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}"
    return None


def batchnorm_stats_problem(
    stats: Mapping[str, np.ndarray],
    global_stats: Mapping[str, np.ndarray],
    variance_keys: Collection[str],
    max_norm: float,
) -> str | None:
    """Check BatchNorm statistics (a client's, or the round's merged ones) before they are used.

    The moving means and variances are arrays of the model like any other:
    replacing the global ones is an update of those arrays, and it is
    bounded like one. Every array must hold finite values (in its own
    dtype: a merge computed in float64 that overflows float32 is caught
    here), variances must be >= 0, and (if ``max_norm > 0``) the statistics
    may differ from the global ones by at most ``max_norm`` in L2 norm over
    all arrays in ``stats`` together (``--max-update-norm``). Honest
    statistics stay far inside the default bound (calibrated on random
    images, MobileNetV2's 34,112 statistics lie about 110 from a fresh
    initialisation's means 0 and variances 1, the small CNN's about 14).

    Args:
        stats: Statistics by key, each shaped like its global array.
        global_stats: The global model's statistics by key (a superset of ``stats``'s keys).
        variance_keys: The keys in ``stats`` that hold moving variances.
        max_norm: Bound on ``||stats - global||_2``; 0 = no bound.

    Returns:
        ``None`` if they are acceptable, else the reason, phrased for the
        history (for example ``"3 has negative variances"``).
    """
    squared = 0.0
    for key, a in stats.items():
        if not np.isfinite(a).all():
            return f"{key} has NaN/inf values"
        if key in variance_keys and (a < 0).any():
            return f"{key} has negative variances"
        diff = a.astype(np.float64) - np.asarray(global_stats[key], dtype=np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    distance = float(np.sqrt(squared))
    if max_norm > 0 and not distance <= max_norm:
        return (
            f"distance {distance:.4g} from the global statistics exceeds "
            f"max-update-norm {max_norm:g}"
        )
    return None
