"""Block scales: the NVFP4 E4M3 block scale and the MX E8M0 scale rules.

Inputs are per-block amax values (float32, >= 0, possibly Inf or NaN). Inf saturates: it is
treated as the largest finite float32 when a scale is computed. NaN gives the NaN scale
(E4M3 0x7F, E8M0 0xFF).
"""

from __future__ import annotations

import numpy as np

from fp4sim.e4m3 import e4m3_encode
from fp4sim.e8m0 import E8M0_MAX, E8M0_NAN, biased_log2_bits, e8m0_decode
from fp4sim.formats import E2M1, E4M3FN
from fp4sim.minifloat import F32_INF_BITS, F32_MAX_BITS

MX_SCALE_RULES = ("rceil", "floor", "even", "ceil")
SCALE_AMAX_OPS = ("divide", "reciprocal")
E2M1_MAX = np.float32(E2M1.max_value)  # 6
E2M1_EMAX = E2M1.max_exponent  # floor(log2 6) = 2: OCP MX spec v1.0 section 6.3
E4M3_MIN_NORMAL = np.float32(E4M3FN.min_normal)  # 2^-6


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
    a = saturate_inf(amax)
    with np.errstate(over="ignore", invalid="ignore"):
        if scale_amax_op == "divide":
            v = a / E2M1_MAX
        else:
            v = a * (np.float32(1.0) / E2M1_MAX)
        if tensor_scale is not None:
            v = v / np.float32(tensor_scale)
    if scale_lower_clamp:
        v = np.maximum(v, E4M3_MIN_NORMAL)  # NaN propagates through np.maximum
    return e4m3_encode(v, overflow="saturate", nan="ptx")


def mx_scale_bits(amax: np.ndarray, rule: str = "rceil") -> np.ndarray:
    """E8M0 scale bytes of blocks with the given amax under an MX scale rule.

    - 'floor' (OCP MX spec v1.0 section 6.3): e = floor(log2 amax) - 2, from the exponent field.
    - 'rceil' (PTX cvt.rp.satfinite.ue8m0x2.f32 on amax/6, NVIDIA's MXFP recipe):
      e = ceil(log2(float32(amax / 6))); nothing saturates.
    - 'even' (torchao ScaleCalculationMode.EVEN): round amax to E2M1's 1 mantissa bit
      (add 2^21 to the float32 pattern), then e = floor(log2) - 2.
    - 'ceil' (torchao ScaleCalculationMode.CEIL): e = ceil(log2 amax) - 2.
    The byte is e + 127 clamped to [0, 254]; amax = 0 gives byte 0; NaN gives 0xFF.
    """
    if rule not in MX_SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {MX_SCALE_RULES}, got {rule!r}")
    a = saturate_inf(amax)
    bits = a.view(np.uint32)
    is_nan = bits > F32_INF_BITS
    safe_bits = np.where(is_nan, np.uint32(0), bits)
    if rule == "rceil":
        with np.errstate(invalid="ignore"):
            quotient = safe_bits.view(np.float32) / E2M1_MAX
        byte = biased_log2_bits(quotient.view(np.uint32), "ceil")
    elif rule == "floor":
        byte = biased_log2_bits(safe_bits, "floor") - E2M1_EMAX
    elif rule == "even":
        rounded = safe_bits.astype(np.int64) + (1 << 21)  # cannot pass Inf: amax <= FLT_MAX
        byte = biased_log2_bits(rounded, "floor") - E2M1_EMAX
    else:
        byte = biased_log2_bits(safe_bits, "ceil") - E2M1_EMAX
    byte = np.clip(byte, 0, E8M0_MAX)
    return np.where(is_nan, E8M0_NAN, byte).astype(np.uint8)


def mx_data_multiplier(scale_bits: np.ndarray) -> np.ndarray:
    """float32 2^-e for E8M0 bytes e + 127 (exact: 2^-e = E8M0 value of byte 254 - b).

    Multiplying by it equals dividing by 2^e (both are one correctly rounded operation on
    the same real number). NaN scales give NaN."""
    b = np.asarray(scale_bits, dtype=np.uint8)
    inverse = np.where(b == E8M0_NAN, np.uint8(E8M0_NAN), (E8M0_MAX - b.astype(np.int64)))
    return e8m0_decode(inverse.astype(np.uint8))
