"""Two-level quantization (SageAttention3 style, FP4_FORMATS.md "Two-level P quantization").

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
from fp4sim.formats import NVFP4
from fp4sim.quantize import QuantizedTensor, dequantize, quantize

ROW_SCALE_DIVISOR = np.float32(448.0 * 6.0)


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
        rowmax = np.max(np.abs(x), axis=row_axis, keepdims=True) if x.size else \
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
    with np.errstate(invalid="ignore", over="ignore"):
        return (dequantize(tq.inner) * tq.row_scales).astype(np.float32)


def fake_quantize_two_level(x: object, axis: int = -1, row_axis: int | None = None,
                            **settings: object) -> np.ndarray:
    """dequantize_two_level(quantize_two_level(...))."""
    return dequantize_two_level(quantize_two_level(x, axis, row_axis, **settings))
