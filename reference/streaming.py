"""Streaming FP4 attention reference: the same numbers as the dense reference, memory linear in L.

The dense reference (``forward``, ``backward``, ``exact``) materializes (B, H, Lq, Lk) scores.
Here query rows are processed in blocks of ``rows`` (a multiple of ``recipe.block_m``, so the
``tile_global`` row groups are the dense ones) and keys in chunks of ``keys`` (a multiple of
``recipe.block_n``, so every P tile is the dense one); only a (B, H, rows, keys) slice of S
exists at a time. Every P policy is local to a tile once the max the tile is taken against is
known, so the tile quantization calls the dense code (``quantize_p_tiles``,
``softmax_backward``) on each slice:

* forward (docs/attention-math.md "Forward"): per row block, the running max of the tile maxima
  is carried across chunks (``dense`` mode and the ``consistent`` policy take a first pass for
  the final row max instead); the accumulators are rescaled to the running max as a flash
  kernel does, so O, O_hp, l differ from the dense reference's by rounding only (it rescales
  every tile to the final max at once).
* backward (FlashAttention-2's recomputation): for each row block, each key chunk recomputes S,
  P = exp(S - LSE) and the variant's P~ from the saved LSE, m, l; dQ accumulates over chunks,
  dK, dV over row blocks (each variant keeps its own (B, H, Lk, d) dK and dV).
* ``ste_autograd`` in closed form: autograd through ``STE(P, P~_fwd / l) @ V^`` with
  P = softmax(S) gives dV = (P~_fwd / l)^T dO and dS = P * (dP - D), dP = dO V^^T,
  D = rowsum(P * dP) = rowsum(dO * O_hp): Attn-QAT's dS and a dV from the forward's own P~
  (recomputed here with the forward's running max).
* ``ste_tiled``: the literal autograd loop of ``reference.ste_tiled`` run on row blocks (rows
  are independent); its memory is O(rows x Lk) per block, not O(rows x keys).
* exact attention (float64 by default) and its gradient: the same two passes, unquantized.

Causal attention is bottom-right aligned; key chunks a row block cannot see are skipped (they
contribute exactly nothing: P = 0 and their tile maxima are -inf).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fp4sim.reference.backward import _check, _check_matches_forward, _resolve_sm_scale
from fp4sim.reference.diagnostics import FP4_CODES
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.forward import ForwardResult
from fp4sim.reference.masks import check_attention_inputs, expand_kv, reduce_kv
from fp4sim.reference.operands import quantize_operands, resolve_accum_dtype
from fp4sim.reference.p_quant import PQuantized, quantize_p_tiles
from fp4sim.reference.recipes import BACKWARD_VARIANTS, QuantSpec, Recipe, get_recipe
from fp4sim.reference.softmax import (
    log_sum_exp,
    normalized_p,
    padded_length,
    safe_divide_rows,
    softmax_backward,
)
from fp4sim.reference.ste_tiled import ste_tiled_grads

NEG_INF = float("-inf")
DEFAULT_BUDGET = 1 << 21
"""Default elements of one (B, H, rows, keys) slice (8 MiB in float32)."""

QUANTIZED_S = ("p_only", "o_only", "attn_qat", "ste_autograd")
"""Variants whose S is recomputed from Q^, K^ (docs/attention-math.md principle (1))."""


# ---------------------------------------------------------------------------------------
# blocking
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocking:
    """Query rows per block (a multiple of ``block_m``) and keys per chunk (of ``block_n``)."""

    rows: int
    keys: int


def choose_blocking(
    recipe: Recipe, batch_heads: int, lq: int, lk: int, budget: int = DEFAULT_BUDGET
) -> Blocking:
    """Blocks whose (B*H, rows, keys) slice holds at most ``budget`` elements where possible
    (never below one block_m x block_n tile); rows up to 256, the rest of the budget to keys."""
    bm, bn = recipe.block_m, recipe.block_n
    rows = min(padded_length(lq, bm), padded_length(256, bm))
    while rows > bm and batch_heads * rows * bn > budget:
        rows -= bm
    keys = max(bn, budget // max(batch_heads * rows, 1) // bn * bn)
    return Blocking(rows, min(keys, padded_length(lk, bn)))


def _check_blocking(blocking: Blocking, recipe: Recipe) -> None:
    if blocking.rows <= 0 or blocking.rows % recipe.block_m:
        raise ValueError(f"rows={blocking.rows} must be a positive multiple of block_m="
                         f"{recipe.block_m} (the tile_global row groups)")
    if blocking.keys <= 0 or blocking.keys % recipe.block_n:
        raise ValueError(f"keys={blocking.keys} must be a positive multiple of block_n="
                         f"{recipe.block_n} (the P tiles)")


@dataclass(frozen=True)
class _Layout:
    """Shapes and the walk over (row block, key chunk) pairs."""

    h: int
    lq: int
    lk: int
    lk_pad: int
    causal: bool
    bn: int
    blocking: Blocking

    def row_blocks(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.lq, self.blocking.rows):
            yield r0, min(r0 + self.blocking.rows, self.lq)

    def chunks(self, r1: int) -> Iterator[tuple[int, int]]:
        """Key chunks [c0, c1) visible to some row of a block ending at r1 (exclusive)."""
        end = self.lk_pad
        if self.causal:
            last = r1 - 1 + self.lk - self.lq  # bottom-right: row i sees j <= i + Lk - Lq
            end = min(end, padded_length(last + 1, self.bn)) if last >= 0 else 0
        for c0 in range(0, end, self.blocking.keys):
            yield c0, min(c0 + self.blocking.keys, end)

    def visible(self, r0: int, r1: int, c0: int, c1: int, device) -> torch.Tensor:
        i = torch.arange(r0, r1, device=device).unsqueeze(-1)
        j = torch.arange(c0, c1, device=device).unsqueeze(0)
        vis = (j < self.lk).expand(r1 - r0, c1 - c0)
        if self.causal:
            vis = vis & (j <= i + (self.lk - self.lq))
        return vis


def _layout(q, k, recipe: Recipe, causal: bool, blocking: Blocking | None) -> _Layout:
    b, h, lq = q.shape[:3]
    lk = k.shape[2]
    if blocking is None:
        blocking = choose_blocking(recipe, b * h, lq, lk)
    _check_blocking(blocking, recipe)
    return _Layout(h, lq, lk, padded_length(lk, recipe.block_n), causal, recipe.block_n,
                   blocking)


def _key_slice(x: torch.Tensor, h: int, c0: int, c1: int) -> torch.Tensor:
    """Keys [c0, c1) of (B, Hkv, Lk, d), GQA-expanded to H heads, zero keys past Lk."""
    part = expand_kv(x[:, :, c0:c1], h)
    short = (c1 - c0) - part.shape[-2]
    return torch.nn.functional.pad(part, (0, 0, 0, short)) if short else part


def _scores(q_blk, k_chunk, tau: float, vis: torch.Tensor) -> torch.Tensor:
    s = tau * (q_blk @ k_chunk.transpose(-1, -2))
    return s.masked_fill(~vis, NEG_INF)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _tiles(x: torch.Tensor, bn: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // bn, bn)


def _rescale(m_from: torch.Tensor, m_to: torch.Tensor) -> torch.Tensor:
    """exp(m_from - m_to), 0 where m_from = -inf (nothing accumulated against it yet)."""
    return torch.where(torch.isfinite(m_from), torch.exp(m_from - _finite_or_zero(m_to)), 0.0)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@dataclass
class _TileP:
    """One chunk's forward tile P: ``p_t`` = exp(S_j - m_j) and its quantization ``pq``
    (None when P is not quantized), ``m_tiles`` the max each tile was taken against."""

    p_t: torch.Tensor
    pq: PQuantized | None
    m_tiles: torch.Tensor

    @property
    def p_tilde_t(self) -> torch.Tensor:
        return self.p_t if self.pq is None else self.pq.values


def _forward_tiles(s: torch.Tensor, recipe: Recipe, m_run: torch.Tensor,
                   m_final: torch.Tensor | None) -> _TileP:
    """The forward's tile P of one chunk (docs/attention-math.md "Forward" step 3): against the
    running max m_j = max(m_{j-1}, rowmax S_j) carried in ``m_run``, or ``m_final`` (dense mode,
    consistent policy)."""
    s_t = _tiles(s, recipe.block_n)
    tile_max = s_t.amax(dim=-1)
    if m_final is None:
        m_tiles = torch.maximum(torch.cummax(tile_max, dim=-1).values, m_run.unsqueeze(-1))
    else:
        m_tiles = m_final.unsqueeze(-1).expand_as(tile_max)
    p_t = torch.exp(s_t - _finite_or_zero(m_tiles).unsqueeze(-1))
    pq = None
    if recipe.p is not None:
        pq = quantize_p_tiles(p_t, recipe.p, recipe.p_policy, recipe.block_m)
    return _TileP(p_t, pq, m_tiles)


def _uses_final_max(recipe: Recipe, mode: str) -> bool:
    return mode == "dense" or recipe.p_policy == "consistent"


def _row_max(q_blk, k_src, lay: _Layout, tau: float, r0: int, r1: int) -> torch.Tensor:
    """Final row max of S over the visible keys (first pass of dense mode / consistent)."""
    m = torch.full(q_blk.shape[:-1], NEG_INF, dtype=q_blk.dtype, device=q_blk.device)
    for c0, c1 in lay.chunks(r1):
        vis = lay.visible(r0, r1, c0, c1, q_blk.device)
        s = _scores(q_blk, _key_slice(k_src, lay.h, c0, c1), tau, vis)
        m = torch.maximum(m, s.amax(dim=-1))
    return m


class _ForwardDiagnostics:
    """Streaming sums of every key of ``reference.diagnostics.forward_diagnostics``."""

    def __init__(self, device) -> None:
        self.kept_fwd: list[torch.Tensor] = []
        self.kept_bwd: list[torch.Tensor] = []
        self.hist = torch.zeros(FP4_CODES, dtype=torch.int64, device=device)
        self.counts = {k: 0 for k in ("fwd_nonzero", "fwd_flushed", "fwd_saturated",
                                      "bwd_nonzero", "bwd_flushed", "bwd_saturated",
                                      "mismatch", "visible")}

    def add_block(self, fwd_pq: PQuantized, bwd_pq: PQuantized, vis: torch.Tensor) -> None:
        shape = vis.shape
        codes_fwd = fwd_pq.codes.reshape(shape)
        codes_bwd = bwd_pq.codes.reshape(shape)
        self.hist += torch.bincount(codes_fwd[vis].reshape(-1).long(), minlength=FP4_CODES)
        c = self.counts
        for prefix, pq in (("fwd", fwd_pq), ("bwd", bwd_pq)):
            c[f"{prefix}_nonzero"] += int(pq.nonzero.sum())
            c[f"{prefix}_flushed"] += int(pq.flushed.sum())
            c[f"{prefix}_saturated"] += int(pq.saturated.sum())
        c["mismatch"] += int(((codes_fwd != codes_bwd) & vis).sum())
        c["visible"] += int(vis.sum())

    def result(self, ops, quantized_p: bool) -> dict:
        out: dict = {}
        for name in ("q", "k", "v"):
            tq = getattr(ops, name)
            if tq is None:
                continue
            out[f"{name}_code_histogram"] = torch.bincount(
                tq.codes.reshape(-1).long(), minlength=FP4_CODES).tolist()
            out[f"{name}_saturated"] = int(tq.saturated.sum())
            out[f"{name}_flushed_blocks"] = int(tq.flushed.sum())
        kept = torch.cat([k.reshape(-1) for k in self.kept_fwd])
        out["p_mass_kept_fwd"] = float(kept.nanmean())
        out["p_mass_kept_fwd_row_min"] = _row_min(kept)
        if not quantized_p:
            return out
        c = self.counts
        out["p_code_histogram"] = self.hist.tolist()
        out.update(_block_stats("p_fwd", c["fwd_nonzero"], c["fwd_flushed"], c["fwd_saturated"]))
        kept_b = torch.cat([k.reshape(-1) for k in self.kept_bwd])
        out["p_mass_kept_bwd"] = float(kept_b.nanmean())
        out["p_mass_kept_bwd_row_min"] = _row_min(kept_b)
        out.update(_block_stats("p_bwd", c["bwd_nonzero"], c["bwd_flushed"], c["bwd_saturated"]))
        n_vis = c["visible"]
        out["p_code_mismatch_rate"] = c["mismatch"] / n_vis if n_vis else 0.0
        out["p_code_mismatch_count"] = c["mismatch"]
        out["p_visible_entries"] = n_vis
        return out


def _row_min(kept: torch.Tensor) -> float:
    # as reference.diagnostics: rows without keys (NaN) and an empty batch count as 1
    return float(torch.nan_to_num(kept, nan=1.0).min()) if kept.numel() else 1.0


def _block_stats(prefix: str, nonzero: int, flushed: int, saturated: int) -> dict:
    return {
        f"{prefix}_nonzero_blocks": nonzero,
        f"{prefix}_flushed_blocks": flushed,
        f"{prefix}_flushed_block_fraction": flushed / nonzero if nonzero else 0.0,
        f"{prefix}_saturated": saturated,
    }


def _mass_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan)


def streaming_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    recipe: str | Recipe = "attn-qat",
    causal: bool = False,
    sm_scale: float | None = None,
    mode: str = "tiled",
    accum_dtype: torch.dtype | None = torch.float32,
    diagnostics: bool = False,
    blocking: Blocking | None = None,
) -> ForwardResult:
    """``fp4_attention_forward`` streamed over (row block, key chunk) slices.

    Same arguments and result (``p_codes`` is always None: the (Lq, Lk) codes are what
    streaming avoids; ``diagnostics`` has the dense keys, the P code histogram counting
    visible entries). Equal to the dense result to rounding (module docstring).
    """
    recipe = get_recipe(recipe)
    if mode not in ("tiled", "dense"):
        raise ValueError(f"mode must be 'tiled' or 'dense', got {mode!r}")
    _, h, _, lq, lk, d = check_attention_inputs(q, k, v, recipe.nan_policy)
    acc_dtype = resolve_accum_dtype(accum_dtype, q)
    tau = default_sm_scale(d, sm_scale)
    ops = quantize_operands(q, k, v, recipe, acc_dtype)
    lay = _layout(q, k, recipe, causal, blocking)
    final_max = _uses_final_max(recipe, mode)
    diag = _ForwardDiagnostics(q.device) if diagnostics else None
    outs: dict[str, list[torch.Tensor]] = {"o": [], "o_hp": [], "m": [], "l": []}
    for r0, r1 in lay.row_blocks():
        q_blk = ops.q_hat[:, :, r0:r1]
        m_final = _row_max(q_blk, ops.k_hat, lay, tau, r0, r1) if final_max else None
        shape = q_blk.shape[:-1]
        m_run = torch.full(shape, NEG_INF, dtype=acc_dtype, device=q.device)
        l = torch.zeros(shape, dtype=acc_dtype, device=q.device)
        l_tilde = torch.zeros_like(l)
        acc = torch.zeros(*shape, d, dtype=acc_dtype, device=q.device)
        acc_hp = torch.zeros_like(acc)
        for c0, c1 in lay.chunks(r1):
            vis = lay.visible(r0, r1, c0, c1, q.device)
            s = _scores(q_blk, _key_slice(ops.k_hat, h, c0, c1), tau, vis)
            tp = _forward_tiles(s, recipe, m_run, m_final)
            m_new = tp.m_tiles[..., -1]
            alpha = _rescale(m_run, m_new)
            # every tile rescaled to the running max, as a flash kernel's accumulators
            w = _rescale(tp.m_tiles, m_new.unsqueeze(-1)).unsqueeze(-1)
            v_chunk = _key_slice(ops.v_hat, h, c0, c1)
            pt_t = tp.p_tilde_t
            l = l * alpha + (tp.p_t.sum(dim=-1) * w.squeeze(-1)).sum(dim=-1)
            l_tilde = l_tilde * alpha + (pt_t.sum(dim=-1) * w.squeeze(-1)).sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + (pt_t * w).reshape(s.shape) @ v_chunk
            acc_hp = acc_hp * alpha.unsqueeze(-1) + (tp.p_t * w).reshape(s.shape) @ v_chunk
            m_run = m_new
        if m_final is not None:
            m_run = m_final
        outs["o"].append(safe_divide_rows(acc, l))
        outs["o_hp"].append(safe_divide_rows(acc_hp, l))
        outs["m"].append(m_run)
        outs["l"].append(l)
        if diag is not None:
            diag.kept_fwd.append(_mass_ratio(l_tilde, l))
            if recipe.p is not None:
                _diagnostic_pass(diag, q_blk, ops, lay, recipe, tau, r0, r1, m_final,
                                 log_sum_exp(m_run, l), m_run, l)
    o, o_hp, m_all, l_all = (torch.cat(outs[n], dim=2) for n in ("o", "o_hp", "m", "l"))
    return ForwardResult(
        o=o, o_hp=o_hp, lse=log_sum_exp(m_all, l_all), m=m_all, l=l_all,
        q_hat=ops.q_hat, k_hat=ops.k_hat, v_hat=ops.v_hat, p_codes=None,
        diagnostics=None if diag is None else diag.result(ops, recipe.p is not None),
        recipe=recipe, mode=mode, causal=causal, sm_scale=tau,
    )


def _diagnostic_pass(diag, q_blk, ops, lay, recipe, tau, r0, r1, m_final, lse, m, l) -> None:
    """Second pass over one row block: the forward's tile codes (recomputed with its running
    max) against the backward's (from the final LSE), and the backward's P mass kept."""
    shape = q_blk.shape[:-1]
    m_run = torch.full(shape, NEG_INF, dtype=q_blk.dtype, device=q_blk.device)
    sum_p = torch.zeros(shape, dtype=q_blk.dtype, device=q_blk.device)
    sum_pt = torch.zeros_like(sum_p)
    for c0, c1 in lay.chunks(r1):
        vis = lay.visible(r0, r1, c0, c1, q_blk.device)
        s = _scores(q_blk, _key_slice(ops.k_hat, lay.h, c0, c1), tau, vis)
        tp = _forward_tiles(s, recipe, m_run, m_final)
        m_run = tp.m_tiles[..., -1]
        bwd = softmax_backward(s, lse, m, l, recipe)
        sum_p += bwd.p.sum(dim=-1)
        sum_pt += bwd.p_tilde.sum(dim=-1)
        diag.add_block(tp.pq, bwd.pq, vis.expand(s.shape))
    diag.kept_bwd.append(_mass_ratio(sum_pt, sum_p))


# ---------------------------------------------------------------------------------------
# exact attention (unquantized; the "exact" variant and the float64 ground truth)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamingGrads:
    """dq (B, H, Lq, d), dk, dv (B, Hkv, Lk, d) and ``ds_rowsum`` = rowsum(dS) (B, H, Lq)
    (the D-identity residual, docs/attention-math.md "The D identity")."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    ds_rowsum: torch.Tensor


@dataclass(frozen=True)
class ExactResult:
    """Exact attention O (B, H, Lq, d), its LSE (B, H, Lq), D = rowsum(dO * O) and the grads."""

    o: torch.Tensor
    lse: torch.Tensor
    d: torch.Tensor | None
    grads: StreamingGrads | None


def _online_rows(q_blk, k_src, v_src, lay: _Layout, tau: float, r0: int, r1: int):
    """Unquantized online softmax of one row block: (O, LSE)."""
    shape = q_blk.shape[:-1]
    m = torch.full(shape, NEG_INF, dtype=q_blk.dtype, device=q_blk.device)
    l = torch.zeros(shape, dtype=q_blk.dtype, device=q_blk.device)
    acc = torch.zeros(*shape, v_src.shape[-1], dtype=q_blk.dtype, device=q_blk.device)
    for c0, c1 in lay.chunks(r1):
        vis = lay.visible(r0, r1, c0, c1, q_blk.device)
        s = _scores(q_blk, _key_slice(k_src, lay.h, c0, c1), tau, vis)
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = _rescale(m, m_new)
        e = torch.exp(s - _finite_or_zero(m_new).unsqueeze(-1))
        l = l * alpha + e.sum(dim=-1)
        acc = acc * alpha.unsqueeze(-1) + e @ _key_slice(v_src, lay.h, c0, c1)
        m = m_new
    return safe_divide_rows(acc, l), log_sum_exp(m, l)


def streaming_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor | None = None,
    causal: bool = False,
    sm_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    keys: int = 512,
    rows: int = 256,
) -> ExactResult:
    """``attention_exact`` (softmax(tau Q K^T) V in ``dtype``) and, given ``do``, the gradient
    autograd gives it, by the two FlashAttention passes. ``grads`` is None without ``do``."""
    _, h, hkv, lq, lk, d = check_attention_inputs(q, k, v, nan_policy="propagate")
    tau = default_sm_scale(d, sm_scale)
    lay = _Layout(h, lq, lk, padded_length(lk, 1), causal, 1, Blocking(rows, keys))
    q_, k_, v_ = (t.to(dtype) for t in (q, k, v))
    do_ = None if do is None else do.to(dtype)
    o_parts, lse_parts = [], []
    for r0, r1 in lay.row_blocks():
        o_blk, lse_blk = _online_rows(q_[:, :, r0:r1], k_, v_, lay, tau, r0, r1)
        o_parts.append(o_blk)
        lse_parts.append(lse_blk)
    o, lse = torch.cat(o_parts, dim=2), torch.cat(lse_parts, dim=2)
    if do_ is None:
        return ExactResult(o, lse, None, None)
    d_row = (do_ * o).sum(dim=-1)
    src = _GradSources(q_, k_, v_, lse, d_row, None)
    grads = _gradient_pass({"exact": src}, do_, lay, None, tau, hkv, None)["exact"]
    return ExactResult(o, lse, d_row, grads)


# ---------------------------------------------------------------------------------------
# backward variants
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GradSources:
    """What one variant's dS = P * (dP - D) and dV = P_dV^T dO read: S from ``q``, ``k``
    (accum dtype), dP from ``v``, P = exp(S - ``lse``), D = ``d_row``; ``p_dv`` names the P
    of dV (None: P itself; 'bwd': the backward's P~; 'fwd': the forward's effective P~)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lse: torch.Tensor
    d_row: torch.Tensor
    p_dv: str | None


def _variant_sources(variant: str, fwd, q, k, v, do_a, acc, lay, tau) -> _GradSources:
    """docs/attention-math.md "Backward variants" table, one row per variant."""
    if variant == "exact":
        q_, k_, v_ = q.to(acc), k.to(acc), v.to(acc)
        parts = [_online_rows(q_[:, :, r0:r1], k_, v_, lay, tau, r0, r1)
                 for r0, r1 in lay.row_blocks()]
        o_ref = torch.cat([p[0] for p in parts], dim=2)
        lse = torch.cat([p[1] for p in parts], dim=2)
        return _GradSources(q_, k_, v_, lse, (do_a * o_ref).sum(dim=-1), None)
    if variant == "drop_in":
        # the FP4 forward's LSE and O on the unquantized operands
        return _GradSources(q.to(acc), k.to(acc), v.to(acc), fwd.lse,
                            (do_a * fwd.o).sum(dim=-1), None)
    o_for_d = fwd.o if variant == "o_only" else fwd.o_hp  # principle (2): D from O_hp
    p_dv = {"p_only": None, "o_only": "bwd", "attn_qat": "bwd", "ste_autograd": "fwd"}[variant]
    return _GradSources(fwd.q_hat, fwd.k_hat, fwd.v_hat, fwd.lse,
                        (do_a * o_for_d).sum(dim=-1), p_dv)


def _gradient_pass(
    sources: dict[str, _GradSources], do_a, lay: _Layout, recipe: Recipe | None, tau: float,
    hkv: int, fwd,
) -> dict[str, StreamingGrads]:
    """All variants' gradients in one walk; slices shared by variants are computed once."""
    b, _, _, d = do_a.shape
    dev, dt = do_a.device, do_a.dtype
    dk = {n: torch.zeros(b, lay.h, lay.lk_pad, d, dtype=dt, device=dev) for n in sources}
    dv = {n: torch.zeros(b, lay.h, lay.lk_pad, d, dtype=dt, device=dev) for n in sources}
    dq_parts: dict[str, list[torch.Tensor]] = {n: [] for n in sources}
    rs_parts: dict[str, list[torch.Tensor]] = {n: [] for n in sources}
    final_max = fwd is not None and _uses_final_max(recipe, getattr(fwd, "mode", "tiled"))
    for r0, r1 in lay.row_blocks():
        do_blk = do_a[:, :, r0:r1]
        dq = {n: torch.zeros_like(do_blk) for n in sources}
        rs = {n: torch.zeros(do_blk.shape[:-1], dtype=dt, device=dev) for n in sources}
        m_run = None if fwd is None else torch.full_like(rs[next(iter(sources))], NEG_INF)
        m_fin = None if fwd is None else fwd.m[:, :, r0:r1]
        for c0, c1 in lay.chunks(r1):
            vis = lay.visible(r0, r1, c0, c1, dev)
            cache: dict = {}
            for name, src in sources.items():
                key = (id(src.q), id(src.k))
                if key not in cache:
                    cache[key] = _scores(src.q[:, :, r0:r1], _key_slice(src.k, lay.h, c0, c1),
                                         tau, vis)
                s = cache[key]
                lse = src.lse[:, :, r0:r1]
                if src.p_dv == "bwd":
                    bkey = ("sb", key)
                    if bkey not in cache:
                        cache[bkey] = softmax_backward(s, lse, m_fin, fwd.l[:, :, r0:r1], recipe)
                    sb = cache[bkey]
                    p, p_dv = sb.p, sb.p_tilde
                else:
                    pkey = ("p", key, id(src.lse))
                    if pkey not in cache:
                        cache[pkey] = normalized_p(s, lse)
                    p = p_dv = cache[pkey]
                if src.p_dv == "fwd":
                    # the forward's effective P~ / l, its tiles against the forward's max
                    if "fwd" not in cache:
                        tp = _forward_tiles(s, recipe, m_run, m_fin if final_max else None)
                        w = _rescale(tp.m_tiles, m_fin.unsqueeze(-1)).unsqueeze(-1)
                        cache["fwd"] = safe_divide_rows((tp.p_tilde_t * w).reshape(s.shape),
                                                        fwd.l[:, :, r0:r1])
                        cache["m_next"] = tp.m_tiles[..., -1]
                    p_dv = cache["fwd"]
                v_chunk = _key_slice(src.v, lay.h, c0, c1)
                dp = do_blk @ v_chunk.transpose(-1, -2)
                ds = p * (dp - src.d_row[:, :, r0:r1].unsqueeze(-1))  # FlashAttention dS
                rs[name] += ds.sum(dim=-1)
                dq[name] += tau * (ds @ _key_slice(src.k, lay.h, c0, c1))
                dk[name][:, :, c0:c1] += tau * (ds.transpose(-1, -2) @ src.q[:, :, r0:r1])
                dv[name][:, :, c0:c1] += p_dv.transpose(-1, -2) @ do_blk
            if "m_next" in cache:  # the forward's running max after this chunk
                m_run = cache["m_next"]
        for n in sources:
            dq_parts[n].append(dq[n])
            rs_parts[n].append(rs[n])
    return {
        n: StreamingGrads(
            torch.cat(dq_parts[n], dim=2),
            reduce_kv(dk[n][..., : lay.lk, :], hkv),
            reduce_kv(dv[n][..., : lay.lk, :], hkv),
            torch.cat(rs_parts[n], dim=2),
        )
        for n in sources
    }


def streaming_backward(
    variants: Sequence[str],
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: str | Recipe,
    causal: bool = False,
    sm_scale: float | None = None,
    blocking: Blocking | None = None,
) -> dict[str, StreamingGrads]:
    """Gradients of several backward variants in one streamed walk (``attention_backward``'s
    arguments; ``fwd`` from ``streaming_forward`` or ``fp4_attention_forward``)."""
    recipe = get_recipe(recipe)
    variants = list(dict.fromkeys(variants))
    for variant in variants:
        _check(variant, fwd, q, do, causal)
    _check_matches_forward(fwd, recipe, q, k)
    _, h, hkv, lq, lk, d = check_attention_inputs(q, k, v, nan_policy="propagate")
    tau = _resolve_sm_scale(fwd, d, sm_scale)
    acc = fwd.o.dtype
    lay = _layout(q, k, recipe, causal, blocking)
    do_a = do.to(acc)
    out: dict[str, StreamingGrads] = {}
    if "ste_tiled" in variants:
        dq, dk, dv = streaming_ste_tiled(q, k, v, do, recipe, causal, tau, acc, lay.blocking.rows)
        out["ste_tiled"] = StreamingGrads(dq, dk, dv, torch.full_like(fwd.lse, math.nan))
    sources = {n: _variant_sources(n, fwd, q, k, v, do_a, acc, lay, tau)
               for n in variants if n != "ste_tiled"}
    if sources:
        out.update(_gradient_pass(sources, do_a, lay, recipe, tau, hkv, fwd))
    return {n: out[n] for n in variants}


def streaming_attention_backward(
    variant: str,
    fwd,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: str | Recipe,
    causal: bool = False,
    sm_scale: float | None = None,
    blocking: Blocking | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one variant, as ``reference.attention_backward``."""
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"unknown backward variant {variant!r}; valid: {BACKWARD_VARIANTS}")
    g = streaming_backward([variant], fwd, q, k, v, do, recipe, causal, sm_scale, blocking)
    return g[variant].dq, g[variant].dk, g[variant].dv


# ---------------------------------------------------------------------------------------
# ste_tiled on row blocks
# ---------------------------------------------------------------------------------------


def _fixed_tensor_scale(spec: QuantSpec | None, tq) -> QuantSpec | None:
    """An 'amax' tensor scale frozen at the whole tensor's value, so that a row block is
    quantized as the whole tensor is (docs/numerics.md NVFP4: one scale per tensor)."""
    if spec is None or spec.tensor_scale != "amax":
        return spec
    return dataclasses.replace(spec, tensor_scale=float(tq.tensor_scale))


def streaming_ste_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    recipe: Recipe,
    causal: bool,
    tau: float,
    acc: torch.dtype,
    rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ste_tiled`` gradients: ``reference.ste_tiled.ste_tiled_grads`` per row block.

    Each query row's loop is independent of the others, so the row blocks' dQ are the rows
    of the whole and their dK, dV sum. Memory: O(rows x Lk) per block (the autograd graph of
    the tile loop), not O(rows x keys). Causal blocks see keys [0, kend) with kend = r1 + Lk
    - Lq rounded up to a tile; ``kend - (r1 - r0)`` must equal the block's causal offset
    ``r0 + Lk - Lq``, so zero query rows with dO = 0 (no gradient) are appended for the
    rounding. Tensor scales ('amax') are frozen at the whole tensors' values.
    """
    if rows <= 0 or rows % recipe.block_m:
        raise ValueError(f"rows={rows} must be a positive multiple of block_m={recipe.block_m}")
    lq, lk, bn = q.shape[2], k.shape[2], recipe.block_n
    ops = quantize_operands(q, k, v, recipe, acc)
    fixed = dataclasses.replace(
        recipe,
        q=_fixed_tensor_scale(recipe.q, ops.q),
        k=_fixed_tensor_scale(recipe.k, ops.k),
        v=_fixed_tensor_scale(recipe.v, ops.v),
    )
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for r0 in range(0, lq, rows):
        r1 = min(r0 + rows, lq)
        q_blk, do_blk, kend = q[:, :, r0:r1], do[:, :, r0:r1], lk
        if causal:
            last = r1 + lk - lq  # keys [0, last) are visible to the block's last row
            if last <= 0:
                continue  # no row of the block sees a key: zero gradient
            kend = min(lk, padded_length(last, bn))
            extra = kend - last  # padding rows: the sub-problem's Lq is kend - offset
            if extra:
                zeros = q_blk.new_zeros(*q_blk.shape[:2], extra, q_blk.shape[-1])
                q_blk = torch.cat([q_blk, zeros], dim=2)
                do_blk = torch.cat([do_blk, zeros.to(do.dtype)], dim=2)
        g = ste_tiled_grads(q_blk, k[:, :, :kend], v[:, :, :kend], do_blk, fixed, causal, tau,
                            acc)
        dq[:, :, r0:r1] = g[0][:, :, : r1 - r0]
        dk[:, :, :kend] += g[1]
        dv[:, :, :kend] += g[2]
    return dq, dk, dv
