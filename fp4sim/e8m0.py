"""E8M0 (OCP MX scale) encoding and decoding: byte b means 2^(b - 127), 0xFF is NaN."""

from __future__ import annotations

import numpy as np

from fp4sim.float_input import as_float32, float32_bits
from fp4sim.formats import E8M0
from fp4sim.minifloat import F32_ABS_MASK, F32_INF_BITS, F32_MANTISSA_MASK, decode_table

E8M0_ROUNDINGS = ("floor", "ceil")
OVERFLOW_POLICIES = ("saturate", "nan")
E8M0_NAN = E8M0.nan_code  # 0xFF (OCP MX spec v1.0 section 5.4.1)
E8M0_MAX = E8M0.max_code  # 0xFE = 2^127


def biased_log2_bits(abs_bits: np.ndarray, rounding: str) -> np.ndarray:
    """floor or ceil of log2|x|, plus 127, from float32 magnitude patterns (int64, unclamped).

    Exact for every finite non-zero magnitude, float32 subnormals included; zero gives -1000.
    """
    a = np.asarray(abs_bits).astype(np.int64)
    exp_field = a >> 23
    mant = a & F32_MANTISSA_MASK
    # A float32 subnormal m * 2^-149 (1 <= m < 2^23) has floor(log2) = bit_length(m) - 150.
    # bit_length(m) - 1 read from the exponent field of float64(m) (exact for m < 2^53).
    sub_bits = np.where(mant > 0, mant, 1).astype(np.float64).view(np.uint64)
    sub_floor = (sub_bits >> np.uint64(52)).astype(np.int64) - 1023 - 149 + 127
    if rounding == "floor":
        result = np.where(exp_field > 0, exp_field, sub_floor)
    else:
        # ceil(log2 x) = floor(log2 x) + 1 unless x is a power of two.
        sub_pow2 = (mant & (mant - 1)) == 0
        result = np.where(exp_field > 0, exp_field + (mant != 0), sub_floor + ~sub_pow2)
    return np.where(a == 0, -1000, result)


def e8m0_encode_bits(bits: np.ndarray, rounding: str = "floor",
                     overflow: str = "saturate") -> np.ndarray:
    """E8M0 bytes of float32 bit patterns: 2^floor(log2 x) or 2^ceil(log2 x), from the fields.

    Zero and values below 2^-127 clamp to byte 0 (the smallest scale); NaN and negative
    values give 0xFF; Inf and values above 2^127 give 0xFE ('saturate') or 0xFF ('nan').
    """
    if rounding not in E8M0_ROUNDINGS:
        raise ValueError(f"rounding must be one of {E8M0_ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    bits = np.asarray(bits, dtype=np.uint32)
    abs_bits = (bits & np.uint32(F32_ABS_MASK)).astype(np.int64)
    byte = biased_log2_bits(abs_bits, rounding)
    over = (byte > E8M0_MAX) | (abs_bits == F32_INF_BITS)
    byte = np.clip(byte, 0, E8M0_MAX)
    byte = np.where(over, E8M0_MAX if overflow == "saturate" else E8M0_NAN, byte)
    negative = ((bits >> 31) == 1) & (abs_bits != 0)
    byte = np.where((abs_bits > F32_INF_BITS) | negative, E8M0_NAN, byte)
    return byte.astype(np.uint8)


def e8m0_encode(x: object, rounding: str = "floor", overflow: str = "saturate") -> np.ndarray:
    """Encode positive values as E8M0 bytes (uint8, shape of x); see ``e8m0_encode_bits``."""
    x32 = as_float32(x)
    return e8m0_encode_bits(float32_bits(x32), rounding, overflow).reshape(x32.shape)


# Byte b means 2^(b - 127) (2^-127 is a float32 subnormal), 0xFF NaN, from fp4sim.formats.
E8M0_VALUES = decode_table(E8M0)


def e8m0_decode(codes: object) -> np.ndarray:
    """Values (float32) of E8M0 bytes; 0xFF decodes to NaN."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise TypeError(f"E8M0 codes must be a uint8 array, got dtype {arr.dtype}")
    return E8M0_VALUES.take(arr)
