"""Exact float64 attention (the unquantized ground truth), differentiable by autograd."""

from __future__ import annotations

import math

import torch

from fp4sim.reference.masks import causal_visible, check_attention_inputs, expand_kv


def default_sm_scale(d: int, sm_scale: float | None) -> float:
    """Softmax scale tau = 1/sqrt(d) unless given (docs/attention-math.md notation)."""
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    value = float(sm_scale)
    if not math.isfinite(value):  # a NaN/Inf scale would turn every score non-finite
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r}")
    return value


def attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """softmax(tau Q K^T) V in float64; (B, H, Lq, d) output.

    Grouped-query attention: k, v have Hkv heads, Hkv divides H. Causal is bottom-right aligned
    (query i sees key j iff j <= i + Lk - Lq). Rows with no visible key output 0.
    """
    _, h, _, lq, lk, d = check_attention_inputs(q, k, v, nan_policy="propagate")
    tau = default_sm_scale(d, sm_scale)
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64, v64 = expand_kv(k64, h), expand_kv(v64, h)
    s = tau * (q64 @ k64.transpose(-1, -2))
    if causal:
        s = s.masked_fill(~causal_visible(lq, lk, q.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    return p @ v64
