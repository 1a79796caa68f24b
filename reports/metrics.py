"""Error metrics between an approximation and a reference tensor (NumPy, float64).

Every function takes array-likes of the same shape (``approx``, ``reference``), converts
them to float64 and returns plain Python floats or dicts of them, so that the results go
straight into ``report.json``.

Conventions (stated once, used everywhere):

* scalar metrics: ``relative_l2 = ||a - r||_2 / ||r||_2``, ``relative_l1 = ||a - r||_1 / ||r||_1``,
  ``rmse = sqrt(mean((a - r)^2))``, ``max_abs = max |a - r|``,
  ``cosine = <a, r> / (||a|| ||r||)``, ``norm_ratio = ||a|| / ||r||``.
  A zero reference gives ``0`` for the relative errors when ``a`` is zero too and ``inf``
  otherwise; the cosine of two zero tensors is 1, of one zero tensor 0.
* per-element relative error: ``e_i = |a_i - r_i| / (|r_i| + ELEMENT_GUARD_EPS * rms(r))``.
  The guard keeps near-zero reference entries from dominating: an entry far below the
  tensor's RMS is measured against ``ELEMENT_GUARD_EPS * rms(r)`` instead of itself.
* per-row relative error (rows = all axes but the last, e.g. one query of one head):
  ``e_row = ||a_row - r_row|| / (||r_row|| + ELEMENT_GUARD_EPS * rms_rows(||r_row||))``.
* distributions are histograms on fixed log10 bin edges (``LOG10_EDGES``), identical for
  every tensor so that histograms can be compared and overlaid; values below the first
  edge (exact matches included) are counted in ``underflow``, above the last in ``overflow``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

ELEMENT_GUARD_EPS = 1e-3
"""Relative weight of the RMS guard in the per-element and per-row relative errors."""

LOG10_EDGES: tuple[float, ...] = tuple(float(x) for x in np.linspace(-8.0, 2.0, 41))
"""Bin edges (log10 of the relative error) shared by every distribution: 1e-8 .. 1e2."""

QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)

SCALAR_METRICS: tuple[str, ...] = (
    "relative_l2",
    "relative_l1",
    "rmse",
    "max_abs",
    "cosine",
    "norm_ratio",
)
"""Names of the scalar metrics returned by :func:`error_metrics`, in display order."""

LOWER_IS_BETTER: dict[str, bool] = {
    "relative_l2": True,
    "relative_l1": True,
    "rmse": True,
    "max_abs": True,
    "cosine": False,
    "norm_ratio": False,
}


def _pair(
    approx: ArrayLike, reference: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    a = np.asarray(approx, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: approx {a.shape} vs reference {r.shape}")
    return a, r


def _l2(x: NDArray[np.float64]) -> float:
    """Euclidean norm without BLAS (a BLAS call contends badly for cores on a loaded CPU)."""
    return float(np.sqrt(np.sum(x * x)))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0.0:
        return numerator / denominator
    return 0.0 if numerator == 0.0 else math.inf


def relative_l2(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    return _ratio(_l2(a - r), _l2(r))


def relative_l1(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    return _ratio(float(np.abs(a - r).sum()), float(np.abs(r).sum()))


def rmse(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    if a.size == 0:
        return 0.0
    return float(np.sqrt(np.mean((a - r) ** 2)))


def max_abs(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - r)))


def cosine_similarity(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    na = _l2(a)
    nr = _l2(r)
    if na == 0.0 and nr == 0.0:
        return 1.0
    if na == 0.0 or nr == 0.0:
        return 0.0
    return float(np.sum(a * r) / (na * nr))


def norm_ratio(approx: ArrayLike, reference: ArrayLike) -> float:
    a, r = _pair(approx, reference)
    return _ratio(_l2(a), _l2(r))


def error_metrics(approx: ArrayLike, reference: ArrayLike) -> dict[str, float]:
    """All scalar metrics of :data:`SCALAR_METRICS` as a dict."""
    a, r = _pair(approx, reference)
    return {
        "relative_l2": relative_l2(a, r),
        "relative_l1": relative_l1(a, r),
        "rmse": rmse(a, r),
        "max_abs": max_abs(a, r),
        "cosine": cosine_similarity(a, r),
        "norm_ratio": norm_ratio(a, r),
    }


def rms(x: ArrayLike) -> float:
    v = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(v**2))) if v.size else 0.0


def elementwise_relative_error(approx: ArrayLike, reference: ArrayLike) -> NDArray[np.float64]:
    """``|a - r| / (|r| + ELEMENT_GUARD_EPS * rms(r))``, flattened; zero where both are zero."""
    a, r = _pair(approx, reference)
    diff = np.abs(a - r).ravel()
    denom = np.abs(r).ravel() + ELEMENT_GUARD_EPS * rms(r)
    out = np.zeros_like(diff)
    nonzero = denom > 0
    out[nonzero] = diff[nonzero] / denom[nonzero]
    out[~nonzero & (diff > 0)] = math.inf
    return out


def row_relative_error(approx: ArrayLike, reference: ArrayLike) -> NDArray[np.float64]:
    """Per-row relative L2 error (rows = every axis but the last), with the RMS guard."""
    a, r = _pair(approx, reference)
    if a.ndim == 0:
        a, r = a.reshape(1, 1), r.reshape(1, 1)
    width = a.shape[-1]
    a2 = a.reshape(-1, width)
    r2 = r.reshape(-1, width)
    diff_norm = np.sqrt(np.sum((a2 - r2) ** 2, axis=1))
    ref_norm = np.sqrt(np.sum(r2 * r2, axis=1))
    denom = ref_norm + ELEMENT_GUARD_EPS * rms(ref_norm)
    out = np.zeros_like(diff_norm)
    nonzero = denom > 0
    out[nonzero] = diff_norm[nonzero] / denom[nonzero]
    out[~nonzero & (diff_norm > 0)] = math.inf
    return out


def log_histogram(values: ArrayLike) -> dict[str, Any]:
    """Histogram of ``log10(values)`` on :data:`LOG10_EDGES` (non-negative values expected).

    The edges are not repeated in the result (they are the module constant, recorded once
    in the report's settings)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite_positive = v[np.isfinite(v) & (v > 0)]
    logs = np.log10(finite_positive)
    lo, hi = LOG10_EDGES[0], LOG10_EDGES[-1]
    inside = logs[(logs >= lo) & (logs <= hi)]
    counts, _ = np.histogram(inside, bins=np.asarray(LOG10_EDGES))
    underflow = int((v == 0).sum()) + int((logs < lo).sum())
    overflow = int((logs > hi).sum()) + int(np.isinf(v).sum())
    return {
        "counts": [int(c) for c in counts],
        "underflow": underflow,
        "overflow": overflow,
        "nan": int(np.isnan(v).sum()),
        "total": int(v.size),
    }


def distribution_summary(values: ArrayLike) -> dict[str, Any]:
    """Quantiles, mean, max and the log histogram of a non-negative error sample."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    quantiles: dict[str, float | None] = {}
    for q in QUANTILES:
        key = f"p{q * 100:g}"
        quantiles[key] = float(np.quantile(finite, q)) if finite.size else None
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "max": float(v.max()) if v.size else None,
        "quantiles": quantiles,
        "histogram": log_histogram(v),
    }


def compare(approx: ArrayLike, reference: ArrayLike) -> dict[str, Any]:
    """Scalar metrics plus the per-element and per-row error distributions."""
    a, r = _pair(approx, reference)
    return {
        "metrics": error_metrics(a, r),
        "element_relative_error": distribution_summary(elementwise_relative_error(a, r)),
        "row_relative_error": distribution_summary(row_relative_error(a, r)),
    }


def histogram_cdf(histogram: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The empirical CDF at the upper bin edges of a :func:`log_histogram` (10**edge, F)."""
    total = histogram["total"] - histogram["nan"]
    if total <= 0:
        return [], []
    running = histogram["underflow"]
    xs: list[float] = []
    fs: list[float] = []
    for edge, count in zip(LOG10_EDGES[1:], histogram["counts"], strict=True):
        running += count
        xs.append(10.0**edge)
        fs.append(running / total)
    return xs, fs
