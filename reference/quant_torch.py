"""FP4 quantizers written in torch ops, bit-exact with the NumPy emulator ``fp4sim``.

Everything is vectorized (no Python loops over data) and runs on CPU and CUDA.
Inputs are cast to float32 first: the rules below are float32 rules (docs/numerics.md).
The arithmetic is independent of ``fp4sim``'s code on purpose (only the format facts of
``fp4sim.formats`` and the setting table of ``fp4sim.settings`` are shared);
``property_tests/test_reference_quant.py`` compares codes and scale bytes with
``fp4sim.quantize`` on every drawn input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4sim.formats import (
    BLOCK_SIZES,
    E2M1,
    E2M1_MAGNITUDES,
    E2M1_TIES,
    E4M3FN,
    NVFP4_TENSOR_SCALE_DIVISOR,
)
from fp4sim.settings import check_value, defaults_of

E2M1_MAX = E2M1.max_value  # 6
E4M3_MAX = E4M3FN.max_value  # 448
E4M3_MIN_NORMAL = E4M3FN.min_normal  # 2^-6


@dataclass(frozen=True)
class TorchQuantized:
    """Result of :func:`quantize_torch_full` (the block axis is the last axis).

    ``codes`` uint8 E2M1 codes, ``scale_bits`` uint8 (E4M3 or E8M0 bytes), ``scales`` float32
    decoded block scales (without the tensor scale), ``tensor_scale`` float32 scalar tensor or
    None, ``values`` the dequantized float32 tensor, ``saturated`` bool mask of elements whose
    scaled magnitude exceeded 6 (clipped by ``satfinite``), ``flushed`` bool mask of blocks with a
    nonzero amax but a zero scale.
    """

    codes: torch.Tensor
    scale_bits: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    values: torch.Tensor
    saturated: torch.Tensor
    flushed: torch.Tensor


def block_size(fmt: str) -> int:
    """Block size of ``fmt`` ('nvfp4' 16, 'mxfp4' 32)."""
    fmt = _check_fmt(fmt)
    return BLOCK_SIZES[fmt]


def _check_fmt(fmt) -> str:
    name = getattr(fmt, "name", fmt)
    if not isinstance(name, str) or name.lower() not in BLOCK_SIZES:
        raise ValueError(f"unknown FP4 block format {fmt!r}; expected 'nvfp4' or 'mxfp4'")
    return name.lower()


def true_divide(x: torch.Tensor, c: float) -> torch.Tensor:
    """Correctly rounded ``x / c`` on every device.

    CUDA turns division by a CPU scalar into multiplication by its reciprocal, which changes
    results on rounding ties (docs/numerics.md: amax/6 vs amax*(1/6) are different rules); a
    0-dim tensor on x's device takes the ordinary division kernel.
    """
    return x / torch.tensor(c, dtype=x.dtype, device=x.device)


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded 1 / x (tensor / tensor division)."""
    return torch.ones_like(x) / x


def _sign_bit(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32) < 0


def e2m1_encode_torch(x: torch.Tensor, nan: str = "ptx") -> torch.Tensor:
    """E2M1 codes (uint8, sign in bit 3) of ``x`` by RNE with saturation on the float32 value."""
    if nan not in ("ptx", "ml_dtypes"):
        raise ValueError(f"nan must be 'ptx' or 'ml_dtypes', got {nan!r}")
    x = x.to(torch.float32)
    a = x.abs()
    # OCP MX v1.0 5.3.3 / docs/numerics.md: RNE, so the code counts the ties below |x|. Tie i
    # lies between codes i and i + 1 and goes to the even one: an even-indexed tie counts only
    # when exceeded, an odd one once reached. Saturating: |x| > 6 and Inf give code 7 (6.0).
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for i, tie in enumerate(E2M1_TIES):
        mag += (a > tie if i % 2 == 0 else a >= tie).to(torch.uint8)
    sign = _sign_bit(x)
    codes = mag | (sign.to(torch.uint8) << 3)  # docs/numerics.md: negatives rounding to 0 keep sign
    if nan == "ptx":
        nan_codes = torch.full_like(codes, 7)  # docs/numerics.md: PTX cvt gives +6 for NaN
    else:
        # docs/numerics.md: ml_dtypes gives zero with the sign flipped
        nan_codes = torch.where(sign, 0, 8).to(torch.uint8)
    return torch.where(torch.isnan(x), nan_codes, codes)


def e2m1_decode_torch(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (bit 3 sign)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    table = torch.cat([mags, -mags])
    return table[(codes & 0xF).long()]


def e4m3_encode_torch(x: torch.Tensor) -> torch.Tensor:
    """E4M3 "fn" bytes of ``x``: RNE, saturating to 448 (Inf too); NaN gives 0x7F."""
    x = x.to(torch.float32)
    sign = _sign_bit(x)
    a = x.abs().clamp(max=E4M3_MAX)  # docs/numerics.md: clamp to 448 before casting
    bits = a.contiguous().view(torch.int32)
    # Normal range: round the 23-bit mantissa to 3 bits, ties to even; a carry bumps the exponent.
    lsb = (bits >> 20) & 1
    rounded = (bits + 0x7FFFF + lsb) >> 20
    normal = rounded - ((127 - 7) << 3)  # docs/numerics.md: E4M3 exponent bias 7
    # Subnormals: multiples of 2^-9; a * 2^9 is exact, torch.round is half-to-even.
    sub = torch.round(a * 512.0).to(torch.int32)
    code = torch.where(a < E4M3_MIN_NORMAL, sub, normal)
    code = code | (sign.to(torch.int32) << 7)
    code = torch.where(torch.isnan(x), 0x7F, code)  # docs/numerics.md: 0x7F is NaN
    return code.to(torch.uint8)


def _e4m3_table(device) -> torch.Tensor:
    c = torch.arange(256, device=device, dtype=torch.int32)
    e = (c >> 3) & 0xF
    m = (c & 7).to(torch.float64)
    sub = m * 2.0**-9
    normal = (1.0 + m / 8.0) * torch.pow(2.0, (e - 7).to(torch.float64))
    mag = torch.where(e == 0, sub, normal)
    val = torch.where((c >> 7) == 1, -mag, mag)
    val = torch.where((c & 0x7F) == 0x7F, float("nan"), val)
    return val.to(torch.float32)


def e4m3_decode_torch(bits: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 "fn" bytes."""
    return _e4m3_table(bits.device)[bits.long()]


def e8m0_decode_torch(bits: torch.Tensor) -> torch.Tensor:
    """float32 values 2^(b-127) of E8M0 bytes; 0xFF is NaN (docs/numerics.md)."""
    return _pow2_float32(bits.to(torch.int32) - 127, nan_mask=bits == 0xFF)


def _pow2_float32(e: torch.Tensor, nan_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact float32 2^e for integer e in [-149, 127], built from bits."""
    normal_bits = (e.clamp(-126, 127) + 127) << 23
    sub_bits = torch.ones_like(e) << (e.clamp(-149, -127) + 149)
    out = torch.where(e >= -126, normal_bits, sub_bits).view(torch.float32)
    if nan_mask is not None:
        out = torch.where(nan_mask, float("nan"), out)
    return out


def _move_block_axis(x: torch.Tensor, axis: int, block: int, pad: bool) -> tuple[torch.Tensor, int]:
    """Move ``axis`` last and reshape to (..., nblocks, block); returns blocks and orig length."""
    if x.dim() == 0:
        raise ValueError("cannot block-quantize a scalar")
    axis = axis % x.dim()
    xm = torch.movedim(x, axis, -1)
    n = xm.shape[-1]
    if n % block:
        if not pad:
            raise ValueError(
                f"length {n} of axis {axis} is not a multiple of the block size {block}; "
                "pass pad=True to pad with zeros"
            )
        xm = torch.nn.functional.pad(xm, (0, block - n % block))
    return xm.reshape(*xm.shape[:-1], xm.shape[-1] // block, block), n


def _restore(blocks: torch.Tensor, axis: int, ndim: int, n: int) -> torch.Tensor:
    # explicit length, not -1: an empty tensor cannot infer it
    flat = blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])[..., :n]
    return torch.movedim(flat, -1, axis % ndim)


def _restore_scales(s: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    return torch.movedim(s, -1, axis % ndim)


def _check_input(x: torch.Tensor, axis: int) -> int:
    """Reject what the emulator rejects (non-float input, an axis out of range) instead of
    converting or wrapping it silently; returns the axis in [0, ndim)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if x.dim() == 0:
        raise ValueError("cannot block-quantize a scalar")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis} is out of range for a tensor with {x.dim()} dimensions")
    return axis % x.dim()


def _check_settings(fmt: str, settings: dict) -> dict:
    """The full settings of ``fmt`` (defaults filled in); names and allowed values are
    fp4sim.settings' table, shared with fp4sim.quantize."""
    defaults = defaults_of(fmt)
    unknown = set(settings) - set(defaults)
    if unknown:
        raise ValueError(
            f"unsupported settings for {fmt}: {sorted(unknown)}; valid: {sorted(defaults)}"
        )
    full = {**defaults, **settings}
    if full["rounding"] != "rne":
        raise NotImplementedError("quantize_torch implements rounding='rne' only")
    for name, value in full.items():
        check_value(name, value)
    return full


def nvfp4_blocks(
    blocks: torch.Tensor,
    tensor_scale: torch.Tensor | None = None,
    *,
    nan: str = "ptx",
    scale_op: str = "reciprocal",
    scale_amax_op: str = "divide",
    scale_lower_clamp: bool = False,
    zero_scale_codes: str = "zeros",
) -> TorchQuantized:
    """NVFP4 on float32 ``blocks`` of shape (..., nblocks, 16).

    ``tensor_scale`` is None (no tensor scale) or a float32 tensor broadcastable to
    (..., nblocks) (a per-group tensor scale, e.g. one per attention tile).
    """
    blocks = blocks.to(torch.float32)
    amax = blocks.abs().amax(dim=-1)
    nanblock = torch.isnan(blocks).any(dim=-1)
    amax = torch.where(nanblock, float("nan"), _saturate_inf(amax))
    if scale_amax_op == "divide":
        s = true_divide(amax, 6.0)  # docs/numerics.md: block scale amax/6 (float32 division)
    elif scale_amax_op == "reciprocal":
        # docs/numerics.md: amax * float32(1/6)
        s = amax * torch.tensor(1.0 / 6.0, dtype=torch.float32, device=amax.device)
    else:
        raise ValueError(f"scale_amax_op must be 'divide' or 'reciprocal', got {scale_amax_op!r}")
    if tensor_scale is not None:
        s = s / tensor_scale  # docs/numerics.md: s_block = E4M3(amax/6/s_tensor)
    if scale_lower_clamp:
        s = torch.clamp(s, min=E4M3_MIN_NORMAL)  # docs/numerics.md: optional clamp to 2^-6
    scale_bits = e4m3_encode_torch(s)
    scales = e4m3_decode_torch(scale_bits)
    total = scales if tensor_scale is None else scales * tensor_scale
    total_e = total.unsqueeze(-1)
    if scale_op == "reciprocal":
        scaled = blocks * reciprocal(total_e)  # docs/numerics.md: x * (1/s) default
    elif scale_op == "divide":
        scaled = blocks / total_e
    else:
        raise ValueError(f"scale_op must be 'reciprocal' or 'divide', got {scale_op!r}")
    codes = e2m1_encode_torch(_positive_nan(scaled), nan=nan)
    zero_scale = (total_e == 0).expand_as(codes)
    if zero_scale_codes == "zeros":
        codes = torch.where(zero_scale, torch.zeros_like(codes), codes)
        saturated = (scaled.abs() > E2M1_MAX) & ~zero_scale
    elif zero_scale_codes == "reciprocal":
        saturated = scaled.abs() > E2M1_MAX
    else:
        raise ValueError(
            f"zero_scale_codes must be 'zeros' or 'reciprocal', got {zero_scale_codes!r}"
        )
    values = e2m1_decode_torch(codes) * total_e
    if scale_op == "reciprocal":
        scaled_max = amax * reciprocal(total)
    else:
        scaled_max = amax / total
    flushed = _flushed(amax, total, scaled_max)
    ts = None if tensor_scale is None else torch.as_tensor(tensor_scale, dtype=torch.float32)
    return TorchQuantized(codes, scale_bits, scales, ts, values, saturated, flushed)


def _biased_log2(bits: torch.Tensor, ceil: bool) -> torch.Tensor:
    """floor/ceil(log2 x) + 127 from nonnegative float32 patterns (int64), subnormals exact;
    zero gives -1000 (clamped to byte 0 later)."""
    b = bits.to(torch.int64)
    exp_field = b >> 23
    mant = b & 0x7FFFFF
    # subnormal m * 2^-149: floor(log2) = floor(log2 m) - 149; frexp of m (exact in float64)
    _, ex = torch.frexp(torch.where(mant > 0, mant, 1).to(torch.float64))
    sub_floor = ex.to(torch.int64) - 1 - 149 + 127
    if ceil:
        sub_pow2 = (mant & (mant - 1)) == 0
        normal = exp_field + (mant != 0).long()
        out = torch.where(exp_field > 0, normal, sub_floor + (~sub_pow2).long())
    else:
        out = torch.where(exp_field > 0, exp_field, sub_floor)
    return torch.where(b == 0, -1000, out)


def _f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _saturate_inf(amax: torch.Tensor) -> torch.Tensor:
    """+Inf amax counts as the largest finite float32 (docs/numerics.md: Inf saturates)."""
    return torch.where(torch.isinf(amax), torch.finfo(torch.float32).max, amax)


def mx_scale_bytes(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """E8M0 scale bytes (int64, NaN not handled) of float32 block amax under an MX rule."""
    a = _saturate_inf(amax)
    if rule == "rceil":
        # docs/numerics.md: ceil(log2(amax / 6)) on the float32 quotient (PTX cvt.rp ue8m0)
        byte = _biased_log2(_f32_bits(true_divide(a, 6.0)), ceil=True)
    elif rule == "floor":
        byte = _biased_log2(_f32_bits(a), ceil=False) - 2  # OCP MX 6.3: floor(log2 amax) - 2
    elif rule == "even":
        # docs/numerics.md "even": round amax to one mantissa bit (add 2^21 to the pattern)
        byte = _biased_log2(_f32_bits(a).to(torch.int64) + (1 << 21), ceil=False) - 2
    elif rule == "ceil":
        byte = _biased_log2(_f32_bits(a), ceil=True) - 2  # docs/numerics.md: ceil(log2 amax) - 2
    else:
        raise ValueError(f"scale_rule must be 'rceil', 'floor', 'even' or 'ceil', got {rule!r}")
    return byte.clamp(0, 254)


def mxfp4_blocks(
    blocks: torch.Tensor, *, nan: str = "ptx", scale_rule: str = "rceil"
) -> TorchQuantized:
    """MXFP4 on float32 ``blocks`` of shape (..., nblocks, 32)."""
    blocks = blocks.to(torch.float32)
    amax = blocks.abs().amax(dim=-1)
    nanblock = torch.isnan(blocks).any(dim=-1)
    byte = mx_scale_bytes(torch.where(nanblock, 0.0, amax), scale_rule)
    scale_bits = torch.where(nanblock, 255, byte).to(torch.uint8)  # NaN block -> 0xFF
    scales = e8m0_decode_torch(scale_bits)
    scaled = blocks / scales.unsqueeze(-1)  # OCP MX 6.3: code = RNE_sat(x / 2^e)
    codes = e2m1_encode_torch(_positive_nan(scaled), nan=nan)
    codes = torch.where((amax == 0).unsqueeze(-1), 0, codes).to(torch.uint8)  # amax 0: codes 0
    saturated = scaled.abs() > E2M1_MAX
    values = e2m1_decode_torch(codes) * scales.unsqueeze(-1)
    flushed = _flushed(amax, scales, blocks.abs().amax(dim=-1) / scales)
    return TorchQuantized(codes, scale_bits, scales, None, values, saturated, flushed)


def _positive_nan(x: torch.Tensor) -> torch.Tensor:
    """NaN of either sign -> +NaN: NaN blocks and 0 * Inf get the positive-NaN code (fp4sim)."""
    return torch.where(torch.isnan(x), float("nan"), x)


def _flushed(amax: torch.Tensor, s_eff: torch.Tensor, scaled_max: torch.Tensor) -> torch.Tensor:
    """Blocks with a nonzero finite amax whose values all dequantize to 0 (docs/numerics.md)."""
    usable = ~torch.isnan(amax) & torch.isfinite(s_eff) & (s_eff > 0)
    return (amax > 0) & torch.isfinite(amax) & ((s_eff == 0) | (usable & (scaled_max <= 0.25)))


def tensor_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 tensor scale float32(amax_tensor / (448 * 6)) (docs/numerics.md); an all-zero
    tensor gets 1, Inf counts as the largest float32, NaN gives NaN (every block NaN)."""
    a = _saturate_inf(amax.to(torch.float32))
    return torch.where(a == 0, 1.0, true_divide(a, NVFP4_TENSOR_SCALE_DIVISOR))


def quantize_torch_full(x: torch.Tensor, fmt="nvfp4", axis: int = -1, **settings) -> TorchQuantized:
    """Quantize ``x`` along ``axis``; all outputs in the original layout (blocks along ``axis``)."""
    fmt = _check_fmt(fmt)
    full = _check_settings(fmt, settings)
    blk = BLOCK_SIZES[fmt]
    axis = _check_input(x, axis)
    x32 = x.to(torch.float32)
    blocks, n = _move_block_axis(x32, axis, blk, full["pad"])
    if fmt == "nvfp4":
        ts_setting = full["tensor_scale"]
        if ts_setting is None:
            ts = None
        elif isinstance(ts_setting, str):
            if ts_setting != "amax":
                raise ValueError(f"tensor_scale must be None, 'amax' or a float: {ts_setting!r}")
            # an empty tensor has amax 0 (tensor scale 1), as in fp4sim.quantize
            amax = x32.abs().amax() if x32.numel() else x32.new_zeros(())
            ts = tensor_scale_from_amax(amax)
        else:
            ts = torch.tensor(float(ts_setting), dtype=torch.float32, device=x.device)
        q = nvfp4_blocks(
            blocks,
            ts,
            nan=full["nan"],
            scale_op=full["scale_op"],
            scale_amax_op=full["scale_amax_op"],
            scale_lower_clamp=full["scale_lower_clamp"],
            zero_scale_codes=full["zero_scale_codes"],
        )
    else:
        q = mxfp4_blocks(blocks, nan=full["nan"], scale_rule=full["scale_rule"])
    nd = x.dim()
    return TorchQuantized(
        codes=_restore(q.codes, axis, nd, n),
        scale_bits=_restore_scales(q.scale_bits, axis, nd),
        scales=_restore_scales(q.scales, axis, nd),
        tensor_scale=q.tensor_scale,
        values=_restore(q.values, axis, nd, n),
        saturated=_restore(q.saturated, axis, nd, n),
        flushed=_restore_scales(q.flushed, axis, nd),
    )


def quantize_torch(x: torch.Tensor, fmt="nvfp4", axis: int = -1, **settings):
    """Quantize like ``fp4sim.quantize``: returns ``(codes, scale_bits, scales, tensor_scale)``.

    ``codes`` uint8 with the shape of ``x`` (unpadded), ``scale_bits`` uint8 and ``scales``
    float32 with the block axis divided by the block size, ``tensor_scale`` float32 scalar
    tensor or None. Supported settings: ``nan``, ``tensor_scale``, ``scale_op``,
    ``scale_amax_op``, ``scale_lower_clamp``, ``zero_scale_codes``, ``pad`` (NVFP4);
    ``nan``, ``scale_rule``, ``pad`` (MXFP4); ``rounding='rne'`` only.
    """
    q = quantize_torch_full(x, fmt, axis, **settings)
    return q.codes, q.scale_bits, q.scales, q.tensor_scale


def fake_quantize_torch(x: torch.Tensor, fmt="nvfp4", axis: int = -1, **settings) -> torch.Tensor:
    """Quantize then dequantize; float32 with the shape of ``x``."""
    return quantize_torch_full(x, fmt, axis, **settings).values
