"""Backward variants of FP4 attention as explicit formulas of the saved tensors.

docs/attention-math.md "Backward variants" (the paper's ablation, arXiv 2603.00040):

| variant    | S, P from | dV        | D                 | dP        |
|------------|-----------|-----------|-------------------|-----------|
| exact      | Q, K      | P^T dO    | rowsum(dO * O_ref)| dO V^T    |  (unquantized attention)
| drop_in    | Q, K      | P^T dO    | rowsum(dO * O)    | dO V^T    |
| p_only     | Q^, K^    | P^T dO    | rowsum(dO * O_hp) | dO V^^T   |
| o_only     | Q^, K^    | P~^T dO   | rowsum(dO * O)    | dO V^^T   |
| attn_qat   | Q^, K^    | P~^T dO   | rowsum(dO * O_hp) | dO V^^T   |

then dS = P * (dP - D), dQ = tau dS K(^), dK = tau dS^T Q(^); the STE carries dQ^, dK^, dV^
to Q, K, V unchanged. The two STE ground truths are autograd through the fake-quant forward:
``ste_autograd`` with the STE on the normalized P (valued as the forward's effective P~/l),
``ste_tiled`` through the literal tiled loop with the STE on each tile's unnormalized P
(``fp4sim.reference.ste_tiled``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.masks import check_attention_inputs, reduce_kv, visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands, straight_through
from fp4sim.reference.recipes import BACKWARD_VARIANTS, Recipe, get_recipe
from fp4sim.reference.softmax import (
    effective_p_tilde,
    log_sum_exp,
    normalized_p,
    padded_length,
    safe_divide_rows,
    scores,
    softmax_backward,
    softmax_forward,
)
from fp4sim.reference.ste_tiled import ste_tiled_grads


@dataclass(frozen=True)
class BackwardParts:
    """dq (B, H, Lq, d), dk, dv (B, Hkv, Lk, d) in the accum dtype, and the intermediate
    ``ds`` (B, H, Lq, Lkp), ``p`` and ``p_dv`` (the P used for dV), ``d`` (B, H, Lq)
    (None for the STE ground truths)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    ds: torch.Tensor
    p: torch.Tensor | None
    p_dv: torch.Tensor | None
    d: torch.Tensor | None


def _check(variant, fwd, q, do, causal):
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"unknown backward variant {variant!r}; valid: {BACKWARD_VARIANTS}")
    if do.shape != q.shape:
        raise ValueError(f"do shape {tuple(do.shape)} differs from q shape {tuple(q.shape)}")
    if getattr(fwd, "causal", None) is not None and fwd.causal != causal:
        raise ValueError(f"forward was computed with causal={fwd.causal}, backward got {causal}")


def _check_matches_forward(fwd, recipe: Recipe, q: torch.Tensor, k: torch.Tensor) -> None:
    """The backward recomputes from the forward's saved tensors: its recipe and shapes must be
    the forward's (a different recipe would mix two quantizations silently)."""
    saved = getattr(fwd, "recipe", None)
    if saved is not None and saved != recipe:
        diff = [f.name for f in dataclasses.fields(Recipe)
                if getattr(saved, f.name) != getattr(recipe, f.name)]
        raise ValueError(
            f"forward was computed with recipe {saved.name!r}, backward got {recipe.name!r} "
            f"(differs in {', '.join(diff)}); pass fwd.recipe"
        )
    for name, t, saved_t in (("q", q, fwd.o), ("k", k, fwd.k_hat)):
        if tuple(t.shape) != tuple(saved_t.shape):
            raise ValueError(
                f"{name} shape {tuple(t.shape)} differs from the forward's "
                f"{tuple(saved_t.shape)}"
            )


def _resolve_sm_scale(fwd, d: int, sm_scale: float | None) -> float:
    """The forward's softmax scale unless given; a different explicit scale is an error."""
    saved = getattr(fwd, "sm_scale", None)
    if sm_scale is None:
        return default_sm_scale(d, None) if saved is None else float(saved)
    if saved is not None and float(sm_scale) != float(saved):
        raise ValueError(f"forward used sm_scale={saved}, backward got sm_scale={sm_scale}")
    return float(sm_scale)


def _ste_parts(fwd, q, k, v, do, recipe: Recipe, causal: bool, tau: float) -> BackwardParts:
    acc = fwd.o.dtype
    h, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    lk_pad = padded_length(lk, recipe.block_n)
    vis = visible_mask(lq, lk, lk_pad, causal, q.device)
    with torch.enable_grad():
        leaves = [t.detach().to(acc).requires_grad_(True) for t in (q, k, v)]
        qg, kg, vg = leaves
        ops = quantize_operands(q.detach(), k.detach(), v.detach(), recipe, acc)
        q_hat = straight_through(qg, ops.q_hat)
        k_hat = straight_through(kg, ops.k_hat)
        v_hat = straight_through(vg, ops.v_hat)
        s = scores(q_hat, pad_keys(k_hat, h, lk_pad), tau, vis)
        mode = getattr(fwd, "mode", "tiled")
        with torch.no_grad():
            p_fwd = effective_p_tilde(softmax_forward(s.detach(), recipe, mode))
        m = s.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        p = safe_divide_rows(e, e.sum(dim=-1))
        # DESIGN.md STE ground truth: straight-through on the normalized P, valued as the
        # forward's effective P~
        o = straight_through(p, p_fwd) @ pad_keys(v_hat, h, lk_pad)
        dq, dk, dv, ds = torch.autograd.grad(o, (qg, kg, vg, s), do.to(acc))
    return BackwardParts(dq, dk, dv, ds, None, None, None)


def backward_parts(
    variant: str,
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: str | Recipe,
    causal: bool = False,
    sm_scale: float | None = None,
) -> BackwardParts:
    """Gradients and intermediates of one backward variant (module docstring has the table)."""
    recipe = get_recipe(recipe)
    _check(variant, fwd, q, do, causal)
    _check_matches_forward(fwd, recipe, q, k)
    _, h, hkv, lq, lk, d = check_attention_inputs(q, k, v, nan_policy="propagate")
    tau = _resolve_sm_scale(fwd, d, sm_scale)
    if variant == "ste_autograd":
        return _ste_parts(fwd, q, k, v, do, recipe, causal, tau)
    if variant == "ste_tiled":
        dq, dk, dv, ds = ste_tiled_grads(q, k, v, do, recipe, causal, tau, fwd.o.dtype)
        return BackwardParts(dq, dk, dv, ds, None, None, None)
    acc = fwd.o.dtype
    lk_pad = padded_length(lk, recipe.block_n)
    vis = visible_mask(lq, lk, lk_pad, causal, q.device)
    do_a = do.to(acc)
    if variant in ("exact", "drop_in"):
        q_use, k_use, v_use = q.to(acc), k.to(acc), v.to(acc)
    else:
        # docs/attention-math.md principle (1): recompute S from the quantized Q^, K^
        q_use, k_use, v_use = fwd.q_hat, fwd.k_hat, fwd.v_hat
    k_pad = pad_keys(k_use, h, lk_pad)
    v_pad = pad_keys(v_use, h, lk_pad)
    s = scores(q_use, k_pad, tau, vis)
    if variant == "exact":
        m = s.amax(dim=-1)
        e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
        l = e.sum(dim=-1)
        p = normalized_p(s, log_sum_exp(m, l))
        p_dv = p
        o_for_d = p @ v_pad
    elif variant == "drop_in":
        p = normalized_p(s, fwd.lse)  # docs/attention-math.md drop-in: LSE of the FP4 forward
        p_dv, o_for_d = p, fwd.o
    else:
        sb = softmax_backward(s, fwd.lse, fwd.m, fwd.l, recipe)
        p = sb.p
        p_dv = sb.p if variant == "p_only" else sb.p_tilde
        # docs/attention-math.md principle (2): D from O_hp
        o_for_d = fwd.o_hp if variant in ("p_only", "attn_qat") else fwd.o
    d_row = (do_a * o_for_d).sum(dim=-1)
    dv = p_dv.transpose(-1, -2) @ do_a
    dp = do_a @ v_pad.transpose(-1, -2)
    ds = p * (dp - d_row.unsqueeze(-1))  # FlashAttention: dS = P * (dP - D)
    dq = tau * (ds @ k_pad)
    dk = tau * (ds.transpose(-1, -2) @ q_use)
    dk = reduce_kv(dk[..., :lk, :], hkv)
    dv = reduce_kv(dv[..., :lk, :], hkv)
    return BackwardParts(dq, dk, dv, ds, p, p_dv, d_row)


def attention_backward(
    variant: str,
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: str | Recipe,
    causal: bool = False,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``variant`` in the input shapes (accum dtype of ``fwd``)."""
    parts = backward_parts(variant, fwd, q, k, v, do, recipe, causal, sm_scale)
    return parts.dq, parts.dk, parts.dv


def ds_rowsum_stats(
    variant: str,
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: str | Recipe,
    causal: bool = False,
    sm_scale: float | None = None,
) -> dict:
    """Statistics of rowsum(dS) over the rows of ``variant``'s dS: zero when its D matches
    the P it uses (docs/attention-math.md "The D identity"). The same quantity as
    ``ds_rowsum`` in `fp4sim report`.

    Also ``predicted_max_abs`` = max |dO . (O_hp - O)|, the row sum that drop_in / o_only
    (D from the FP4 output O) should show.
    """
    parts = backward_parts(variant, fwd, q, k, v, do, recipe, causal, sm_scale)
    r = parts.ds.sum(dim=-1)
    pred = (do.to(fwd.o.dtype) * (fwd.o_hp - fwd.o)).sum(dim=-1)
    if r.numel() == 0:  # an empty batch has no residual
        return {"max_abs": 0.0, "mean_abs": 0.0, "rms": 0.0, "predicted_max_abs": 0.0}
    return {
        "max_abs": float(r.abs().max()),
        "mean_abs": float(r.abs().mean()),
        "rms": float(r.pow(2).mean().sqrt()),
        "predicted_max_abs": float(pred.abs().max()),
    }
