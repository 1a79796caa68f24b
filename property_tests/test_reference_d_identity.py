"""The D identity (docs/attention-math.md "The D identity"), both directions.

With D = rowsum(dO * O_hp) (attn_qat, p_only) the row sums of dS vanish and dQ is invariant to
adding one constant vector to every key. With the quantized O (drop_in, o_only) they do not:
rowsum(dS)_i = dO_i . (O_hp,i - O_i) for o_only, and dQ moves by tau * rowsum(dS) c^T, linear
in the shared key bias c. K is left unquantized here so that K + c is exactly the shifted
operand (FQ(K + c) != FQ(K) + c); Q, V and P stay FP4 (Q too is unquantized for drop_in, whose
P = exp(QK^T - LSE_fp4) is otherwise not normalized).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from reference_inputs import assert_within, attn_cases, make_inputs, rounding_bound

from fp4sim import reference
from fp4sim.reference.backward import backward_parts
from fp4sim.reference.exact import default_sm_scale

RECIPES = ("attn-qat", "attn-qat-consistent", "sage3-like", "nvfp4-tensor-scale", "infer-nvfp4")


def _recipe(name, block_n):
    return dataclasses.replace(reference.get_recipe(name), k=None, block_n=block_n)


def _grads(variant, q, k, v, do, recipe, causal):
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=causal,
                                          accum_dtype=torch.float64)
    return fwd, backward_parts(variant, fwd, q, k, v, do, recipe, causal)


@given(case=attn_cases(), name=st.sampled_from(RECIPES), block_n=st.sampled_from((16, 64)))
def test_rowsum_ds_vanishes_with_o_hp_and_not_with_o(case, name, block_n):
    recipe = dataclasses.replace(reference.get_recipe(name), block_n=block_n)
    q, k, v = make_inputs(case)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed),
                     dtype=torch.float64)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal,
                                          accum_dtype=torch.float64)
    bound = rounding_bound(fwd.q_hat, fwd.k_hat, fwd.v_hat, do, default_sm_scale(case.d, None))
    for variant in ("attn_qat", "p_only"):
        parts = backward_parts(variant, fwd, q, k, v, do, recipe, case.causal)
        assert_within(parts.ds.sum(-1), torch.zeros(()), bound["ds_row"], f"{variant} rowsum dS")
    o_only = backward_parts("o_only", fwd, q, k, v, do, recipe, case.causal)
    predicted = (do * (fwd.o_hp - fwd.o)).sum(-1)
    assert_within(o_only.ds.sum(-1), predicted, bound["ds_row"], "o_only rowsum dS")
    if float(predicted.abs().max()) > 1e3 * bound["ds_row"]:
        # the other direction: where O != O_hp the residual is far above rounding
        assert float(o_only.ds.sum(-1).abs().max()) > 100 * bound["ds_row"]


@given(case=attn_cases(), name=st.sampled_from(RECIPES), block_n=st.sampled_from((16, 64)),
       bias=st.sampled_from((1.0, 8.0, 64.0)))
def test_dq_invariant_to_shared_key_shift_only_with_o_hp(case, name, block_n, bias):
    recipe = _recipe(name, block_n)
    q, k, v = make_inputs(case)
    tau = default_sm_scale(case.d, None)
    gen = torch.Generator().manual_seed(case.seed + 7)
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    c = torch.randn(case.d, generator=gen, dtype=torch.float64)
    c = bias * c / c.norm()
    k_shift = k + c
    bound = rounding_bound(q, k_shift, v, do, tau)
    for variant in ("attn_qat", "p_only"):
        _, a = _grads(variant, q, k, v, do, recipe, case.causal)
        _, b = _grads(variant, q, k_shift, v, do, recipe, case.causal)
        assert_within(b.dq, a.dq, 4 * bound["dq"], f"{variant} dq under key shift")
        assert_within(b.dk, a.dk, 4 * bound["dk"], f"{variant} dk under key shift")
    for variant in ("o_only", "drop_in"):
        # drop_in recomputes S from the unquantized Q with the FP4 forward's LSE: with Q^ != Q
        # its P is not normalized and moves with the shift, so compare it with Q unquantized
        rec = recipe if variant == "o_only" else dataclasses.replace(recipe, q=None)
        _, a = _grads(variant, q, k, v, do, rec, case.causal)
        _, b = _grads(variant, q, k_shift, v, do, rec, case.causal)
        # dQ moves by tau * rowsum(dS) c^T (dS itself is shift invariant)
        moved = tau * a.ds.sum(-1, keepdim=True) * c
        assert_within(b.dq - a.dq, moved, 4 * bound["dq"], f"{variant} dq shift = tau rowsum(dS) c")


@given(case=attn_cases(causal=False), name=st.sampled_from(RECIPES))
def test_o_only_error_grows_linearly_with_key_bias(case, name):
    recipe = _recipe(name, 64)
    q, k, v = make_inputs(case)
    gen = torch.Generator().manual_seed(case.seed + 3)
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    c = torch.randn(case.d, generator=gen, dtype=torch.float64)
    c = c / c.norm()
    gaps = []
    for bias in (0.0, 10.0, 100.0, 1000.0):
        _, qat = _grads("attn_qat", q, k + bias * c, v, do, recipe, case.causal)
        _, oo = _grads("o_only", q, k + bias * c, v, do, recipe, case.causal)
        gaps.append(float((oo.dq - qat.dq).norm()))
    assume(gaps[-1] > 1e-6)
    # gap(b) = || tau (D_hp - D_o) (P K + b c) ||: affine in b, so it grows once b dominates
    assert gaps[3] > gaps[2] > gaps[1]
    assert gaps[3] / gaps[2] == pytest.approx(10.0, rel=0.2)
