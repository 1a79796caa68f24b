"""Statistical verdicts: a kernel's error distribution against its recipe's own.

A hardware kernel cannot be bit-exact with any reference (its accumulation order differs),
so beside the FP4 tolerance rule the report asks a distributional question: are the
kernel's errors against float64 exact attention distributed like the errors of the
recipe's reference implementation (float32 accumulation, rounded to the kernel's output
dtype) on the same inputs?

The samples are per-row relative errors (``metrics.row_relative_error``: one value per
query row of O and dQ, per key row of dK and dV), pooled over the scenarios. Kernel and
reference are measured on the same rows, so the samples are paired.

* Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``), null hypothesis: both
  samples come from one continuous distribution. It assumes independent draws within
  and between the samples. Rows of one scenario share inputs and the two samples are
  paired, so neither holds exactly: positive dependence between the samples makes the
  test conservative, dependence within a sample makes it anti-conservative. Read the
  p-value as a guide, not an exact error rate.
* Paired percentile bootstrap (``scipy.stats.bootstrap``, rows resampled with their
  pairing kept, ``N_RESAMPLES`` resamples, fixed seed) of the difference of the mean and
  of the median relative error, kernel minus reference, at ``CONFIDENCE``. It assumes the
  rows are exchangeable draws from one population (the same caveat as above) and enough
  rows for the percentile interval to be accurate.

Label of one tensor (``ALPHA`` split over the tensors tested, Bonferroni): "larger" or
"smaller" when the mean difference's interval excludes 0; "different shape" when only the
KS test rejects; else "indistinguishable". The labels inform; the exit code follows the
tolerance rule alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

N_RESAMPLES = 1000
CONFIDENCE = 0.95
ALPHA = 0.05
KS_EXACT_MAX = 100
BOOTSTRAP_SEED = 20240601

ASSUMPTIONS: tuple[str, ...] = (
    "Samples: per-row relative error against float64 exact attention (one value per query "
    "row of O and dQ, per key row of dK and dV), pooled over the scenarios; the reference "
    "is the recipe's own implementation (float32 accumulation) rounded to the kernel's "
    "output dtype, on the same rows (paired).",
    f"Kolmogorov-Smirnov (scipy.stats.ks_2samp; exact p up to {KS_EXACT_MAX} rows, asymptotic "
    "above): null = one continuous distribution; assumes "
    "independent draws within and between the samples. Rows of a scenario share inputs and "
    "the samples are paired, so the p-value is approximate.",
    f"Bootstrap (scipy.stats.bootstrap, paired, percentile, {N_RESAMPLES} resamples, fixed "
    f"seed): {CONFIDENCE:.0%} intervals of mean and median relative error, kernel minus "
    "reference; assumes exchangeable rows.",
    f"Label per tensor at alpha {ALPHA:g} split over the tensors (Bonferroni): larger / smaller "
    "when the mean-difference interval excludes 0, different shape when only KS rejects, "
    "else indistinguishable. Informative only: the exit code follows the tolerance rule.",
)


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _median_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(a, axis=axis) - np.median(b, axis=axis)


def _interval(kernel: np.ndarray, ref: np.ndarray, statistic: Any) -> list[float]:
    if np.array_equal(kernel, ref):  # every resample gives 0: the interval is the point
        return [0.0, 0.0]
    if np.all(kernel - ref == (kernel - ref)[0]):  # a constant shift: no spread to resample
        value = float(statistic(kernel, ref))
        return [value, value]
    result = stats.bootstrap(
        (kernel, ref),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=N_RESAMPLES,
        confidence_level=CONFIDENCE,
        method="percentile",
        batch=200,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def compare_errors(kernel: Sequence[float], reference: Sequence[float], alpha: float) -> dict:
    """KS test and bootstrap intervals for one tensor's paired error samples; rows where
    either error is not finite are dropped (and counted)."""
    k = np.asarray(kernel, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if k.shape != r.shape:
        raise ValueError(f"paired samples differ in length: {k.shape} vs {r.shape}")
    finite = np.isfinite(k) & np.isfinite(r)
    k, r = k[finite], r[finite]
    out: dict[str, Any] = {
        "rows": int(k.size),
        "dropped_nonfinite": int((~finite).sum()),
        "kernel_mean": float(k.mean()) if k.size else None,
        "reference_mean": float(r.mean()) if r.size else None,
        "kernel_median": float(np.median(k)) if k.size else None,
        "reference_median": float(np.median(r)) if r.size else None,
        "ks_statistic": None,
        "ks_pvalue": None,
        "mean_difference": None,
        "mean_difference_ci": None,
        "median_difference": None,
        "median_difference_ci": None,
        "alpha": alpha,
        "label": "not enough rows",
    }
    if k.size < 2:
        return out
    # exact p-values for small samples; the asymptotic distribution otherwise (the exact
    # recursion loses precision on large ones)
    ks = stats.ks_2samp(k, r, method="exact" if k.size <= KS_EXACT_MAX else "asymp")
    out["ks_statistic"] = float(ks.statistic)
    out["ks_pvalue"] = float(ks.pvalue)
    out["mean_difference"] = float(_mean_diff(k, r))
    out["median_difference"] = float(_median_diff(k, r))
    mean_ci = _interval(k, r, _mean_diff)
    out["mean_difference_ci"] = mean_ci
    out["median_difference_ci"] = _interval(k, r, _median_diff)
    if mean_ci[0] > 0:
        out["label"] = "larger"
    elif mean_ci[1] < 0:
        out["label"] = "smaller"
    elif out["ks_pvalue"] < alpha:
        out["label"] = "different shape"
    else:
        out["label"] = "indistinguishable"
    return out


def distribution_verdict(
    kernel_rows: Mapping[str, Sequence[float]], reference_rows: Mapping[str, Sequence[float]]
) -> dict[str, Any]:
    """Per tensor (O, dQ, dK, dV present in both) :func:`compare_errors`, plus an overall
    label: the first of larger, different shape, smaller, indistinguishable found."""
    names = [n for n in kernel_rows if n in reference_rows and len(kernel_rows[n])]
    alpha = ALPHA / max(len(names), 1)
    tensors = {n: compare_errors(kernel_rows[n], reference_rows[n], alpha) for n in names}
    labels = [t["label"] for t in tensors.values()]
    overall = next(
        (
            label
            for label in ("larger", "different shape", "smaller", "indistinguishable")
            if label in labels
        ),
        "not enough rows",
    )
    return {"label": overall, "alpha": ALPHA, "tensors": tensors}


def describe(verdict: Mapping[str, Any]) -> str:
    """One sentence on a :func:`distribution_verdict`."""
    if verdict["label"] == "not enough rows":
        return "error distribution vs the recipe's own: not compared (too few finite rows)"
    parts = []
    for name, t in verdict["tensors"].items():
        if t["mean_difference_ci"] is None:
            parts.append(f"{name}: {t['label']}")
            continue
        low, high = t["mean_difference_ci"]
        parts.append(
            f"{name} {t['label']} (mean diff {t['mean_difference']:+.2e}, "
            f"{CONFIDENCE:.0%} CI [{low:+.2e}, {high:+.2e}]; KS p = {t['ks_pvalue']:.2g})"
        )
    if not parts:
        return "no error samples to compare"
    return (
        f"error distribution vs the recipe's own: {verdict['label']}; " + "; ".join(parts)
    )
