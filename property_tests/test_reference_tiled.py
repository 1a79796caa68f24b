"""Tiled forward: a literal flash loop with fp4sim quantizers, dense mode, and padding.

The literal loop walks the key tiles one by one (FlashAttention online softmax, attention-math.md
"Forward" step 3) and quantizes each tile's valid P with the NumPy emulator (``pad=True``, so
padded keys are zeros the emulator adds itself). The vectorized reference must give the same P
codes and scale bytes bit for bit, and O, O_hp, LSE to float64 rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference_inputs import assert_within, attn_cases, make_inputs, rounding_bound

import fp4sim
from fp4sim import reference
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands
from fp4sim.reference.softmax import padded_length, scores, softmax_forward


def _fp4sim_tile(p32: np.ndarray, recipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scale bytes, values) of one tile's valid P (B, H, Lq, w) by fp4sim."""
    spec, policy = recipe.p, recipe.p_policy
    settings = spec.settings(pad=True)
    settings.pop("tensor_scale", None)
    if spec.fmt == "mxfp4":
        settings = {"nan": spec.nan, "scale_rule": spec.scale_rule, "pad": True}
    if policy in ("block", "consistent"):
        q = fp4sim.quantize(p32, spec.fmt, axis=-1, **settings)
        return q.codes, q.scale_bits, fp4sim.dequantize(q)
    if policy == "two_level":
        with np.errstate(divide="ignore", invalid="ignore"):
            q = fp4sim.quantize_two_level(p32, axis=-1, row_axis=-1, **settings)
        codes, scale_bits = q.inner.codes.copy(), q.inner.scale_bits.copy()
        values = fp4sim.dequantize_two_level(q)
        # Documented divergence (docs/bench/reference.md): a nonzero row max whose s1 =
        # rowmax / 2688 underflows to 0 makes fp4sim divide by 0; the reference uses s1 = 1
        # there, i.e. plain NVFP4 of the row, which is what is checked for those rows.
        under = (p32.max(axis=-1) > 0) & (q.row_scales[..., 0] == 0)
        if under.any():
            plain = fp4sim.quantize(p32[under], "nvfp4", axis=-1, **settings)
            codes[under], scale_bits[under] = plain.codes, plain.scale_bits
            values[under] = fp4sim.dequantize(plain)
        return codes, scale_bits, values
    assert policy == "tile_global"
    codes = np.zeros(p32.shape[:-1] + (-(-p32.shape[-1] // 16) * 16,), np.uint8)
    scale_bits = np.zeros(p32.shape[:-1] + (codes.shape[-1] // 16,), np.uint8)
    values = np.zeros_like(p32)
    b, h, lq, _ = p32.shape
    for bi in range(b):
        for hi in range(h):
            for r0 in range(0, lq, recipe.block_m):
                sl = (bi, hi, slice(r0, r0 + recipe.block_m))
                q = fp4sim.quantize(p32[sl], "nvfp4", axis=-1, tensor_scale="amax", **settings)
                codes[sl], scale_bits[sl], values[sl] = q.codes, q.scale_bits, fp4sim.dequantize(q)
    return codes, scale_bits, values


def _literal_flash(s: torch.Tensor, v_pad: torch.Tensor, lk: int, recipe, mode: str):
    """One tile at a time: running max, per-tile P~ by fp4sim, l, acc, acc_hp (float64)."""
    bn = recipe.block_n
    shape = s.shape[:-1]
    m = torch.full(shape, float("-inf"), dtype=s.dtype)
    l = torch.zeros(shape, dtype=s.dtype)
    acc = torch.zeros(*shape, v_pad.shape[-1], dtype=s.dtype)
    acc_hp = torch.zeros_like(acc)
    codes_all, scales_all = [], []
    m_final = s.amax(-1)
    consistent = recipe.p_policy == "consistent"
    for j in range(s.shape[-1] // bn):
        s_j = s[..., j * bn:(j + 1) * bn]
        if mode == "dense" or consistent:
            m_new = m_final  # second pass: against the final row max
        else:
            m_new = torch.maximum(m, s_j.amax(-1))  # FlashAttention running max
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        p_j = torch.exp(s_j - m_safe.unsqueeze(-1))
        alpha = torch.where(torch.isfinite(m), torch.exp(m - m_safe), 0.0)
        w = max(0, min(bn, lk - j * bn))
        if recipe.p is None:
            pt_j = p_j
        else:
            c, sb, val = _fp4sim_tile(p_j[..., :w].to(torch.float32).numpy(), recipe)
            codes_all.append(c[..., :w])
            scales_all.append(sb)
            pt_j = torch.zeros_like(p_j)
            pt_j[..., :w] = torch.from_numpy(val[..., :w]).to(s.dtype)
        l = l * alpha + p_j.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + pt_j @ v_pad[..., j * bn:(j + 1) * bn, :]
        acc_hp = acc_hp * alpha.unsqueeze(-1) + p_j @ v_pad[..., j * bn:(j + 1) * bn, :]
        m = m_new
    l_safe = torch.where(l > 0, l, 1.0).unsqueeze(-1)
    return {
        "o": torch.where(l.unsqueeze(-1) > 0, acc / l_safe, 0.0),
        "o_hp": torch.where(l.unsqueeze(-1) > 0, acc_hp / l_safe, 0.0),
        "lse": torch.where(l > 0, m + torch.log(torch.where(l > 0, l, 1.0)), float("-inf")),
        "codes": codes_all,
        "scales": scales_all,
    }


POLICY_RECIPES = [
    ("attn-qat", {}),
    ("attn-qat-consistent", {}),
    ("sage3-like", {}),
    ("nvfp4-tensor-scale", {"block_m": 16}),
    ("infer-mxfp4", {}),
    ("bf16", {}),
]


@pytest.mark.parametrize(("name", "overrides"), POLICY_RECIPES, ids=lambda v: str(v))
@given(case=attn_cases(d_choices=(32,)), block_n=st.sampled_from((32, 64)),
       mode=st.sampled_from(("tiled", "dense")))
def test_vectorized_tiles_equal_literal_flash_loop_and_fp4sim(name, overrides, case, block_n,
                                                            mode):
    recipe = dataclasses.replace(reference.get_recipe(name), block_n=block_n, **overrides)
    q, k, v = make_inputs(case)
    tau = default_sm_scale(case.d, None)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal, mode=mode,
                                          accum_dtype=torch.float64, diagnostics=True)
    ops = quantize_operands(q, k, v, recipe, torch.float64)
    lk_pad = padded_length(case.lk, block_n)
    vis = visible_mask(case.lq, case.lk, lk_pad, case.causal)
    s = scores(ops.q_hat, pad_keys(ops.k_hat, case.h, lk_pad), tau, vis)
    sm = softmax_forward(s, recipe, mode)
    lit = _literal_flash(s, pad_keys(ops.v_hat, case.h, lk_pad), case.lk, recipe, mode)
    bound = rounding_bound(ops.q_hat, ops.k_hat, ops.v_hat, torch.ones(()), tau)
    assert_within(fwd.o, lit["o"], bound["o"], "o")
    assert_within(fwd.o_hp, lit["o_hp"], bound["o"], "o_hp")
    fin = torch.isfinite(lit["lse"])
    assert torch.equal(fin, torch.isfinite(fwd.lse))
    lse_scale = 1 + float(lit["lse"][fin].abs().max()) if fin.any() else 1.0
    assert_within(fwd.lse[fin], lit["lse"][fin], 64 * (case.lk + 64) * 2.2e-16 * lse_scale, "lse")
    if recipe.p is None:
        assert fwd.p_codes is None
        return
    blk = recipe.p.block
    for j, (codes, scale_bytes) in enumerate(zip(lit["codes"], lit["scales"], strict=True)):
        w = codes.shape[-1]
        ours = fwd.p_codes[..., j * block_n: j * block_n + w].numpy()
        assert np.array_equal(ours, codes), f"tile {j}: P codes differ from the literal loop"
        ours_sb = sm.pq.scale_bits[..., j, :].numpy()
        nb = scale_bytes.shape[-1]
        assert np.array_equal(ours_sb[..., :nb], scale_bytes), f"tile {j}: scale bytes differ"
        # blocks made only of padded keys: scale 0 and zero codes
        assert not ours_sb[..., nb:].any()
        assert w == block_n or nb == -(-w // blk)


@given(case=attn_cases(), block_n=st.sampled_from((16, 32, 64)))
def test_tiled_equals_dense_when_nothing_is_quantized(case, block_n):
    recipe = dataclasses.replace(reference.get_recipe("bf16"), block_n=block_n)
    q, k, v = make_inputs(case)
    tiled = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal,
                                            accum_dtype=torch.float64)
    dense = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal, mode="dense",
                                            accum_dtype=torch.float64)
    bound = rounding_bound(q, k, v, torch.ones(()), default_sm_scale(case.d, None))
    assert_within(tiled.o, dense.o, bound["o"], "o")
    assert torch.equal(torch.isfinite(tiled.lse), torch.isfinite(dense.lse))


@pytest.mark.parametrize("name", ["attn-qat", "sage3-like", "nvfp4-tensor-scale",
                                  "infer-nvfp4", "infer-mxfp4"])
@given(case=attn_cases(d_choices=(32,)), accum=st.sampled_from((torch.float32, torch.float64)))
def test_one_tile_makes_tiled_and_dense_bit_identical(name, case, accum):
    recipe = reference.get_recipe(name)
    recipe = dataclasses.replace(recipe, block_n=padded_length(case.lk, 32))
    q, k, v = make_inputs(case, dtype=torch.float32)
    kw = dict(causal=case.causal, accum_dtype=accum, diagnostics=True)
    tiled = reference.fp4_attention_forward(q, k, v, recipe, **kw)
    dense = reference.fp4_attention_forward(q, k, v, recipe, mode="dense", **kw)
    for field in ("o", "o_hp", "lse", "m", "l", "p_codes"):
        assert torch.equal(getattr(tiled, field), getattr(dense, field)), field


@given(case=attn_cases(max_lk=160), block_n=st.sampled_from((16, 32)))
def test_running_max_is_the_only_tiled_dense_difference(case, block_n):
    """P codes agree on every tile whose running max already equals the final row max."""
    recipe = dataclasses.replace(reference.get_recipe("attn-qat"), block_n=block_n)
    q, k, v = make_inputs(case)
    kw = dict(causal=case.causal, accum_dtype=torch.float64, diagnostics=True)
    tiled = reference.fp4_attention_forward(q, k, v, recipe, **kw)
    dense = reference.fp4_attention_forward(q, k, v, recipe, mode="dense", **kw)
    ops = quantize_operands(q, k, v, recipe, torch.float64)
    lk_pad = padded_length(case.lk, block_n)
    vis = visible_mask(case.lq, case.lk, lk_pad, case.causal)
    s = scores(ops.q_hat, pad_keys(ops.k_hat, case.h, lk_pad), default_sm_scale(case.d, None),
               vis)
    m_tiles = softmax_forward(s, recipe, "tiled").m_tiles  # (B, H, Lq, T)
    settled = (m_tiles == tiled.m.unsqueeze(-1)).repeat_interleave(block_n, dim=-1)
    settled = settled[..., : case.lk]
    assert torch.equal(tiled.p_codes[settled], dense.p_codes[settled])
