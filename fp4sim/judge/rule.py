"""The FP4 tolerance rule for one attention output or gradient tensor.

Shared by `fp4sim check attention` (``fp4sim.judge.attention``), `fp4sim report`'s verdicts
on external kernels and ``fp4sim.testing.assert_attention_close``; NumPy only.

The rule (after FlashAttention's tests, which bound a kernel's error by a
multiple of the error of a PyTorch run in the same low precision):

    max|out - ref_fp64| <= factor * max|ref_lowprec - ref_fp64| + floor,
    factor = 2 (forward) or 3 (backward),  floor = u(out dtype) * max|ref_fp64| + floor_abs

elementwise (``floor_abs`` may be an array: `fp4sim check` passes the componentwise
float32 rounding-error bound of the attention formulas, so that an exactly cancelling
reference, whose own error is 0, does not make the bound 0).

``ref_fp64`` is the same recipe evaluated with float64 accumulation (every quantization
decision identical), ``ref_lowprec`` the same recipe in the kernel's precision (float32
accumulation, output rounded to the kernel's output dtype). ``u`` is the unit roundoff
(2^-24 float32, 2^-11 float16, 2^-8 bfloat16): one final rounding of the largest value.
No row may exceed the bound unless an allowance says why, and the report then says so:

* ``flip_allowance`` (elementwise, shaped like ``out``): a row over the bound passes only if
  every element is within bound + allowance. `fp4sim check` passes the effect of the FP4
  code flips of P that are plausible on this input (fp4sim.judge.bounds.p_flip_allowances:
  zero unless the reference P sits within a kernel's float32 error of a rounding boundary),
  with ``allowance_reason`` naming it;
* ``row_allowance`` / ``max_allowance_rows``: at most that many rows may exceed the bound by
  at most ``row_allowance`` (an explicit, caller-chosen allowance).

``describe()`` prints every use of an allowance (rows, largest excess and the allowance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fp4sim.judge.arrays import as_numpy, dtype_name

__all__ = ["RULE_FACTORS", "UNIT_ROUNDOFF", "AttentionErrorReport", "attention_error"]

# Unit roundoff 2^-(p) with p the significand precision (IEEE 754; bfloat16 has 8 bits).
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


# Multiplier of the low-precision reference's error (FlashAttention's tests use 2 for the
# output and up to 3 for gradients, whose accumulation chains are longer).
RULE_FACTORS: dict[str, float] = {"forward": 2.0, "backward": 3.0}


@dataclass(frozen=True)
class AttentionErrorReport:
    """Outcome of the FP4 tolerance rule on one tensor."""

    name: str
    kind: str
    ok: bool
    max_error: float  # max|out - ref_fp64|
    ref_error: float  # max|ref_lowprec - ref_fp64|
    bound: float  # factor * ref_error + floor, at worst_index
    floor: float  # at worst_index
    worst_error: float  # |out - ref_fp64| at worst_index
    worst_index: tuple[int, ...]  # the element most over its bound (else the largest error)
    n_rows_over: int  # rows (all axes but the last) whose max error exceeds the bound
    n_rows: int
    rows_over_allowance: int  # rows exceeding even bound + row_allowance
    relative_l2: float  # ||out - ref_fp64|| / ||ref_fp64||
    nonfinite: int
    rows_allowed: int = 0  # rows over the bound that an allowance lets pass
    allowance_excess: float = 0.0  # the largest excess over the bound among them
    allowance_at: float = 0.0  # the allowance at that element
    allowance_reason: str = ""

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        text = (
            f"{self.name} ({self.kind}): {verdict}: max|out - ref64| = {self.max_error:.3e};"
            f" at {self.worst_index} error {self.worst_error:.3e} vs bound {self.bound:.3e}"
            f" (ref error {self.ref_error:.3e}, floor {self.floor:.3e}); rows over bound"
            f" {self.n_rows_over}/{self.n_rows}; relative L2 "
            # an all-zero reference (e.g. dQ with one visible key) has no relative error
            + (f"{self.relative_l2:.3e}" if not math.isinf(self.relative_l2)
               else "n/a (the reference is zero)")
            + (f"; {self.nonfinite} non-finite values" if self.nonfinite else "")
        )
        if self.rows_allowed:
            text += (
                f"; allowance used: {self.rows_allowed} row(s) over the bound pass because"
                f" {self.allowance_reason or 'of the row allowance'} (largest excess"
                f" {self.allowance_excess:.3e} <= allowance {self.allowance_at:.3e})"
            )
        return text


def attention_error(
    out: Any,
    ref_lowprec: Any,
    ref_fp64: Any,
    kind: str = "forward",
    *,
    name: str = "O",
    out_dtype: str | None = None,
    factor: float | None = None,
    floor_abs: Any = 0.0,
    row_allowance: Any = None,
    max_allowance_rows: int = 0,
    flip_allowance: Any = None,
    allowance_reason: str = "",
) -> AttentionErrorReport:
    """Evaluate the FP4 tolerance rule (module docstring) without raising."""
    if kind not in RULE_FACTORS:
        raise ValueError(f"kind must be one of {sorted(RULE_FACTORS)}, got {kind!r}")
    factor = RULE_FACTORS[kind] if factor is None else float(factor)
    out_dtype = dtype_name(out) if out_dtype is None else out_dtype
    if out_dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"unsupported output dtype {out_dtype!r}")
    o = as_numpy(out).astype(np.float64)
    lo = as_numpy(ref_lowprec).astype(np.float64)
    hi = as_numpy(ref_fp64).astype(np.float64)
    if not (o.shape == lo.shape == hi.shape):
        raise ValueError(
            f"{name}: shapes differ: out {o.shape}, ref_lowprec {lo.shape}, ref_fp64 {hi.shape}"
        )
    nonfinite = int((~np.isfinite(o) & np.isfinite(hi)).sum())
    err = np.abs(o - hi)
    err = np.where(np.isnan(err), np.inf, err)
    ref_err = np.abs(lo - hi)
    ref_err = ref_err[np.isfinite(ref_err)]
    ref_error = float(ref_err.max()) if ref_err.size else 0.0
    scale = float(np.abs(hi[np.isfinite(hi)]).max()) if np.isfinite(hi).any() else 0.0
    floor = UNIT_ROUNDOFF[out_dtype] * scale + np.broadcast_to(
        np.asarray(floor_abs, dtype=np.float64), err.shape
    )
    bound = factor * ref_error + floor
    rows = err.reshape(-1, err.shape[-1]) if err.ndim else err.reshape(1, 1)
    row_bound = bound.reshape(rows.shape)
    excess = rows - row_bound  # > 0 where over the bound
    row_excess = excess.max(axis=-1)
    over = row_excess > 0
    if row_allowance is None:
        allowance = np.zeros(row_excess.shape)
    else:
        allowance = np.broadcast_to(
            np.asarray(row_allowance, dtype=np.float64).reshape(-1), row_excess.shape
        )
    over_allowance = row_excess > allowance
    n_over = int(over.sum())
    allowed_excess, allowed_at = 0.0, 0.0
    if flip_allowance is not None:
        flip = np.broadcast_to(np.asarray(flip_allowance, dtype=np.float64), err.shape)
        flip_rows = flip.reshape(rows.shape)
        within = np.all(excess <= flip_rows, axis=-1)  # every element within bound + allowance
        allowed = over & within
        n_allowed = int(allowed.sum())
        ok = n_over == n_allowed
        if n_allowed:
            ex = np.where(allowed[:, None] & (excess > 0), excess, -np.inf)
            at = np.unravel_index(int(np.argmax(ex)), ex.shape)
            allowed_excess, allowed_at = float(excess[at]), float(flip_rows[at])
    else:
        ok = n_over == 0 or (n_over <= max_allowance_rows and not over_allowance.any())
        n_allowed = n_over if (ok and n_over) else 0
        if n_allowed:
            allowed_excess = float(row_excess[over].max())
            allowed_at = float(allowance[over][np.argmax(row_excess[over])])
            allowance_reason = allowance_reason or (
                f"of the caller's row allowance (at most {max_allowance_rows} row(s))")
    if err.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
        flat = int(np.argmax(ratio)) if np.any(ratio > 1) else int(np.argmax(err))
        worst = np.unravel_index(flat, err.shape)
    else:
        flat, worst = 0, ()
    norm = float(np.linalg.norm(hi))
    finite_err_norm = float(np.linalg.norm(np.where(np.isfinite(err), err, 0.0)))
    if norm:
        rel = finite_err_norm / norm
    else:
        rel = float("inf") if finite_err_norm else 0.0
    return AttentionErrorReport(
        name=name,
        kind=kind,
        ok=bool(ok) and nonfinite == 0,
        max_error=float(err.max()) if err.size else 0.0,
        ref_error=ref_error,
        bound=float(bound.reshape(-1)[flat]) if err.size else 0.0,
        floor=float(floor.reshape(-1)[flat]) if err.size else 0.0,
        worst_error=float(err.reshape(-1)[flat]) if err.size else 0.0,
        worst_index=tuple(int(i) for i in worst),
        n_rows_over=n_over,
        n_rows=int(row_excess.size),
        rows_over_allowance=int(over_allowance.sum()),
        relative_l2=rel,
        nonfinite=nonfinite,
        rows_allowed=n_allowed if ok else 0,
        allowance_excess=allowed_excess,
        allowance_at=allowed_at,
        allowance_reason=allowance_reason,
    )
