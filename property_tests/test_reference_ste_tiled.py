"""The second STE ground truth ``ste_tiled`` (fp4sim.reference.ste_tiled).

It must equal an independent autograd computation of the same function (vectorized over
tiles with a cumulative max instead of the Python loop), reproduce the tiled forward's O,
reduce to the exact gradient without quantization, and differ from ``ste_autograd`` where
the forward's P~ and the backward's differ (docs/attention-math.md, "Two placements of the
STE").
"""

from __future__ import annotations

import pytest
import torch

from fp4sim import reference
from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands, straight_through
from fp4sim.reference.softmax import padded_length, scores, softmax_forward
from fp4sim.reference.ste_tiled import tiled_forward_autograd

F64 = torch.float64


def _inputs(seed: int, lq: int, lk: int, heads: int = 2, kv_heads: int = 1, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, d, generator=g, dtype=F64)
    k = torch.randn(1, kv_heads, lk, d, generator=g, dtype=F64)
    v = torch.randn(1, kv_heads, lk, d, generator=g, dtype=F64)
    do = torch.randn(1, heads, lq, d, generator=g, dtype=F64)
    return q, k, v, do


def _vectorized_ste_grads(q, k, v, do, recipe, causal: bool, tau: float):
    """Independent of the loop: all tiles at once, running max as a cumulative max."""
    h, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    bn = recipe.block_n
    lk_pad = padded_length(lk, bn)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    qg, kg, vg = leaves
    ops = quantize_operands(q, k, v, recipe, F64)
    s = scores(
        straight_through(qg, ops.q_hat),
        pad_keys(straight_through(kg, ops.k_hat), h, lk_pad),
        tau,
        visible_mask(lq, lk, lk_pad, causal),
    )
    with torch.no_grad():
        pq = softmax_forward(s.detach(), recipe, "tiled").pq
    s_t = s.reshape(*s.shape[:-1], lk_pad // bn, bn)
    tile_max = s_t.amax(dim=-1)
    m = tile_max.amax(dim=-1)
    if recipe.p_policy == "consistent":
        m_tiles = m.unsqueeze(-1).expand_as(tile_max)
    else:
        m_tiles = torch.cummax(tile_max, dim=-1).values
    p_t = torch.exp(s_t - m_tiles.unsqueeze(-1))
    rescale = torch.exp(m_tiles - m.unsqueeze(-1)).unsqueeze(-1)
    l = (p_t * rescale).sum(dim=(-1, -2))
    p_used = p_t if pq is None else straight_through(p_t, pq.values)
    acc = (p_used * rescale).reshape(s.shape) @ pad_keys(straight_through(vg, ops.v_hat), h, lk_pad)
    o = acc / l.unsqueeze(-1)
    return torch.autograd.grad(o, leaves, do)


@pytest.mark.parametrize("recipe_name", ["attn-qat", "attn-qat-consistent", "sage3-like", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_ste_tiled_equals_independent_autograd(recipe_name: str, causal: bool) -> None:
    recipe = reference.get_recipe(recipe_name)
    q, k, v, do = _inputs(1, 80, 192 if not causal else 200)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=causal, accum_dtype=F64)
    got = reference.attention_backward("ste_tiled", fwd, q, k, v, do, recipe, causal=causal)
    want = _vectorized_ste_grads(q, k, v, do, recipe, causal, fwd.sm_scale)
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        rel = float((a - b).norm() / b.norm())
        # both are float64 evaluations of one function in different orders
        assert rel < 1e-9, f"{recipe_name} causal={causal} {name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("recipe_name", ["attn-qat", "attn-qat-consistent"])
def test_ste_tiled_forward_value_is_the_tiled_forward(recipe_name: str) -> None:
    recipe = reference.get_recipe(recipe_name)
    q, k, v, _ = _inputs(2, 64, 256)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, accum_dtype=F64)
    o, _, _ = tiled_forward_autograd(q, k, v, recipe, False, fwd.sm_scale, F64)
    rel = float((o.detach() - fwd.o).abs().max() / fwd.o.abs().max())
    assert rel < 1e-9, f"loop forward differs from the tiled forward by {rel:.2e}"


def test_ste_tiled_is_the_exact_gradient_without_quantization() -> None:
    recipe = reference.get_recipe("bf16")
    q, k, v, do = _inputs(3, 48, 160)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=True, accum_dtype=F64)
    got = reference.attention_backward("ste_tiled", fwd, q, k, v, do, recipe, causal=True)
    exact = reference.attention_backward("exact", fwd, q, k, v, do, recipe, causal=True)
    for a, b in zip(got, exact, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-12


def test_ste_tiled_differs_from_ste_autograd_where_the_two_p_differ() -> None:
    # Multi-tile rows under attn-qat: the two STE placements give different dQ and dK.
    recipe = reference.get_recipe("attn-qat")
    q, k, v, do = _inputs(4, 64, 256)
    fwd = reference.fp4_attention_forward(q, k, v, recipe, accum_dtype=F64)
    tiled = reference.attention_backward("ste_tiled", fwd, q, k, v, do, recipe)
    normalized = reference.attention_backward("ste_autograd", fwd, q, k, v, do, recipe)
    for name, a, b in zip(("dq", "dk"), tiled[:2], normalized[:2], strict=True):
        rel = float((a - b).norm() / a.norm())
        assert rel > 1e-2, f"{name}: ste_tiled and ste_autograd agree to {rel:.2e}"
