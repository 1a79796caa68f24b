"""STE ground truth vs the explicit Attn-QAT backward.

Where the STE sits: docs/attention-math.md, "Two placements of the STE".

Under the ``consistent`` P policy the backward quantizes exactly the numbers the forward did,
so attn_qat == ste_autograd to float64 rounding. Under the paper's ``block`` policy the
forward quantizes exp(S - m_running) per tile and the backward the normalized exp(S - LSE):
dQ and dK still agree (dS does not use P~), and dV differs by exactly (P~_fwd - P~_bwd)^T dO.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference_inputs import assert_within, attn_cases, make_inputs, rounding_bound

from fp4sim import reference
from fp4sim.reference.backward import backward_parts
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.forward import fp4_attention_forward


def _setup(case, recipe, mode):
    q, k, v = make_inputs(case)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 1),
                     dtype=torch.float64)
    fwd = fp4_attention_forward(q, k, v, recipe, causal=case.causal, mode=mode,
                                accum_dtype=torch.float64)
    return q, k, v, do, fwd


def _bound(case, q, k, v, do, fwd):
    # compare against the quantized operands the gradients are built from
    return rounding_bound(fwd.q_hat, fwd.k_hat, fwd.v_hat, do, default_sm_scale(case.d, None))


@given(case=attn_cases(), block_n=st.sampled_from((16, 32, 64)),
       mode=st.sampled_from(("tiled", "dense")),
       base=st.sampled_from(("attn-qat-consistent", "infer-nvfp4")))
def test_attn_qat_equals_ste_under_consistent_policy(case, block_n, mode, base):
    recipe = dataclasses.replace(reference.get_recipe(base), p_policy="consistent",
                                 block_n=block_n)
    q, k, v, do, fwd = _setup(case, recipe, mode)
    ste = reference.attention_backward("ste_autograd", fwd, q, k, v, do, recipe, case.causal)
    qat = reference.attention_backward("attn_qat", fwd, q, k, v, do, recipe, case.causal)
    bound = _bound(case, q, k, v, do, fwd)
    for name, a, b in zip(("dq", "dk", "dv"), qat, ste, strict=True):
        assert_within(a, b, bound[name], f"consistent attn_qat vs STE {name}")


@given(case=attn_cases(max_lk=160), block_n=st.sampled_from((16, 64)))
def test_block_policy_ste_gap_is_exactly_the_p_mismatch(case, block_n):
    recipe = dataclasses.replace(reference.get_recipe("attn-qat"), block_n=block_n)
    q, k, v, do, fwd = _setup(case, recipe, "tiled")
    ste = backward_parts("ste_autograd", fwd, q, k, v, do, recipe, case.causal)
    qat = backward_parts("attn_qat", fwd, q, k, v, do, recipe, case.causal)
    bound = _bound(case, q, k, v, do, fwd)
    # dS does not involve P~ in either: dQ, dK agree to rounding
    assert_within(qat.dq, ste.dq, bound["dq"], "block dq")
    assert_within(qat.dk, ste.dk, bound["dk"], "block dk")
    # dV: the forward's effective P~ (STE) against the backward's FQ(exp(S - LSE))
    fwd_d = fp4_attention_forward(q, k, v, recipe, causal=case.causal, accum_dtype=torch.float64,
                                  diagnostics=True)
    p_fwd = _forward_p_tilde(q, k, recipe, case.causal)
    gap = (p_fwd - qat.p_dv).transpose(-1, -2) @ do
    gap = reference.backward.reduce_kv(gap[..., : case.lk, :], case.hkv)
    assert_within(ste.dv - qat.dv, gap, 2 * bound["dv"], "block dv gap")
    # the gap is visible exactly when codes or scales differ; measured, not assumed
    if fwd_d.diagnostics["p_code_mismatch_count"] == 0 and torch.equal(p_fwd, qat.p_dv):
        assert_within(ste.dv, qat.dv, bound["dv"], "no mismatch, no gap")


def _forward_p_tilde(q, k, recipe, causal):
    from fp4sim.reference.masks import visible_mask
    from fp4sim.reference.operands import pad_keys, quantize_operands
    from fp4sim.reference.softmax import effective_p_tilde, padded_length, scores, softmax_forward

    ops = quantize_operands(q, k, k, recipe, torch.float64)
    lk_pad = padded_length(k.shape[-2], recipe.block_n)
    vis = visible_mask(q.shape[-2], k.shape[-2], lk_pad, causal)
    s = scores(ops.q_hat, pad_keys(ops.k_hat, q.shape[1], lk_pad),
               default_sm_scale(q.shape[-1], None), vis)
    return effective_p_tilde(softmax_forward(s, recipe, "tiled"))


def test_long_uniform_row_backward_flushes_what_the_forward_kept():
    # attention-math.md: normalized P of a long row ~ 1/L is below the flush threshold 6 * 2^-10
    lk = 1024
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 16, generator=gen, dtype=torch.float64) * 0.05
    k = torch.randn(1, 1, lk, 16, generator=gen, dtype=torch.float64) * 0.05
    v = torch.randn(1, 1, lk, 16, generator=gen, dtype=torch.float64)
    block = fp4_attention_forward(q, k, v, "attn-qat", accum_dtype=torch.float64,
                                  diagnostics=True).diagnostics
    cons = fp4_attention_forward(q, k, v, "attn-qat-consistent", accum_dtype=torch.float64,
                                 diagnostics=True).diagnostics
    assert block["p_mass_kept_fwd"] > 0.95
    assert block["p_mass_kept_bwd"] < 0.05
    assert block["p_bwd_flushed_block_fraction"] > 0.95
    assert block["p_code_mismatch_rate"] > 0.9
    assert cons["p_mass_kept_bwd"] == pytest.approx(cons["p_mass_kept_fwd"], rel=1e-12)
    assert cons["p_code_mismatch_rate"] == 0.0
