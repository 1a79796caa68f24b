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
  dK, dV over row blocks (each variant keeps its own (B, Hkv, Lk, d) dK and dV).
* grouped-query heads: K and V are never copied per query head. Products with a kv head's keys
  or values treat its G query heads as extra rows (dK, dV sum over them in the product); S is
  taken one query head of each group at a time, each product shaped as the dense reference's.
  Memory: the slices and O(L) per head, not multiplied by G.
* diagnostics: the second pass over a row block (the backward's codes need the final LSE)
  reuses the forward's S and codes while a row block's S fits ``CACHE_ELEMENTS``; the sums
  are kept per row and as integers, so forwards of head ranges merge exactly
  (``streaming_forward_part``, ``merge_forward_parts``; ``reports.head_parts`` splits a
  report case over kv heads this way).
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
from fp4sim.reference.masks import check_attention_inputs
from fp4sim.reference.operands import QuantizedOperands, quantize_operands, resolve_accum_dtype
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

CACHE_ELEMENTS = 1 << 25
"""Most elements of one row block's S (B, H, rows, Lk) kept for the forward's diagnostic
pass (float32 S and uint8 codes: 160 MiB); larger row blocks recompute S and the codes."""

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
    hkv: int
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

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, R, n) -> (B, Hkv, G R, n): a kv head's G query heads as extra rows (query
        head h reads kv head h // G, ``masks.expand_kv``), so that a product with one kv
        head's keys or values needs no copy of them per query head."""
        b, _, r, n = x.shape
        return x.reshape(b, self.hkv, (self.h // self.hkv) * r, n)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``rows_of``: (B, Hkv, G R, n) -> (B, H, R, n)."""
        b, _, gr, n = x.shape
        return x.reshape(b, self.h, gr // (self.h // self.hkv), n)

    def times_keys(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (B, H, R, c) @ keys (B, Hkv, c, n) -> (B, H, R, n) (S, O, dP, dQ)."""
        return self.heads_of(self.rows_of(x) @ keys)

    def per_head(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``times_keys`` one query head of each group at a time: each head's product has the
        shape of the dense reference's per-head product, so S rounds as the dense S does on
        the cases the tests pin (and as this module did before sharing K, V); a copy of one
        slice's S, never of K."""
        group = self.h // self.hkv
        if group == 1:
            return x @ keys
        parts = [x[:, g::group] @ keys for g in range(group)]  # (B, Hkv, R, n) each
        return torch.stack(parts, dim=2).reshape(x.shape[0], self.h, x.shape[2], keys.shape[-1])

    def to_keys(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a^T b summed over each kv head's query heads: a (B, H, R, c), b (B, H, R, n) ->
        (B, Hkv, c, n) (dK, dV)."""
        return self.rows_of(a).transpose(-1, -2) @ self.rows_of(b)


def _layout(q, k, recipe: Recipe, causal: bool, blocking: Blocking | None) -> _Layout:
    if recipe.kv_splits > 1 or recipe.kv_split_keys:
        # the key chunks here carry one running max across the whole row; restarting it per
        # split would need the splits aligned to the chunks
        raise ValueError(f"the streaming reference does not model split-KV recipes "
                         f"(recipe {recipe.name!r}); use fp4_attention_forward")
    b, h, lq = q.shape[:3]
    hkv, lk = k.shape[1], k.shape[2]
    if blocking is None:
        blocking = choose_blocking(recipe, b * h, lq, lk)
    _check_blocking(blocking, recipe)
    return _Layout(h, hkv, lq, lk, padded_length(lk, recipe.block_n), causal, recipe.block_n,
                   blocking)


def _key_slice(x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Keys [c0, c1) of (B, Hkv, Lk, d), zero keys past Lk (never expanded over query heads)."""
    part = x[:, :, c0:c1]
    short = (c1 - c0) - part.shape[-2]
    return torch.nn.functional.pad(part, (0, 0, 0, short)) if short else part


def _scores(lay: _Layout, q_blk, k_chunk, tau: float, vis: torch.Tensor) -> torch.Tensor:
    s = tau * lay.per_head(q_blk, k_chunk.transpose(-1, -2))
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
        s = _scores(lay, q_blk, _key_slice(k_src, c0, c1), tau, vis)
        m = torch.maximum(m, s.amax(dim=-1))
    return m


class ForwardDiagnostics:
    """Streaming sums of every key of ``reference.diagnostics.forward_diagnostics``.

    The per-row P mass ratios are kept as (B, H, Lq) tensors and the counts as integers, so
    that parts of a problem split over heads merge (``merge``) into exactly the whole's."""

    COUNTS = ("fwd_nonzero", "fwd_flushed", "fwd_saturated", "bwd_nonzero", "bwd_flushed",
              "bwd_saturated", "mismatch", "visible")

    def __init__(self, device) -> None:
        self.kept_fwd_blocks: list[torch.Tensor] = []
        self.kept_bwd_blocks: list[torch.Tensor] = []
        self.kept_fwd: torch.Tensor | None = None
        self.kept_bwd: torch.Tensor | None = None
        self.hist = torch.zeros(FP4_CODES, dtype=torch.int64, device=device)
        self.counts = dict.fromkeys(self.COUNTS, 0)

    def add_quantized(self, prefix: str, pq: PQuantized) -> None:
        c = self.counts
        c[f"{prefix}_nonzero"] += int(pq.nonzero.sum())
        c[f"{prefix}_flushed"] += int(pq.flushed.sum())
        c[f"{prefix}_saturated"] += int(pq.saturated.sum())

    def add_codes(self, codes_fwd: torch.Tensor, codes_bwd: torch.Tensor,
                  vis: torch.Tensor) -> None:
        """Codes of one slice (B, H, rows, keys); ``vis`` (rows, keys) broadcasts over them."""
        hidden = ~vis
        # hidden entries counted in an extra bin (a boolean-mask gather costs far more)
        marked = codes_fwd.masked_fill(hidden, FP4_CODES).reshape(-1).long()
        self.hist += torch.bincount(marked, minlength=FP4_CODES + 1)[:FP4_CODES]
        self.counts["mismatch"] += int((codes_fwd != codes_bwd).masked_fill(hidden, False).sum())
        self.counts["visible"] += int(vis.sum()) * (codes_fwd.numel() // vis.numel())

    def close(self) -> None:
        """Row blocks -> (B, H, Lq) tensors (called once the forward has walked every row)."""
        if self.kept_fwd_blocks:
            self.kept_fwd = torch.cat(self.kept_fwd_blocks, dim=2)
        if self.kept_bwd_blocks:
            self.kept_bwd = torch.cat(self.kept_bwd_blocks, dim=2)
        self.kept_fwd_blocks, self.kept_bwd_blocks = [], []

    @classmethod
    def merge(cls, parts: Sequence[ForwardDiagnostics]) -> ForwardDiagnostics:
        """Parts over consecutive head ranges (in head order) as one: ratios concatenated
        along heads, counts summed (integers: exact)."""
        out = cls(parts[0].hist.device)
        for part in parts:
            out.hist += part.hist
            for key in cls.COUNTS:
                out.counts[key] += part.counts[key]
        for name in ("kept_fwd", "kept_bwd"):
            kept = [getattr(p, name) for p in parts]
            if all(x is not None for x in kept):
                setattr(out, name, torch.cat(kept, dim=1))
        return out

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
        assert self.kept_fwd is not None
        kept = self.kept_fwd.reshape(-1)  # (B, H, Lq) order, as the dense diagnostics
        out["p_mass_kept_fwd"] = float(kept.nanmean())
        out["p_mass_kept_fwd_row_min"] = _row_min(kept)
        if not quantized_p:
            return out
        c = self.counts
        out["p_code_histogram"] = self.hist.tolist()
        out.update(_block_stats("p_fwd", c["fwd_nonzero"], c["fwd_flushed"], c["fwd_saturated"]))
        assert self.kept_bwd is not None
        kept_b = self.kept_bwd.reshape(-1)
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


@dataclass
class ForwardPart:
    """A streamed forward before its diagnostics are summarized: ``result`` (its
    ``diagnostics`` None) and the raw sums (None without diagnostics); see
    ``merge_forward_parts``."""

    result: ForwardResult
    diagnostics: ForwardDiagnostics | None
    ops: QuantizedOperands | None = None
    """The part's quantized operands (dropped before a part travels between processes)."""


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
    part = streaming_forward_part(q, k, v, recipe, causal, sm_scale, mode, accum_dtype,
                                  diagnostics, blocking)
    assert part.ops is not None
    return merge_forward_parts([part], part.ops)


def streaming_forward_part(
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
) -> ForwardPart:
    """``streaming_forward`` with its diagnostics left as mergeable sums."""
    recipe = get_recipe(recipe)
    if mode not in ("tiled", "dense"):
        raise ValueError(f"mode must be 'tiled' or 'dense', got {mode!r}")
    _, _, _, _, _, d = check_attention_inputs(q, k, v, recipe.nan_policy)
    acc_dtype = resolve_accum_dtype(accum_dtype, q)
    tau = default_sm_scale(d, sm_scale)
    ops = quantize_operands(q, k, v, recipe, acc_dtype)
    lay = _layout(q, k, recipe, causal, blocking)
    final_max = _uses_final_max(recipe, mode)
    diag = ForwardDiagnostics(q.device) if diagnostics else None
    quantized_p = recipe.p is not None
    # the diagnostic pass reuses the forward's S and codes when a row block's fit the cache
    cache_ok = diag is not None and quantized_p and (
        q.shape[0] * lay.h * lay.blocking.rows * lay.lk_pad <= CACHE_ELEMENTS)
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
        cached: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for c0, c1 in lay.chunks(r1):
            vis = lay.visible(r0, r1, c0, c1, q.device)
            s = _scores(lay, q_blk, _key_slice(ops.k_hat, c0, c1), tau, vis)
            tp = _forward_tiles(s, recipe, m_run, m_final)
            m_new = tp.m_tiles[..., -1]
            alpha = _rescale(m_run, m_new)
            # every tile rescaled to the running max, as a flash kernel's accumulators
            w = _rescale(tp.m_tiles, m_new.unsqueeze(-1))
            v_chunk = _key_slice(ops.v_hat, c0, c1)
            pt_t = tp.p_tilde_t
            l = l * alpha + (tp.p_t.sum(dim=-1) * w).sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + lay.times_keys(
                (pt_t * w.unsqueeze(-1)).reshape(s.shape), v_chunk)
            if quantized_p:
                l_tilde = l_tilde * alpha + (pt_t.sum(dim=-1) * w).sum(dim=-1)
                acc_hp = acc_hp * alpha.unsqueeze(-1) + lay.times_keys(
                    (tp.p_t * w.unsqueeze(-1)).reshape(s.shape), v_chunk)
            if cache_ok:
                assert diag is not None and tp.pq is not None
                diag.add_quantized("fwd", tp.pq)
                cached.append((s, tp.pq.codes.reshape(s.shape), vis))
            m_run = m_new
        if not quantized_p:  # P~ = P: the same sums
            l_tilde, acc_hp = l, acc
        if m_final is not None:
            m_run = m_final
        outs["o"].append(safe_divide_rows(acc, l))
        outs["o_hp"].append(safe_divide_rows(acc_hp, l))
        outs["m"].append(m_run)
        outs["l"].append(l)
        if diag is not None:
            diag.kept_fwd_blocks.append(_mass_ratio(l_tilde, l))
            if quantized_p:
                lse = log_sum_exp(m_run, l)
                slices = cached if cache_ok else _recomputed_forward_codes(
                    diag, q_blk, ops, lay, recipe, tau, r0, r1, m_final)
                _diagnostic_pass(diag, slices, recipe, lse, m_run, l)
    o, o_hp, m_all, l_all = (torch.cat(outs[n], dim=2) for n in ("o", "o_hp", "m", "l"))
    if diag is not None:
        diag.close()
    result = ForwardResult(
        o=o, o_hp=o_hp, lse=log_sum_exp(m_all, l_all), m=m_all, l=l_all,
        q_hat=ops.q_hat, k_hat=ops.k_hat, v_hat=ops.v_hat, p_codes=None, diagnostics=None,
        recipe=recipe, mode=mode, causal=causal, sm_scale=tau,
    )
    return ForwardPart(result, diag, ops)


def merge_forward_parts(parts: Sequence[ForwardPart], ops: QuantizedOperands) -> ForwardResult:
    """Forward parts over consecutive kv-head ranges (in order; each part all the query
    heads of its kv heads) as one ``ForwardResult``: tensors concatenated along heads,
    diagnostics summarized from the merged sums; ``ops`` the whole problem's quantized
    operands (their code histograms). One part: its own result, summarized."""
    first = parts[0].result
    if len(parts) == 1:
        merged = first
    else:
        fields = ("o", "o_hp", "lse", "m", "l", "q_hat", "k_hat", "v_hat")
        merged = dataclasses.replace(first, **{
            f: torch.cat([getattr(p.result, f) for p in parts], dim=1) for f in fields})
    raw = [p.diagnostics for p in parts]
    if any(r is None for r in raw):
        return merged
    diag = raw[0] if len(raw) == 1 else ForwardDiagnostics.merge(raw)  # type: ignore[arg-type]
    assert diag is not None and first.recipe is not None
    return dataclasses.replace(merged, diagnostics=diag.result(ops, first.recipe.p is not None))


def _recomputed_forward_codes(diag, q_blk, ops, lay, recipe, tau, r0, r1, m_final
                              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(S, forward codes, visible) of each chunk of a row block, recomputed with the forward's
    running max (when the row block's S did not fit the cache)."""
    shape = q_blk.shape[:-1]
    m_run = torch.full(shape, NEG_INF, dtype=q_blk.dtype, device=q_blk.device)
    for c0, c1 in lay.chunks(r1):
        vis = lay.visible(r0, r1, c0, c1, q_blk.device)
        s = _scores(lay, q_blk, _key_slice(ops.k_hat, c0, c1), tau, vis)
        tp = _forward_tiles(s, recipe, m_run, m_final)
        m_run = tp.m_tiles[..., -1]
        diag.add_quantized("fwd", tp.pq)
        yield s, tp.pq.codes.reshape(s.shape), vis


def _diagnostic_pass(diag, slices, recipe, lse, m, l) -> None:
    """Second pass over one row block: the forward's tile codes against the backward's (from
    the final LSE), and the backward's P mass kept."""
    sum_p = torch.zeros_like(l)
    sum_pt = torch.zeros_like(l)
    for s, codes_fwd, vis in slices:
        bwd = softmax_backward(s, lse, m, l, recipe)
        sum_p += bwd.p.sum(dim=-1)
        sum_pt += bwd.p_tilde.sum(dim=-1)
        diag.add_quantized("bwd", bwd.pq)
        diag.add_codes(codes_fwd, bwd.pq.codes.reshape(s.shape), vis)
    diag.kept_bwd_blocks.append(_mass_ratio(sum_pt, sum_p))


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


def merge_grads(parts: Sequence[StreamingGrads]) -> StreamingGrads:
    """Gradients of parts over consecutive kv-head ranges, concatenated along heads."""
    if len(parts) == 1:
        return parts[0]
    return StreamingGrads(*(torch.cat([getattr(p, f.name) for p in parts], dim=1)
                            for f in dataclasses.fields(StreamingGrads)))


@dataclass(frozen=True)
class ExactResult:
    """Exact attention O (B, H, Lq, d), its LSE (B, H, Lq), D = rowsum(dO * O) and the grads."""

    o: torch.Tensor
    lse: torch.Tensor
    d: torch.Tensor | None
    grads: StreamingGrads | None


def merge_exact(parts: Sequence[ExactResult]) -> ExactResult:
    """Exact results of parts over consecutive kv-head ranges, concatenated along heads."""
    if len(parts) == 1:
        return parts[0]
    d = None if parts[0].d is None else torch.cat([p.d for p in parts], dim=1)
    grads = None if parts[0].grads is None else merge_grads([p.grads for p in parts])
    return ExactResult(torch.cat([p.o for p in parts], dim=1),
                       torch.cat([p.lse for p in parts], dim=1), d, grads)


def _online_rows(q_blk, k_src, v_src, lay: _Layout, tau: float, r0: int, r1: int):
    """Unquantized online softmax of one row block: (O, LSE)."""
    shape = q_blk.shape[:-1]
    m = torch.full(shape, NEG_INF, dtype=q_blk.dtype, device=q_blk.device)
    l = torch.zeros(shape, dtype=q_blk.dtype, device=q_blk.device)
    acc = torch.zeros(*shape, v_src.shape[-1], dtype=q_blk.dtype, device=q_blk.device)
    for c0, c1 in lay.chunks(r1):
        vis = lay.visible(r0, r1, c0, c1, q_blk.device)
        s = _scores(lay, q_blk, _key_slice(k_src, c0, c1), tau, vis)
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = _rescale(m, m_new)
        e = torch.exp(s - _finite_or_zero(m_new).unsqueeze(-1))
        l = l * alpha + e.sum(dim=-1)
        acc = acc * alpha.unsqueeze(-1) + lay.times_keys(e, _key_slice(v_src, c0, c1))
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
    keys: int = 2048,
    rows: int = 256,
) -> ExactResult:
    """``attention_exact`` (softmax(tau Q K^T) V in ``dtype``) and, given ``do``, the gradient
    autograd gives it, by the two FlashAttention passes. ``grads`` is None without ``do``."""
    _, h, hkv, lq, lk, d = check_attention_inputs(q, k, v, nan_policy="propagate")
    tau = default_sm_scale(d, sm_scale)
    lay = _Layout(h, hkv, lq, lk, padded_length(lk, 1), causal, 1, Blocking(rows, keys))
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
    grads = _gradient_pass({"exact": src}, do_, lay, None, tau, None)["exact"]
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
    fwd,
) -> dict[str, StreamingGrads]:
    """All variants' gradients in one walk; slices shared by variants (S, P, P~, dP) are
    computed once. dK, dV accumulate per kv head (the group's query heads as extra rows)."""
    b, _, _, d = do_a.shape
    dev, dt = do_a.device, do_a.dtype
    dk = {n: torch.zeros(b, lay.hkv, lay.lk_pad, d, dtype=dt, device=dev) for n in sources}
    dv = {n: torch.zeros(b, lay.hkv, lay.lk_pad, d, dtype=dt, device=dev) for n in sources}
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
                k_chunk = _key_slice(src.k, c0, c1)
                if key not in cache:
                    cache[key] = _scores(lay, src.q[:, :, r0:r1], k_chunk, tau, vis)
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
                dkey = ("dp", id(src.v))
                if dkey not in cache:
                    v_t = _key_slice(src.v, c0, c1).transpose(-1, -2)
                    cache[dkey] = lay.times_keys(do_blk, v_t)
                ds = p * (cache[dkey] - src.d_row[:, :, r0:r1].unsqueeze(-1))  # FlashAttention dS
                rs[name] += ds.sum(dim=-1)
                dq[name] += tau * lay.times_keys(ds, k_chunk)
                dk[name][:, :, c0:c1] += tau * lay.to_keys(ds, src.q[:, :, r0:r1])
                dv[name][:, :, c0:c1] += lay.to_keys(p_dv, do_blk)
            if "m_next" in cache:  # the forward's running max after this chunk
                m_run = cache["m_next"]
        for n in sources:
            dq_parts[n].append(dq[n])
            rs_parts[n].append(rs[n])
    return {
        n: StreamingGrads(
            torch.cat(dq_parts[n], dim=2),
            dk[n][..., : lay.lk, :],
            dv[n][..., : lay.lk, :],
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
    _, _, _, _, _, d = check_attention_inputs(q, k, v, nan_policy="propagate")
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
        out.update(_gradient_pass(sources, do_a, lay, recipe, tau, fwd))
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


def frozen_tensor_scales(recipe: Recipe, ops: QuantizedOperands) -> Recipe:
    """``recipe`` with its 'amax' operand tensor scales frozen at the values of ``ops`` (the
    whole tensors'), so that any part of the operands (rows, heads) quantizes as the whole."""
    return dataclasses.replace(
        recipe,
        q=_fixed_tensor_scale(recipe.q, ops.q),
        k=_fixed_tensor_scale(recipe.k, ops.k),
        v=_fixed_tensor_scale(recipe.v, ops.v),
    )


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
    rounding. Tensor scales ('amax') are frozen at the whole tensors' values. Grouped-query
    heads run one query head of each group at a time (``ste_tiled_grads`` would expand K, V
    over the group), their dK, dV summed in head order.
    """
    if rows <= 0 or rows % recipe.block_m:
        raise ValueError(f"rows={rows} must be a positive multiple of block_m={recipe.block_m}")
    lq, lk, bn = q.shape[2], k.shape[2], recipe.block_n
    group = q.shape[1] // k.shape[1]
    fixed = frozen_tensor_scales(recipe, quantize_operands(q, k, v, recipe, acc))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for r0 in range(0, lq, rows):
        r1 = min(r0 + rows, lq)
        kend, extra = lk, 0
        if causal:
            last = r1 + lk - lq  # keys [0, last) are visible to the block's last row
            if last <= 0:
                continue  # no row of the block sees a key: zero gradient
            kend = min(lk, padded_length(last, bn))
            extra = kend - last  # padding rows: the sub-problem's Lq is kend - offset
        for g in range(group):
            heads = slice(g, None, group)  # query head g of every kv head's group
            q_blk, do_blk = q[:, heads, r0:r1], do[:, heads, r0:r1]
            if extra:
                zeros = q_blk.new_zeros(*q_blk.shape[:2], extra, q_blk.shape[-1])
                q_blk = torch.cat([q_blk, zeros], dim=2)
                do_blk = torch.cat([do_blk, zeros.to(do.dtype)], dim=2)
            gr = ste_tiled_grads(q_blk, k[:, :, :kend], v[:, :, :kend], do_blk, fixed, causal,
                                 tau, acc)
            dq[:, heads, r0:r1] = gr[0][:, :, : r1 - r0]
            dk[:, :, :kend] += gr[1]
            dv[:, :, :kend] += gr[2]
    return dq, dk, dv
