"""pollen.compress: codecs round-trip within their bounds; bad payloads are refused."""

from __future__ import annotations

import math
import tracemalloc
import zlib

import numpy as np
import pytest

from pollen.compress import (
    CODECS,
    MAX_INFLATION,
    Feedback,
    Fp16,
    Int8,
    TopK,
    parse,
    with_feedback,
)
from pollen.errors import PollenError

RNG = np.random.default_rng(0)
SIZES = [3 * 3 * 3 * 8, 8, 0, 1, 40 * 10, 10]


def _flat(sizes=SIZES, scale: float = 0.05) -> np.ndarray:
    """A vector of arrays of ``sizes``, each of its own magnitude."""
    parts = [RNG.normal(scale=scale * (i + 1), size=n) for i, n in enumerate(sizes)]
    return np.concatenate(parts).astype(np.float32)


def _segments(flat: np.ndarray, sizes=SIZES) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1])


def test_fp16_is_exact_for_values_half_precision_represents() -> None:
    exact = np.array([0, 1, -2, 0.5, 65504, -65504, 2**-24, 1 / 1024, 3.140625], np.float32)
    sizes = [exact.size]
    payload = Fp16().encode(exact, sizes)
    assert payload["values"].dtype == np.float16 and payload["values"].nbytes == exact.size * 2
    np.testing.assert_array_equal(Fp16.decode(payload, sizes), exact)
    # Others are rounded to the nearest half: within 2**-11 relative.
    flat = _flat()
    back = Fp16.decode(Fp16().encode(flat, SIZES), SIZES)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, flat, rtol=2**-11, atol=2**-24)


def test_int8_error_is_at_most_half_a_step_of_each_arrays_scale() -> None:
    flat = _flat()
    payload = Int8().encode(flat, SIZES)
    assert payload["values"].dtype == np.uint8  # deflated
    assert payload["scales"].dtype == np.float32 and payload["scales"].size == len(SIZES)
    back = Int8.decode(payload, SIZES)
    for x, y, scale in zip(_segments(flat), _segments(back), payload["scales"], strict=True):
        if x.size:
            assert scale == pytest.approx(np.abs(x).max() / 127)
            assert np.abs(x - y).max() <= scale / 2 * (1 + 1e-5)
            # the largest magnitude is exact up to float32 rounding
            i = np.abs(x).argmax()
            assert y[i] == pytest.approx(x[i], rel=1e-6)


def _int8_bytes(payload) -> bytes:
    """The raw int8 values a payload deflates."""
    return zlib.decompress(payload["values"].tobytes())


def test_int8_values_deflate_below_one_byte_each_on_a_realistic_change() -> None:
    # A change as training makes it: heavier-tailed than a Gaussian (Student t, 3
    # degrees of freedom), each array of its own magnitude.
    sizes = [3 * 3 * 64 * 64, 64, 64, 3 * 3 * 64 * 128, 128, 1280]
    parts = [0.001 * (i + 1) * RNG.standard_t(3, size=n) for i, n in enumerate(sizes)]
    flat = np.concatenate(parts).astype(np.float32)
    payload = Int8().encode(flat, sizes)
    raw = _int8_bytes(payload)
    assert len(raw) == flat.size  # the lossless stage holds one int8 per value
    assert payload["values"].nbytes < 0.6 * len(raw)
    # And so under 15 % of the fp32 bytes, scales included.
    assert payload["values"].nbytes + payload["scales"].nbytes < 0.15 * flat.nbytes
    back = Int8.decode(payload, sizes)
    bound = np.repeat(payload["scales"], sizes) / 2 * (1 + 1e-5)
    assert (np.abs(back - flat) <= bound).all()
    # A Gaussian change deflates less, still below its int8 bytes.
    gauss = RNG.normal(size=100_000).astype(np.float32)
    assert Int8().encode(gauss, [gauss.size])["values"].nbytes < 0.9 * gauss.size


def test_int8_values_of_zero_changes_stay_within_max_inflation() -> None:
    # A frozen layer's change is all zeros: Huffman coding sends about a bit each.
    flat = np.zeros(100_000, np.float32)
    payload = Int8().encode(flat, [flat.size])
    assert flat.size / MAX_INFLATION < payload["values"].size < flat.size / 7
    np.testing.assert_array_equal(Int8.decode(payload, [flat.size]), 0)


def test_int8_refuses_a_zip_bomb_without_inflating_it() -> None:
    bomb = np.frombuffer(zlib.compress(bytes(10 << 20), 9), np.uint8)  # 10 MB in ~10 kB
    scales = np.ones(1, np.float32)
    # Claiming as many values as it inflates to: refused before inflating.
    with pytest.raises(ValueError, match="bytes for"):
        Int8.decode({"values": bomb, "scales": scales}, [10 << 20])
    # Claiming as many as its size allows: inflated up to those only, then refused.
    size = MAX_INFLATION * bomb.size
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"more than {size} bytes"):
            Int8.decode({"values": bomb, "scales": scales}, [size])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size + (1 << 20), peak  # far below the 10 MB the stream holds


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda z: z[: len(z) // 2], "end before their deflate stream does"),
        (lambda z: z[:-4], "end before their deflate stream does"),  # no Adler-32
        (lambda z: z + b"\0", "bytes follow the values"),
        (lambda z: z + zlib.compress(b"x"), "bytes follow the values"),
        (lambda z: z[:40] + bytes([z[40] ^ 0xFF]) + z[41:], "not a deflate stream|values"),
        (lambda z: z[:-1] + bytes([z[-1] ^ 1]), "not a deflate stream"),  # Adler-32 wrong
        (lambda z: b"junk" + z, "not a deflate stream"),
        (lambda z: zlib.compress(bytes(range(99)), 0), "inflate to 99 bytes for 100"),
    ],
)
def test_int8_refuses_a_truncated_corrupt_or_extended_stream(mangle, problem) -> None:
    flat = _flat([100])
    payload = Int8().encode(flat, [100])
    data = mangle(payload["values"].tobytes())
    bad = {"values": np.frombuffer(data, np.uint8), "scales": payload["scales"]}
    with pytest.raises(ValueError, match=problem):
        Int8.decode(bad, [100])


def test_int8_keeps_zero_arrays_zero_and_sends_non_finite_as_nan() -> None:
    sizes = [4, 3]
    flat = np.array([0, 0, 0, 0, 1, np.inf, 2], np.float32)
    payload = Int8().encode(flat, sizes)
    back = Int8.decode(payload, sizes)
    np.testing.assert_array_equal(back[:4], 0)
    assert np.isnan(back[4:]).all()  # the receiver's checks refuse a non-finite update


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.25, 1.0])
def test_topk_keeps_the_k_largest_of_each_array_exactly(fraction) -> None:
    flat = _flat()
    codec = TopK(fraction)
    payload = codec.encode(flat, SIZES)
    back = TopK.decode(payload, SIZES)
    assert payload["index"].dtype == np.uint32 and payload["values"].dtype == np.float32
    assert payload["index"].size == sum(codec.kept(n) for n in SIZES)
    for x, y, n in zip(_segments(flat), _segments(back), SIZES, strict=True):
        k = codec.kept(n)
        assert k == (min(n, max(1, math.ceil(fraction * n))) if n else 0)
        kept = np.flatnonzero(y)
        assert kept.size == k
        np.testing.assert_array_equal(y[kept], x[kept])  # sent exactly
        if k < n:  # every value left out is no larger than every value kept
            dropped = np.setdiff1d(np.arange(n), kept)
            assert np.abs(x[dropped]).max() <= np.abs(x[kept]).min()


def test_topk_carries_the_residual_into_the_next_update() -> None:
    sizes = [10]
    codec, feedback = TopK(0.2), Feedback()
    first = np.arange(1, 11, dtype=np.float32)  # keeps 10 and 9
    sent = TopK.decode(with_feedback(codec, first, sizes, feedback), sizes)
    np.testing.assert_array_equal(np.flatnonzero(sent), [8, 9])
    np.testing.assert_array_equal(feedback.residual, np.r_[first[:8], 0, 0])
    # Nothing new: the largest left-overs (8 and 7) go now, and the rest stays carried.
    second = np.zeros(10, np.float32)
    sent2 = TopK.decode(with_feedback(codec, second, sizes, feedback), sizes)
    np.testing.assert_array_equal(sent2, np.r_[np.zeros(6), 7, 8, 0, 0])
    np.testing.assert_array_equal(feedback.residual, np.r_[first[:6], 0, 0, 0, 0])
    # Over the updates, what was sent plus what is carried is what there was to send.
    np.testing.assert_allclose(sent + sent2 + feedback.residual, first + second)


def test_feedback_is_kept_for_int8_too_and_reset_by_a_non_finite_update() -> None:
    sizes = [5]
    feedback = Feedback()
    x = np.array([1.0, 0.3, -0.004, 0.5, 0.001], np.float32)
    sent = Int8.decode(with_feedback(Int8(), x, sizes, feedback), sizes)
    np.testing.assert_allclose(sent + feedback.residual, x, atol=1e-7)
    with_feedback(Int8(), np.array([np.nan, 0, 0, 0, 0], np.float32), sizes, feedback)
    assert feedback.residual is None
    # A residual of another size (the model changed) is not added.
    feedback.residual = np.ones(3, np.float32)
    sent = Int8.decode(with_feedback(Int8(), x, sizes, feedback), sizes)
    assert np.abs(sent - x).max() <= 1 / 254 + 1e-7


_Z3 = np.frombuffer(zlib.compress(bytes(3)), np.uint8)  # three int8 zeros, deflated


@pytest.mark.parametrize(
    ("codec", "payload", "sizes", "problem"),
    [
        ("fp16", {"values": np.zeros(3, np.float32)}, [3], "not float16"),
        ("fp16", {"values": np.zeros(2, np.float16)}, [3], "2 values for 3"),
        ("int8", {"values": np.zeros(3, np.int8), "scales": np.ones(1, np.float32)}, [3],
         "not deflated bytes"),
        ("int8", {"values": _Z3, "scales": np.ones(2, np.float32)}, [3],
         "2 scales for 1 arrays"),
        ("int8", {"values": _Z3, "scales": -np.ones(1, np.float32)}, [3], "negative"),
        ("int8", {"values": _Z3, "scales": np.ones(1, np.float32)}, [2**40],
         "bytes for 1099511627776 values"),
        ("int8", {"values": _Z3, "scales": np.ones(1, np.float32)}, [2],
         "more than 2 bytes"),
        ("topk", {"index": np.array([2, 1], np.uint32), "values": np.ones(2, np.float32)}, [3],
         "not increasing"),
        ("topk", {"index": np.array([1, 1], np.uint32), "values": np.ones(2, np.float32)}, [3],
         "not increasing"),
        ("topk", {"index": np.array([3], np.uint32), "values": np.ones(1, np.float32)}, [3],
         "beyond"),
        ("topk", {"index": np.array([0], np.int32), "values": np.ones(1, np.float32)}, [3],
         "not uint"),
        ("topk", {"index": np.array([0, 1], np.uint32), "values": np.ones(1, np.float32)}, [3],
         "2 positions for 1"),
    ],
)  # fmt: skip
def test_a_payload_that_does_not_fit_is_refused_before_decoding(
    codec, payload, sizes, problem
) -> None:
    with pytest.raises(ValueError, match=problem):
        CODECS[codec].decode(payload, sizes)


def test_specs_parse_and_bad_ones_are_refused_with_a_fix() -> None:
    assert parse("none") is None and parse("none", downlink=True) is None
    assert isinstance(parse("fp16"), Fp16) and isinstance(parse("int8", downlink=True), Int8)
    assert parse("topk:0.05").fraction == 0.05 and parse("topk:5%").fraction == 0.05
    assert parse("topk:0.05").spec == "topk:0.05"
    for bad in ("zip", "topk", "topk:0", "topk:1.5", "topk:x", "int8:3", "none:1"):
        with pytest.raises(PollenError, match="compression"):
            parse(bad)
    with pytest.raises(PollenError, match="weights the server sends are not"):
        parse("topk:0.1", downlink=True)
