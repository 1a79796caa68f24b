"""Tiled online softmax with quantized P, vectorized over key tiles (no Python loops).

A flash kernel walks key tiles j = 0..T-1 keeping a running row max ``m``. Its tile-j
probabilities are ``P_j = exp(S_j - m_j)`` with ``m_j = max(m_{j-1}, rowmax S_j)``, i.e. the
cumulative max of the tile maxima (docs/attention-math.md "Forward" step 3). Every accumulator is
later rescaled by ``exp(m_j - m_final)``, so the kernel's final sums equal
``sum_j exp(m_j - m_final) * (tile-j term)``; this module computes all tiles at once that way.
``dense`` mode uses ``m_j = m_final`` for every tile (no running-max effect); with one tile
(``block_n >= Lk``) both modes run the identical float operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4sim.reference.p_quant import PQuantized, quantize_p_tiles
from fp4sim.reference.recipes import Recipe

NEG_INF = float("-inf")


def padded_length(lk: int, block_n: int) -> int:
    """Key length padded up to a multiple of the tile width."""
    return -(-lk // block_n) * block_n


def scores(
    q_hat: torch.Tensor, k_pad: torch.Tensor, sm_scale: float, visible: torch.Tensor
) -> torch.Tensor:
    """S = tau Q K^T with invisible (causal or padded) keys at -inf (docs/attention-math.md)."""
    s = sm_scale * (q_hat @ k_pad.transpose(-1, -2))
    return s.masked_fill(~visible, NEG_INF)


def _finite_or(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, fill))


def _tiles(x: torch.Tensor, block_n: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_n, block_n)


def tiles_per_split(n_tiles: int, recipe: Recipe) -> int:
    """Key tiles a split walks (``Recipe.kv_splits``, ``kv_split_keys``; one pass: all)."""
    if recipe.kv_split_keys:
        return recipe.kv_split_keys // recipe.block_n
    return -(-n_tiles // recipe.kv_splits)


def split_running_max(tile_max: torch.Tensor, per: int) -> torch.Tensor:
    """Running max over the key tiles (last axis) in splits of ``per`` tiles, each starting
    afresh (``tiles_per_split``; ``per`` >= the tiles: the plain running max)."""
    n_tiles = tile_max.shape[-1]
    if per >= n_tiles:
        return torch.cummax(tile_max, dim=-1).values
    return torch.cat([torch.cummax(tile_max[..., a:a + per], dim=-1).values
                      for a in range(0, n_tiles, per)], dim=-1)


@dataclass(frozen=True)
class SoftmaxForward:
    """Tile-wise forward softmax quantities (flattened back to (B, H, Lq, Lkp) where 2-D).

    ``m`` final row max (-inf for rows without keys), ``l`` row sum of the high-precision P
    relative to ``m``, ``p_hp`` = exp(S - m) as the kernel effectively accumulates it,
    ``p_tilde`` the quantized P rescaled to ``m`` (unnormalized), ``pq`` the PQuantized of the
    per-tile P (None when P is not quantized), ``m_tiles`` the max each tile was taken against.
    """

    m: torch.Tensor
    l: torch.Tensor
    p_hp: torch.Tensor
    p_tilde: torch.Tensor
    pq: PQuantized | None
    m_tiles: torch.Tensor


def softmax_forward(s: torch.Tensor, recipe: Recipe, mode: str) -> SoftmaxForward:
    """Online-softmax forward of scores ``s`` (B, H, Lq, Lkp), Lkp a multiple of block_n."""
    if mode not in ("tiled", "dense"):
        raise ValueError(f"mode must be 'tiled' or 'dense', got {mode!r}")
    bn = recipe.block_n
    s_t = _tiles(s, bn)
    tile_max = s_t.amax(dim=-1)  # (B, H, Lq, T)
    m = tile_max.amax(dim=-1)
    if mode == "tiled" and recipe.p_policy != "consistent":
        # FlashAttention online softmax: running max m_j = max(m_{j-1}, rowmax S_j), afresh
        # at each split's first tile (Recipe.kv_splits)
        m_tiles = split_running_max(tile_max, tiles_per_split(tile_max.shape[-1], recipe))
    else:
        # dense mode, and the consistent policy's second pass: every tile against m_final
        m_tiles = m.unsqueeze(-1).expand_as(tile_max)
    p_t = torch.exp(s_t - _finite_or(m_tiles, 0.0).unsqueeze(-1))
    # docs/attention-math.md step 3: accumulators rescaled by exp(m_j - m_final)
    rescale = torch.where(
        torch.isfinite(m_tiles),
        torch.exp(m_tiles - _finite_or(m, 0.0).unsqueeze(-1)),
        torch.zeros_like(m_tiles),
    ).unsqueeze(-1)
    # docs/attention-math.md step 3: l accumulates the high-precision P
    l = (p_t.sum(dim=-1) * rescale.squeeze(-1)).sum(dim=-1)
    if recipe.p is None:
        pq = None
        p_tilde_t = p_t
    else:
        pq = quantize_p_tiles(p_t, recipe.p, recipe.p_policy, recipe.block_m)
        p_tilde_t = pq.values
    flat = s.shape
    return SoftmaxForward(
        m=m,
        l=l,
        p_hp=(p_t * rescale).reshape(flat),
        p_tilde=(p_tilde_t * rescale).reshape(flat),
        pq=pq,
        m_tiles=m_tiles,
    )


def safe_divide_rows(x: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """x / l per row; rows with l == 0 (no visible key) give 0 (NaN propagates)."""
    l_e = l.unsqueeze(-1)
    empty = l_e == 0
    return torch.where(empty, 0.0, x / torch.where(empty, torch.ones_like(l_e), l_e))


def log_sum_exp(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """LSE = m + log l (docs/attention-math.md step 4); -inf for rows without keys."""
    empty = l == 0
    return torch.where(empty, NEG_INF, m + torch.log(torch.where(empty, torch.ones_like(l), l)))


@dataclass(frozen=True)
class SoftmaxBackward:
    """Backward-recomputed probabilities: ``p`` = exp(S - LSE) (normalized, high precision),
    ``p_tilde`` the quantized P the backward uses (normalized), ``pq`` its PQuantized or None."""

    p: torch.Tensor
    p_tilde: torch.Tensor
    pq: PQuantized | None


def normalized_p(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S - LSE) (docs/attention-math.md "Backward variants"); rows without keys give 0."""
    p = torch.exp(s - _finite_or(lse, 0.0).unsqueeze(-1))
    return torch.where(torch.isfinite(lse).unsqueeze(-1), p, 0.0)


def softmax_backward(
    s: torch.Tensor, lse: torch.Tensor, m: torch.Tensor, l: torch.Tensor, recipe: Recipe
) -> SoftmaxBackward:
    """Recompute P and P~ from scores ``s`` (B, H, Lq, Lkp) and the saved LSE, m, l."""
    p = normalized_p(s, lse)
    if recipe.p is None:
        return SoftmaxBackward(p=p, p_tilde=p, pq=None)
    bn = recipe.block_n
    if recipe.p_policy == "consistent":
        # DESIGN.md consistent policy: P~ = FQ(exp(S - m_final)) / l, as the forward's 2nd pass
        e = torch.exp(s - _finite_or(m, 0.0).unsqueeze(-1))
        pq = quantize_p_tiles(_tiles(e, bn), recipe.p, "consistent", recipe.block_m)
        p_tilde = safe_divide_rows(pq.values.reshape(s.shape), l)
    else:
        # docs/attention-math.md principle (1): P~ = FQ_P(P) of the normalized P
        pq = quantize_p_tiles(_tiles(p, bn), recipe.p, recipe.p_policy, recipe.block_m)
        p_tilde = pq.values.reshape(s.shape)
    return SoftmaxBackward(p=p, p_tilde=p_tilde, pq=pq)


def effective_p_tilde(sm: SoftmaxForward) -> torch.Tensor:
    """The normalized P~ the forward effectively multiplied V^ by: rescaled P~_j / l."""
    return safe_divide_rows(sm.p_tilde, sm.l)
