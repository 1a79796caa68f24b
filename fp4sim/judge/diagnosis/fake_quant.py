"""A configurable FP4 fake quantizer (torch, float32 arithmetic) whose knobs are the ways real
kernels get block quantization wrong. With default knobs it is bit-exact with
``fp4sim.reference.quant_torch`` (property_tests/test_diagnosis_deviant.py checks it).

Rules (docs/numerics.md; OCP MX v1.0 sections 5.3.3 and 6.3):
NVFP4 block scale E4M3(amax / 6 [/ tensor scale]), data x * (1/s); MXFP4 scale
2^ceil(log2(amax/6)) (rceil) or 2^(floor(log2 amax) - 2) (floor), data x / s; E2M1 by
round-to-nearest-even with saturation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fp4sim.formats import BLOCK_SIZES, E2M1_MAGNITUDES, E2M1_TIES, E4M3FN
from fp4sim.reference.quant_torch import e8m0_decode_torch, mx_scale_bytes

# E2M1 magnitudes of codes 0..7 and the ties between neighbours (OCP MX v1.0 5.3.3), and the
# E4M3 "fn" limits (OCP FP8 spec), all from fp4sim.formats.
E2M1_VALUES = E2M1_MAGNITUDES
E4M3_MAX = E4M3FN.max_value  # 448
E4M3_MIN_NORMAL = E4M3FN.min_normal  # 2^-6


@dataclass(frozen=True)
class QuantKnobs:
    """How one operand is block-quantized. ``block``: elements per scale (0 = the whole
    axis, i.e. per-row); ``axis``: -1 (last, head dim / keys of P) or -2 (sequence)."""

    fmt: str = "nvfp4"
    block: int = 16
    axis: int = -1
    divisor: float = 6.0  # amax / divisor is the scale (6 = E2M1 max)
    e4m3_round: str = "rne"  # rne | up | down
    scale_op: str = "reciprocal"  # data x * (1/s) | divide: x / s
    amax_op: str = "divide"  # amax / 6 | reciprocal: amax * (1/6)
    lower_clamp: bool = False  # clamp the scale to E4M3's min normal 2^-6
    upper_clamp: bool = True  # clamp amax/6 to 448 before the E4M3 cast
    tensor_scale: str | None = None  # None | 'amax' (amax_tensor / (448 * 6))
    scale_rule: str = "rceil"  # MXFP4: rceil | floor | ceil | even
    elem_round: str = "rne"  # rne | away (ties away from 0) | zero (ties to 0) | trunc
    pre_round: str | None = None  # round x*(1/s) to 'bfloat16'/'float16' before E2M1
    scale_dtype: str = "e4m3"  # e4m3 | float32 (scale kept unrounded) | e8m0 (power of two)
    nan: str = "ptx"  # NaN code: ptx (+6) | ml_dtypes (signed zero, sign flipped)
    neg_zero: bool = True  # a negative value rounding to 0 keeps its sign (code 0x8)
    zero_scale_codes: str = "zeros"  # codes of a block whose scale is 0: zeros | reciprocal
    nan_input: str = "keep"  # keep | zero (NaN -> 0 first) | skip_amax (amax ignores NaN)
    scale_pre_round: str | None = None  # round amax/6 to 'bfloat16'/'float16' before E4M3

    def with_(self, **kw: Any) -> QuantKnobs:
        return replace(self, **kw)


def knobs_from_spec(spec: Any, axis: int = -1) -> QuantKnobs | None:
    """QuantKnobs equal to a ``fp4sim.reference.QuantSpec`` (None stays None)."""
    if spec is None:
        return None
    return QuantKnobs(
        fmt=spec.fmt,
        block=BLOCK_SIZES[spec.fmt],
        axis=axis,
        scale_op=spec.scale_op,
        amax_op=spec.scale_amax_op,
        lower_clamp=spec.scale_lower_clamp,
        tensor_scale=spec.tensor_scale if isinstance(spec.tensor_scale, str) else None,
        scale_rule=spec.scale_rule,
    )


def _e4m3_positive_table() -> torch.Tensor:
    """All non-negative finite E4M3 values in code order 0x00..0x7E (float64)."""
    c = torch.arange(127, dtype=torch.int64)
    e, m = c >> 3, (c & 7).double()
    return torch.where(e == 0, m * 2.0**-9, (1 + m / 8) * torch.pow(2.0, (e - 7).double()))


_E4M3 = _e4m3_positive_table()


def e4m3_round(s: torch.Tensor, mode: str = "rne") -> torch.Tensor:
    """Non-negative float32 ``s`` rounded to E4M3 (saturating at 448) by ``mode``; float32."""
    a = s.double().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(_E4M3, a, right=False).clamp(max=126)  # first value >= a
    lo = (hi - 1).clamp(min=0)
    vhi, vlo = _E4M3[hi], _E4M3[lo]
    exact = vhi == a
    if mode == "rne":
        dlo, dhi = a - vlo, vhi - a
        pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    elif mode == "up":
        pick_hi = torch.ones_like(exact)
    elif mode == "down":
        pick_hi = exact
    else:
        raise ValueError(f"unknown E4M3 rounding {mode!r}")
    out = torch.where(exact | pick_hi, vhi, vlo)
    return torch.where(torch.isnan(s), s.double(), out).float()


def e2m1_round(y: torch.Tensor, mode: str = "rne") -> torch.Tensor:
    """float32 ``y`` rounded to E2M1 values (signed, saturating at 6) by ``mode``."""
    a = y.abs()
    mag = torch.zeros_like(a, dtype=torch.int64)
    for i, t in enumerate(E2M1_TIES):
        lower_even = i % 2 == 0  # the tie between codes i and i+1 goes to the even one
        if mode == "rne":
            step = (a > t) if lower_even else (a >= t)
        elif mode == "away":
            step = a >= t
        elif mode == "zero":
            step = a > t
        elif mode == "trunc":
            step = a >= E2M1_VALUES[i + 1]
        elif mode == "add_half":
            step = a >= t  # refined below: floor(x / step + 0.5) in float32
        else:
            raise ValueError(f"unknown E2M1 rounding {mode!r}")
        mag = mag + step.long()
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)[mag]
    if mode == "add_half":
        # ties away implemented as floor(a / step + 0.5) * step in float32: the addition
        # rounds, so values just below a tie also go up (a double rounding)
        half = torch.tensor(0.5, dtype=torch.float32)
        grid = torch.where(a < 2, torch.floor(a * 2 + half) * half,
                           torch.where(a < 4, torch.floor(a + half),
                                       torch.floor(a * half + half) * 2))
        vals = grid.clamp(max=6.0).to(torch.float32)
    vals = torch.where(torch.isnan(y), torch.full_like(vals, 6.0), vals)  # PTX: NaN -> +6
    return torch.where(torch.signbit(y) & ~torch.isnan(y), -vals, vals)


def _round_dtype(x: torch.Tensor, dtype: str | None) -> torch.Tensor:
    if dtype is None:
        return x
    return x.to(getattr(torch, dtype)).to(x.dtype)


def _mx_scale(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """Power-of-two MXFP4 scale (float32) by ``rule`` (OCP MX v1.0 6.3; docs/numerics.md)."""
    return e8m0_decode_torch(mx_scale_bytes(amax, rule).to(torch.uint8))


def fake_quantize(x: torch.Tensor, kn: QuantKnobs) -> torch.Tensor:
    """Quantize then dequantize ``x`` (any float dtype; arithmetic in float32) along
    ``kn.axis`` in blocks of ``kn.block``, zero-padding a partial last block; float32."""
    return quantize_parts(x, kn, codes=False)[2]


def e2m1_codes(vals: torch.Tensor, y: torch.Tensor, kn: QuantKnobs) -> torch.Tensor:
    """uint8 E2M1 codes (bit 3 the sign) of rounded values ``vals`` of scaled inputs ``y``."""
    mag = torch.searchsorted(torch.tensor(E2M1_VALUES), vals.abs().contiguous())
    neg = torch.signbit(y) & (kn.neg_zero | (vals != 0)) & ~torch.isnan(y)
    codes = mag.to(torch.uint8) | (neg.to(torch.uint8) << 3)
    if kn.nan == "ml_dtypes":  # ml_dtypes: NaN becomes zero with the sign flipped
        codes = torch.where(torch.isnan(y), torch.where(torch.signbit(y), 0, 8).to(torch.uint8),
                            codes)
    return codes


def quantize_parts(x: torch.Tensor, kn: QuantKnobs, codes: bool = True
                   ) -> tuple[Any, Any, torch.Tensor]:
    """(codes uint8 (blocked: (..., nblocks, block)), scale bytes uint8 (..., nblocks) or
    None for a float32 scale, dequantized float32 values in ``x``'s layout); ``codes=False``
    skips the codes and scale bytes (None, None, values), the attention's only need."""
    want_codes = codes
    x32 = x.to(torch.float32)
    xm = torch.movedim(x32, kn.axis, -1)
    n = xm.shape[-1]
    blk = n if kn.block <= 0 else kn.block
    pad = (-n) % blk
    if pad:
        xm = torch.nn.functional.pad(xm, (0, pad))
    blocks = xm.reshape(*xm.shape[:-1], xm.shape[-1] // blk, blk)
    if kn.nan_input == "zero":
        blocks = torch.where(torch.isnan(blocks), torch.zeros_like(blocks), blocks)
    if kn.nan_input == "skip_amax":
        amax = torch.nan_to_num(blocks.abs(), nan=0.0).amax(dim=-1)
    else:
        amax = blocks.abs().amax(dim=-1)
    nan_block = torch.isnan(amax)
    if kn.fmt == "mxfp4":
        scale = _mx_scale(torch.where(nan_block, 0.0, amax), kn.scale_rule)
        scale = torch.where(nan_block, torch.nan, scale)  # OCP MX: a NaN block's scale is NaN
        total = scale
        scaled = blocks / total.unsqueeze(-1)
    else:
        if kn.tensor_scale == "amax":
            ta = x32.abs().amax()
            ts = torch.where(ta == 0, 1.0, ta / torch.tensor(E4M3_MAX * 6.0))
        else:
            ts = None
        if kn.amax_op == "divide":
            s = amax / torch.tensor(kn.divisor, dtype=torch.float32)
        else:
            s = amax * torch.tensor(1.0 / kn.divisor, dtype=torch.float32)
        if ts is not None:
            s = s / ts
        s = _round_dtype(s, kn.scale_pre_round)
        if kn.lower_clamp:
            s = s.clamp(min=E4M3_MIN_NORMAL)
        if kn.scale_dtype == "e4m3":
            scale = e4m3_round(s, kn.e4m3_round)
            if not kn.upper_clamp:  # a non-saturating E4M3 cast: from the midpoint 464 on, NaN
                scale = torch.where(s >= 464.0, torch.nan, scale)
        elif kn.scale_dtype == "e8m0":
            scale = torch.pow(2.0, torch.ceil(torch.log2(s))).float()
            scale = torch.where(s > 0, scale, torch.zeros_like(scale))
        else:
            scale = s
        total = scale if ts is None else scale * ts
        t_e = total.unsqueeze(-1)
        if kn.scale_op == "reciprocal":
            scaled = blocks * (torch.ones_like(t_e) / t_e)
        else:
            scaled = blocks / t_e
    scaled = _round_dtype(scaled, kn.pre_round)
    vals = e2m1_round(scaled, kn.elem_round)
    if kn.nan == "ml_dtypes":
        vals = torch.where(torch.isnan(scaled), torch.zeros_like(vals), vals)
    t_e = total.unsqueeze(-1)
    zero = (t_e == 0).expand_as(vals)
    if kn.fmt == "mxfp4":
        zero = zero | (amax == 0).unsqueeze(-1).expand_as(vals)
    out = (torch.where(zero, torch.zeros_like(vals), vals) * t_e)
    out = torch.movedim(out.reshape(*out.shape[:-2], -1)[..., :n], -1, kn.axis)
    if not want_codes:
        return None, None, out
    codes_ = e2m1_codes(vals, scaled, kn)
    if kn.zero_scale_codes == "zeros" or kn.fmt == "mxfp4":
        codes_ = torch.where(zero, torch.zeros_like(codes_), codes_)
    return codes_, _scale_bytes(total if kn.fmt == "mxfp4" else scale, kn), out


def _scale_bytes(scale: torch.Tensor, kn: QuantKnobs) -> torch.Tensor | None:
    """E4M3 or E8M0 bytes of decoded block scales (None when the scale is not a byte)."""
    if kn.fmt == "mxfp4" or kn.scale_dtype == "e8m0":
        e = torch.log2(torch.where(scale > 0, scale, 1.0)).round().to(torch.int64) + 127
        e = torch.where(scale > 0, e, 0).clamp(0, 254)
        return torch.where(torch.isnan(scale), 255, e).to(torch.uint8)
    if kn.scale_dtype != "e4m3":
        return None
    idx = torch.searchsorted(_E4M3, scale.double().contiguous()).clamp(max=126)
    return torch.where(torch.isfinite(scale), idx, 0x7F).to(torch.uint8)
