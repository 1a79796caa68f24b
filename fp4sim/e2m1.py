"""E2M1 (FP4) element encoding and decoding.

Codes are uint8 in 0..15, unpacked: bit 3 is the sign, bits 0-2 index the magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6 (OCP MX spec v1.0 section 5.3.3).

Fast path (round to nearest even): a 65536-entry table indexed by the top 16 bits of the
float32 pattern (sign, exponent, 7 mantissa bits). Every E2M1 rounding boundary (the ties
0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 and the saturation point 6) has at most two mantissa
bits, so the top 16 bits decide the code except when the input sits within 2^16 ulp above
a tie, or is Inf/NaN with a zero top mantissa. Those entries are marked undecided and resolved
from whether the low 16 bits are zero (fp4sim.minifloat.HighHalfTable). The tables are built
at import from the exact integer rounding in fp4sim.minifloat, which is also the slow path.
"""

from __future__ import annotations

import numpy as np

from fp4sim.float_input import as_float32, float32_bits
from fp4sim.formats import E2M1
from fp4sim.minifloat import (
    F32_ABS_MASK,
    F32_INF_BITS,
    build_high_half_table,
    decode_table,
    encode_with_high_half_table,
    round_magnitude_rne,
    round_magnitude_stochastic,
)

ROUNDINGS = ("rne", "stochastic")
NAN_POLICIES = ("ptx", "ml_dtypes")

# Values of codes 0..15, derived from the bit layout (fp4sim.formats): the eight E2M1
# magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, then their negatives.
E2M1_VALUES = decode_table(E2M1)

SIGN_CODE_BIT = 0x8
MAX_MAGNITUDE_CODE = E2M1.max_code  # 7 = 6.0


def _check_nan_policy(nan: str) -> None:
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")


def e2m1_nan_code(nan: str, negative: bool = False) -> int:
    """The code a NaN input gets under policy ``nan``.

    'ptx': +6 (code 7) whatever the sign (PTX cvt.rn.satfinite.e2m1x2.f32 on NaN);
    'ml_dtypes': zero with the sign flipped (ml_dtypes float4_e2m1fn cast: +NaN -> 8, -NaN -> 0).
    """
    _check_nan_policy(nan)
    if nan == "ptx":
        return MAX_MAGNITUDE_CODE
    return 0 if negative else SIGN_CODE_BIT


def _finish_codes(bits: np.ndarray, magnitude: np.ndarray, nan: str) -> np.ndarray:
    """Saturate magnitudes, attach signs and apply the NaN policy."""
    # PTX .satfinite (docs/numerics.md): |x| > 6 and Inf give 6.
    codes = np.minimum(magnitude, MAX_MAGNITUDE_CODE).astype(np.uint8)
    codes |= ((bits >> 28) & SIGN_CODE_BIT).astype(np.uint8)
    is_nan = (bits & F32_ABS_MASK) > F32_INF_BITS
    if is_nan.any():
        negative = (bits[is_nan] >> 31).astype(bool)
        codes[is_nan] = np.where(negative, e2m1_nan_code(nan, True), e2m1_nan_code(nan, False))
    return codes


def e2m1_encode_bits_exact(bits: np.ndarray, nan: str = "ptx") -> np.ndarray:
    """RNE codes of float32 bit patterns by exact integer arithmetic (slow, general path)."""
    bits = np.asarray(bits, dtype=np.uint32)
    abs_bits = bits & np.uint32(F32_ABS_MASK)
    finite_or_inf = np.where(abs_bits > F32_INF_BITS, np.uint32(0), abs_bits)
    return _finish_codes(bits, round_magnitude_rne(finite_or_inf, E2M1), nan)


_HIGH_HALF_TABLES = {
    policy: build_high_half_table(lambda bits, policy=policy: e2m1_encode_bits_exact(bits, policy))
    for policy in NAN_POLICIES
}


def e2m1_encode_bits_into(bits: np.ndarray, out: np.ndarray, nan: str = "ptx",
                          index: np.ndarray | None = None) -> np.ndarray:
    """RNE-encode contiguous 1-D float32 bit patterns ``bits`` into the uint8 array ``out``
    (``index``: optional uint32 scratch, see encode_with_high_half_table)."""
    _check_nan_policy(nan)
    return encode_with_high_half_table(bits, out, _HIGH_HALF_TABLES[nan], index)


def as_random_words(rbits: object, shape: tuple[int, ...]) -> np.ndarray:
    words = np.asarray(rbits)
    if words.dtype == np.uint32:
        pass
    elif words.dtype == np.uint8:
        # A byte of randomness per element is used as the top 8 bits of the word.
        words = words.astype(np.uint32) << np.uint32(24)
    else:
        raise TypeError(f"rbits must be a uint32 or uint8 array, got dtype {words.dtype}")
    if words.shape != shape:
        raise ValueError(f"rbits must have shape {shape} (one word per element), got {words.shape}")
    return words


def e2m1_encode(x: object, rounding: str = "rne", nan: str = "ptx",
                rbits: object = None) -> np.ndarray:
    """Encode ``x`` to unpacked E2M1 codes (uint8, shape of x) with saturation.

    rounding='rne': round to nearest, ties to even, decided on the exact float32 value.
    rounding='stochastic' (PTX cvt.rs.satfinite.e2m1x4.f32): needs ``rbits``, one random word
    per element (uint32, or uint8 used as the top byte); see
    fp4sim.minifloat.round_magnitude_stochastic for the exact mapping.
    nan: 'ptx' (NaN -> code 7) or 'ml_dtypes' (NaN -> zero with the sign flipped).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    _check_nan_policy(nan)
    x32 = as_float32(x)
    bits = float32_bits(x32).reshape(-1)
    if rounding == "rne":
        if rbits is not None:
            raise ValueError("rbits is only used with rounding='stochastic'")
        out = np.empty(bits.shape, dtype=np.uint8)
        return e2m1_encode_bits_into(bits, out, nan).reshape(x32.shape)
    if rbits is None:
        raise ValueError("rounding='stochastic' needs explicit random bits: pass rbits "
                         "(uint32 or uint8 array of x's shape) so results are reproducible")
    words = as_random_words(rbits, x32.shape).reshape(-1)
    abs_bits = bits & np.uint32(F32_ABS_MASK)
    finite_or_inf = np.where(abs_bits > F32_INF_BITS, np.uint32(0), abs_bits)
    magnitude = round_magnitude_stochastic(finite_or_inf, words, E2M1)
    return _finish_codes(bits, magnitude, nan).reshape(x32.shape)


def e2m1_decode(codes: object) -> np.ndarray:
    """Values (float32) of unpacked E2M1 codes 0..15."""
    arr = np.asarray(codes)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"codes must be an integer array, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 15):
        raise ValueError(f"E2M1 codes must lie in 0..15, got range [{arr.min()}, {arr.max()}]")
    return E2M1_VALUES.take(arr.astype(np.intp, copy=False))
