"""FP4 attention forward (tiled flash-style or dense) under a Recipe."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4sim.reference.diagnostics import forward_diagnostics
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.masks import check_attention_inputs, visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands, resolve_accum_dtype
from fp4sim.reference.recipes import Recipe, get_recipe
from fp4sim.reference.softmax import (
    log_sum_exp,
    padded_length,
    safe_divide_rows,
    scores,
    softmax_forward,
)


@dataclass(frozen=True)
class ForwardResult:
    """Outputs of :func:`fp4_attention_forward`, all in ``accum_dtype``.

    ``o`` (B, H, Lq, d) = acc / l from the quantized P~; ``o_hp`` = acc_hp / l from the
    high-precision P; ``lse``, ``m`` (row max), ``l`` (row sum) (B, H, Lq); ``q_hat``, ``k_hat``,
    ``v_hat`` the dequantized inputs in the input shapes (the inputs themselves where not
    quantized); ``p_codes`` uint8 (B, H, Lq, Lk) forward P codes when diagnostics were asked
    (None otherwise or when P is not quantized); ``diagnostics`` dict or None. ``recipe``,
    ``mode``, ``causal``, ``sm_scale`` record how it was computed (None when unknown, e.g. a
    result assembled elsewhere; the backward then trusts its arguments). Rows with no visible key:
    o = o_hp = 0, m = lse = -inf, l = 0.
    """

    o: torch.Tensor
    o_hp: torch.Tensor
    lse: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    q_hat: torch.Tensor
    k_hat: torch.Tensor
    v_hat: torch.Tensor
    p_codes: torch.Tensor | None = None
    diagnostics: dict | None = None
    recipe: Recipe | None = None
    mode: str = "tiled"
    causal: bool | None = None
    sm_scale: float | None = None


def fp4_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: str | Recipe = "attn-qat",
    causal: bool = False,
    sm_scale: float | None = None,
    mode: str = "tiled",
    accum_dtype: torch.dtype | None = torch.float32,
    diagnostics: bool = False,
) -> ForwardResult:
    """FP4 attention forward (docs/attention-math.md "Forward"), tiled as a flash kernel or dense.

    q (B, H, Lq, d); k, v (B, Hkv, Lk, d). Tiled mode quantizes each key tile's P against the
    running row max; dense mode against the final row max. Keys are padded to a multiple of
    ``recipe.block_n``; padded keys are masked (P = 0) and never change a valid block's scale.
    """
    recipe = get_recipe(recipe)
    if mode not in ("tiled", "dense"):
        raise ValueError(f"mode must be 'tiled' or 'dense', got {mode!r}")
    _, h, _, lq, lk, d = check_attention_inputs(q, k, v, recipe.nan_policy)
    acc_dtype = resolve_accum_dtype(accum_dtype, q)
    tau = default_sm_scale(d, sm_scale)
    ops = quantize_operands(q, k, v, recipe, acc_dtype)
    lk_pad = padded_length(lk, recipe.block_n)
    vis = visible_mask(lq, lk, lk_pad, causal, q.device)
    s = scores(ops.q_hat, pad_keys(ops.k_hat, h, lk_pad), tau, vis)
    sm = softmax_forward(s, recipe, mode)
    v_pad = pad_keys(ops.v_hat, h, lk_pad)
    # docs/attention-math.md step 3-4: acc = sum P~_j V^_j, acc_hp = sum P_j V^_j, O = acc / l
    o = safe_divide_rows(sm.p_tilde @ v_pad, sm.l)
    o_hp = safe_divide_rows(sm.p_hp @ v_pad, sm.l)
    lse = log_sum_exp(sm.m, sm.l)
    p_codes = None
    diag = None
    if diagnostics:
        if sm.pq is not None:
            p_codes = sm.pq.codes.reshape(s.shape)[..., :lk]
        diag = forward_diagnostics(ops, sm, s, lse, vis, recipe)
    return ForwardResult(
        o=o,
        o_hp=o_hp,
        lse=lse,
        m=sm.m,
        l=sm.l,
        q_hat=ops.q_hat,
        k_hat=ops.k_hat,
        v_hat=ops.v_hat,
        p_codes=p_codes,
        diagnostics=diag,
        recipe=recipe,
        mode=mode,
        causal=causal,
        sm_scale=tau,
    )
