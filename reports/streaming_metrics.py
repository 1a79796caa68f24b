"""The report's error metrics (``reports.metrics.compare``) accumulated over row chunks.

``metrics.compare`` converts both tensors to float64 NumPy arrays and keeps several
temporaries of their size; at production shapes (12 heads x 32760 rows x 128) each is
400 MB. Here the tensors are walked in chunks of rows (rows = every axis but the last, as in
``metrics.row_relative_error``), each chunk converted to float64 on its own:

1. sums: sum (a - r)^2, sum r^2, sum a^2, sum a r, sum |a - r|, sum |r|, max |a - r|, and
   sum ||r_row||^2 (the RMS guards of ``metrics`` are sqrt(sum r^2 / n) and
   sqrt(sum ||r_row||^2 / rows), so one pass gives both);
2. per-element and per-row relative errors (the guards known): fixed-edge log histograms
   (``metrics.LOG10_EDGES``), sum, count and max, and a histogram of the errors' float64 bit
   patterns (non-negative floats order like their bits) that locates each quantile's order
   statistics;
3. the values in the located bins only, from which the quantiles come exactly (numpy's
   default 'linear' method, Hyndman and Fan type 7). A bin too full to collect is split
   by its next 16 bits in a further pass.

The numbers equal ``metrics.compare``'s to rounding (chunked sums add in another order);
counts and order statistics are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fp4sim.reports import metrics

ChunkSource = Callable[[], Iterator[tuple[NDArray[np.float64], NDArray[np.float64]]]]
"""Returns a fresh iterator of (approx, reference) float64 chunks of shape (rows, width)."""

DEFAULT_CHUNK_ELEMENTS = 1 << 21
"""Elements per chunk (16 MiB per float64 chunk)."""

COLLECT_CAP = 1 << 20
"""Most values collected from the bins that hold the quantiles' order statistics."""

BITS_PER_PASS = 16


def _to_float64(x: Any) -> NDArray[np.float64]:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def chunk_source(approx: Any, reference: Any, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
                 ) -> ChunkSource:
    """Chunks of rows of two same-shaped tensors (torch or NumPy), each made float64 alone."""
    shape_a, shape_r = tuple(approx.shape), tuple(reference.shape)
    if shape_a != shape_r:
        raise ValueError(f"shape mismatch: approx {shape_a} vs reference {shape_r}")
    width = shape_a[-1] if len(shape_a) else 1
    a2 = approx.reshape(-1, width) if len(shape_a) else approx.reshape(1, 1)
    r2 = reference.reshape(-1, width) if len(shape_a) else reference.reshape(1, 1)
    step = max(1, chunk_elements // max(width, 1))

    def chunks() -> Iterator[tuple[NDArray[np.float64], NDArray[np.float64]]]:
        for i in range(0, a2.shape[0], step):
            yield _to_float64(a2[i : i + step]), _to_float64(r2[i : i + step])

    return chunks


# ---------------------------------------------------------------------------------------
# pass 1: scalar metrics
# ---------------------------------------------------------------------------------------


class ScalarSums:
    """Pass 1: the sums behind ``metrics.error_metrics`` and the two RMS guards."""

    def __init__(self) -> None:
        self.n = 0
        self.rows = 0
        self.diff2 = self.ref2 = self.app2 = self.dot = self.diff1 = self.ref1 = 0.0
        self.row_ref2 = 0.0
        self.max_abs = -math.inf
        self.nan = False

    def add(self, a: NDArray[np.float64], r: NDArray[np.float64]) -> None:
        d = a - r
        self.n += a.size
        self.rows += a.shape[0]
        self.diff2 += float(np.sum(d * d))
        self.ref2 += float(np.sum(r * r))
        self.app2 += float(np.sum(a * a))
        self.dot += float(np.sum(a * r))
        self.diff1 += float(np.abs(d).sum())
        self.ref1 += float(np.abs(r).sum())
        ref_norm = np.sqrt(np.sum(r * r, axis=1))  # as metrics.row_relative_error
        self.row_ref2 += float(np.sum(ref_norm**2))
        if d.size:
            m = float(np.max(np.abs(d)))
            self.nan = self.nan or math.isnan(m)
            self.max_abs = max(self.max_abs, m)

    @property
    def rms_reference(self) -> float:
        return math.sqrt(self.ref2 / self.n) if self.n else 0.0

    @property
    def rms_row_norms(self) -> float:
        return math.sqrt(self.row_ref2 / self.rows) if self.rows else 0.0

    def metrics(self) -> dict[str, float]:
        """``metrics.error_metrics`` from the sums (its conventions for zero tensors)."""
        ratio = metrics._ratio
        na, nr = math.sqrt(self.app2), math.sqrt(self.ref2)
        if na == 0.0 and nr == 0.0:
            cosine = 1.0
        elif na == 0.0 or nr == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / (na * nr)
        return {
            "relative_l2": ratio(math.sqrt(self.diff2), nr),
            "relative_l1": ratio(self.diff1, self.ref1),
            "rmse": math.sqrt(self.diff2 / self.n) if self.n else 0.0,
            "max_abs": (math.nan if self.nan else self.max_abs) if self.n else 0.0,
            "cosine": cosine,
            "norm_ratio": ratio(na, nr),
        }


# ---------------------------------------------------------------------------------------
# errors of one chunk (metrics' formulas with the guards given)
# ---------------------------------------------------------------------------------------


def _guarded(diff: NDArray[np.float64], denom: NDArray[np.float64]) -> NDArray[np.float64]:
    """diff / denom where denom > 0; inf where not and diff > 0; 0 otherwise (masked ufuncs,
    not boolean gathers: the same divisions, a fraction of the time)."""
    nonzero = denom > 0
    out = np.divide(diff, denom, out=np.zeros_like(diff), where=nonzero)
    np.copyto(out, math.inf, where=~nonzero & (diff > 0))
    return out


def element_errors(a, r, rms_reference: float) -> NDArray[np.float64]:
    """``metrics.elementwise_relative_error`` of a chunk, ``rms(r)`` of the whole tensor."""
    return _guarded(np.abs(a - r).ravel(),
                    np.abs(r).ravel() + metrics.ELEMENT_GUARD_EPS * rms_reference)


def row_errors(a, r, rms_row_norms: float) -> NDArray[np.float64]:
    """``metrics.row_relative_error`` of a chunk of rows, the rows' norm RMS of the whole."""
    diff_norm = np.sqrt(np.sum((a - r) ** 2, axis=1))
    ref_norm = np.sqrt(np.sum(r * r, axis=1))
    return _guarded(diff_norm, ref_norm + metrics.ELEMENT_GUARD_EPS * rms_row_norms)


# ---------------------------------------------------------------------------------------
# passes 2-3: distributions with exact quantiles
# ---------------------------------------------------------------------------------------

ValueSource = Callable[[], Iterator[NDArray[np.float64]]]


def _bits(x: NDArray[np.float64]) -> NDArray[np.int64]:
    # finite x >= 0 (+0.0 included): the int64 bit patterns sort as the values
    return x.view(np.int64)


def _linear_quantile(lo: float, hi: float, index: float) -> float:
    """numpy's 'linear' interpolation between consecutive order statistics (numpy _lerp)."""
    t = index - math.floor(index)  # gamma, numpy _get_gamma
    diff = hi - lo
    return hi - diff * (1 - t) if t >= 0.5 else lo + diff * t


def _order_statistics(values: ValueSource, total: int, ranks: list[int], cap: int
                      ) -> dict[int, float]:
    """The ``ranks``-th smallest (0-based) of the ``total`` finite values of a stream of
    non-negative chunks."""
    # a pending rank: the values whose bits >> shift == prefix hold it at position `within`
    pending = {r: (0, 64, r) for r in ranks}  # shift 64: every value
    counts: dict[tuple[int, int], int] = {(0, 64): total}
    found: dict[int, float] = {}
    while pending:
        groups = {(p, s) for p, s, _ in pending.values()}
        for p, s in [g for g in groups if g[1] == 0]:  # one bit pattern: the value itself
            for r in [r for r, st in pending.items() if st[:2] == (p, s)]:
                found[r] = float(np.array([p], dtype=np.int64).view(np.float64)[0])
                del pending[r]
            groups.discard((p, s))
        if not pending:
            break
        collect = {g for g in groups if counts[g] <= cap}
        gathered: dict[tuple[int, int], list[NDArray[np.float64]]] = {g: [] for g in collect}
        hist = {g: np.zeros(1 << BITS_PER_PASS, dtype=np.int64) for g in groups - collect}
        for chunk in values():
            v = chunk[np.isfinite(chunk)]
            b = _bits(v)
            for p, s in groups:
                sel = v if s == 64 else v[(b >> s) == p]
                if (p, s) in gathered:
                    gathered[(p, s)].append(sel)
                else:
                    sub = (_bits(sel) >> (s - BITS_PER_PASS)) & ((1 << BITS_PER_PASS) - 1)
                    hist[(p, s)] += np.bincount(sub, minlength=1 << BITS_PER_PASS)
        # each collected group partitioned once at every position asked of it (an exact
        # order statistic, without a full sort)
        asked: dict[tuple[int, int], list[int]] = {}
        for p, s, within in pending.values():
            if (p, s) in gathered:
                asked.setdefault((p, s), []).append(within)
        ordered = {g: np.partition(np.concatenate(gathered[g]), sorted(set(kth)))
                   for g, kth in asked.items()}
        for r, (p, s, within) in list(pending.items()):
            if (p, s) in gathered:
                found[r] = float(ordered[(p, s)][within])
                del pending[r]
                continue
            before = np.cumsum(hist[(p, s)])
            b = int(np.searchsorted(before, within, side="right"))
            start = int(before[b - 1]) if b else 0
            new = (p << BITS_PER_PASS) | b if s < 64 else b
            counts[(new, s - BITS_PER_PASS)] = int(hist[(p, s)][b])
            pending[r] = (new, s - BITS_PER_PASS, within - start)
    return found


def distribution(values: ValueSource, cap: int = COLLECT_CAP) -> dict[str, Any]:
    """``metrics.distribution_summary`` of a stream of non-negative error chunks."""
    hist_total: dict[str, Any] | None = None
    total = finite_n = 0
    finite_sum = 0.0
    vmax = -math.inf
    nan = False
    for chunk in values():
        h = metrics.log_histogram(chunk)
        if hist_total is None:
            hist_total = h
        else:
            hist_total["counts"] = [x + y for x, y in zip(hist_total["counts"], h["counts"],
                                                           strict=True)]
            for key in ("underflow", "overflow", "nan", "total"):
                hist_total[key] += h[key]
        total += chunk.size
        finite = chunk[np.isfinite(chunk)]
        finite_n += finite.size
        finite_sum += float(finite.sum())
        if chunk.size:
            m = float(chunk.max())
            nan = nan or math.isnan(m)
            vmax = max(vmax, m)
    quantiles: dict[str, float | None] = {}
    if finite_n:
        # numpy 'linear': index (n - 1) q between order statistics floor and floor + 1
        index = {q: (finite_n - 1) * q for q in metrics.QUANTILES}  # numpy's 'linear' index
        ranks = sorted({min(int(math.floor(i)) + k, finite_n - 1) for i in index.values()
                        for k in (0, 1)})
        stats = _order_statistics(values, finite_n, ranks, cap)
    for q in metrics.QUANTILES:
        key = f"p{q * 100:g}"
        if not finite_n:
            quantiles[key] = None
            continue
        lo = int(math.floor(index[q]))
        quantiles[key] = _linear_quantile(stats[lo], stats[min(lo + 1, finite_n - 1)], index[q])
    if hist_total is None:
        hist_total = metrics.log_histogram(np.zeros(0))
    return {
        "mean": finite_sum / finite_n if finite_n else None,
        "max": (math.nan if nan else vmax) if total else None,
        "quantiles": quantiles,
        "histogram": hist_total,
    }


def compare_streaming(approx: Any, reference: Any,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                      cap: int = COLLECT_CAP) -> dict[str, Any]:
    """``metrics.compare`` over row chunks: scalar metrics, per-element and per-row errors."""
    source = chunk_source(approx, reference, chunk_elements)
    sums = ScalarSums()
    for a, r in source():
        sums.add(a, r)
    rms_r, rms_rows = sums.rms_reference, sums.rms_row_norms

    def elements() -> Iterator[NDArray[np.float64]]:
        for a, r in source():
            yield element_errors(a, r, rms_r)

    def rows() -> Iterator[NDArray[np.float64]]:
        for a, r in source():
            yield row_errors(a, r, rms_rows)

    return {
        "metrics": sums.metrics(),
        "element_relative_error": distribution(elements, cap),
        "row_relative_error": distribution(rows, cap),
    }


def row_relative_error_streaming(approx: Any, reference: Any,
                                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
                                 ) -> NDArray[np.float64]:
    """``metrics.row_relative_error`` (one value per row: O(rows) memory) over row chunks."""
    source = chunk_source(approx, reference, chunk_elements)
    sums = ScalarSums()
    for a, r in source():
        sums.add(a, r)
    parts = [row_errors(a, r, sums.rms_row_norms) for a, r in source()]
    return np.concatenate(parts) if parts else np.zeros(0)
