"""Small Hypothesis strategies of heavy-tailed attention inputs for the reference tests.

A drawn :class:`AttnCase` holds shapes and distribution parameters; :func:`make_inputs` turns
it into (q, k, v) deterministically (NumPy generator seeded by the case), so Hypothesis
shrinks over parameters while the tensors stay cheap to build.
Features: Student-t entries, a bias vector shared by all keys, outlier channels, an attention
sink (key 0 aligned with every query), ragged lengths, Lq != Lk, grouped-query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st


@dataclass(frozen=True)
class AttnCase:
    b: int
    h: int
    hkv: int
    lq: int
    lk: int
    d: int
    df: float  # Student-t degrees of freedom; 0 means Gaussian
    key_bias: float  # scale of a vector added to every key
    outliers: int  # number of outlier channels in q and k
    outlier_scale: float
    sink: bool  # key 0 made a strong attention sink
    causal: bool
    seed: int


def make_inputs(case: AttnCase, dtype=torch.float64, device="cpu"):
    """(q, k, v) for ``case``: q (B, H, Lq, d), k, v (B, Hkv, Lk, d), float32-representable."""
    rng = np.random.default_rng(case.seed)

    def draw(shape):
        if case.df > 0:
            return rng.standard_t(case.df, size=shape)
        return rng.standard_normal(shape)

    q = draw((case.b, case.h, case.lq, case.d))
    k = draw((case.b, case.hkv, case.lk, case.d))
    v = draw((case.b, case.hkv, case.lk, case.d))
    if case.outliers:
        ch = rng.choice(case.d, size=min(case.outliers, case.d), replace=False)
        q[..., ch] *= case.outlier_scale
        k[..., ch] *= case.outlier_scale
    if case.key_bias:
        k = k + case.key_bias * rng.standard_normal(case.d)
    if case.sink:
        # attention sink: key 0 points along the mean query direction
        direction = q.mean(axis=(0, 1, 2))
        k[:, :, 0, :] = 3.0 * direction / max(np.linalg.norm(direction), 1e-6) * np.sqrt(case.d)
    # float32-representable so float32 and float64 runs quantize the same numbers
    out = [torch.from_numpy(x.astype(np.float32)).to(dtype=dtype, device=device) for x in (q, k, v)]
    return tuple(out)


@st.composite
def attn_cases(
    draw,
    max_lq: int = 48,
    max_lk: int = 80,
    d_choices=(16, 32),
    causal=None,
    gqa: bool = True,
    max_batch: int = 2,
):
    """Draw an AttnCase: ragged lengths, Lq != Lk, GQA, heavy tails, key bias, sinks."""
    hkv = draw(st.sampled_from((1, 2)))
    group = draw(st.sampled_from((1, 2))) if gqa else 1
    return AttnCase(
        b=draw(st.integers(1, max_batch)),
        h=hkv * group,
        hkv=hkv,
        lq=draw(st.integers(1, max_lq)),
        lk=draw(st.integers(1, max_lk)),
        d=draw(st.sampled_from(d_choices)),
        df=draw(st.sampled_from((0.0, 3.0, 2.0))),
        key_bias=draw(st.sampled_from((0.0, 1.0, 4.0))),
        outliers=draw(st.integers(0, 2)),
        outlier_scale=draw(st.sampled_from((4.0, 16.0))),
        sink=draw(st.booleans()),
        causal=draw(st.booleans()) if causal is None else causal,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def e4m3_ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values exactly halfway between neighbouring E4M3 values (normal and subnormal)."""
    m = rng.integers(0, 8, size=n)
    e = rng.integers(-6, 9, size=n)
    normal = np.ldexp(2.0 * (8 + m) + 1.0, e - 4)  # (8 + m + 1/2) * 2^(e - 3)
    sub = np.ldexp(2.0 * m + 1.0, -10)  # (m + 1/2) * 2^-9
    return np.where(rng.random(n) < 0.2, sub, normal).astype(np.float32)


def heavy_tailed_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values mixing E2M1/E4M3 ties, their float32 neighbours, Student-t, tiny values,
    and block maxima 6 * t whose NVFP4 scale amax / 6 lands on an E4M3 tie t."""
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 448.0, 464.0], np.float32)
    scale = np.float32(2.0) ** rng.integers(-12, 12, size=n).astype(np.float32)
    base = ties[rng.integers(0, len(ties), size=n)] * scale
    base = np.where(rng.random(n) < 0.3, e4m3_ties(rng, n) * np.float32(6.0), base)
    base = np.where(rng.random(n) < 0.15, e4m3_ties(rng, n), base).astype(np.float32)
    nudge = rng.integers(-1, 2, size=n)
    near = np.nextafter(base, np.where(nudge > 0, np.inf, -np.inf).astype(np.float32))
    near = np.where(nudge == 0, base, near).astype(np.float32)
    t = (rng.standard_t(2.0, size=n) * 2.0 ** rng.integers(-10, 6, size=n)).astype(np.float32)
    pick = rng.integers(0, 3, size=n)
    out = np.where(pick == 0, near, np.where(pick == 1, t, t * np.float32(1e-3)))
    sign = np.where(rng.integers(0, 2, size=n) == 1, -1.0, 1.0).astype(np.float32)
    return (out * sign).astype(np.float32)


EPS64 = float(np.finfo(np.float64).eps)


def rounding_bound(q, k, v, do, tau: float) -> dict:
    """Float64 rounding bounds for two computations of the same attention gradient.

    Every entry is a sum of at most n = Lq + Lk + d products, so two evaluation orders differ
    by at most ~n * eps64 times the sum of the absolute summands; P = exp(S - m) carries the
    absolute error of S (at most d * eps64 * tau * max |q| |k|) as a relative error. With
    sum_j P_ij = 1 and |dP|, |D| <= d * max|dO| max|V|, the summand sums are bounded by
    ``mag`` below. The factor 64 covers the few chained operations. Quantization effects in
    these tests are >= 1e-3 relative, many orders of magnitude above these bounds.
    """
    lq, d = q.shape[-2], q.shape[-1]
    lk = k.shape[-2]
    n = lq + lk + d
    qa, ka, va, da = (float(t.abs().max()) for t in (q, k, v, do))
    s_err = d * EPS64 * tau * qa * ka
    rel = 64 * (n * EPS64 + s_err)
    dp = d * da * va
    groups = q.shape[1] // k.shape[1]
    return {
        "o": rel * va,
        "dq": rel * tau * 2 * dp * ka,
        "dk": rel * tau * groups * lq * 2 * dp * qa,
        "dv": rel * groups * lq * da,
        "ds_row": rel * 2 * dp,
    }


def assert_within(a, b, tol: float, what: str) -> None:
    """max |a - b| <= tol, with a readable message."""
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs diff {err:.3e} exceeds the rounding bound {tol:.3e}"
