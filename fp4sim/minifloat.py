"""Exact rounding of float32 magnitudes to the grid of a small float format, on bit patterns.

This is the slow, general path (int64 arithmetic on the float32 fields). It serves E4M3 and
E8M0-free scale encoding directly, builds the E2M1 lookup table, resolves the rare inputs the
table cannot decide, and implements stochastic rounding. No floating-point arithmetic is used,
so the result does not depend on the FPU's rounding or flush-to-zero mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fp4sim.formats import ElementFormat

# IEEE 754 binary32 fields.
F32_MANTISSA_BITS = 23
F32_EXPONENT_MASK = 0x7F800000
F32_MANTISSA_MASK = 0x007FFFFF
F32_ABS_MASK = 0x7FFFFFFF
F32_INF_BITS = 0x7F800000
F32_MAX_BITS = 0x7F7FFFFF
F32_SIGN_BIT = 0x80000000
# Shifts are capped here: (m << 32) >> 62 is 0 for any 24-bit m, and int64 stays exact.
_MAX_SHIFT = 62


def _significand_and_shift(abs_bits: np.ndarray, fmt: ElementFormat) -> tuple[np.ndarray, ...]:
    """Split magnitudes into the integer significand m and the shift s with |x|/q = m / 2^s.

    q is the spacing of ``fmt``'s grid in the binade of |x|: 2^(max(e, emin) - mbits).
    Also returns the code offset of that binade, ((max(e, emin) - emin) << mbits).
    """
    a = abs_bits.astype(np.int64)
    exp_field = a >> F32_MANTISSA_BITS
    mant = a & F32_MANTISSA_MASK
    # float32 normals carry an implicit leading 1; subnormals have exponent -126.
    m = np.where(exp_field > 0, mant | (1 << F32_MANTISSA_BITS), mant)
    e = np.maximum(exp_field, 1) - 127
    grid_e = np.maximum(e, fmt.min_exponent)
    shift = np.minimum(F32_MANTISSA_BITS + grid_e - fmt.mantissa_bits - e, _MAX_SHIFT)
    offset = (grid_e - fmt.min_exponent) << fmt.mantissa_bits
    return m, shift, offset


def round_magnitude_rne(abs_bits: np.ndarray, fmt: ElementFormat) -> np.ndarray:
    """Unsaturated magnitude code of RNE(|x|) on ``fmt``'s grid (int64; may exceed max_code).

    ``abs_bits`` are float32 bit patterns without sign and not NaN (Inf gives a huge code).
    """
    m, s, offset = _significand_and_shift(abs_bits, fmt)
    # IEEE 754 roundTiesToEven: add half-ulp minus one, plus one more when the kept LSB is odd.
    half_minus_one = (np.int64(1) << (s - 1)) - 1
    n = (m + half_minus_one + ((m >> s) & 1)) >> s
    return n + offset


def round_magnitude_stochastic(abs_bits: np.ndarray, rbits32: np.ndarray,
                               fmt: ElementFormat) -> np.ndarray:
    """Unsaturated magnitude code of stochastic rounding of |x| on ``fmt``'s grid (int64).

    Mapping (the emulator's documented choice): |x|/q is written in 32.32 fixed point,
    truncating fraction bits below 2^-32 of a grid step; the element's own uint32 random word
    is added to those 32 fraction bits and the carry into the integer part rounds away from
    zero. Where |x| has at most 32 discarded bits (every |x| >= 2^-10 for E2M1) only the top
    bits of the word matter, as PTX describes for cvt.rs (random bits added to the discarded
    mantissa bits). P(round up) = fraction, so the result is unbiased up to 2^-32 of a step.
    """
    m, s, offset = _significand_and_shift(abs_bits, fmt)
    fixed = (m << 32) >> s  # m < 2^24, so m << 32 < 2^56 fits int64
    n = (fixed + rbits32.astype(np.int64)) >> 32
    return n + offset


def decode_table(fmt: ElementFormat) -> np.ndarray:
    """float32 value of every code of ``fmt`` (index = code), from its bit layout; NaN codes
    hold a positive NaN. Read-only (the decoders index it)."""
    magnitudes = np.full(1 << (fmt.exponent_bits + fmt.mantissa_bits), np.nan)
    magnitudes[: fmt.max_code + 1] = fmt.magnitudes()  # exact in float64 and in float32
    values = np.concatenate([magnitudes, -magnitudes]) if fmt.signed else magnitudes
    values = np.where(np.isnan(values), np.nan, values).astype(np.float32)
    values.flags.writeable = False
    return values


# --- Fast path: decide the code from the top 16 bits of the float32 pattern -----------------

UNDECIDED = 0xFF  # marker in a uint8 table: the top 16 bits do not decide the code
UNDECIDED_WIDE = 0xFFFF  # marker in a uint16 table (formats that use all 256 codes)
TABLE_CHUNK = 1 << 17  # elements per pass: temporaries near L2 size, few NumPy calls


@dataclass(frozen=True, eq=False)
class HighHalfTable:
    """Codes decided by the top 16 bits of a float32 pattern.

    ``code[h]`` is the code of every pattern with top bits h, or the UNDECIDED marker. For an
    undecided h the code is ``base[h]`` when the low 16 bits are 0 and ``base[h] + step[h]``
    (mod 256) otherwise: every rounding boundary of the formats here lies on a pattern with
    zero low 16 bits (ties have at most 4 mantissa bits), and Inf (low bits 0) differs from
    the NaNs beside it. ``build_high_half_table`` verifies this for every h.
    """

    code: np.ndarray
    base: np.ndarray
    step: np.ndarray

    @property
    def marker(self) -> int:
        return UNDECIDED_WIDE if self.code.dtype == np.uint16 else UNDECIDED


def build_high_half_table(encode_exact: Callable[[np.ndarray], np.ndarray],
                          wide: bool = False) -> HighHalfTable:
    """Tabulate ``encode_exact(bits_uint32) -> uint8 codes`` by the top 16 bits (uint8 table,
    or uint16 when ``wide``, for formats that use all 256 codes)."""
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    at_zero = encode_exact(high)
    at_one = encode_exact(high | np.uint32(1))
    at_max = encode_exact(high | np.uint32(0xFFFF))
    if not np.array_equal(at_one, at_max):
        raise ValueError("a rounding boundary lies inside a 2^16-pattern range")
    decided = at_zero == at_max
    dtype = np.uint16 if wide else np.uint8
    marker = UNDECIDED_WIDE if wide else UNDECIDED
    if not wide and (at_zero[decided] == UNDECIDED).any():
        raise ValueError("a decided code collides with the UNDECIDED marker: use wide=True")
    code = np.where(decided, at_zero.astype(dtype), dtype(marker))
    step = (at_max.astype(np.int64) - at_zero.astype(np.int64)) % 256
    tables = HighHalfTable(code=code, base=at_zero.astype(np.uint8), step=step.astype(np.uint8))
    for array in (tables.code, tables.base, tables.step):
        array.flags.writeable = False
    return tables


def encode_with_high_half_table(bits: np.ndarray, out: np.ndarray, tables: HighHalfTable,
                                index: np.ndarray | None = None) -> np.ndarray:
    """Encode 1-D uint32 patterns ``bits`` into uint8 ``out`` by table lookup, chunked.

    ``index``: optional uint32 scratch of at least min(n, TABLE_CHUNK) elements, for callers
    that encode many chunks (a fresh temporary per call costs more than the lookup)."""
    n = bits.shape[0]
    wide = tables.code.dtype == np.uint16
    marker = tables.marker
    if index is None or index.size < min(n, TABLE_CHUNK):
        index = np.empty(min(n, TABLE_CHUNK), dtype=np.uint32)
    looked_up = np.empty(min(n, TABLE_CHUNK), dtype=np.uint16) if wide else None
    for start in range(0, n, TABLE_CHUNK):
        stop = min(start + TABLE_CHUNK, n)
        chunk_index = index[: stop - start]
        np.right_shift(bits[start:stop], 16, out=chunk_index)
        chunk = looked_up[: stop - start] if wide else out[start:stop]
        tables.code.take(chunk_index, out=chunk, mode="wrap")  # indices < 2^16
        if chunk.max(initial=0) == marker:
            undecided = np.flatnonzero(chunk == marker)
            high = chunk_index[undecided]
            low_nonzero = (bits[start:stop][undecided] & np.uint32(0xFFFF)) != 0
            chunk[undecided] = tables.base[high] + low_nonzero * tables.step[high]
        if wide:
            out[start:stop] = chunk
    return out
