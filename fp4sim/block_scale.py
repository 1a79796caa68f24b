"""Block scales: the NVFP4 E4M3 block scale and the MX E8M0 scale rules.

Inputs are per-block amax values (float32, >= 0, possibly Inf or NaN). Inf saturates: it is
treated as the largest finite float32 when a scale is computed. NaN gives the NaN scale
(E4M3 0x7F, E8M0 0xFF).
"""

from __future__ import annotations

import numpy as np

from fp4sim.e4m3 import e4m3_encode_satfinite
from fp4sim.e8m0 import E8M0_MAX, E8M0_NAN, e8m0_decode
from fp4sim.formats import E2M1, E4M3FN
from fp4sim.minifloat import F32_INF_BITS, F32_MANTISSA_MASK, F32_MAX_BITS

MX_SCALE_RULES = ("rceil", "floor", "even", "ceil")
SCALE_AMAX_OPS = ("divide", "reciprocal")
E2M1_MAX = np.float32(E2M1.max_value)  # 6
E2M1_EMAX = E2M1.max_exponent  # floor(log2 6) = 2: OCP MX spec v1.0 section 6.3
E4M3_MIN_NORMAL = np.float32(E4M3FN.min_normal)  # 2^-6
_F32_EXP_SHIFT = 23
_CEIL_CARRY = np.uint32(F32_MANTISSA_MASK)  # a non-zero mantissa carries into the exponent
_EVEN_CARRY = np.uint32(1 << 21)  # half an ulp of a 1-bit mantissa (torchao EVEN)
_F32_HALF_MIN_NORMAL_BITS = np.uint32(1 << 22)  # pattern of 2^-127


def saturate_inf(amax: np.ndarray) -> np.ndarray:
    """amax with +Inf replaced by the largest finite float32 (NaN kept)."""
    bits = np.ascontiguousarray(amax, dtype=np.float32).view(np.uint32)
    return np.where(bits == F32_INF_BITS, np.uint32(F32_MAX_BITS), bits).view(np.float32)


def nvfp4_block_scale_bits(amax: np.ndarray, tensor_scale: np.float32 | None = None,
                           scale_amax_op: str = "divide",
                           scale_lower_clamp: bool = False) -> np.ndarray:
    """E4M3 block-scale bytes: E4M3_RNE_sat(amax / 6 [/ tensor_scale]) (docs/numerics.md, NVFP4).

    float32 op order: v = amax / 6 ('divide') or amax * float32(1/6) ('reciprocal'); then
    v = v / tensor_scale when a tensor scale is used; then max(v, 2^-6) when
    scale_lower_clamp; then round to nearest even E4M3 with saturation at 448.
    """
    if scale_amax_op not in SCALE_AMAX_OPS:
        raise ValueError(f"scale_amax_op must be one of {SCALE_AMAX_OPS}, got {scale_amax_op!r}")
    # Without a tensor scale Inf needs no replacing: Inf / 6 saturates to 448 as FLT_MAX / 6
    # does (so does Inf * (1/6), and max(Inf, 2^-6)); v is a fresh array either way.
    a = np.ascontiguousarray(amax, dtype=np.float32) if tensor_scale is None else \
        saturate_inf(amax)
    with np.errstate(over="ignore", invalid="ignore"):
        if scale_amax_op == "divide":
            v = np.divide(a, E2M1_MAX)
        else:
            v = np.multiply(a, np.float32(1.0) / E2M1_MAX)
        if tensor_scale is not None:
            v = np.divide(v, np.float32(tensor_scale), out=v)
    if scale_lower_clamp:
        v = np.maximum(v, E4M3_MIN_NORMAL, out=v)  # NaN propagates through np.maximum
    return e4m3_encode_satfinite(v)


def mx_scale_bits(amax: np.ndarray, rule: str = "rceil") -> np.ndarray:
    """E8M0 scale bytes of blocks with the given amax under an MX scale rule.

    - 'floor' (OCP MX spec v1.0 section 6.3): e = floor(log2 amax) - 2, from the exponent field.
    - 'rceil' (PTX cvt.rp.satfinite.ue8m0x2.f32 on amax/6, NVIDIA's MXFP recipe):
      e = ceil(log2(float32(amax / 6))); nothing saturates.
    - 'even' (torchao ScaleCalculationMode.EVEN): round amax to E2M1's 1 mantissa bit
      (add 2^21 to the float32 pattern), then e = floor(log2) - 2.
    - 'ceil' (torchao ScaleCalculationMode.CEIL): e = ceil(log2 amax) - 2.
    The byte is e + 127 clamped to [0, 254]; amax = 0 gives byte 0; NaN gives 0xFF.

    Computed on uint32 patterns (one pass per step, no int64 temporaries): for a normal
    float32 with exponent field E, floor(log2) + 127 = E and ceil(log2) + 127 = E + 1 unless the
    mantissa is 0, which is the exponent field of (pattern + 0x7FFFFF). Subnormal patterns
    give E = 0 or 1 there, and every rule's exact byte for them is 0 after the clamp, except
    'rceil' on a quotient in (2^-127, 2^-126), which gives 1 (handled below).
    """
    if rule not in MX_SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {MX_SCALE_RULES}, got {rule!r}")
    bits = saturate_inf(amax).view(np.uint32)
    if rule == "rceil":
        with np.errstate(invalid="ignore"):
            quotient = (bits.view(np.float32) / E2M1_MAX).view(np.uint32)
        byte = (quotient + _CEIL_CARRY) >> _F32_EXP_SHIFT
        # Subnormal quotients: ceil(log2) + 127 is 1 above 2^-127 and <= 0 up to it.
        byte[quotient <= _F32_HALF_MIN_NORMAL_BITS] = 0
    else:
        carry = {"floor": 0, "ceil": _CEIL_CARRY, "even": _EVEN_CARRY}[rule]
        # e + 127 = exponent field - E2M1_EMAX, clamped at 0: max(field, 2) - 2 never wraps.
        byte = np.maximum((bits + np.uint32(carry)) >> _F32_EXP_SHIFT, E2M1_EMAX) - E2M1_EMAX
    # Largest byte: FLT_MAX's exponent field (254) or 255 - 2 for 'ceil'/'even', 253 for
    # 'rceil' (FLT_MAX / 6): never above E8M0_MAX. NaN and negative patterns give 0xFF.
    byte[bits > F32_INF_BITS] = E8M0_NAN
    return byte.astype(np.uint8)


def mx_data_multiplier(scale_bits: np.ndarray) -> np.ndarray:
    """float32 2^-e for E8M0 bytes e + 127 (exact: 2^-e = E8M0 value of byte 254 - b).

    Multiplying by it equals dividing by 2^e (both are one correctly rounded operation on
    the same real number). NaN scales give NaN: 254 - 255 wraps to 255 in uint8."""
    b = np.asarray(scale_bits, dtype=np.uint8)
    return e8m0_decode(np.uint8(E8M0_MAX) - b)
