"""Input validation, causal masks and grouped-query head mapping."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nan_policy: str = "raise"
) -> tuple[int, int, int, int, int, int]:
    """Validate (B, H, Lq, d) q and (B, Hkv, Lk, d) k, v; returns (B, H, Hkv, Lq, Lk, d)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, d); got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} unsupported; use float32/float16/bfloat16")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, h, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if bk != b:
        raise ValueError(f"batch sizes differ: q {b}, k/v {bk}")
    if dk != d:
        raise ValueError(f"head dims differ: q {d}, k/v {dk}")
    # B = 0 or H = Hkv = 0 is an empty batch: every result is empty (callers return early).
    if (hkv == 0 and h != 0) or (hkv and h % hkv):
        raise ValueError(f"Hkv={hkv} must divide H={h} (grouped-query attention)")
    if lq == 0 or lk == 0 or d == 0:
        raise ValueError(f"empty attention: Lq={lq}, Lk={lk}, d={d}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if nan_policy == "raise":
        # 'raise' rejects every non-finite input: an Inf score gives NaN rows just like a NaN.
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.isfinite(t).all():
                what = "NaN" if torch.isnan(t).any() else "Inf"
                raise ValueError(
                    f"{name} contains {what}; the recipe's nan_policy='raise' forbids "
                    "non-finite inputs (use nan_policy='propagate' to let them through)"
                )
    return b, h, hkv, lq, lk, d


def causal_visible(lq: int, lk: int, device=None) -> torch.Tensor:
    """Bool (Lq, Lk): query i sees key j iff j <= i + Lk - Lq (bottom-right, FlashAttention)."""
    i = torch.arange(lq, device=device).unsqueeze(-1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq)


def visible_mask(lq: int, lk: int, lk_padded: int, causal: bool, device=None) -> torch.Tensor:
    """Bool (Lq, lk_padded): keys >= Lk are padding (never visible); causal as above."""
    j = torch.arange(lk_padded, device=device).unsqueeze(0)
    vis = (j < lk).expand(lq, lk_padded)
    if causal:
        i = torch.arange(lq, device=device).unsqueeze(-1)
        vis = vis & (j <= i + (lk - lq))
    return vis


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, L, d) -> (B, H, L, d): query head h reads kv head h // (H // Hkv)."""
    if x.shape[1] == num_heads:  # also H = Hkv = 0 (an empty batch of heads)
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def reduce_kv(dx: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, L, d) -> (B, Hkv, L, d): sum gradients over each query-head group."""
    b, h, length, d = dx.shape
    if h == num_kv_heads:  # also H = Hkv = 0
        return dx
    return dx.reshape(b, num_kv_heads, h // num_kv_heads, length, d).sum(dim=2)
