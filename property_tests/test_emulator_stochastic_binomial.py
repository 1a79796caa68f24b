"""Stochastic rounding is unbiased, tested statistically with random words (binomial test).

PTX ``cvt.rs.satfinite.e2m1x4.f32`` rounds a value v between neighbouring E2M1 values
a < v < b up with probability (v - a) / (b - a), so E[round(v)] = v (PTX ISA, "cvt":
stochastic rounding). ``test_emulator_elements`` checks this exactly over all 256 one-byte
words; here uniformly random 32-bit words are drawn, as a kernel would, and the number of
upward roundings is tested against Binomial(n, p) with ``scipy.stats.binomtest``.
"""

from __future__ import annotations

import numpy as np
import pytest

import fp4sim

stats = pytest.importorskip("scipy.stats")

SAMPLES = 20_000
# Bonferroni over the cases below: the family-wise false-alarm rate stays at 1e-3.
CASES = 24
ALPHA = 1e-3 / CASES


def _between_values(rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(v, a, b): v strictly between neighbours a < b of the positive E2M1 grid, with
    (v - a) / (b - a) a multiple of 1/64 so every word width resolves it exactly."""
    grid = np.unique(np.abs(np.asarray(fp4sim.E2M1_VALUES, dtype=np.float64)))
    out = []
    for _ in range(CASES):
        i = int(rng.integers(0, grid.size - 1))
        a, b = float(grid[i]), float(grid[i + 1])
        frac = int(rng.integers(1, 64)) / 64
        out.append((a + frac * (b - a), a, b))
    return out


def _upward_count(v: float, b: float, words: np.ndarray, sign: float) -> int:
    x = np.full(words.shape, sign * v, dtype=np.float32)
    got = fp4sim.e2m1_decode(fp4sim.e2m1_encode(x, rounding="stochastic", rbits=words))
    return int(np.count_nonzero(np.abs(got) == b))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_passes_a_binomial_test(sign: float) -> None:
    rng = np.random.default_rng(20261202)
    for v, a, b in _between_values(rng):
        words = rng.integers(0, 2**32, size=SAMPLES, dtype=np.uint32)
        up = _upward_count(v, b, words, sign)
        p = (v - a) / (b - a)
        result = stats.binomtest(up, SAMPLES, p)
        assert result.pvalue > ALPHA, (
            f"v={sign * v}: {up}/{SAMPLES} rounded up to {sign * b}, expected p={p:.4f};"
            f" binomial p-value {result.pvalue:.2e} <= {ALPHA:.1e}"
        )


def test_binomial_test_detects_a_small_bias() -> None:
    # The test must be able to fail: a rounding that goes up 3 points more often than it
    # should (a bias of 0.03 in probability) is rejected at the same alpha.
    rng = np.random.default_rng(7)
    v, a, b = 2.25, 2.0, 3.0
    words = rng.integers(0, 2**32, size=SAMPLES, dtype=np.uint32)
    up = _upward_count(v, b, words, 1.0)
    biased_p = (v - a) / (b - a) - 0.03
    assert stats.binomtest(up, SAMPLES, biased_p).pvalue <= ALPHA
