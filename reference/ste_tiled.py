"""The second STE ground truth, ``ste_tiled``: literal autograd through the tiled forward.

``ste_autograd`` puts the straight-through estimator on the normalized P and values it as
the forward's effective P~/l, so Attn-QAT's dQ and dK equal it by construction whenever the
backward's P~ is the forward's (docs/attention-math.md, "Two placements of the STE").
``ste_tiled`` is what a framework computes when the tiled fake-quant forward is written in
PyTorch and differentiated as it stands: a loop over key tiles with a running row max,
the STE on each tile's unnormalized ``exp(S_j - m_j)`` (its value the recipe's quantized
tile P), the row sum ``l`` accumulating the high-precision tile P, and gradients flowing
through the running max as well. No formula of this module is shared with the explicit
backward variants, so agreement with them is evidence, not identity.
"""

from __future__ import annotations

import torch

from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands, straight_through
from fp4sim.reference.recipes import Recipe
from fp4sim.reference.softmax import padded_length, scores, softmax_forward, tiles_per_split


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def tiled_forward_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: Recipe,
    causal: bool,
    tau: float,
    acc: torch.dtype,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """(O, (q, k, v) leaves, S): the tiled FP4 forward as a differentiable Python loop.

    Values equal ``fp4_attention_forward(..., mode="tiled").o`` to rounding (only the
    order of the rescalings differs); the quantized values come from the recipe's own
    tile quantizer, the gradients from autograd with the STE on every quantizer.
    """
    h, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    bn = recipe.block_n
    lk_pad = padded_length(lk, bn)
    vis = visible_mask(lq, lk, lk_pad, causal, q.device)
    leaves = tuple(t.detach().to(acc).requires_grad_(True) for t in (q, k, v))
    qg, kg, vg = leaves
    ops = quantize_operands(q.detach(), k.detach(), v.detach(), recipe, acc)
    q_hat = straight_through(qg, ops.q_hat)
    k_pad = pad_keys(straight_through(kg, ops.k_hat), h, lk_pad)
    v_pad = pad_keys(straight_through(vg, ops.v_hat), h, lk_pad)
    s = scores(q_hat, k_pad, tau, vis)
    with torch.no_grad():
        # the recipe's quantized tile P, relative to the max each tile was taken against
        sm = softmax_forward(s.detach(), recipe, "tiled")
        p_tiles = sm.pq.values if sm.pq is not None else None
    consistent = recipe.p_policy == "consistent"
    m_final = s.amax(dim=-1)  # the consistent policy's first pass
    m = torch.full_like(m_final, float("-inf"))
    l = torch.zeros_like(m_final)
    out = torch.zeros(*q.shape[:-1], v_pad.shape[-1], dtype=acc, device=q.device)
    # split, not s[..., cols] per tile: autograd's backward of one slice writes its gradient
    # into a zero tensor the size of S, once per tile (O(tiles * |S|)); split's backward
    # concatenates the tiles' gradients once. Same views, same values (bit-identical).
    s_tiles = s.split(bn, dim=-1)
    v_tiles = v_pad.split(bn, dim=-2)
    # Recipe.kv_splits / kv_split_keys: each split's tile P is taken against the split's own
    # running max (m_split) and enters the sums, kept relative to the running max m of every
    # key so far, with the weight exp(m_split - m): the exact merge of the splits
    per_split = tiles_per_split(len(s_tiles), recipe)
    split = per_split < len(s_tiles) and not consistent
    m_split = m
    for j, s_j in enumerate(s_tiles):
        # FlashAttention's online softmax: m_j = max(m_{j-1}, rowmax S_j); consistent: m_final
        if split:
            restart = torch.full_like(m, float("-inf"))
            m_split = torch.maximum(m_split if j % per_split else restart, s_j.amax(dim=-1))
            m_new = torch.maximum(m, m_split)
        else:
            m_new = m_final if consistent else torch.maximum(m, s_j.amax(dim=-1))
        e_j = torch.exp(s_j - _finite(m_split if split else m_new).unsqueeze(-1))
        e_tilde = e_j if p_tiles is None else straight_through(e_j, p_tiles[..., j, :])
        alpha = torch.where(torch.isfinite(m_new), torch.exp(_finite(m) - _finite(m_new)), 0.0)
        alpha = torch.where(torch.isfinite(m), alpha, torch.zeros_like(alpha))
        l_j, o_j = e_j.sum(dim=-1), e_tilde @ v_tiles[j]
        if split:
            beta = torch.where(torch.isfinite(m_split),
                               torch.exp(_finite(m_split) - _finite(m_new)), 0.0)
            l_j, o_j = l_j * beta, o_j * beta.unsqueeze(-1)
        l = l * alpha + l_j
        out = out * alpha.unsqueeze(-1) + o_j
        m = m_new
    l_e = l.unsqueeze(-1)
    empty = l_e == 0
    o = torch.where(empty, 0.0, out / torch.where(empty, torch.ones_like(l_e), l_e))
    return o, leaves, s


def ste_tiled_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: Recipe,
    causal: bool,
    tau: float,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dS) of the ``ste_tiled`` ground truth (input shapes, ``acc`` dtype)."""
    with torch.enable_grad():
        o, leaves, s = tiled_forward_autograd(q, k, v, recipe, causal, tau, acc)
        dq, dk, dv, ds = torch.autograd.grad(o, (*leaves, s), do.to(acc))
    return dq, dk, dv, ds
