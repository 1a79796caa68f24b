"""Streaming metrics (fp4sim.reports.streaming_metrics) against the dense metrics.compare.

Both evaluate the same formulas; the streaming sums add chunk by chunk, so every sum of n
terms may differ by 2 gamma_n of its absolute sum (Higham, Accuracy and Stability of
Numerical Algorithms, eq. 3.5; gamma_n = n u / (1 - n u), u = 2^-53), and each value derived
from a sum by a few roundings more. The RMS guard inherits that relative error, and so do
the per-element and per-row errors and their quantiles. Counts (histograms, totals) and the
order statistics themselves must be identical.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fp4sim.reports import metrics, streaming_metrics

U = 2.0**-53


def _rel_tol(n: int) -> float:
    return 2 * n * U / (1 - n * U) + 8 * U


def _close(got, want, tol: float, where: str) -> None:
    if want is None or got is None:
        assert got is want, f"{where}: {got!r} vs {want!r}"
        return
    if math.isnan(want) or math.isinf(want):
        assert (math.isnan(got) and math.isnan(want)) or got == want, f"{where}: {got} vs {want}"
        return
    assert abs(got - want) <= tol * abs(want) + 1e-300, (
        f"{where}: {got!r} vs {want!r} (relative tolerance {tol:.1e})"
    )


def _assert_same(got: dict, want: dict, n: int) -> None:
    tol = _rel_tol(n)
    for key, w in want["metrics"].items():
        _close(got["metrics"][key], w, tol, key)
    for dist in ("element_relative_error", "row_relative_error"):
        g, w = got[dist], want[dist]
        assert g["histogram"] == w["histogram"], dist
        _close(g["mean"], w["mean"], tol, f"{dist} mean")
        _close(g["max"], w["max"], tol, f"{dist} max")
        for q, wq in w["quantiles"].items():
            _close(g["quantiles"][q], wq, tol, f"{dist} {q}")


def _pair(seed: int, shape, kind: str):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(shape)
    a = r + 1e-3 * rng.standard_normal(shape)
    if kind == "exact-half":  # many zero errors: a crowded bin at 0
        a.reshape(-1)[::2] = r.reshape(-1)[::2]
    elif kind == "zero-reference-rows":
        r[..., :3, :] = 0.0
    elif kind == "inf-nan":
        a.reshape(-1)[5] = np.inf
        a.reshape(-1)[17] = np.nan
    elif kind == "ties":  # quantised errors: many equal values
        a = r + 1e-3 * np.round(rng.standard_normal(shape) * 4)
    return a, r


@pytest.mark.parametrize("kind", ["plain", "exact-half", "zero-reference-rows", "inf-nan", "ties"])
@pytest.mark.parametrize("cap", [streaming_metrics.COLLECT_CAP, 7])
def test_compare_streaming_equals_dense(kind: str, cap: int) -> None:
    a, r = _pair(1, (2, 3, 50, 16), kind)
    want = metrics.compare(a, r)
    # 70 elements per chunk: rows split across many chunks; cap 7 forces the bit-split passes
    got = streaming_metrics.compare_streaming(a, r, chunk_elements=70, cap=cap)
    _assert_same(got, want, a.size)


def test_torch_inputs_and_row_errors() -> None:
    a, r = _pair(2, (1, 4, 33, 64), "plain")
    ta, tr = torch.from_numpy(a).float(), torch.from_numpy(r).float()
    want = metrics.compare(ta.double().numpy(), tr.double().numpy())
    got = streaming_metrics.compare_streaming(ta, tr, chunk_elements=1000)
    _assert_same(got, want, a.size)
    rows = streaming_metrics.row_relative_error_streaming(ta, tr, chunk_elements=500)
    dense_rows = metrics.row_relative_error(ta.double().numpy(), tr.double().numpy())
    assert rows.shape == dense_rows.shape
    assert np.allclose(rows, dense_rows, rtol=_rel_tol(a.size), atol=0)


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (5, 1)])
def test_edge_shapes(shape) -> None:
    a, r = np.ones(shape), np.zeros(shape)
    _assert_same(streaming_metrics.compare_streaming(a, r, chunk_elements=2),
                 metrics.compare(a, r), max(a.size, 1))


def test_order_statistics_through_every_split() -> None:
    """cap 1: every quantile walks the bit-split down to a single bit pattern."""
    rng = np.random.default_rng(3)
    v = np.abs(rng.standard_normal(997))
    v[::3] = 0.5  # ties across the split
    def source():
        for i in range(0, v.size, 100):
            yield v[i : i + 100]
    got = streaming_metrics.distribution(source, cap=1)
    want = metrics.distribution_summary(v)
    assert got["quantiles"] == want["quantiles"]
