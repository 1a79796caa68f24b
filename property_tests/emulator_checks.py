"""Properties of the FP4 emulator as plain functions ``check_xxx(impl, ...)``.

``impl`` is any object with the fp4sim API (``e2m1_encode``, ``e2m1_decode``, ``pack_fp4``,
``unpack_fp4``, ``quantize``, ``dequantize``, ``fake_quantize``): the real ``fp4sim`` module,
or a deliberately broken variant (test_emulator_mutants.py). Each check raises AssertionError
when the property fails, so the same checks serve the property tests and the mutant tests.

The independent references here never call fp4sim: element rounding is ml_dtypes' cast
(float4_e2m1fn, float8_e4m3fn) or a nearest-value search in Python floats, exponents come
from math.frexp, and block maxima from np.max on floats. Only the block-size table is read
from fp4sim.formats (a fact, pinned to the specs by test_formats.py, not a computation).
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np

from fp4sim.formats import BLOCK_SIZES as BLOCK

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn
FLT_MAX = np.float32(np.finfo(np.float32).max)
# The E2M1 magnitudes 0 .. 6 of codes 0..7 (OCP MX v1.0 section 5.3.3), decoded by ml_dtypes:
# the independent oracle is the point of these checks, so the grid does not come from fp4sim.
GRID = tuple(float(v) for v in np.arange(8, dtype=np.uint8).view(F4).astype(np.float64))


# --- independent references ---------------------------------------------------------------

def nan_code(nan: str, negative: bool = False) -> int:
    """docs/numerics.md: PTX NaN -> +6 (7); ml_dtypes NaN -> zero with the sign flipped."""
    if nan == "ptx":
        return 7
    return 0 if negative else 8


def slow_e2m1_code(v: float, nan: str = "ptx") -> int:
    """Nearest E2M1 value by distance in Python floats; ties to the even code; saturating."""
    if math.isnan(v):
        return nan_code(nan, math.copysign(1.0, v) < 0)
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a >= 6.0:
        return sign | 7
    best = min(range(8), key=lambda c: (abs(a - GRID[c]), c & 1))
    return sign | best


def slow_e2m1_stochastic(v: float, word: int, nan: str = "ptx") -> int:
    """Stochastic rounding with exact fractions: |v|/q in 32.32 fixed point (fraction bits
    below 2^-32 truncated) plus the 32-bit word; a carry rounds away from zero; saturate."""
    if math.isnan(v):
        return nan_code(nan, math.copysign(1.0, v) < 0)
    sign = 8 if math.copysign(1.0, v) < 0 else 0
    if math.isinf(v) or abs(v) >= 8.0:
        return sign | 7
    a = Fraction(abs(v))
    q = Fraction(1, 2) if a < 2 else (Fraction(1) if a < 4 else Fraction(2))
    steps = math.floor(a / q)
    fraction_bits = math.floor((a / q - steps) * 2**32)
    steps += (fraction_bits + word) >= 2**32
    value = min(steps * q, Fraction(6))
    return sign | GRID.index(float(value))


def oracle_e2m1_codes(y: np.ndarray, nan: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        codes = np.asarray(y, dtype=np.float32).astype(F4).view(np.uint8).copy()
    if nan == "ptx":
        codes[np.isnan(y)] = 7
    return codes


def _reciprocal_codes(blocks: np.ndarray, nan: str) -> np.ndarray:
    sign = np.where(np.signbit(blocks), 8, 0)
    return np.where(blocks == 0, nan_code(nan), sign | 7).astype(np.uint8)


def _mx_exponent(amax: float, rule: str) -> int:
    """The MX shared exponent from its defining formula (math.frexp, Python floats)."""
    if amax == 0:
        return -127
    if rule == "rceil":
        amax = float(np.float32(amax) / np.float32(6.0))
        if amax == 0:  # the float32 quotient underflowed: ceil(log2 0) = -inf
            return -127
    floor_log2 = math.frexp(amax)[1] - 1
    is_power = amax == 2.0**floor_log2
    if rule == "floor":  # OCP MX spec v1.0 section 6.3
        e = floor_log2 - 2
    elif rule == "ceil":
        e = floor_log2 + (not is_power) - 2
    elif rule == "even":  # mantissa rounded to 1 bit (1.75 and up bump the exponent)
        e = floor_log2 + (amax / 2.0**floor_log2 >= 1.75) - 2
    elif rule == "rceil":
        e = floor_log2 + (not is_power)
    else:
        raise ValueError(rule)
    return max(-127, min(127, e))


def reference_quantize(x: np.ndarray, fmt: str = "nvfp4", axis: int = -1, nan: str = "ptx",
                       scale_rule: str = "rceil", tensor_scale=None,
                       scale_op: str = "reciprocal", scale_amax_op: str = "divide",
                       scale_lower_clamp: bool = False, zero_scale_codes: str = "zeros"):
    """(codes, scale_bits) in the layout of fp4sim.quantize, by an independent route."""
    bs = BLOCK[fmt]
    moved = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    blocks = np.ascontiguousarray(moved).reshape(-1, bs)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.max(np.abs(blocks), axis=1)
        nan_block = np.isnan(amax)
        amax = np.where(np.isinf(amax), FLT_MAX, amax)
        if fmt == "nvfp4":
            t = None
            if tensor_scale == "amax":
                tensor_amax = np.max(amax) if blocks.size else np.float32(0)
                t = np.float32(tensor_amax / np.float32(2688))
                t = np.float32(1) if t == 0 else t  # zero or underflowing tensor amax
            elif tensor_scale is not None:
                t = np.float32(tensor_scale)
            if scale_amax_op == "divide":
                v = amax / np.float32(6)
            else:
                v = amax * (np.float32(1) / np.float32(6))
            if t is not None:
                v = v / t
            if scale_lower_clamp:
                v = np.maximum(v, np.float32(2.0**-6))
            scale_bits = np.minimum(v, np.float32(448)).astype(F8).view(np.uint8).copy()
            scale_bits[np.isnan(v)] = 0x7F
            s_eff = scale_bits.view(F8).astype(np.float32)
            if t is not None:
                s_eff = s_eff * t
            if scale_op == "reciprocal":
                multiplier = np.float32(1) / s_eff
                y = blocks * multiplier[:, None]
            else:
                multiplier = None
                y = blocks / s_eff[:, None]
            codes = oracle_e2m1_codes(y, nan)
            zero = (s_eff == 0) & ~nan_block
            if zero_scale_codes == "zeros":
                codes[zero] = 0
            else:
                codes[zero] = _reciprocal_codes(blocks[zero], nan)
            if multiplier is not None:
                over = np.isinf(multiplier) & (s_eff > 0) & ~nan_block
                codes[over] = _reciprocal_codes(blocks[over], nan)
        else:
            exps = np.array([_mx_exponent(float(a), scale_rule) if not np.isnan(a) else 0
                             for a in amax], dtype=np.int64)
            scale_bits = (exps + 127).astype(np.uint8)
            scale_bits[nan_block] = 0xFF
            y = (blocks.astype(np.float64) / np.exp2(exps.astype(np.float64))[:, None])
            codes = oracle_e2m1_codes(y.astype(np.float32), nan)
            codes[amax == 0] = 0
        codes[nan_block] = nan_code(nan)
    codes = np.moveaxis(codes.reshape(moved.shape), -1, axis)
    scale_bits = np.moveaxis(scale_bits.reshape(moved.shape[:-1] + (-1,)), -1, axis)
    return codes, scale_bits


# --- element checks -----------------------------------------------------------------------

def check_e2m1_matches_slow_reference(impl, x: np.ndarray, nan: str = "ptx") -> None:
    x = np.asarray(x, dtype=np.float32)
    got = impl.e2m1_encode(x, nan=nan)
    want = np.array([slow_e2m1_code(float(v), nan) for v in x.reshape(-1)], dtype=np.uint8)
    bad = np.flatnonzero(got.reshape(-1) != want)
    assert bad.size == 0, (f"e2m1_encode differs at {bad.size} inputs, e.g. "
                           f"{x.reshape(-1)[bad[:4]]!r}: got {got.reshape(-1)[bad[:4]]}, "
                           f"want {want[bad[:4]]}")


def check_e2m1_round_trip(impl) -> None:
    codes = np.arange(16, dtype=np.uint8)
    values = impl.e2m1_decode(codes)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(np.abs(values[:8]), np.array(GRID, dtype=np.float32))
    np.testing.assert_array_equal(np.signbit(values), codes >= 8)
    np.testing.assert_array_equal(impl.e2m1_encode(values), codes)


def check_e2m1_sign_symmetry(impl, x: np.ndarray) -> None:
    x = np.asarray(x, dtype=np.float32)
    x = x[~np.isnan(x)]
    np.testing.assert_array_equal(impl.e2m1_encode(-x), impl.e2m1_encode(x) ^ 8)


def check_e2m1_monotone(impl, x: np.ndarray) -> None:
    x = np.sort(np.asarray(x, dtype=np.float32)[~np.isnan(x)])
    decoded = impl.e2m1_decode(impl.e2m1_encode(x)).astype(np.float64)
    assert np.all(np.diff(decoded) >= 0), "decoded E2M1 values are not monotone in x"


def check_e2m1_saturation(impl, x: np.ndarray) -> None:
    x = np.asarray(x, dtype=np.float32)
    big = ~np.isnan(x) & (np.abs(x) >= 6)
    codes = impl.e2m1_encode(x[big])
    np.testing.assert_array_equal(codes, np.where(np.signbit(x[big]), 15, 7).astype(np.uint8))


def check_e2m1_stochastic_matches_slow(impl, x: np.ndarray, words: np.ndarray,
                                       nan: str = "ptx") -> None:
    x = np.asarray(x, dtype=np.float32)
    got = impl.e2m1_encode(x, rounding="stochastic", rbits=words, nan=nan)
    want = np.array([slow_e2m1_stochastic(float(v), int(w), nan)
                     for v, w in zip(x.reshape(-1), words.reshape(-1), strict=True)],
                    dtype=np.uint8)
    bad = np.flatnonzero(got.reshape(-1) != want)
    assert bad.size == 0, (f"stochastic codes differ at {x.reshape(-1)[bad[:4]]!r} with words "
                           f"{words.reshape(-1)[bad[:4]]}: got {got.reshape(-1)[bad[:4]]}, "
                           f"want {want[bad[:4]]}")


def check_e2m1_stochastic_unbiased(impl, x: np.ndarray) -> None:
    """Averaged over all 256 one-byte words, stochastic rounding of v in [-6, 6] returns v up
    to the byte's resolution: |mean - v| <= q / 256 (q the grid step at v), deterministically."""
    x = np.asarray(x, dtype=np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= 6)]
    words = np.arange(256, dtype=np.uint8)
    grid_x = np.repeat(x[:, None], 256, axis=1)
    grid_w = np.broadcast_to(words, grid_x.shape).copy()
    mean = impl.e2m1_decode(impl.e2m1_encode(grid_x, rounding="stochastic",
                                             rbits=grid_w)).astype(np.float64).mean(axis=1)
    a = np.abs(x.astype(np.float64))
    q = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))
    err = np.abs(mean - x)
    assert np.all(err <= q / 256 + 1e-12), f"biased: max |mean - x| / q = {np.max(err / q)}"


def check_pack_nibble_order(impl, codes: np.ndarray) -> None:
    """Element 2i in the low nibble, 2i+1 in the high nibble (docs/numerics.md, Packing)."""
    codes = np.asarray(codes, dtype=np.uint8)
    packed = impl.pack_fp4(codes, axis=-1)
    want = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(impl.unpack_fp4(packed, axis=-1), codes)


# --- block checks -------------------------------------------------------------------------

def check_quantize_matches_reference(impl, x: np.ndarray, fmt: str = "nvfp4", axis: int = -1,
                                     **settings) -> None:
    q = impl.quantize(x, fmt, axis, **settings)
    codes, scale_bits = reference_quantize(x, fmt, axis, **settings)
    assert q.scale_bits.shape == scale_bits.shape, (q.scale_bits.shape, scale_bits.shape)
    bad = np.argwhere(q.scale_bits != scale_bits)
    assert bad.size == 0, (f"scale bytes differ at {len(bad)} blocks, first {bad[0]}: got "
                           f"{q.scale_bits[tuple(bad[0])]}, want {scale_bits[tuple(bad[0])]}")
    bad = np.argwhere(q.codes != codes)
    assert bad.size == 0, (f"codes differ at {len(bad)} elements, first {bad[0]} "
                           f"(x={x[tuple(bad[0])]!r}): got {q.codes[tuple(bad[0])]}, "
                           f"want {codes[tuple(bad[0])]}")
    ax = axis % np.ndim(x)
    want_packed = np.moveaxis(np.moveaxis(codes, ax, -1)[..., 0::2]
                              | (np.moveaxis(codes, ax, -1)[..., 1::2] << 4), -1, ax)
    np.testing.assert_array_equal(q.packed, want_packed)


def check_fake_quantize_idempotent(impl, x: np.ndarray, fmt: str = "nvfp4", **settings) -> None:
    """fake_quantize(fake_quantize(x)) == fake_quantize(x), bit for bit.

    For NVFP4 this holds for blocks with a zero or normal E4M3 scale (amax >= 6 * 2^-6):
    there the scale is within 1/16 of amax/6, the block maximum lands on 6 and the second
    pass finds the same scale. With a subnormal scale the maximum may land on 4 and the
    second pass picks a smaller scale (a real NVFP4 property), so those blocks are skipped.
    """
    q = impl.quantize(x, fmt, **settings)
    once = impl.dequantize(q)
    twice = impl.fake_quantize(once, fmt, **settings)
    bs = BLOCK[fmt]
    if fmt == "nvfp4":
        stable = (q.scale_bits == 0) | ((q.scale_bits.astype(np.int64) >> 3) >= 1)
    else:
        stable = np.ones(q.scale_bits.shape, dtype=bool)
    stable = np.repeat(stable, bs, axis=-1)
    np.testing.assert_array_equal(twice.view(np.uint32)[stable], once.view(np.uint32)[stable])


def check_power_of_two_invariance(impl, x: np.ndarray, fmt: str, k: int) -> bool:
    """Codes of x * 2^k equal those of x when every block scale of both stays a normal,
    unsaturated scale; returns False (nothing checked) when the scales leave that range."""
    x = np.asarray(x, dtype=np.float32)
    scaled = (x * np.float32(2.0**k)).astype(np.float32)
    if not np.array_equal(scaled.astype(np.float64), x.astype(np.float64) * 2.0**k):
        return False  # the scaling itself was inexact (underflow/overflow)
    q0, q1 = impl.quantize(x, fmt), impl.quantize(scaled, fmt)
    s0, s1 = q0.scale_bits.astype(np.int64), q1.scale_bits.astype(np.int64)
    if fmt == "nvfp4":
        # Normal E4M3 scales (exponent field 1..15) below 448, both before and after.
        ok = ((s0 >> 3) >= 1) & ((s1 >> 3) >= 1) & (s0 < 0x7E) & (s1 < 0x7E)
    else:
        ok = (s0 >= 1) & (s0 <= 253) & (s1 >= 1) & (s1 <= 253)
    if not ok.all():
        return False
    np.testing.assert_array_equal(q1.codes, q0.codes)
    if fmt == "nvfp4":
        np.testing.assert_array_equal(s1, s0 + 8 * k)
    else:
        np.testing.assert_array_equal(s1, s0 + k)
    return True


def check_quantize_sign_symmetry(impl, x: np.ndarray, fmt: str = "nvfp4") -> None:
    """quantize(-x) has the same scales and codes with the sign bit flipped, except in blocks
    whose codes are all forced to 0 (zero scale, zero amax). x must be NaN-free."""
    x = np.asarray(x, dtype=np.float32)
    q_pos, q_neg = impl.quantize(x, fmt), impl.quantize(-x, fmt)
    np.testing.assert_array_equal(q_neg.scale_bits, q_pos.scale_bits)
    bs = BLOCK[fmt]
    forced = (q_pos.scale_bits == 0) if fmt == "nvfp4" else (q_pos.block_amax == 0)
    forced = np.repeat(forced, bs, axis=-1)
    want = np.where(forced, q_pos.codes, q_pos.codes ^ 8)
    np.testing.assert_array_equal(q_neg.codes, want)


def check_block_monotone(impl, x: np.ndarray, fmt: str = "nvfp4") -> None:
    """Within a block (one scale), a larger x never dequantizes to a smaller value."""
    x = np.asarray(x, dtype=np.float32)
    deq = impl.fake_quantize(x, fmt)
    bs = BLOCK[fmt]
    xb, db = x.reshape(-1, bs), deq.reshape(-1, bs).astype(np.float64)
    order = np.argsort(xb, axis=1, kind="stable")
    sorted_deq = np.take_along_axis(db, order, axis=1)
    assert np.all(np.diff(sorted_deq, axis=1) >= 0), "dequantized values not monotone in x"


def check_nvfp4_flush_threshold(impl, exponent_shift: int = 0) -> None:
    """docs/numerics.md: with no tensor scale a block with amax/6 <= 2^-10 (half the smallest
    E4M3 subnormal; the tie goes to 0) gets scale 0 and dequantizes to 0; just above, the
    scale is 2^-9 and the block survives."""
    threshold = np.float32(6 * 2.0**-10)
    above = np.nextafter(threshold, np.float32(1))
    x = np.zeros((3, 16), dtype=np.float32)
    x[0, 0] = threshold
    x[1, 0] = above
    x[2, :] = np.float32(1e-30)
    q = impl.quantize(x, "nvfp4")
    np.testing.assert_array_equal(q.scale_bits[:, 0], np.array([0, 1, 0], dtype=np.uint8))
    deq = impl.dequantize(q)
    assert np.all(deq[0] == 0) and np.all(deq[2] == 0) and deq[1, 0] > 0
    np.testing.assert_array_equal(q.flushed_blocks[:, 0], [True, False, True])
