"""Captured activations from a file (``--inputs FILE``): q, k, v and optionally dO."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fp4sim.harness.spec import UsageError

__all__ = ["INPUT_SUFFIXES", "load_inputs_file"]

INPUT_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
_DO_NAMES = ("do", "dO", "d_o", "grad_out", "dout")


def _as_numpy(value: Any, name: str, path: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy dtype: go via float32)
        value = value.detach().to("cpu").float().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise UsageError(f"{path}: {name} must be a numeric array, got dtype {array.dtype}")
    return array.astype(np.float32)


def _read(path: str) -> dict[str, Any]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    if suffix in (".pt", ".pth"):
        # lazy: torch is optional: .npz captures load with NumPy alone
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
        return dict(data)
    if suffix == ".safetensors":
        # lazy: optional dependency, only for .safetensors files
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception:  # bfloat16 tensors need the torch reader
            # lazy: optional dependency, only for .safetensors files
            from safetensors.torch import load_file as load_torch

            return dict(load_torch(path))
    raise UsageError(
        f"--inputs {path}: unknown file type {suffix or '(none)'}; use one of"
        f" {', '.join(INPUT_SUFFIXES)}"
    )


def load_inputs_file(path: str) -> dict[str, np.ndarray]:
    """q, k, v (and ``do`` when present) as float32 BHLD arrays: q (B, H, Lq, d), k and v
    (B, Hkv, Lk, d) with Hkv dividing H; raises ``UsageError`` with one line otherwise."""
    if not os.path.isfile(path):
        raise UsageError(f"--inputs {path}: no such file")
    try:
        raw = _read(path)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"--inputs {path}: cannot read: {type(err).__name__}: {err}") from err
    missing = [n for n in ("q", "k", "v") if n not in raw]
    if missing:
        raise UsageError(
            f"--inputs {path}: missing {', '.join(missing)}; it holds {sorted(raw)}"
            " (expected q, k, v and optionally do)"
        )
    out = {n: _as_numpy(raw[n], n, path) for n in ("q", "k", "v")}
    for name in _DO_NAMES:
        if name in raw:
            out["do"] = _as_numpy(raw[name], name, path)
            break
    q, k, v = out["q"], out["k"], out["v"]
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise UsageError(
            f"--inputs {path}: q must be (B, H, Lq, d) and k, v (B, Hkv, Lk, d) (BHLD);"
            f" got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise UsageError(
            f"--inputs {path}: batch and head dim must match and Hkv divide H;"
            f" got q {q.shape}, k {k.shape}"
        )
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise UsageError(f"--inputs {path}: empty tensors (q {q.shape}, k {k.shape})")
    if "do" in out and out["do"].shape != q.shape:
        raise UsageError(f"--inputs {path}: do {out['do'].shape} must have q's shape {q.shape}")
    for name, array in out.items():
        if not np.isfinite(array).all():
            raise UsageError(f"--inputs {path}: {name} holds NaN or Inf")
    return out
