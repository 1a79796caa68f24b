"""NumPy copies of arrays or torch tensors, and their dtype names (torch only when a tensor
is given: this module imports with NumPy alone)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy", "dtype_name"]


def _torch_dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def as_numpy(x: Any, *, raw_bytes: bool = False) -> np.ndarray:
    """A NumPy copy of a NumPy array or torch tensor (any device).

    ``raw_bytes=True`` reinterprets 1-byte dtypes (uint8, int8, float8_e4m3fn,
    float8_e8m0fnu, float4_e2m1fn_x2) as uint8; floating tensors otherwise become float32
    (bfloat16 and float16 exactly) or float64.
    """
    if type(x).__module__.startswith("torch"):
        t = x.detach().cpu()
        if raw_bytes:
            if t.element_size() != 1:
                raise TypeError(f"expected a 1-byte dtype for raw bytes, got {t.dtype}")
            import torch  # lazy: torch is optional; a tensor is in hand, so it imports

            return t.contiguous().view(torch.uint8).numpy().copy()
        name = _torch_dtype_name(t)
        if name in ("bfloat16", "float16"):
            t = t.float()
        return t.numpy().copy()
    arr = np.asarray(x)
    if raw_bytes:
        if arr.dtype.itemsize != 1:
            raise TypeError(f"expected a 1-byte dtype for raw bytes, got {arr.dtype}")
        return arr.view(np.uint8).copy()
    return arr.copy()


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', ... for a NumPy array or torch tensor."""
    if type(x).__module__.startswith("torch"):
        return _torch_dtype_name(x)
    return str(np.asarray(x).dtype)
