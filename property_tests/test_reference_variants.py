"""Each backward variant against an independent dense implementation of its table row.

docs/attention-math.md "Backward variants": the test rebuilds S, P, P~, D, dV from the inputs with
plain dense torch (P~ quantized per row of the normalized P with ``quantize_torch`` and
``pad=True``, independent of the tiled P code), then compares with
``reference.attention_backward`` to float64 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from reference_inputs import assert_within, attn_cases, make_inputs, rounding_bound

from fp4sim import reference
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.quant_torch import fake_quantize_torch

# variant -> (S, P from quantized Q^ K^?, dV uses P~?, D from O_hp?)
TABLE = {
    "drop_in": (False, False, False),
    "p_only": (True, False, True),
    "o_only": (True, True, False),
    "attn_qat": (True, True, True),
}


def _independent(variant, fwd, q, k, v, do, causal, h):
    quant_s, ptilde_dv, d_hp = TABLE[variant]
    group = h // k.shape[1]
    qq, kk, vv = (fwd.q_hat, fwd.k_hat, fwd.v_hat) if quant_s else (q, k, v)
    kk = kk.repeat_interleave(group, dim=1)
    vv = vv.repeat_interleave(group, dim=1)
    tau = default_sm_scale(q.shape[-1], None)
    s = tau * qq @ kk.transpose(-1, -2)
    lq, lk = s.shape[-2:]
    if causal:
        vis = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        s = s.masked_fill(~vis, float("-inf"))
    lse = fwd.lse.unsqueeze(-1)
    p = torch.where(torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)),
                    0.0)
    p_dv = p
    if ptilde_dv:
        # attn-qat P policy 'block': FQ of the normalized P, blocks of 16 along keys
        p_dv = fake_quantize_torch(p.float(), "nvfp4", -1, pad=True).double()
    o_d = fwd.o_hp if d_hp else fwd.o
    d_row = (do * o_d).sum(-1, keepdim=True)
    dv = p_dv.transpose(-1, -2) @ do
    ds = p * (do @ vv.transpose(-1, -2) - d_row)
    dq = tau * ds @ kk
    dk = tau * ds.transpose(-1, -2) @ qq
    b, _, _, d = dk.shape
    dk = dk.reshape(b, -1, group, lk, d).sum(2)
    dv = dv.reshape(b, -1, group, lk, d).sum(2)
    return (dq, dk, dv), float(p.sum(-1).max())


@pytest.mark.parametrize("variant", sorted(TABLE))
@given(case=attn_cases(max_lk=100), block_n=st.sampled_from((16, 64)))
def test_variant_equals_its_table_row(case, variant, block_n):
    recipe = dataclasses.replace(reference.get_recipe("attn-qat"), block_n=block_n)
    q, k, v = make_inputs(case)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed + 5),
                     dtype=torch.float64)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal,
                                          accum_dtype=torch.float64)
    got = reference.attention_backward(variant, fwd, q, k, v, do, recipe, case.causal)
    want, p_mass = _independent(variant, fwd, q, k, v, do, case.causal, case.h)
    # drop_in's P = exp(QK^T - LSE_fp4) is not normalized (row sums reach 1e12 on heavy tails:
    # the instability the paper reports); the rounding bound scales with the largest row sum
    # (and overflow to Inf, giving NaN gradients: such draws are skipped)
    assume(math.isfinite(p_mass))
    scale = max(1.0, p_mass)
    tau = default_sm_scale(case.d, None)
    bound = rounding_bound(torch.maximum(q.abs(), fwd.q_hat.abs()),
                           torch.maximum(k.abs(), fwd.k_hat.abs()),
                           torch.maximum(v.abs(), fwd.v_hat.abs()), do, tau)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_within(a, b, scale * bound[name], f"{variant} {name}")
