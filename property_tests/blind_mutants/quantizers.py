"""Quantizer fixtures: faithful NVFP4 / MXFP4 quantizers and single-defect mutants.

Contract: ``fn(x) -> (packed uint8, scale bytes uint8, tensor scale or None)``, quantizing a
float tensor along its last axis (a multiple of the block) as ``fp4sim.quantize(x, fmt)`` does
with its defaults: RNE with saturation, NaN -> +6 (PTX cvt.rn.satfinite), element 2i in the low
nibble; NVFP4 block scale E4M3(amax / 6) rounded to nearest, data x * (1/s), a zero-scale block
gets codes 0, a NaN block scale byte 0x7F; MXFP4 E8M0 scale 2^ceil(log2(amax / 6)) ('rceil'),
data x / s, a NaN block scale byte 0xFF, an all-zero block codes 0.

Each mutant is the faithful code with one knob changed (catalog.py is the answer key).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from property_tests.blind_mutants import fp4ops

_FMAX = torch.finfo(torch.float32).max


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(torch.float32).contiguous()


def _pack(codes: torch.Tensor, low_first: bool = True) -> torch.Tensor:
    even, odd = codes[..., 0::2], codes[..., 1::2]
    if low_first:
        return even | (odd << 4)
    return odd | (even << 4)


def _codes(
    y: torch.Tensor, ties: str = "even", nan_code: int = 7, sign_from_rounded: bool = False
) -> torch.Tensor:
    """E2M1 codes of scaled values y (float32)."""
    r = fp4ops.e2m1_round(y, ties=ties)
    if sign_from_rounded:  # sign = (rounded < 0): a -0 result loses its sign
        sign_src = torch.where(r < 0, -1.0, 1.0)
    else:
        sign_src = torch.where(torch.isnan(y), 0.0, y)
    codes = fp4ops.e2m1_codes(r, sign_src)
    return torch.where(torch.isnan(y), torch.full_like(codes, nan_code), codes)


def nvfp4_quantize(
    x,
    *,
    block: int = 16,
    nan_to_num: bool = False,
    zero_scale_codes_zero: bool = True,
    ties: str = "even",
    sign_from_rounded: bool = False,
    bf16_scaled: bool = False,
    low_nibble_first: bool = True,
    scale_direction: str = "nearest",
    saturate_scale: bool = True,
    amax_op: str = "divide",
    data_op: str = "reciprocal",
    bf16_scale: bool = False,
):
    """NVFP4 along the last axis; the keyword knobs exist for the mutants only."""
    x = _as_tensor(x)
    if nan_to_num:
        x = torch.nan_to_num(x, nan=0.0, posinf=_FMAX, neginf=-_FMAX)
    blocks, _ = fp4ops.to_blocks(x, block)
    amax = blocks.abs().amax(dim=-1)
    amax = torch.where(torch.isinf(amax), _FMAX, amax)
    if amax_op == "divide":
        s = amax / torch.tensor(6.0)
    else:
        s = amax * torch.tensor(1.0 / 6.0)
    if bf16_scale:
        s = s.to(torch.bfloat16).to(torch.float32)
    if saturate_scale:
        s_hat = fp4ops.e4m3_round(s, scale_direction)
    else:
        # a non-saturating cvt (NOSAT): values at or past the rounding midpoint 464 -> NaN
        s_hat = fp4ops.e4m3_round(s, scale_direction)
        s_hat = torch.where(s >= 464.0, float("nan"), s_hat)
    scale_bytes = fp4ops.e4m3_byte(s_hat)
    total = s_hat.unsqueeze(-1)
    if data_op == "reciprocal":
        y = blocks * (torch.ones_like(total) / total)
    else:
        y = blocks / total
    if bf16_scaled:
        y = y.to(torch.bfloat16).to(torch.float32)
    codes = _codes(y, ties=ties, sign_from_rounded=sign_from_rounded)
    if zero_scale_codes_zero:
        codes = torch.where(total == 0, torch.zeros_like(codes), codes)
    codes = codes.reshape(x.shape)
    return _pack(codes, low_nibble_first), scale_bytes, None


def _ceil_log2(q: torch.Tensor) -> torch.Tensor:
    mant, ex = torch.frexp(q)
    return torch.where(mant == 0.5, ex - 1, ex).to(torch.int64)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    _, ex = torch.frexp(a)
    return (ex - 1).to(torch.int64)


def mxfp4_quantize(
    x, *, block: int = 32, scale_rule: str = "rceil", nan_amax: str = "propagate"
):
    """MXFP4 along the last axis (OCP MX v1.0 section 6.3, rceil scale rule)."""
    x = _as_tensor(x)
    blocks, _ = fp4ops.to_blocks(x, block)
    if nan_amax == "propagate":
        nanblock = torch.isnan(blocks).any(dim=-1)
        amax = torch.where(nanblock, 0.0, blocks.abs().amax(dim=-1))
    else:  # fmax semantics: NaN elements are ignored by the block max
        nanblock = torch.zeros(blocks.shape[:-1], dtype=torch.bool)
        amax = torch.nan_to_num(blocks.abs(), nan=0.0).amax(dim=-1)
    a = torch.where(torch.isinf(amax), _FMAX, amax)
    if scale_rule == "rceil":
        e = _ceil_log2(a / torch.tensor(6.0))
    else:  # OCP MX v1.0 6.3 example: floor(log2(amax)) - emax_elem (2 for E2M1)
        e = _floor_log2(a) - 2
    byte = torch.where(a == 0, 0, (e + 127).clamp(0, 254))
    byte = torch.where(nanblock, 255, byte)
    scale = torch.ldexp(torch.ones_like(a, dtype=torch.float64), byte - 127).to(torch.float32)
    scale = torch.where(nanblock, float("nan"), scale).unsqueeze(-1)
    y = blocks / scale
    codes = _codes(y)
    codes = torch.where((amax == 0).unsqueeze(-1) & ~nanblock.unsqueeze(-1), 0, codes)
    codes = codes.to(torch.uint8).reshape(x.shape)
    return _pack(codes), byte.to(torch.uint8), None


def _variant(base, name: str, doc: str, **knobs):
    fn = functools.partial(base, **knobs)

    def kernel(x):
        return fn(x)

    kernel.__name__ = name
    kernel.__doc__ = doc
    return kernel


faithful_nvfp4 = _variant(nvfp4_quantize, "faithful_nvfp4", "Faithful NVFP4 quantizer.")
faithful_mxfp4 = _variant(mxfp4_quantize, "faithful_mxfp4", "Faithful MXFP4 quantizer.")

# ---- NVFP4 mutants ----------------------------------------------------------------------------
q_nvfp4_nan_to_zero = _variant(
    nvfp4_quantize, "q_nvfp4_nan_to_zero",
    "NaN inputs are replaced by 0 (nan_to_num) before quantizing.", nan_to_num=True)
q_nvfp4_flushed_block_codes = _variant(
    nvfp4_quantize, "q_nvfp4_flushed_block_codes",
    "A block whose E4M3 scale rounds to 0 keeps the codes of x * (1/0) instead of codes 0.",
    zero_scale_codes_zero=False)
q_nvfp4_negative_zero_lost = _variant(
    nvfp4_quantize, "q_nvfp4_negative_zero_lost",
    "The sign bit is taken from the rounded value, so negatives rounding to 0 get +0.",
    sign_from_rounded=True)
q_nvfp4_ties_away = _variant(
    nvfp4_quantize, "q_nvfp4_ties_away",
    "E2M1 ties are rounded away from zero instead of to the even code.", ties="away")
q_nvfp4_bf16_double_rounding = _variant(
    nvfp4_quantize, "q_nvfp4_bf16_double_rounding",
    "x * (1/s) is rounded to bfloat16 before E2M1 rounding (double rounding).",
    bf16_scaled=True)
q_nvfp4_nibble_swap = _variant(
    nvfp4_quantize, "q_nvfp4_nibble_swap",
    "Element 2i is packed into the high nibble instead of the low one.",
    low_nibble_first=False)
q_nvfp4_scale_round_up = _variant(
    nvfp4_quantize, "q_nvfp4_scale_round_up",
    "The E4M3 block scale amax/6 is rounded up instead of to nearest.", scale_direction="up")
q_nvfp4_scale_not_saturated = _variant(
    nvfp4_quantize, "q_nvfp4_scale_not_saturated",
    "amax/6 is cast to E4M3 without clamping to 448 first (overflow becomes NaN).",
    saturate_scale=False)
q_nvfp4_scale_times_reciprocal = _variant(
    nvfp4_quantize, "q_nvfp4_scale_times_reciprocal",
    "The block scale is amax * float32(1/6) instead of amax / 6.", amax_op="reciprocal")
q_nvfp4_data_divide = _variant(
    nvfp4_quantize, "q_nvfp4_data_divide",
    "Data are x / s instead of x * (1/s).", data_op="divide")
q_nvfp4_scale_bf16 = _variant(
    nvfp4_quantize, "q_nvfp4_scale_bf16",
    "amax/6 is rounded to bfloat16 before E4M3 rounding (double rounding of the scale).",
    bf16_scale=True)

# ---- MXFP4 mutants ----------------------------------------------------------------------------
q_mxfp4_floor_scale = _variant(
    mxfp4_quantize, "q_mxfp4_floor_scale",
    "E8M0 scale floor(log2 amax) - 2 (OCP example rule) instead of ceil(log2(amax/6)).",
    scale_rule="floor")
q_mxfp4_nan_ignored_in_amax = _variant(
    mxfp4_quantize, "q_mxfp4_nan_ignored_in_amax",
    "The block max ignores NaN (fmax), so a NaN block gets a finite scale, not 0xFF.",
    nan_amax="ignore")
q_mxfp4_block16 = _variant(
    mxfp4_quantize, "q_mxfp4_block16",
    "MXFP4 scales are computed over 16-element blocks instead of 32.", block=16)

# (name, format) of every quantizer mutant, for the catalog and the checks
MUTANT_FORMATS: dict[str, str] = {
    name: ("mxfp4" if name.startswith("q_mxfp4") else "nvfp4")
    for name in list(globals())
    if name.startswith("q_")
}
