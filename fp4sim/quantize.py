"""Block quantization to NVFP4 / MXFP4: quantize, dequantize, fake_quantize.

Conventions (FP4_FORMATS.md; each variant is a keyword setting, see QuantizeSettings):

NVFP4, per block of 16 along ``axis``, all arithmetic in float32:
  amax    = max |x| over the block (bit-pattern max, so a NaN anywhere gives NaN)
  s_block = E4M3_RNE_sat(amax / 6)                        scale_amax_op='divide' (default)
          = E4M3_RNE_sat(amax * float32(1/6))             scale_amax_op='reciprocal'
            with a tensor scale t: (amax / 6) / t, left to right, then rounded to E4M3
  s_eff   = s_block (no tensor scale) or float32(s_block * t)
  code    = E2M1_RNE_sat(x * float32(1 / s_eff))          scale_op='reciprocal' (default)
          = E2M1_RNE_sat(x / s_eff)                       scale_op='divide'
  value   = e2m1(code) * s_eff
  tensor_scale='amax': t = float32(amax_tensor / 2688) (2688 = 448 * 6); t = 1 when that
  is 0 (an all-zero tensor, or amax below ~1.9e-42 where the quotient underflows).
MXFP4, per block of 32: scale byte by the scale_rule (fp4sim.block_scale.mx_scale_bits),
  code = E2M1_RNE_sat(x * 2^-e) (exactly x / 2^e), value = e2m1(code) * 2^e.

Special values (documented bytes, never garbage):
  - Inf saturates: it counts as the largest finite float32 for the scale (NVFP4 scale 448 =
    0x7E unless the tensor scale changes that), and encodes as +-6 (code 7 / 15).
  - A NaN anywhere in a block makes the block scale NaN (E4M3 0x7F, E8M0 0xFF) and gives
    every element of the block the NaN code of a positive NaN under the element policy
    ('ptx': 7, 'ml_dtypes': 8); the block dequantizes to NaN.
  - A block whose scale is 0 (NVFP4 only: amax <= 6 * 2^-10 without tensor scale) gets codes
    per zero_scale_codes: 'zeros' (all 0) or 'reciprocal' (what x * (1/0) gives: +-Inf ->
    code 7 / 15 for non-zero x, 0 * Inf = NaN -> the positive-NaN code for zeros). It
    dequantizes to 0 either way and, if its amax is non-zero, counts in ``flushed_blocks``.
  - A block with amax = 0 gets MX scale byte 0 and codes 0.
  - Elements that round to zero keep their sign (code 8) in blocks with a non-zero scale.
Padding (pad=True): the block axis is padded with +0.0 up to a multiple of the block size;
``codes``/``packed``/scales cover the padded length, dequantize returns the original shape.
Speed: float32 bit operations on chunks of 2^16 elements; inputs of 2^20 elements or more are
split over up to 4 threads (disjoint slices: the results do not depend on the split).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fp4sim.block_scale import (
    MX_SCALE_RULES,
    SCALE_AMAX_OPS,
    mx_data_multiplier,
    mx_scale_bits,
    nvfp4_block_scale_bits,
    saturate_inf,
)
from fp4sim.e2m1 import (
    E2M1_VALUES,
    MAX_MAGNITUDE_CODE,
    NAN_POLICIES,
    ROUNDINGS,
    SIGN_CODE_BIT,
    as_random_words,
    e2m1_encode_bits_exact,
    e2m1_encode_bits_into,
    e2m1_nan_code,
)
from fp4sim.e4m3 import e4m3_decode
from fp4sim.e8m0 import e8m0_decode
from fp4sim.float_input import as_float32, normalize_axis
from fp4sim.formats import E2M1, E4M3FN, E8M0, BlockFormat, get_block_format
from fp4sim.minifloat import F32_ABS_MASK, F32_INF_BITS, round_magnitude_stochastic

SCALE_OPS = ("reciprocal", "divide")
ZERO_SCALE_CODES = ("zeros", "reciprocal")
TENSOR_SCALE_DIVISOR = np.float32(448.0 * 6.0)  # FP4_FORMATS.md: s_tensor = amax / (448 * 6)
_ROWS_ELEMENTS = 1 << 16  # elements per chunk of blocks: temporaries stay in L2 cache
_PARALLEL_MIN_ELEMENTS = 1 << 20  # below this, threads cost more than they save
_MAX_WORKERS = 4


@dataclass(frozen=True)
class QuantizeSettings:
    """The rule choices of one quantization (the keyword names are the API contract)."""

    rounding: str = "rne"
    nan: str = "ptx"
    scale_rule: str = "rceil"
    tensor_scale: str | float | None = None
    scale_op: str = "reciprocal"
    scale_amax_op: str = "divide"
    scale_lower_clamp: bool = False
    zero_scale_codes: str = "zeros"
    pad: bool = False

    def __post_init__(self) -> None:
        choices = {
            "rounding": ROUNDINGS, "nan": NAN_POLICIES, "scale_rule": MX_SCALE_RULES,
            "scale_op": SCALE_OPS, "scale_amax_op": SCALE_AMAX_OPS,
            "zero_scale_codes": ZERO_SCALE_CODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("scale_lower_clamp", "pad"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        ts = self.tensor_scale
        if ts is not None and ts != "amax":
            if isinstance(ts, (str, bool, np.bool_)) or not np.isscalar(ts):
                raise ValueError(
                    f"tensor_scale must be None, 'amax' or a positive float, got {ts!r}")
            value = np.float32(ts)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"tensor_scale must be finite and > 0 in float32, got {ts!r}")

    def check_format(self, fmt: BlockFormat) -> None:
        """Reject settings that do not apply to ``fmt`` (rather than ignoring them)."""
        defaults = QuantizeSettings()
        if fmt.scale == E8M0:
            for name in ("tensor_scale", "scale_op", "scale_amax_op", "scale_lower_clamp",
                         "zero_scale_codes"):
                if getattr(self, name) != getattr(defaults, name):
                    raise ValueError(f"{name} applies to E4M3-scaled formats (NVFP4) only, "
                                     f"not {fmt.name}")
        elif fmt.scale == E4M3FN:
            if self.scale_rule != defaults.scale_rule:
                raise ValueError(f"scale_rule applies to E8M0-scaled formats (MXFP4) only, "
                                 f"not {fmt.name}")
            if self.tensor_scale is not None and not fmt.supports_tensor_scale:
                raise ValueError(f"{fmt.name} does not support a tensor scale")
        else:
            raise ValueError(f"unsupported scale format {fmt.scale.name} in {fmt.name}")


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Result of ``quantize``. Arrays are in the input's axis order; scale-shaped arrays have
    the block axis divided by the block size.

    codes: uint8 E2M1 codes (unpacked; block axis padded when pad=True)
    packed: uint8, two codes per byte along ``axis`` (element 2i in the low nibble)
    scale_bits: uint8 raw scale bytes (E4M3 or E8M0)
    scales: float32 decoded block scales (without the tensor scale)
    tensor_scale: float32 tensor scale or None
    shape: the input's shape (before padding)
    block_amax: float32 max |x| per block (NaN if the block has a NaN)
    Derived on access: flushed_blocks, saturated_blocks, effective_scales.
    """

    codes: np.ndarray
    packed: np.ndarray
    scale_bits: np.ndarray
    scales: np.ndarray
    tensor_scale: np.float32 | None
    fmt: BlockFormat
    settings: QuantizeSettings
    axis: int
    shape: tuple[int, ...]
    block_amax: np.ndarray

    @property
    def flushed_blocks(self) -> np.ndarray:
        """bool, scale-shaped: blocks with a non-zero finite amax that dequantize to all 0."""
        return _block_flags(self.block_amax, self.effective_scales, self.settings)[0]

    @property
    def saturated_blocks(self) -> np.ndarray:
        """bool, scale-shaped: blocks where the largest |x| / s_eff exceeds 6 (clipped)."""
        return _block_flags(self.block_amax, self.effective_scales, self.settings)[1]

    @property
    def effective_scales(self) -> np.ndarray:
        """float32 s_eff = s_block (times the tensor scale when one is used)."""
        if self.tensor_scale is None:
            return self.scales
        with np.errstate(over="ignore"):
            return self.scales * np.float32(self.tensor_scale)


def block_flush_mask(q: QuantizedTensor) -> np.ndarray:
    """Blocks whose non-zero finite content all dequantizes to 0 (scale underflow)."""
    return q.flushed_blocks


def _row_max_bits(abs_bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-row max of (rows, width) uint32 magnitudes, one strided column at a time
    (faster in NumPy than a reduction over a short inner axis)."""
    np.maximum(abs_bits[:, 0], abs_bits[:, 1], out=out)
    for column in range(2, abs_bits.shape[1]):
        np.maximum(out, abs_bits[:, column], out=out)
    return out


def _zero_scale_codes(x_rows: np.ndarray, policy: str, nan: str) -> np.ndarray:
    """Codes of blocks whose multiplier is infinite (scale 0 or 1/s_eff overflow)."""
    if policy == "zeros":
        return np.zeros(x_rows.shape, dtype=np.uint8)
    bits = x_rows.view(np.uint32)
    sign = ((bits >> 28) & SIGN_CODE_BIT).astype(np.uint8)
    is_zero = (bits & np.uint32(F32_ABS_MASK)) == 0
    # +-x * Inf = +-Inf saturates to +-6; 0 * Inf is NaN (taken as the positive NaN).
    return np.where(is_zero, np.uint8(e2m1_nan_code(nan)), sign | np.uint8(MAX_MAGNITUDE_CODE))


def _run_in_parts(task, nblocks: int, width: int) -> None:
    """Run ``task(r0, r1)`` over contiguous block ranges covering [0, nblocks): in threads
    for large inputs (NumPy releases the GIL inside its loops, and the parts write disjoint
    slices, so results do not depend on the split), else in one call."""
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if workers < 2 or nblocks * width < _PARALLEL_MIN_ELEMENTS:
        task(0, nblocks)
        return
    bounds = [nblocks * i // workers for i in range(workers + 1)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(task, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        for future in futures:
            future.result()


def _block_amax_bits_into(bits: np.ndarray, out: np.ndarray) -> None:
    """Pass 1: per-block max of |x| as uint32 patterns into ``out`` (NaN patterns exceed
    Inf's, so a NaN anywhere makes the block's max a NaN pattern)."""
    nblocks, width = bits.shape
    rows = max(1, _ROWS_ELEMENTS // width)
    abs_buf = np.empty((min(rows, nblocks), width), dtype=np.uint32)
    for r0 in range(0, nblocks, rows):
        r1 = min(r0 + rows, nblocks)
        abs_rows = abs_buf[: r1 - r0]
        np.bitwise_and(bits[r0:r1], np.uint32(F32_ABS_MASK), out=abs_rows)
        _row_max_bits(abs_rows, out[r0:r1])


def _block_amax_bits(bits: np.ndarray) -> np.ndarray:
    nblocks, width = bits.shape
    out = np.empty(nblocks, dtype=np.uint32)
    _run_in_parts(lambda a, b: _block_amax_bits_into(bits[a:b], out[a:b]), nblocks, width)
    return out


def _tensor_scale_value(amax_bits: np.ndarray, settings: QuantizeSettings) -> np.float32 | None:
    """None, the given float32 value, or float32(amax_tensor / 2688) for 'amax'."""
    ts = settings.tensor_scale
    if ts is None:
        return None
    if ts != "amax":
        return np.float32(ts)
    tensor_amax_bits = amax_bits.max(initial=np.uint32(0))
    amax = saturate_inf(np.array([tensor_amax_bits], dtype=np.uint32).view(np.float32))[0]
    scale = np.float32(amax / TENSOR_SCALE_DIVISOR)  # NaN tensor -> NaN scale -> NaN blocks
    # All-zero tensors, and amax below ~1.9e-42 whose quotient underflows, get 1 (never / 0).
    return np.float32(1.0) if scale == 0 else scale


def _block_scales(amax: np.ndarray, fmt: BlockFormat, settings: QuantizeSettings,
                  tensor_scale: np.float32 | None):
    """Scale bytes, decoded scales, s_eff and the data multiplier (None for
    scale_op='divide') per block."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if fmt.scale == E4M3FN:
            scale_bits = nvfp4_block_scale_bits(amax, tensor_scale, settings.scale_amax_op,
                                                settings.scale_lower_clamp)
            scales = e4m3_decode(scale_bits)
            s_eff = scales if tensor_scale is None else scales * tensor_scale
            multiplier = np.float32(1.0) / s_eff if settings.scale_op == "reciprocal" else None
        else:
            scale_bits = mx_scale_bits(amax, settings.scale_rule)
            scales = s_eff = e8m0_decode(scale_bits)
            multiplier = mx_data_multiplier(scale_bits)
    return scale_bits, scales, s_eff, multiplier


def _encode_stochastic_into(y: np.ndarray, words: np.ndarray, out: np.ndarray, nan: str) -> None:
    y_bits = y.view(np.uint32).reshape(-1)
    abs_y = y_bits & np.uint32(F32_ABS_MASK)
    is_nan = abs_y > F32_INF_BITS
    mag = round_magnitude_stochastic(np.where(is_nan, np.uint32(0), abs_y), words, E2M1)
    encoded = np.minimum(mag, MAX_MAGNITUDE_CODE).astype(np.uint8)
    encoded |= ((y_bits >> 28) & SIGN_CODE_BIT).astype(np.uint8)
    encoded[is_nan] = e2m1_encode_bits_exact(y_bits[is_nan], nan)
    out.reshape(-1)[:] = encoded


def _encode_blocks_into(blocks: np.ndarray, s_eff: np.ndarray, multiplier: np.ndarray | None,
                        settings: QuantizeSettings, rbits: np.ndarray | None,
                        codes: np.ndarray, packed: np.ndarray) -> None:
    """Pass 2: codes = E2M1(x * multiplier) (or x / s_eff), and their packed bytes."""
    nblocks, width = blocks.shape
    rows = max(1, _ROWS_ELEMENTS // width)
    y_buf = np.empty((min(rows, nblocks), width), dtype=np.float32)
    pair_buf = np.empty((min(rows, nblocks), width // 2), dtype=np.uint16)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for r0 in range(0, nblocks, rows):
            r1 = min(r0 + rows, nblocks)
            y = y_buf[: r1 - r0]
            if multiplier is not None:
                np.multiply(blocks[r0:r1], multiplier[r0:r1, None], out=y)
            else:
                np.divide(blocks[r0:r1], s_eff[r0:r1, None], out=y)
            out = codes[r0:r1]
            if rbits is None:
                e2m1_encode_bits_into(y.view(np.uint32).reshape(-1), out.reshape(-1),
                                      settings.nan)
            else:
                _encode_stochastic_into(y, rbits[r0 * width:r1 * width], out, settings.nan)
            # FP4_FORMATS.md packing: little-endian byte pairs, element 2i in the low nibble.
            pairs = out.view("<u2")
            pair = pair_buf[: r1 - r0]
            np.right_shift(pairs, 4, out=pair)
            np.bitwise_or(pair, pairs, out=pair)
            np.copyto(packed[r0:r1], pair, casting="unsafe")


def _encode_blocks(blocks: np.ndarray, s_eff: np.ndarray, multiplier: np.ndarray | None,
                   settings: QuantizeSettings, rbits: np.ndarray | None):
    nblocks, width = blocks.shape
    codes = np.empty((nblocks, width), dtype=np.uint8)
    packed = np.empty((nblocks, width // 2), dtype=np.uint8)

    def task(a: int, b: int) -> None:
        _encode_blocks_into(blocks[a:b], s_eff[a:b],
                            None if multiplier is None else multiplier[a:b], settings,
                            None if rbits is None else rbits[a * width:b * width],
                            codes[a:b], packed[a:b])

    _run_in_parts(task, nblocks, width)
    return codes, packed


def _fix_special_blocks(blocks: np.ndarray, codes: np.ndarray, packed: np.ndarray,
                        amax_bits: np.ndarray, s_eff: np.ndarray,
                        multiplier: np.ndarray | None, fmt: BlockFormat,
                        settings: QuantizeSettings, tensor_scale: np.float32 | None) -> None:
    """Whole-block rules (rare blocks only), so results never depend on a NaN's sign:
    NaN blocks, zero-scale blocks, overflowing reciprocals, MX blocks with amax 0."""
    # Cheap whole-array tests first (one reduction each); masks only when something is there.
    if amax_bits.size == 0:
        return
    tensor_nan = tensor_scale is not None and bool(np.isnan(tensor_scale))
    if tensor_nan:
        nan_blocks = np.ones(amax_bits.shape, dtype=bool)
    elif amax_bits.max() > F32_INF_BITS:
        nan_blocks = amax_bits > F32_INF_BITS
    else:
        nan_blocks = np.zeros(amax_bits.shape, dtype=bool)
    fixes = []
    if nan_blocks.any():
        fixes.append((nan_blocks, lambda rows: np.full(rows.shape, e2m1_nan_code(settings.nan),
                                                       dtype=np.uint8)))
    if fmt.scale == E4M3FN:
        # Without a tensor scale s_eff >= 2^-9 or 0, so 1/s_eff never overflows.
        if tensor_scale is not None or not s_eff.min() > 0:  # a 0 (or a NaN) is present
            zero_scale = (s_eff == 0) & ~nan_blocks
            if zero_scale.any():
                fixes.append((zero_scale, lambda rows: _zero_scale_codes(
                    rows, settings.zero_scale_codes, settings.nan)))
        if multiplier is not None and tensor_scale is not None:
            # 1/s_eff overflows for a tiny non-zero s_eff (tensor scale): x * Inf semantics.
            overflow = np.isinf(multiplier) & (s_eff > 0) & ~nan_blocks
            if overflow.any():
                fixes.append((overflow, lambda rows: _zero_scale_codes(
                    rows, "reciprocal", settings.nan)))
    elif amax_bits.min() == 0:
        zero_amax = amax_bits == 0
        fixes.append((zero_amax, lambda rows: np.zeros(rows.shape, dtype=np.uint8)))
    for mask, make_codes in fixes:
        new_codes = make_codes(blocks[mask])
        codes[mask] = new_codes
        packed[mask] = new_codes[:, 0::2] | (new_codes[:, 1::2] << 4)


def _block_flags(amax: np.ndarray, s_eff: np.ndarray, settings: QuantizeSettings):
    """Per-block flags from the largest element, whose scaled value |x|max / s_eff is
    computed with the same float32 operations as the data (codes are monotone in it):
    flushed: non-zero finite amax but everything dequantizes to 0 (scale 0, or the largest
    scaled value rounds to 0); saturated: the largest scaled value exceeds 6 (Inf included)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if settings.scale_op == "divide":
            scaled = amax / s_eff
        else:
            scaled = amax * (np.float32(1.0) / s_eff)
    usable = ~np.isnan(amax) & np.isfinite(s_eff) & (s_eff > 0)
    flushed = (amax > 0) & np.isfinite(amax) & ((s_eff == 0) | (usable & (scaled <= 0.25)))
    saturated = usable & (scaled > 6)
    return flushed, saturated


def quantize(x: object, fmt: str | BlockFormat = "nvfp4", axis: int = -1, *,
             rounding: str = "rne", rbits: object = None, nan: str = "ptx",
             scale_rule: str = "rceil", tensor_scale: str | float | None = None,
             scale_op: str = "reciprocal", scale_amax_op: str = "divide",
             scale_lower_clamp: bool = False, zero_scale_codes: str = "zeros",
             pad: bool = False) -> QuantizedTensor:
    """Quantize ``x`` to the block format ``fmt`` with blocks along ``axis``.

    See the module docstring for the exact arithmetic and special values. ``rbits``
    (stochastic rounding only): one uint32 (or uint8, used as the top byte) per element, with
    the shape of x or of x padded along ``axis``; element i's word rounds x_i / s_eff as in
    fp4sim.minifloat.round_magnitude_stochastic.
    """
    block_format = get_block_format(fmt)
    settings = QuantizeSettings(rounding=rounding, nan=nan, scale_rule=scale_rule,
                                tensor_scale=tensor_scale, scale_op=scale_op,
                                scale_amax_op=scale_amax_op, scale_lower_clamp=scale_lower_clamp,
                                zero_scale_codes=zero_scale_codes, pad=pad)
    settings.check_format(block_format)
    x32 = as_float32(x)
    if x32.ndim == 0:
        raise ValueError("x must have at least one dimension")
    ax = normalize_axis(axis, x32.ndim)
    bs = block_format.block_size
    moved = np.moveaxis(x32, ax, -1)
    length = moved.shape[-1]
    if length % bs:
        if not pad:
            raise ValueError(f"axis {ax} of x has length {length}, not a multiple of the "
                             f"{block_format.name} block size {bs}; pass pad=True to pad "
                             "with zeros")
        widths = [(0, 0)] * (moved.ndim - 1) + [(0, bs - length % bs)]
        moved = np.pad(moved, widths)
    padded_shape = moved.shape
    blocks = np.ascontiguousarray(moved).reshape(-1, bs)
    words = None
    if rounding == "stochastic":
        if rbits is None:
            raise ValueError("rounding='stochastic' needs explicit random bits (rbits)")
        rb = np.asarray(rbits)
        if rb.ndim == x32.ndim:
            # Words are given in x's axis order, for x or for x padded along the block axis;
            # padding elements (zeros) get word 0, which cannot change a zero's code.
            rb = np.moveaxis(rb, ax, -1)
            if rb.shape[-1] == length and rb.shape != padded_shape:
                rb = np.pad(rb, [(0, 0)] * (rb.ndim - 1) + [(0, padded_shape[-1] - length)])
        words = as_random_words(np.ascontiguousarray(rb), padded_shape).reshape(-1)
    elif rbits is not None:
        raise ValueError("rbits is only used with rounding='stochastic'")
    amax_bits = _block_amax_bits(blocks.view(np.uint32))
    ts = _tensor_scale_value(amax_bits, settings)
    amax = amax_bits.view(np.float32)
    scale_bits, scales, s_eff, multiplier = _block_scales(amax, block_format, settings, ts)
    codes, packed = _encode_blocks(blocks, s_eff, multiplier, settings, words)
    _fix_special_blocks(blocks, codes, packed, amax_bits, s_eff, multiplier, block_format,
                        settings, ts)

    scale_shape = padded_shape[:-1] + (padded_shape[-1] // bs,)
    packed_shape = padded_shape[:-1] + (padded_shape[-1] // 2,)
    scale_bits = scale_bits.reshape(scale_shape)

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(a, -1, ax))

    return QuantizedTensor(
        codes=back(codes.reshape(padded_shape)),
        packed=back(packed.reshape(packed_shape)),
        scale_bits=back(scale_bits),
        scales=back(scales.reshape(scale_shape)),
        tensor_scale=ts,
        fmt=block_format,
        settings=settings,
        axis=ax,
        shape=tuple(x32.shape),
        block_amax=back(amax.reshape(scale_shape)),
    )


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """float32 values e2m1(code) * s_eff, in the input's shape (padding removed)."""
    bs = q.fmt.block_size
    codes = np.moveaxis(q.codes, q.axis, -1)
    s_eff = np.moveaxis(q.effective_scales, q.axis, -1)
    values = E2M1_VALUES.take(codes).reshape(codes.shape[:-1] + (-1, bs))
    with np.errstate(invalid="ignore", over="ignore"):
        values = values * s_eff[..., None]
    values = values.reshape(codes.shape)[..., : q.shape[q.axis]]
    return np.ascontiguousarray(np.moveaxis(values, -1, q.axis))


def fake_quantize(x: object, fmt: str | BlockFormat = "nvfp4", axis: int = -1,
                  **settings: object) -> np.ndarray:
    """dequantize(quantize(x, fmt, axis, **settings)): float32, shape of x."""
    return dequantize(quantize(x, fmt, axis, **settings))
