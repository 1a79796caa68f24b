"""Packing of unpacked 4-bit codes two per byte: element 2i in the low nibble (bits 0-3),
element 2i+1 in the high nibble (docs/numerics.md, Packing; torch.float4_e2m1fn_x2 order)."""

from __future__ import annotations

import numpy as np

from fp4sim.float_input import normalize_axis


def _check_codes(codes: np.ndarray, name: str) -> None:
    if codes.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 array, got dtype {codes.dtype}")


def pack_fp4(codes: object, axis: int = -1) -> np.ndarray:
    """Pack uint8 codes 0..15 pairwise along ``axis`` (its length must be even)."""
    arr = np.asarray(codes)
    _check_codes(arr, "codes")
    if arr.ndim == 0:
        raise ValueError("codes must have at least one dimension")
    ax = normalize_axis(axis, arr.ndim)
    length = arr.shape[ax]
    if length % 2:
        raise ValueError(f"pack_fp4: axis {axis} has odd length {length}; codes pack in pairs")
    if arr.size and arr.max() > 15:
        raise ValueError(f"pack_fp4: codes must lie in 0..15, got max {arr.max()}")
    last = np.ascontiguousarray(np.moveaxis(arr, ax, -1))
    # Read pairs as little-endian uint16: element 2i is the low byte, 2i+1 the high byte.
    pairs = last.view("<u2")
    packed = (pairs | (pairs >> 4)).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(packed, -1, ax))


def unpack_fp4(packed: object, axis: int = -1) -> np.ndarray:
    """Inverse of ``pack_fp4``: uint8 bytes -> uint8 codes, ``axis`` doubled in length."""
    arr = np.asarray(packed)
    _check_codes(arr, "packed")
    if arr.ndim == 0:
        raise ValueError("packed must have at least one dimension")
    ax = normalize_axis(axis, arr.ndim)
    last = np.moveaxis(arr, ax, -1)
    codes = np.empty(last.shape[:-1] + (2 * last.shape[-1],), dtype=np.uint8)
    codes[..., 0::2] = last & 0x0F
    codes[..., 1::2] = last >> 4
    return np.ascontiguousarray(np.moveaxis(codes, -1, ax))
