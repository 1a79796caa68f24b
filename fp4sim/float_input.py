"""Validation and exact conversion of user input to float32 arrays."""

from __future__ import annotations

import numpy as np

# ml_dtypes float types whose values are all exactly representable in float32.
_NARROW_ML_DTYPES = frozenset({
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2", "float8_e5m2fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn",
    "float4_e2m1fn",
})


def as_float32(x: object, name: str = "x") -> np.ndarray:
    """Return ``x`` as a float32 ndarray.

    float32 passes through unchanged (no copy); float16, bfloat16 (the ml_dtypes dtype,
    recognised by name so ml_dtypes is never imported) and narrower ml_dtypes floats are
    converted exactly. float64 (including Python floats) is rounded to float32 with RNE:
    the emulator's input type is float32, so give float32 for bit-exact claims.
    Booleans, integers, complex numbers, strings and objects raise TypeError.
    """
    arr = np.asarray(x)
    dtype = arr.dtype
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        if dtype == np.float32:  # native float32: no copy
            return arr
        # float16 and byte-swapped float32 convert exactly; float64 rounds (RNE).
        return arr.astype(np.float32)
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        # bfloat16 is the top half of a float32: shifting the bits left is exact.
        bits = np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    if dtype.name in _NARROW_ML_DTYPES:
        return arr.astype(np.float32)
    raise TypeError(f"{name} must be a floating-point array (float32, float16, bfloat16, "
                    f"float64), got dtype {dtype} (shape {arr.shape})")


def float32_bits(x: np.ndarray) -> np.ndarray:
    """The uint32 bit patterns of a float32 array (a view when possible)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Turn a possibly negative axis into an index, with a clear error when out of range."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return int(axis) % ndim
