"""Forward diagnostics: P mass kept, flushes, saturation, code histograms, P-code mismatch."""

from __future__ import annotations

import torch

from fp4sim.reference.p_quant import PQuantized
from fp4sim.reference.recipes import Recipe
from fp4sim.reference.softmax import SoftmaxForward, softmax_backward

FP4_CODES = 16  # E2M1: 16 codes (docs/numerics.md)


def code_histogram(codes: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
    """Counts of the 16 E2M1 codes (optionally only where ``mask``)."""
    c = codes if mask is None else codes[mask]
    return torch.bincount(c.reshape(-1).long(), minlength=FP4_CODES).tolist()


def _row_mass_kept(p_tilde: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per row sum P~ / sum P (rows without keys excluded: returned as NaN)."""
    den = p.sum(dim=-1)
    return torch.where(den > 0, p_tilde.sum(dim=-1) / torch.where(den > 0, den, 1.0), torch.nan)


def _row_min(kept: torch.Tensor) -> float:
    """Smallest row of a mass-kept tensor; rows without keys (NaN), and an empty batch, count
    as 1 (nothing lost)."""
    return float(torch.nan_to_num(kept, nan=1.0).min()) if kept.numel() else 1.0


def _p_block_stats(pq: PQuantized, prefix: str) -> dict:
    nonzero = int(pq.nonzero.sum())
    flushed = int(pq.flushed.sum())
    return {
        f"{prefix}_nonzero_blocks": nonzero,
        f"{prefix}_flushed_blocks": flushed,
        f"{prefix}_flushed_block_fraction": flushed / nonzero if nonzero else 0.0,
        f"{prefix}_saturated": int(pq.saturated.sum()),
    }


def forward_diagnostics(ops, sm: SoftmaxForward, s, lse, visible, recipe: Recipe) -> dict:
    """Diagnostics dict of one forward (see docs/bench/reference.md for every key).

    ``p_mass_kept_fwd`` = mean over rows of sum P~ / sum P (both rescaled to the final row max,
    as the forward accumulates them), ``p_mass_kept_fwd_row_min`` its smallest row;
    ``p_mass_kept_bwd`` the same for the backward's P~ against P = exp(S - LSE);
    ``p_code_mismatch_rate`` the fraction of visible P entries whose forward and backward codes
    differ (docs/attention-math.md "Two placements of the STE").
    """
    out: dict = {}
    for name in ("q", "k", "v"):
        tq = getattr(ops, name)
        if tq is None:
            continue
        out[f"{name}_code_histogram"] = code_histogram(tq.codes)
        out[f"{name}_saturated"] = int(tq.saturated.sum())
        out[f"{name}_flushed_blocks"] = int(tq.flushed.sum())
    b, h, lq, lkp = s.shape
    vis = visible.expand(b, h, lq, lkp)
    kept_fwd = _row_mass_kept(sm.p_tilde, sm.p_hp)
    out["p_mass_kept_fwd"] = float(kept_fwd.nanmean())
    out["p_mass_kept_fwd_row_min"] = _row_min(kept_fwd)
    if sm.pq is None:
        return out
    codes_fwd = sm.pq.codes.reshape(s.shape)
    out["p_code_histogram"] = code_histogram(codes_fwd, vis)
    out.update(_p_block_stats(sm.pq, "p_fwd"))
    bwd = softmax_backward(s, lse, sm.m, sm.l, recipe)
    kept_bwd = _row_mass_kept(bwd.p_tilde, bwd.p)
    out["p_mass_kept_bwd"] = float(kept_bwd.nanmean())
    out["p_mass_kept_bwd_row_min"] = _row_min(kept_bwd)
    out.update(_p_block_stats(bwd.pq, "p_bwd"))
    codes_bwd = bwd.pq.codes.reshape(s.shape)
    n_vis = int(vis.sum())
    mismatch = int(((codes_fwd != codes_bwd) & vis).sum())
    out["p_code_mismatch_rate"] = mismatch / n_vis if n_vis else 0.0
    out["p_code_mismatch_count"] = mismatch
    out["p_visible_entries"] = n_vis
    return out
