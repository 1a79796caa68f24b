"""E4M3 "fn" (OCP OFP8) encoding and decoding: the NVFP4 block-scale format.

Codes are uint8: bit 7 sign, bits 3-6 exponent (bias 7), bits 0-2 mantissa; 0x7F/0xFF NaN.
RNE uses the same top-16-bit table as E2M1 (every E4M3 tie has at most 4 mantissa bits).
"""

from __future__ import annotations

import numpy as np

from fp4sim.float_input import as_float32, float32_bits
from fp4sim.formats import E4M3FN
from fp4sim.minifloat import (
    F32_ABS_MASK,
    F32_INF_BITS,
    build_high_half_table,
    decode_table,
    encode_with_high_half_table,
    round_magnitude_rne,
)

OVERFLOW_POLICIES = ("saturate", "nan")
NAN_POLICIES = ("ptx", "ml_dtypes")
E4M3_NAN = E4M3FN.nan_code  # 0x7F
E4M3_MAX_CODE = E4M3FN.max_code  # 0x7E = 448


def _check_policies(overflow: str, nan: str) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")


def e4m3_encode_bits_exact(bits: np.ndarray, overflow: str = "saturate",
                           nan: str = "ptx") -> np.ndarray:
    """RNE E4M3 codes of float32 bit patterns by exact integer arithmetic (general path)."""
    bits = np.asarray(bits, dtype=np.uint32)
    abs_bits = bits & np.uint32(F32_ABS_MASK)
    is_nan = abs_bits > F32_INF_BITS
    magnitude = round_magnitude_rne(np.where(is_nan, np.uint32(0), abs_bits), E4M3FN)
    if overflow == "saturate":
        # PTX cvt.rn.satfinite.e4m3x2.f32: out-of-range values and Inf give +-448.
        magnitude = np.minimum(magnitude, E4M3_MAX_CODE)
    else:
        # ml_dtypes float8_e4m3fn: values rounding past 448 and Inf become NaN.
        magnitude = np.where(magnitude > E4M3_MAX_CODE, E4M3_NAN, magnitude)
    codes = magnitude.astype(np.uint8) | ((bits >> 24) & 0x80).astype(np.uint8)
    if is_nan.any():
        # PTX gives the canonical NaN 0x7F; ml_dtypes keeps the input's sign.
        keep_sign = nan == "ml_dtypes"
        codes[is_nan] = E4M3_NAN | (((bits[is_nan] >> 24) & 0x80) if keep_sign else 0)
    return codes


_TABLES = {
    (overflow, nan): build_high_half_table(
        lambda b, overflow=overflow, nan=nan: e4m3_encode_bits_exact(b, overflow, nan),
        wide=True)
    for overflow in OVERFLOW_POLICIES for nan in NAN_POLICIES
}


def e4m3_encode(x: object, overflow: str = "saturate", nan: str = "ptx") -> np.ndarray:
    """Encode ``x`` to E4M3FN codes (uint8, shape of x), round to nearest even.

    overflow='saturate' (default, PTX .satfinite): beyond 448 and Inf give +-448 (0x7E/0xFE).
    overflow='nan' (ml_dtypes): values that round past 448, and Inf, give NaN.
    nan='ptx': NaN -> 0x7F; nan='ml_dtypes': NaN keeps its sign (0x7F or 0xFF).
    """
    _check_policies(overflow, nan)
    x32 = as_float32(x)
    bits = float32_bits(x32).reshape(-1)
    out = np.empty(bits.shape, dtype=np.uint8)
    encode_with_high_half_table(bits, out, _TABLES[(overflow, nan)])
    return out.reshape(x32.shape)


# Arithmetic RNE for the block-scale path (PTX .satfinite, NaN -> 0x7F); no table, no
# undecided entries. Normals: RNE of the float32 pattern to 3 mantissa bits (a carry out of
# the mantissa is the next binade, as it should be). Subnormals (|x| < 2^-6): adding 2^14,
# whose float32 ulp is 2^-9 (E4M3's subnormal spacing), rounds to nearest even there.
_MIN_NORMAL_BITS = np.uint32(0x3C800000)  # float32 2^-6
_ROUND_TO_3_BITS = np.uint32((1 << 19) - 1)  # half an E4M3 ulp (2^20 patterns) minus one
_EXPONENT_REBIAS = np.uint32((127 - 7) << 3)  # float32 -> E4M3 exponent, in code units
_SUBNORMAL_MAGIC = np.float32(2.0 ** 14)


def e4m3_encode_satfinite(x: np.ndarray) -> np.ndarray:
    """``e4m3_encode(x, 'saturate', 'ptx')`` for a float32 array, by uint32 arithmetic
    (the block-scale path). Bit-exact with the table for every float32 pattern."""
    bits = float32_bits(x).reshape(-1)
    # Block scales are >= 0 and rarely NaN: one max skips the sign and NaN passes then.
    signed_or_nan = bits.size > 0 and bits.max() > F32_INF_BITS
    magnitude = bits & np.uint32(F32_ABS_MASK) if signed_or_nan else bits
    code = magnitude >> 20
    code &= np.uint32(1)  # the kept LSB: ties go to even
    code += magnitude
    code += _ROUND_TO_3_BITS
    code >>= 20
    code -= _EXPONENT_REBIAS  # wraps below 2^-6: replaced next
    small = magnitude < _MIN_NORMAL_BITS
    if small.any():
        rounded = (magnitude[small].view(np.float32) + _SUBNORMAL_MAGIC).view(np.uint32)
        code[small] = rounded - _SUBNORMAL_MAGIC.view(np.uint32)
    if code.max() > E4M3_MAX_CODE:  # (a max is cheaper than np.minimum with a scalar)
        np.minimum(code, np.uint32(E4M3_MAX_CODE), out=code)  # Inf and beyond 448 give 448
    if signed_or_nan:
        code |= (bits >> 24) & np.uint32(0x80)
        code[magnitude > F32_INF_BITS] = E4M3_NAN
    return code.astype(np.uint8).reshape(np.shape(x))


# OCP OFP8 E4M3: subnormal m * 2^-9, normal (1 + m/8) * 2^(e - 7), from fp4sim.formats.
E4M3_VALUES = decode_table(E4M3FN)


def e4m3_decode(codes: object) -> np.ndarray:
    """Values (float32) of E4M3FN codes (uint8); 0x7F and 0xFF decode to NaN."""
    arr = np.asarray(codes)
    if arr.dtype != np.uint8:
        raise TypeError(f"E4M3 codes must be a uint8 array, got dtype {arr.dtype}")
    return E4M3_VALUES.take(arr)
