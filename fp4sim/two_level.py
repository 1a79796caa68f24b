"""Two-level quantization (SageAttention3 style, docs/numerics.md "Two-level P quantization").

Per row r (the elements sharing every index except ``row_axis``):
  s1_r = float32(rowmax_r / 2688)    (2688 = 448 * 6; rowmax = max |x|, Inf -> FLT_MAX;
                                      s1 = 1 where this is 0: zero rows, and row maxima
                                      below ~1.9e-42 whose quotient underflows)
  q    = NVFP4 quantize of float32(x / s1_r) with blocks along ``axis``
  x~   = dequantize(q) * s1_r        (float32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fp4sim.block_scale import saturate_inf
from fp4sim.float_input import as_float32, normalize_axis
from fp4sim.formats import NVFP4, NVFP4_TENSOR_SCALE_DIVISOR
from fp4sim.pieces import split_into_pieces
from fp4sim.quantize import QuantizedTensor, dequantize, fake_quantize, quantize

_PIECE_ELEMENTS = 1 << 20  # fake_quantize_two_level walks pieces of this size (fp4sim.pieces)

ROW_SCALE_DIVISOR = np.float32(NVFP4_TENSOR_SCALE_DIVISOR)  # 448 * 6


@dataclass(frozen=True, eq=False)
class TwoLevelQuantized:
    """``inner``: the NVFP4 quantization of x / s1; ``row_scales``: float32 s1 with the row
    axis kept (length 1), so it broadcasts against x."""

    inner: QuantizedTensor
    row_scales: np.ndarray
    row_axis: int


def row_scales(x: np.ndarray, row_axis: int) -> np.ndarray:
    """float32 s1 = rowmax(|x|) / 2688 per row (keepdims); 1 where that is 0 (zero rows and
    row maxima below about 1.9e-42, where the float32 division underflows); NaN rows NaN."""
    with np.errstate(invalid="ignore"):
        # max |x| as max(max x, -min x): the same value (only the sign of a zero may differ,
        # and s1 = 0 becomes 1 below) without a temporary |x| the size of x.
        rowmax = np.maximum(np.max(x, axis=row_axis, keepdims=True),
                            -np.min(x, axis=row_axis, keepdims=True)) if x.size else \
            np.zeros(x.shape[:row_axis] + (1,) + x.shape[row_axis + 1:], np.float32)
    s1 = saturate_inf(rowmax).reshape(rowmax.shape) / ROW_SCALE_DIVISOR
    # A zero row, or a row max so small that s1 underflows to 0, gets s1 = 1 (never / 0).
    return np.where(s1 == 0, np.float32(1.0), s1).astype(np.float32)


def quantize_two_level(x: object, axis: int = -1, row_axis: int | None = None,
                       **settings: object) -> TwoLevelQuantized:
    """Per-row scale first, then NVFP4 along ``axis``. ``row_axis`` (default: ``axis``) is
    the axis the row max runs over. ``settings`` go to ``quantize`` (no tensor_scale: the
    row scale plays that role)."""
    if "tensor_scale" in settings and settings["tensor_scale"] is not None:
        raise ValueError("quantize_two_level uses its per-row scale; tensor_scale must be None")
    x32 = as_float32(x)
    if x32.ndim == 0:
        raise ValueError("x must have at least one dimension")
    ax = normalize_axis(axis, x32.ndim)
    rax = ax if row_axis is None else normalize_axis(row_axis, x32.ndim, "row_axis")
    s1 = row_scales(x32, rax)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (x32 / s1).astype(np.float32)
    inner = quantize(scaled, NVFP4, ax, **settings)
    return TwoLevelQuantized(inner=inner, row_scales=s1, row_axis=rax)


def dequantize_two_level(tq: TwoLevelQuantized) -> np.ndarray:
    """float32 dequantize(inner) * s1."""
    out = dequantize(tq.inner)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.multiply(out, tq.row_scales, out=out)  # float32 * float32, in place


def fake_quantize_two_level(x: object, axis: int = -1, row_axis: int | None = None,
                            **settings: object) -> np.ndarray:
    """dequantize_two_level(quantize_two_level(...)), bit for bit.

    Large inputs are walked in pieces of whole blocks (fp4sim.pieces): every step is per
    element or per block once s1 is known, so the extra memory is the output plus a few
    pieces' temporaries instead of x / s1, its codes and two float32 products."""
    x32 = as_float32(x)
    if x32.ndim == 0 or x32.size <= _PIECE_ELEMENTS:
        return dequantize_two_level(quantize_two_level(x32, axis, row_axis, **settings))
    if "tensor_scale" in settings and settings["tensor_scale"] is not None:
        raise ValueError("quantize_two_level uses its per-row scale; tensor_scale must be None")
    ax = normalize_axis(axis, x32.ndim)
    rax = ax if row_axis is None else normalize_axis(row_axis, x32.ndim, "row_axis")
    bs = NVFP4.block_size
    moved = np.moveaxis(x32, ax, -1)
    length = moved.shape[-1]
    padded_length = -(-length // bs) * bs
    rbits = settings.pop("rbits", None)
    rb_moved, rb_padded = None, False
    if rbits is not None:
        rb = np.asarray(rbits)
        rb_moved = np.moveaxis(rb, ax, -1) if rb.ndim == x32.ndim else rb
        rb_padded = rb_moved.shape == moved.shape[:-1] + (padded_length,)
        if not rb_padded and rb_moved.shape != moved.shape:
            raise ValueError(f"rbits must have shape {moved.shape[:-1] + (padded_length,)} (one "
                             f"word per element, block axis last), got {rb_moved.shape}")
    if length % bs and not settings.get("pad", False):  # before any work, as quantize does
        raise ValueError(f"axis {ax} of x has length {length}, not a multiple of the "
                         f"{NVFP4.name} block size {bs}; pass pad=True to pad with zeros")
    # s1 seen like x (a broadcast view, no copy), so a piece of x indexes its own s1.
    s1 = np.broadcast_to(np.moveaxis(row_scales(x32, rax), ax, -1), moved.shape)
    out = np.empty(x32.shape, np.float32)
    out_moved = np.moveaxis(out, ax, -1)
    for piece in split_into_pieces(moved.shape[:-1], length, padded_length, bs, _PIECE_ELEMENTS):
        s1_piece = s1[piece.src]
        with np.errstate(invalid="ignore", over="ignore"):
            scaled = moved[piece.src] / s1_piece
        words = None if rb_moved is None else rb_moved[piece.dst if rb_padded else piece.src]
        # Pieces hold whole blocks (a cut row is cut at a block boundary; its padding falls
        # in its last piece), so each block is quantized exactly as in one pass.
        fq = fake_quantize(scaled, NVFP4, -1, **settings,
                           **({} if words is None else {"rbits": words}))
        with np.errstate(invalid="ignore", over="ignore"):
            np.multiply(fq, s1_piece, out=out_moved[piece.src])
    return out
