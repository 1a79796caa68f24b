"""The streaming reference (fp4sim.reference.streaming) against the dense reference.

Small float64 cases cut into several row blocks and key chunks: Lk not a multiple of the tile,
causal with Lq != Lk (both ways), grouped-query heads, every P policy. Tolerances are
derived, not tuned: the two sides evaluate the same sums in different orders, so for a value
X = sum of n terms t, |X_stream - X_dense| <= 2 (gamma_n + eps_p) sum |t| (Higham, Accuracy
and Stability of Numerical Algorithms, 2nd ed., eq. 3.5: |fl(x . y) - x . y| <= gamma_n |x| . |y|
in any order; a sum is the case y = 1),
gamma_n = n u / (1 - n u), u = 2^-53, and eps_p the relative error of one P entry: its score
is a length-d dot product (|dS| <= gamma_d tau |q| . |k|) and exp and the rescalings add a few
roundings. Quantized P must be bit-identical (the quantizer sees the same tile values): the
code counts are compared exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fp4sim import reference
from fp4sim.reference import streaming
from fp4sim.reference.masks import expand_kv, reduce_kv, visible_mask
from fp4sim.reference.operands import pad_keys
from fp4sim.reference.softmax import (
    effective_p_tilde,
    normalized_p,
    padded_length,
    scores,
    softmax_forward,
)

F64 = torch.float64
U = 2.0**-53
ROUNDINGS = 16  # exp, the rescalings, the divisions: a few roundings per P entry and output


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _inputs(seed: int, lq: int, lk: int, heads: int = 2, kv_heads: int = 1, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, d, generator=g, dtype=F64)
    k = torch.randn(1, kv_heads, lk, d, generator=g, dtype=F64)
    v = torch.randn(1, kv_heads, lk, d, generator=g, dtype=F64)
    do = torch.randn(1, heads, lq, d, generator=g, dtype=F64)
    return q, k, v, do


def _small_blocking(recipe) -> streaming.Blocking:
    # several row blocks and several key chunks even on these small shapes
    return streaming.Blocking(rows=recipe.block_m, keys=2 * recipe.block_n)


def _eps_p(q_hat, k_hat, tau: float) -> float:
    """Relative error bound of one P entry: the score's dot product plus a few roundings."""
    h, d = q_hat.shape[1], q_hat.shape[-1]
    dot = tau * (q_hat.abs() @ expand_kv(k_hat, h).abs().transpose(-1, -2))
    return gamma(d) * float(dot.max()) + ROUNDINGS * U


def _assert_close(name: str, got, want, abs_sum, n: int, eps_p: float) -> None:
    bound = 2 * (gamma(n + ROUNDINGS) + eps_p) * abs_sum + 1e-300
    err = (got - want).abs()
    ratio = float((err / bound).max())
    print(f"{name}: max |diff| {float(err.max()):.2e}, max diff/bound {ratio:.2e}")
    assert ratio <= 1.0, f"{name}: difference exceeds its rounding bound ({ratio:.2e} x bound)"


CASES = [
    # (lq, lk, causal, heads, kv_heads)
    (150, 200, False, 2, 1),
    (150, 200, True, 2, 1),
    (96, 230, True, 2, 2),
    (230, 96, True, 4, 2),
]
RECIPES = ["attn-qat", "attn-qat-consistent", "sage3-like", "nvfp4-tensor-scale", "bf16",
           "infer-mxfp4", "fastvideo-attn-qat"]


def _p_abs(fwd, lq, lk, causal, recipe):
    """|P| = exp(S - LSE) of the dense forward (for the bounds), (B, H, Lq, Lk)."""
    h = fwd.q_hat.shape[1]
    lk_pad = padded_length(lk, recipe.block_n)
    s = scores(fwd.q_hat, pad_keys(fwd.k_hat, h, lk_pad), fwd.sm_scale,
               visible_mask(lq, lk, lk_pad, causal))
    return normalized_p(s, fwd.lse)[..., :lk]


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "lq{}-lk{}-causal{}-h{}-hkv{}".format(*c))
def test_forward_matches_dense(recipe_name: str, case) -> None:
    lq, lk, causal, heads, kv_heads = case
    recipe = reference.get_recipe(recipe_name)
    q, k, v, _ = _inputs(3, lq, lk, heads, kv_heads)
    dense = reference.fp4_attention_forward(q, k, v, recipe, causal=causal, accum_dtype=F64,
                                            diagnostics=True)
    got = streaming.streaming_forward(q, k, v, recipe, causal=causal, accum_dtype=F64,
                                      diagnostics=True, blocking=_small_blocking(recipe))
    eps_p = _eps_p(dense.q_hat, dense.k_hat, dense.sm_scale)
    p = _p_abs(dense, lq, lk, causal, recipe)
    v_abs = expand_kv(dense.v_hat, heads).abs()
    _assert_close("o", got.o, dense.o, p @ v_abs, lk, eps_p)
    _assert_close("o_hp", got.o_hp, dense.o_hp, p @ v_abs, lk, eps_p)
    _assert_max_close(got.m, dense.m, dense.q_hat, dense.k_hat, dense.sm_scale)
    finite = torch.isfinite(dense.lse)
    assert torch.equal(finite, torch.isfinite(got.lse))
    # l sums Lk positive terms; LSE = m + log l: |d log l| <= |dl| / l
    _assert_close("l", got.l, dense.l, dense.l, lk, eps_p)
    _assert_close("lse", got.lse[finite], dense.lse[finite], torch.ones_like(dense.lse[finite]),
                  lk, eps_p)
    _assert_diagnostics_equal(got.diagnostics, dense.diagnostics, lk, eps_p)


def _assert_max_close(got, want, q_hat, k_hat, tau: float) -> None:
    """Row maxima of S: |m_stream - m_dense| <= 2 gamma_{d+1} tau max(|q| . |k|).

    Derivation. Each side computes S_ij = fl(tau * fl(q_i . k_j)) in float64 (``scores``;
    u = 2^-53, the unit roundoff of the dtype S is computed in), the dot product in any
    summation order (the BLAS kernel a product takes depends on its shape: the dense S is one
    (Lq, Lk_pad) product, the streamed S a (rows, keys) one per slice). A length-d dot product
    has |fl(x . y) - x . y| <= gamma_d |x| . |y| (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., eq. 3.5), and the product by tau adds one rounding:
    (1 + theta_d)(1 + delta) = 1 + theta_{d+1} (Higham Lemma 3.3), so each side is within
    gamma_{d+1} tau |q_i| . |k_j| of the exact S_ij, and the two sides within twice that.
    A max adds no rounding and is 1-Lipschitz in the max norm (|max a - max b| <=
    max |a - b|), so the row maxima differ by at most 2 gamma_{d+1} tau max_ij |q_i| . |k_j|,
    gamma_n = n u / (1 - n u). The bound's tau |q| . |k| is itself computed (the same d + 1
    roundings), at most gamma_{d+1} below the exact one, hence the factor
    1 / (1 - gamma_{d+1}). Equal where S is exact (FP4 operands without a tensor scale) and at
    rows without keys (-inf)."""
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.equal(got[~finite], want[~finite])
    h, d = q_hat.shape[1], q_hat.shape[-1]
    assert q_hat.dtype == F64, "the bound takes u = 2^-53 (float64 scores)"
    dot = tau * (q_hat.abs() @ expand_kv(k_hat, h).abs().transpose(-1, -2))
    bound = 2 * gamma(d + 1) * float(dot.max()) / (1 - gamma(d + 1))
    err = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    print(f"m: max |diff| {err:.2e}, bound 2 gamma_(d+1) tau max|q|.|k| = {bound:.2e}")
    assert err <= bound, f"m: difference {err:.2e} exceeds its rounding bound {bound:.2e}"


def _assert_diagnostics_equal(got: dict, want: dict, lk: int, eps_p: float) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, float):
            # mass ratios (sums of <= Lk terms over sums of <= Lk terms) and exact count ratios
            tol = 4 * (gamma(lk + ROUNDINGS) + eps_p) * max(abs(w), 1.0)
            assert abs(g - w) <= tol, f"{key}: {g!r} vs dense {w!r} (tol {tol:.1e})"
        else:
            assert g == w, f"{key}: {g!r} vs dense {w!r}"


def test_forward_dense_mode_matches() -> None:
    recipe = reference.get_recipe("attn-qat")
    q, k, v, _ = _inputs(5, 150, 200)
    dense = reference.fp4_attention_forward(q, k, v, recipe, mode="dense", accum_dtype=F64)
    got = streaming.streaming_forward(q, k, v, recipe, mode="dense", accum_dtype=F64,
                                      blocking=_small_blocking(recipe))
    eps_p = _eps_p(dense.q_hat, dense.k_hat, dense.sm_scale)
    p = _p_abs(dense, 150, 200, False, recipe)
    _assert_close("o(dense mode)", got.o, dense.o, p @ expand_kv(dense.v_hat, 2).abs(), 200, eps_p)


def _grad_abs_sums(variant: str, fwd, q, k, v, do, recipe, causal: bool):
    """sum |terms| of dq, dk, dv of a variant, from the dense intermediates."""
    parts = reference.backward_parts(variant, fwd, q, k, v, do, recipe, causal)
    lq, lk = q.shape[2], k.shape[2]
    h, hkv = q.shape[1], k.shape[1]
    tau = fwd.sm_scale
    quantized = variant in streaming.QUANTIZED_S
    q_use, k_use, v_use = (fwd.q_hat, fwd.k_hat, fwd.v_hat) if quantized else (q, k, v)
    lk_pad = padded_length(lk, recipe.block_n)
    s = scores(q_use, pad_keys(k_use, h, lk_pad), tau, visible_mask(lq, lk, lk_pad, causal))
    lse = fwd.lse
    if variant == "exact":
        lse = torch.logsumexp(s, dim=-1)
    p = normalized_p(s, lse)[..., :lk].abs()
    p_dv = p if parts.p_dv is None else parts.p_dv[..., :lk].abs()
    if variant == "ste_autograd":  # dV from the forward's effective P~
        p_dv = effective_p_tilde(softmax_forward(s, recipe, fwd.mode))[..., :lk].abs()
    dp_abs = do.abs() @ expand_kv(v_use, h).abs().transpose(-1, -2)
    ds_abs = p * (dp_abs + (do.abs() * fwd.o_hp.abs().maximum(fwd.o.abs())).sum(-1, True) * 2)
    dq = tau * ds_abs @ expand_kv(k_use, h).abs()
    dk = reduce_kv(tau * ds_abs.transpose(-1, -2) @ q_use.abs(), hkv)
    dv = reduce_kv(p_dv.transpose(-1, -2) @ do.abs(), hkv)
    return (dq, dk, dv, ds_abs.sum(dim=-1)), parts


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "lq{}-lk{}-causal{}-h{}-hkv{}".format(*c))
def test_backward_variants_match_dense(recipe_name: str, case) -> None:
    lq, lk, causal, heads, kv_heads = case
    recipe = reference.get_recipe(recipe_name)
    q, k, v, do = _inputs(7, lq, lk, heads, kv_heads)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=causal, accum_dtype=F64)
    variants = ["exact", "drop_in", "p_only", "o_only", "attn_qat", "ste_autograd"]
    got = streaming.streaming_backward(variants, fwd, q, k, v, do, recipe, causal=causal,
                                       blocking=_small_blocking(recipe))
    eps_p = _eps_p(fwd.q_hat, fwd.k_hat, fwd.sm_scale)
    group = heads // kv_heads
    for variant in variants:
        sums, parts = _grad_abs_sums(variant, fwd, q, k, v, do, recipe, causal)
        d = q.shape[-1]
        # dq sums Lk terms (each a product of 2 length-d dot products); dk, dv sum Lq * group
        g = got[variant]
        for name, a, w, t, n in zip(
            ("dq", "dk", "dv", "rowsum(dS)"),
            (g.dq, g.dk, g.dv, g.ds_rowsum),
            (parts.dq, parts.dk, parts.dv, parts.ds.sum(dim=-1)),
            sums,
            (lk + 2 * d, lq * group + 2 * d, lq * group + 2 * d, lk + 2 * d),
            strict=True,
        ):
            _assert_close(f"{recipe_name} {variant} {name}", a, w, t, n, eps_p)


@pytest.mark.parametrize("recipe_name", ["attn-qat", "attn-qat-consistent", "sage3-like"])
def test_streamed_forward_feeds_streamed_backward(recipe_name: str) -> None:
    """End to end: streaming forward then streaming backward against dense then dense."""
    recipe = reference.get_recipe(recipe_name)
    q, k, v, do = _inputs(11, 150, 200)
    blk = _small_blocking(recipe)
    fwd_s = streaming.streaming_forward(q, k, v, recipe, causal=True, accum_dtype=F64,
                                        blocking=blk)
    fwd_d = reference.fp4_attention_forward(q, k, v, recipe, causal=True, accum_dtype=F64)
    got = streaming.streaming_backward(["attn_qat", "ste_autograd"], fwd_s, q, k, v, do, recipe,
                                       causal=True, blocking=blk)
    eps_p = _eps_p(fwd_d.q_hat, fwd_d.k_hat, fwd_d.sm_scale)
    for variant in ("attn_qat", "ste_autograd"):
        sums, parts = _grad_abs_sums(variant, fwd_d, q, k, v, do, recipe, True)
        for name, g, w, t in zip(("dq", "dk", "dv"),
                                 (got[variant].dq, got[variant].dk, got[variant].dv),
                                 (parts.dq, parts.dk, parts.dv), sums[:3], strict=True):
            _assert_close(f"{variant} {name}", g, w, t, 200 + 150 + 128, eps_p * 2)


@pytest.mark.parametrize("recipe_name", ["attn-qat", "nvfp4-tensor-scale", "sage3-like", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "lq{}-lk{}-causal{}-h{}-hkv{}".format(*c))
def test_ste_tiled_on_row_blocks_matches_dense(recipe_name: str, case) -> None:
    lq, lk, causal, heads, kv_heads = case
    recipe = reference.get_recipe(recipe_name)
    q, k, v, do = _inputs(13, lq, lk, heads, kv_heads)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=causal, accum_dtype=F64)
    want = reference.attention_backward("ste_tiled", fwd, q, k, v, do, recipe, causal=causal)
    got = streaming.streaming_ste_tiled(q, k, v, do, recipe, causal, fwd.sm_scale, F64,
                                        rows=recipe.block_m)
    sums, _ = _grad_abs_sums("ste_autograd", fwd, q, k, v, do, recipe, causal)
    eps_p = _eps_p(fwd.q_hat, fwd.k_hat, fwd.sm_scale)
    for name, g, w, t in zip(("dq", "dk", "dv"), got, want, sums[:3], strict=True):
        _assert_close(f"ste_tiled {name}", g, w, t, lq + lk + 128, eps_p)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "lq{}-lk{}-causal{}-h{}-hkv{}".format(*c))
def test_exact_float64_matches_autograd(case) -> None:
    lq, lk, causal, heads, kv_heads = case
    q, k, v, do = _inputs(17, lq, lk, heads, kv_heads)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = reference.attention_exact(*leaves, causal=causal)
    grads = torch.autograd.grad(o, leaves, do)
    got = streaming.streaming_exact(q, k, v, do, causal=causal, keys=48, rows=40)
    tau = q.shape[-1] ** -0.5
    eps_p = _eps_p(q, k, tau)
    s = tau * (q @ expand_kv(k, heads).transpose(-1, -2))
    if causal:
        s = s.masked_fill(~visible_mask(lq, lk, lk, True), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    v_abs, k_abs = expand_kv(v, heads).abs(), expand_kv(k, heads).abs()
    _assert_close("exact o", got.o, o.detach(), p @ v_abs, lk, eps_p)
    ds_abs = p * (do.abs() @ v_abs.transpose(-1, -2) + (do.abs() * o.detach().abs()).sum(-1, True))
    sums = (tau * ds_abs @ k_abs, reduce_kv(tau * ds_abs.transpose(-1, -2) @ q.abs(), kv_heads),
            reduce_kv(p.transpose(-1, -2) @ do.abs(), kv_heads))
    for name, g, w, t in zip(("dq", "dk", "dv"), (got.grads.dq, got.grads.dk, got.grads.dv),
                             grads, sums, strict=True):
        _assert_close(f"exact {name}", g, w, t, lq + lk + 128, eps_p)


def test_blocking_must_align_with_tiles() -> None:
    recipe = reference.get_recipe("attn-qat")
    q, k, v, _ = _inputs(1, 64, 64)
    with pytest.raises(ValueError, match="block_m"):
        streaming.streaming_forward(q, k, v, recipe, blocking=streaming.Blocking(32, 64))
    with pytest.raises(ValueError, match="block_n"):
        streaming.streaming_forward(q, k, v, recipe, blocking=streaming.Blocking(64, 96))


def test_slices_stay_within_budget() -> None:
    recipe = dataclasses.replace(reference.get_recipe("attn-qat"))
    b = streaming.choose_blocking(recipe, batch_heads=12, lq=32760, lk=32760)
    assert 12 * b.rows * b.keys <= streaming.DEFAULT_BUDGET
    assert b.rows % recipe.block_m == 0 and b.keys % recipe.block_n == 0
