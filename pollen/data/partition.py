"""Split a dataset into per-client partitions for federated learning.

In a federated run every client trains on its own share of the data. This module decides
which examples each client (partition) gets:

* ``"iid"``: a random, equally sized share of every split (sizes differ by at most one), the
  textbook baseline where every client sees the same label distribution;
* ``"dirichlet"``: label proportions drawn per class from a Dirichlet distribution with
  concentration ``alpha``, the standard way to simulate non-IID clients (small ``alpha``,
  e.g. 0.1, gives each client only a few dominant classes; large ``alpha`` approaches IID).

The splitting itself is done by Flower's own partitioners from ``flwr-datasets``
(:class:`~flwr_datasets.partitioner.IidPartitioner` and
:class:`~flwr_datasets.partitioner.DirichletPartitioner`) rather than hand-written code, so
Pollen's partitions are the ones the Flower community uses, compares against and
documents. Those partitioners work on Hugging Face ``datasets.Dataset`` objects; we give them
a tiny one holding only the labels and an ``idx`` column, and read back indices into the
original arrays, so the images themselves never leave numpy.

Partitioning is deterministic for a given seed, and every partition id gets disjoint indices
whose union is the whole split.

Partitions are lazy, for federations of thousands of clients of which a round samples a
few (docs/scale.md): an IID partition is computed alone, as ``IidPartitioner`` would cut
it, from one cached permutation of the split, so building client 999's share touches no
other client's indices or data. A Dirichlet draw couples all partitions; it is computed
once from the labels alone and kept as one index array plus offsets (on disk and in a
small in-process cache), and a client slices its own share out of it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings

import numpy as np

from pollen.data.cache import default_cache_dir
from pollen.data.dataset import Dataset
from pollen.errors import PollenError
from pollen.files import atomic_writer

__all__ = [
    "METHODS",
    "check_partitions",
    "label_histogram",
    "partition_dataset",
    "partition_indices",
]

METHODS = ("iid", "dirichlet")
"""Accepted values of ``method``."""


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partition_id: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
    min_partition_size: int | None = None,
) -> np.ndarray:
    """Return the indices of the examples that belong to one partition.

    Args:
        labels: Integer class labels of the whole split, shape ``(N,)``.
        num_partitions: Number of partitions (clients), at least 1 and at most ``N``.
        partition_id: Which partition to return, in ``[0, num_partitions)``.
        method: ``"iid"`` (default) or ``"dirichlet"``.
        alpha: Dirichlet concentration, > 0; only used by ``"dirichlet"``. Default 0.5.
        seed: Seed of the random split; the same seed gives the same partitions. Default 42.
        min_partition_size: Only for ``"dirichlet"``: the smallest acceptable partition
            (the Dirichlet draw is repeated, up to 10 times, until every partition is at
            least this big). ``None`` (default) means ``min(10, N // (2 * num_partitions))``,
            which keeps clients from ending up empty yet is always reachable on small data.

    Returns:
        ``int64`` indices into ``labels``, sorted ascending. Across all partition ids they
        are disjoint and together cover ``range(N)``.

    Raises:
        PollenError: If an argument is invalid, or the Dirichlet split cannot give every
            partition ``min_partition_size`` examples.
    """
    labels = _check_labels(labels)
    part = _partition(
        labels, num_partitions, partition_id, method, alpha, seed, min_partition_size, "data"
    )
    return part.copy()


def partition_dataset(
    ds: Dataset,
    num_partitions: int,
    partition_id: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
) -> Dataset:
    """Return one client's view of a dataset: its partition of both train and test.

    The test split is partitioned independently with the same method, ``alpha`` and
    ``seed``, so each client evaluates on held-out data of its own. With ``"dirichlet"`` the
    same seed draws the same class proportions for both splits (unless the draw had to be
    repeated to satisfy the minimum partition size), so a client's test data looks like its
    training data.

    Args:
        ds: The full dataset.
        num_partitions: Number of partitions (clients); each split needs at least this many
            examples.
        partition_id: Which partition to return, in ``[0, num_partitions)``.
        method: ``"iid"`` (default) or ``"dirichlet"``.
        alpha: Dirichlet concentration, > 0; only used by ``"dirichlet"``. Default 0.5.
        seed: Seed of the random split. Default 42.

    Returns:
        A :class:`~pollen.data.dataset.Dataset` with the selected rows of ``x_train``/``y_train``
        and ``x_test``/``y_test`` (in their original order) and the same ``class_names``.

    Raises:
        PollenError: If an argument is invalid or a split is too small to partition.
    """
    train_labels = _check_labels(ds.y_train)
    test_labels = _check_labels(ds.y_test)
    train = _partition(
        train_labels, num_partitions, partition_id, method, alpha, seed, None, "training data"
    )
    test = _partition(
        test_labels, num_partitions, partition_id, method, alpha, seed, None, "test data"
    )
    return Dataset(
        x_train=ds.x_train[train],
        y_train=ds.y_train[train],
        x_test=ds.x_test[test],
        y_test=ds.y_test[test],
        class_names=ds.class_names,
    )


def check_partitions(
    ds: Dataset,
    num_partitions: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
) -> np.ndarray:
    """Refuse, before any client starts, a split that cannot give every client its share.

    Every one of ``num_partitions`` clients needs at least one training and one test
    example: a split with fewer examples than clients, or a Dirichlet draw that cannot give
    each client its minimum, raises here with what to do. With ``"dirichlet"`` the draw is
    computed here, once, and kept in the disk cache the clients then read; ``"iid"`` only
    checks the sizes (each client computes its own share).

    Returns:
        The number of training examples of each client, ``(num_partitions,)``
        (what a client's privacy accounting depends on).

    Raises:
        PollenError: A split cannot be partitioned for ``num_partitions`` clients.
    """
    for labels, what in ((ds.y_train, "training data"), (ds.y_test, "test data")):
        _partition(_check_labels(labels), num_partitions, 0, method, alpha, seed, None, what)
    n = len(ds.y_train)
    if str(method).strip().lower() == "iid":
        size, longer = divmod(n, int(num_partitions))
        return np.array([size + (i < longer) for i in range(int(num_partitions))], np.int64)
    labels = _check_labels(ds.y_train)
    minimum = max(1, min(10, n // (2 * int(num_partitions))))  # as _partition's default
    parts = _dirichlet_partitions(
        labels.tobytes(), int(num_partitions), float(alpha), int(seed), minimum
    )
    return np.diff(np.asarray(parts.offsets)).astype(np.int64)


def label_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Count the examples of each class.

    Args:
        labels: Integer labels, shape ``(N,)``, values in ``[0, num_classes)``.
        num_classes: Number of classes.

    Returns:
        ``int64`` array of shape ``(num_classes,)``; entry ``k`` is the number of ``k`` labels.

    Raises:
        ValueError: If a label is negative or not below ``num_classes``.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=num_classes).astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise PollenError(
            f"Labels to partition must be a one-dimensional array of whole numbers; got an "
            f"array of shape {arr.shape} and type {arr.dtype}."
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _partition(
    labels: np.ndarray,
    num_partitions: int,
    partition_id: int,
    method: str,
    alpha: float,
    seed: int,
    min_partition_size: int | None,
    what: str,
) -> np.ndarray:
    """Validate the arguments, then return partition ``partition_id`` of ``labels``.

    ``"iid"`` is computed for that partition alone (:func:`_iid_partition`): building one
    client's share never builds the others'. ``"dirichlet"`` draws every partition's
    class proportions together (they depend on each other), once, from the labels only;
    the draw is kept on disk and in a small in-process cache (:func:`_dirichlet_partitions`).
    """
    method = str(method).strip().lower()
    _check_arguments(len(labels), num_partitions, partition_id, method, alpha, what)
    if method == "iid":
        return _iid_partition(len(labels), int(num_partitions), int(partition_id), int(seed))
    n = len(labels)
    if min_partition_size is None:
        # At least one example each: a client with no training or test example could
        # neither train nor evaluate.
        min_partition_size = max(1, min(10, n // (2 * num_partitions)))
    if min_partition_size < 0:
        raise PollenError(
            f"The minimum partition size must be 0 or more, not {min_partition_size}."
        )
    try:
        return _dirichlet_partitions(
            labels.tobytes(), int(num_partitions), float(alpha), int(seed), int(min_partition_size)
        ).part(int(partition_id))
    except ValueError as exc:
        raise PollenError(
            f"Could not split the {what} ({n} examples) into {num_partitions} Dirichlet "
            f"partitions with alpha={alpha} so that each gets at least {min_partition_size} "
            f"examples ({exc}). Use a larger alpha, fewer partitions, or method 'iid'."
        ) from None


def _check_arguments(
    n: int, num_partitions: int, partition_id: int, method: str, alpha: float, what: str
) -> None:
    """Raise a PollenError for partitioning arguments that cannot work."""
    if not _is_number(num_partitions) or int(num_partitions) != num_partitions:
        raise PollenError(
            f"The number of partitions must be a whole number, not {num_partitions!r}."
        )
    if num_partitions < 1:
        raise PollenError(
            f"The number of partitions (clients) must be at least 1, not {num_partitions}."
        )
    if not _is_number(partition_id) or not 0 <= partition_id < num_partitions:
        raise PollenError(
            f"The partition id {partition_id} is out of range: with {num_partitions} partitions "
            f"the ids are 0 to {num_partitions - 1}. Give each client a distinct id in that range."
        )
    if method not in METHODS:
        raise PollenError(
            f"Unknown partitioning method {method!r}. Use 'iid' (random equal shares) or "
            "'dirichlet' (non-IID label skew controlled by alpha)."
        )
    if method == "dirichlet" and not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        raise PollenError(
            f"The Dirichlet alpha must be a positive number, not {alpha}. Small values such as "
            "0.1 give strongly skewed clients; large ones such as 100 are close to IID."
        )
    if num_partitions > n:
        raise PollenError(
            f"Cannot split the {what} ({n} examples) into {num_partitions} partitions: there "
            "are more partitions than examples, so some clients would get none. Use at most "
            f"{n} clients, or more data."
        )


def _iid_partition(n: int, num_partitions: int, partition_id: int, seed: int) -> np.ndarray:
    """One IID partition, exactly as flwr-datasets' ``IidPartitioner`` cuts a shuffled split.

    ``datasets.Dataset.shuffle(seed)`` orders the rows by
    ``np.random.default_rng(seed).permutation(n)``, and ``IidPartitioner`` takes the
    ``partition_id``-th contiguous shard of ``Dataset.shard`` (the first ``n % k`` shards
    one row longer). The same arithmetic here, without building a ``datasets`` table,
    gives the same partition (``tests/data/test_partition_scale.py`` checks it against
    flwr-datasets) while touching only this partition's slice of the permutation: the
    cost is one permutation of ``n`` (cached), whatever the number of partitions.
    """
    size, longer = divmod(n, num_partitions)
    start = size * partition_id + min(partition_id, longer)
    stop = start + size + (1 if partition_id < longer else 0)
    idx = np.sort(_permutation(n, seed)[start:stop])
    idx.flags.writeable = False
    return idx


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> np.ndarray:
    """``datasets.Dataset.shuffle(seed=seed)``'s row order for ``n`` rows (read-only)."""
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64, copy=False)
    perm.flags.writeable = False
    return perm


class _Partitions:
    """Every partition of one split, stored as one index array cut at ``offsets``.

    Two arrays whatever the number of partitions: the disk cache holds two members
    (not one per partition), and reading one partition slices a view.
    """

    def __init__(self, indices: np.ndarray, offsets: np.ndarray) -> None:
        self.indices = indices
        self.offsets = offsets
        for arr in (indices, offsets):
            arr.flags.writeable = False

    def part(self, partition_id: int) -> np.ndarray:
        """The sorted, read-only indices of one partition."""
        return self.indices[self.offsets[partition_id] : self.offsets[partition_id + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1


@functools.lru_cache(maxsize=8)
def _dirichlet_partitions(
    labels_bytes: bytes,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int,
) -> _Partitions:
    """Every Dirichlet partition of a label array: from the disk cache, else computed.

    In deployment Flower starts a new client-app process for every message, so without the
    disk cache each round would import ``datasets`` and ``flwr_datasets`` (seconds) and redo
    the split. The cache file is keyed by a hash of the labels and every parameter.
    """
    key = hashlib.sha256(labels_bytes)
    key.update(repr((num_partitions, "dirichlet", alpha, seed, min_partition_size)).encode())
    path = default_cache_dir() / "partitions" / f"{key.hexdigest()[:32]}.npz"
    try:
        with np.load(path, allow_pickle=False) as cached:
            parts = _Partitions(cached["indices"], cached["offsets"])
        if len(parts) == num_partitions and parts.offsets[-1] == len(parts.indices):
            return parts
    except (OSError, KeyError, ValueError):
        pass
    parts = _compute_dirichlet(labels_bytes, num_partitions, alpha, seed, min_partition_size)
    try:
        with atomic_writer(path) as f:
            np.savez(f, indices=parts.indices, offsets=parts.offsets)
    except OSError:  # a read-only or full cache only costs speed
        pass
    return parts


def _compute_dirichlet(
    labels_bytes: bytes,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int,
) -> _Partitions:
    """Compute every Dirichlet partition of a label array with flwr-datasets.

    The label array travels as ``bytes`` (of ``int64``) so that the whole call is hashable
    and :func:`functools.lru_cache` can reuse the split for every partition id.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    # Arrow format: the partitioner then reads columns without a Python-level row loop
    # (see docs/performance.md#partitioning).
    table = datasets.Dataset.from_dict(
        {"label": labels, "idx": np.arange(len(labels), dtype=np.int64)}
    ).with_format("arrow")
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = table
    parts = []
    with warnings.catch_warnings():
        # DirichletPartitioner warns on every redraw; a final failure raises ValueError.
        warnings.simplefilter("ignore")
        for pid in range(num_partitions):
            column = partitioner.load_partition(pid)["idx"]  # a pyarrow ChunkedArray
            parts.append(np.sort(np.asarray(column.to_numpy(), dtype=np.int64)))
    offsets = np.zeros(num_partitions + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return _Partitions(indices, offsets)
