"""A small, configurable FP4 attention (forward + explicit backward, float64 accumulation)
whose knobs are the deviations a kernel may make from its recipe.

With ``faithful(recipe)`` knobs it computes exactly what ``fp4sim.reference`` computes (the
same float64 operations in the same order, the same float32 quantization decisions:
property_tests/test_diagnosis_deviant.py). Each hypothesis of the diagnosis engine changes
one knob. The formulas follow docs/attention-math.md ("Forward" steps 1-4, "Backward variants"):

    S = tau Q^ K^T (masked),  P_j = exp(S_j - m_j) per key tile with running max m_j,
    l = sum_j exp(m_j - m) rowsum(P_j),  O = sum_j exp(m_j - m) P~_j V^ / l,  O_hp likewise
    from P;  backward: P = exp(S - LSE), P~ = FQ(P), dV = P~^T dO, dP = dO V^T,
    D = rowsum(dO o O_hp), dS = P (dP - D), dQ = tau dS K^, dK = tau dS^T Q^.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from fp4sim.judge.diagnosis.fake_quant import QuantKnobs, fake_quantize, knobs_from_spec

_SAME = "same"  # a backward operand knob equal to the forward's


@dataclass(frozen=True)
class Knobs:
    """Every deviation the engine can express; the defaults of ``faithful(recipe)`` are the
    recipe itself. Operand knobs are ``QuantKnobs`` or None (not quantized)."""

    # operand quantization, forward
    q: QuantKnobs | None = None
    k: QuantKnobs | None = None
    v: QuantKnobs | None = None
    p: QuantKnobs | None = None
    # operand quantization at each backward product (_SAME: as in the forward)
    q_for_s: Any = _SAME  # Q in the recomputed S
    k_for_s: Any = _SAME
    v_for_dp: Any = _SAME  # V in dP = dO V^T
    k_for_dq: Any = _SAME  # K in dQ = dS K
    q_for_dk: Any = _SAME  # Q in dK = dS^T Q
    p_for_dv: Any = _SAME  # the backward's P quantizer (for dV)
    do_for_dv: QuantKnobs | None = None  # dO quantized in dV = P~^T dO
    do_for_dp: QuantKnobs | None = None  # dO quantized in dP
    ds_for_dqk: QuantKnobs | None = None  # dS quantized in dQ, dK
    # softmax and P
    p_max: str = "running"  # running (tile-wise online max) | final (second pass)
    p_max_bwd: str | None = None  # the backward's P~ policy (None: as p_max)
    block_n: int = 64  # key tile width (sets the running max and the key padding)
    # split-KV (flash-decoding): the key tiles cut into contiguous splits, each starting its
    # own running max (the P~ of a tile is quantized against its split's max), then merged
    # exactly: kv_splits splits of ceil(tiles / kv_splits) tiles, or splits of kv_split_tiles
    kv_splits: int = 0
    kv_split_tiles: int = 0
    p_norm: str = "after"  # after: O = P~ V / l | before: O = FQ(exp(S - LSE)) V
    l_from: str = "hp"  # hp | tilde: l sums the quantized P~
    o_from: str = "tilde"  # tilde | hp: O from the unquantized P
    o_hp_from: str = "hp"  # hp | tilde
    rescale: str = "ok"  # ok | no_acc | no_acc_hp | no_l: not rescaled by exp(m_j - m)
    dv_from: str = "tilde"  # tilde (backward P~) | hp (P) | tilde_fwd (forward's P~ / l)
    ds_from: str = "hp"  # dS = P (dP - D) with hp: P | tilde: the backward's P~
    d_from: str = "o_hp"  # o_hp | o (the quantized output)
    # masks
    causal_flip: bool = False  # the causal flag ignored / applied
    mask_align: str = "bottom_right"  # bottom_right | top_left
    mask_offset: int = 0  # query i sees key j iff j <= i + shift + offset
    # the backward's mask (None: as the forward's knobs above)
    bwd_causal_flip: bool | None = None
    bwd_mask_align: str | None = None
    bwd_mask_offset: int | None = None
    pad_keys: str = "masked"  # masked | softmax (zero keys visible) | p_scale (in P amax)
    pad_to: int = 16  # the kernel's key block for pad_keys
    p_tail: str = "quantized"  # unquantized: a partial last 16-key P block kept in high precision
    bwd_tail_tile: str = "ok"  # dropped: the backward skips the last partial key tile
    # grouped-query heads
    head_map: str = "interleave"  # interleave: h // group | modulo: h % Hkv
    head_map_bwd: str | None = None  # the backward's head map (None: as head_map)
    dkv_reduce: str = "sum"  # sum | first | mean over a head group
    # factors
    s_mult: float = 1.0  # multiplies tau in the forward scores
    s_mult_bwd: float | None = None  # in the backward scores (None: as the forward)
    dq_mult: float = 1.0
    dk_mult: float = 1.0
    dv_mult: float = 1.0
    lse_mult: float = 1.0  # multiplies the LSE the backward reads (a base-2 LSE: log2 e)
    # intermediate rounding ('bfloat16' | 'float16' | None)
    round_s: str | None = None
    round_p: str | None = None
    round_o_hp: str | None = None
    round_acc: str | None = None  # the P~ V accumulator rounded after every key tile
    round_o: str | None = None  # the output O rounded (kept in a narrower type, returned wider)
    round_dp: str | None = None
    round_ds: str | None = None
    backward: str = "attn_qat"  # the recipe's variant (exact / drop_in handled as knobs)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def changed(self, base: Knobs) -> dict[str, Any]:
        """The knobs that differ from ``base``."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and getattr(self, f.name) != getattr(base, f.name)
        }


SUPPORTED_VARIANTS = ("attn_qat", "p_only", "o_only", "drop_in", "exact")


def faithful(recipe: Any) -> Knobs:
    """The knobs that reproduce ``recipe`` (a ``fp4sim.reference.Recipe``)."""
    if recipe.p_policy not in ("none", "block", "consistent"):
        raise NotImplementedError(f"diagnosis supports P policies none/block/consistent, not"
                                  f" {recipe.p_policy!r}")
    if recipe.backward not in SUPPORTED_VARIANTS:
        raise NotImplementedError(f"diagnosis does not model backward {recipe.backward!r}")
    kn = Knobs(
        q=knobs_from_spec(recipe.q),
        k=knobs_from_spec(recipe.k),
        v=knobs_from_spec(recipe.v, -1 if recipe.v_axis == "head_dim" else -2),
        p=knobs_from_spec(recipe.p),
        p_max="final" if recipe.p_policy == "consistent" else "running",
        block_n=recipe.block_n,
        kv_splits=recipe.kv_splits if recipe.kv_splits > 1 else 0,
        kv_split_tiles=recipe.kv_split_keys // recipe.block_n,
        backward=recipe.backward,
    )
    # the backward variants of the reference, as knobs (reference/backward.py table)
    if recipe.backward == "p_only":
        kn = replace(kn, dv_from="hp")
    elif recipe.backward == "o_only":
        kn = replace(kn, d_from="o")
    elif recipe.backward in ("drop_in", "exact"):
        kn = replace(kn, q_for_s=None, k_for_s=None, v_for_dp=None, k_for_dq=None,
                     q_for_dk=None, dv_from="hp", d_from="o")
    return kn


def _fq(x: torch.Tensor, kn: QuantKnobs | None, cache: dict | None = None,
        key: str = "") -> torch.Tensor:
    if kn is None:
        return x
    if cache is None or not key:
        return fake_quantize(x, kn).to(torch.float64)
    if (key, kn) not in cache:  # the same operand under the same knobs: quantize once
        cache[(key, kn)] = fake_quantize(x, kn).to(torch.float64)
    return cache[(key, kn)]


def _round(x: torch.Tensor, dtype: str | None) -> torch.Tensor:
    return x if dtype is None else x.to(getattr(torch, dtype)).to(x.dtype)


def _expand(x: torch.Tensor, h: int, head_map: str) -> torch.Tensor:
    group = h // x.shape[1]
    if group == 1:
        return x
    if head_map == "modulo":
        return x.repeat(1, group, 1, 1)
    return x.repeat_interleave(group, dim=1)


def _reduce(dx: torch.Tensor, hkv: int, head_map: str, how: str) -> torch.Tensor:
    b, h, n, d = dx.shape
    group = h // hkv
    if group == 1:
        return dx
    if head_map == "modulo":
        g = dx.reshape(b, group, hkv, n, d).transpose(1, 2)
    else:
        g = dx.reshape(b, hkv, group, n, d)
    if how == "first":
        return g[:, :, 0]
    if how == "mean":
        return g.mean(dim=2)
    return g.sum(dim=2)


def _visible(lq: int, lk: int, lk_pad: int, causal: bool, align: str, offset: int,
             pad_visible_to: int) -> torch.Tensor:
    j = torch.arange(lk_pad).unsqueeze(0)
    vis = (j < pad_visible_to).expand(lq, lk_pad)
    if causal:
        i = torch.arange(lq).unsqueeze(-1)
        shift = (lk - lq) if align == "bottom_right" else 0
        vis = vis & (j <= i + shift + offset)
    return vis


def _tail_keys(lk: int, lk_pad: int, block: int) -> torch.Tensor:
    """Bool (lk_pad,): the keys of a partial last ``block`` of the Lk real keys."""
    j = torch.arange(lk_pad)
    if lk % block == 0:
        return torch.zeros_like(j, dtype=torch.bool)
    return (j >= (lk // block) * block) & (j < lk)


def _finite_or(x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.full_like(x, fill))


def _divide_rows(x: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    l_e = l.unsqueeze(-1)
    empty = l_e == 0
    return torch.where(empty, 0.0, x / torch.where(empty, torch.ones_like(l_e), l_e))


def _pick(knob: Any, default: QuantKnobs | None) -> QuantKnobs | None:
    return default if knob == _SAME else knob


def _split_running_max(tile_max: torch.Tensor, n_tiles: int, splits: int,
                       split_tiles: int) -> torch.Tensor:
    """Running max over key tiles (last axis), restarting at each split's first tile: with
    ``splits`` the tiles holding keys form contiguous splits of ceil(n_tiles / splits) tiles,
    with ``split_tiles`` splits of that many tiles; neither: one pass."""
    per = split_tiles or (-(-n_tiles // splits) if splits else 0)
    if not per:
        return torch.cummax(tile_max, dim=-1).values
    parts = [torch.cummax(tile_max[..., s0:s0 + per], dim=-1).values
             for s0 in range(0, tile_max.shape[-1], per)]
    return torch.cat(parts, dim=-1)


def deviant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor | None,
    causal: bool,
    sm_scale: float | None,
    kn: Knobs,
    cache: dict | None = None,
) -> dict[str, torch.Tensor]:
    """O (and dQ, dK, dV when ``do`` is given) in float64 under knobs ``kn``.
    q (B, H, Lq, d); k, v (B, Hkv, Lk, d); any float dtype (converted to float64).
    ``cache``: a dict shared by calls on the same inputs (quantized operands are reused)."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    _, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    tau = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    causal_f = causal != kn.causal_flip
    bn = kn.block_n
    pad_cover = lk if kn.pad_keys == "masked" else -(-lk // kn.pad_to) * kn.pad_to
    lk_pad = -(-max(lk, pad_cover) // bn) * bn
    softmax_keys = pad_cover if kn.pad_keys == "softmax" else lk
    vis = _visible(lq, lk, lk_pad, causal_f, kn.mask_align, kn.mask_offset, softmax_keys)

    q_hat = _fq(q, kn.q, cache, "q")
    k_hat, v_hat = _fq(k, kn.k, cache, "k"), _fq(v, kn.v, cache, "v")

    def keys(x: torch.Tensor, head_map: str = kn.head_map) -> torch.Tensor:
        x = _expand(x, h, head_map)
        return torch.nn.functional.pad(x, (0, 0, 0, lk_pad - x.shape[-2]))

    k_pad, v_pad = keys(k_hat), keys(v_hat)
    s = (tau * kn.s_mult) * (q_hat @ k_pad.transpose(-1, -2))
    s = _round(s, kn.round_s).masked_fill(~vis, float("-inf"))
    s_t = s.reshape(*s.shape[:-1], lk_pad // bn, bn)
    tile_max = s_t.amax(dim=-1)
    m = tile_max.amax(dim=-1)
    if kn.p_max == "running":
        m_tiles = _split_running_max(tile_max, -(-lk // bn), kn.kv_splits, kn.kv_split_tiles)
    else:
        m_tiles = m.unsqueeze(-1).expand_as(tile_max)
    p_t = torch.exp(s_t - _finite_or(m_tiles, 0.0).unsqueeze(-1))
    rescale = torch.where(
        torch.isfinite(m_tiles),
        torch.exp(m_tiles - _finite_or(m, 0.0).unsqueeze(-1)),
        torch.zeros_like(m_tiles),
    ).unsqueeze(-1)
    if kn.p is None:
        pt_t = p_t
    else:
        p_in = _round(p_t, kn.round_p)  # rounded as the quantizer's input only
        if kn.pad_keys == "p_scale":  # zero padded keys (S = 0) enter the P block amax only
            padded = (torch.arange(lk_pad) >= lk).reshape(lk_pad // bn, bn)
            leak = torch.exp(-_finite_or(m_tiles, 0.0)).unsqueeze(-1).expand_as(p_t)
            p_in = torch.where(padded, leak, p_t)
        pt_flat = _fq(p_in.reshape(s.shape), kn.p).reshape(p_t.shape)
        if kn.pad_keys == "p_scale":
            pt_t = torch.where(padded, torch.zeros_like(pt_flat), pt_flat)
        else:
            pt_t = pt_flat
        if kn.p_tail == "unquantized":
            tail = _tail_keys(lk, lk_pad, 16).reshape(lk_pad // bn, bn)
            pt_t = torch.where(tail, p_t, pt_t)
    ones = torch.ones_like(rescale)
    l_rescale = ones if kn.rescale == "no_l" else rescale
    l_terms = pt_t if kn.l_from == "tilde" else p_t
    l = (l_terms.sum(dim=-1) * l_rescale.squeeze(-1)).sum(dim=-1)
    p_hp = (p_t * (ones if kn.rescale == "no_acc_hp" else rescale)).reshape(s.shape)
    p_tilde = (pt_t * (ones if kn.rescale == "no_acc" else rescale)).reshape(s.shape)
    if kn.round_acc is not None:  # acc_j = round(acc_{j-1} exp(m_{j-1} - m_j) + P~_j V_j)
        p_src = (pt_t if kn.o_from == "tilde" else p_t)
        v_t = v_pad.reshape(*v_pad.shape[:-2], lk_pad // bn, bn, v_pad.shape[-1])
        m_fin = _finite_or(m_tiles, 0.0)
        acc = torch.zeros_like(q_hat)
        for j in range(lk_pad // bn):
            if j:
                step = torch.exp(m_fin[..., j - 1] - m_fin[..., j]).unsqueeze(-1)
                acc = acc * torch.where(torch.isfinite(m_tiles[..., j - 1]).unsqueeze(-1),
                                        step, 0.0)
            acc = _round(acc + p_src[..., j, :] @ v_t[..., j, :, :], kn.round_acc)
        o = _divide_rows(acc, l)
    else:
        o = _divide_rows((p_tilde if kn.o_from == "tilde" else p_hp) @ v_pad, l)
    o_hp = _divide_rows((p_hp if kn.o_hp_from == "hp" else p_tilde) @ v_pad, l)
    empty = l == 0
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l)))
    p_bwd_kn = _pick(kn.p_for_dv, kn.p)
    if kn.p_norm == "before":  # a two-pass forward quantizes the normalized P
        p_n = torch.where(torch.isfinite(lse).unsqueeze(-1),
                          torch.exp(s - _finite_or(lse, 0.0).unsqueeze(-1)), 0.0)
        o = _fq(p_n, kn.p) @ v_pad
    out = {"O": _round(o, kn.round_o)}
    if do is None:
        return out

    # ---- backward ----
    do = do.to(torch.float64)
    tau_b = tau * (kn.s_mult if kn.s_mult_bwd is None else kn.s_mult_bwd)
    bwd_mask = (kn.bwd_causal_flip, kn.bwd_mask_align, kn.bwd_mask_offset)
    if bwd_mask == (None, None, None):
        vis_b = vis
    else:
        flip = kn.causal_flip if kn.bwd_causal_flip is None else kn.bwd_causal_flip
        vis_b = _visible(lq, lk, lk_pad, causal != flip, kn.bwd_mask_align or kn.mask_align,
                         kn.mask_offset if kn.bwd_mask_offset is None else kn.bwd_mask_offset,
                         softmax_keys)
    hm_b = kn.head_map_bwd or kn.head_map
    q_s = _fq(q, _pick(kn.q_for_s, kn.q), cache, "q")
    k_s = keys(_fq(k, _pick(kn.k_for_s, kn.k), cache, "k"), hm_b)
    s_b = tau_b * (q_s @ k_s.transpose(-1, -2))
    s_b = _round(s_b, kn.round_s).masked_fill(~vis_b, float("-inf"))
    fin = torch.isfinite(lse).unsqueeze(-1)
    lse_b = lse * kn.lse_mult
    p = torch.where(fin, torch.exp(s_b - _finite_or(lse_b, 0.0).unsqueeze(-1)), 0.0)
    if kn.dv_from == "hp" or p_bwd_kn is None:
        p_dv = p
    elif kn.dv_from == "tilde_fwd":
        p_dv = _divide_rows(p_tilde, l)
    elif (kn.p_max_bwd or kn.p_max) == "final":  # consistent: P~ = FQ(exp(S - m)) / l
        e = torch.exp(s_b - _finite_or(m, 0.0).unsqueeze(-1))
        p_dv = _divide_rows(_fq(_round(e, kn.round_p), p_bwd_kn), l)
    else:
        p_dv = _fq(_round(p, kn.round_p), p_bwd_kn)
    if kn.p_tail == "unquantized" and p_bwd_kn is not None and kn.dv_from != "hp":
        p_dv = torch.where(_tail_keys(lk, lk_pad, 16), p, p_dv)
    o_for_d = _round(o_hp if kn.d_from == "o_hp" else o, kn.round_o_hp)
    d_row = (do * o_for_d).sum(dim=-1)
    dv = p_dv.transpose(-1, -2) @ _fq(do, kn.do_for_dv, cache, "do")
    v_dp = keys(_fq(v, _pick(kn.v_for_dp, kn.v), cache, "v"), hm_b)
    dp = _round(_fq(do, kn.do_for_dp, cache, "do") @ v_dp.transpose(-1, -2), kn.round_dp)
    p_ds = p_dv if kn.ds_from == "tilde" else p
    ds = _round(p_ds * (dp - d_row.unsqueeze(-1)), kn.round_ds)
    if kn.bwd_tail_tile == "dropped":  # keys of the last partial tile get no gradient
        kept = ~_tail_keys(lk, lk_pad, bn)
        ds = ds * kept
        dv = dv * kept.unsqueeze(-1)
    ds_q = _fq(ds, kn.ds_for_dqk)
    k_dq = keys(_fq(k, _pick(kn.k_for_dq, kn.k), cache, "k"), hm_b)
    q_dk = _fq(q, _pick(kn.q_for_dk, kn.q), cache, "q")
    dq = (tau_b * kn.dq_mult) * (ds_q @ k_dq)
    dk = (tau_b * kn.dk_mult) * (ds_q.transpose(-1, -2) @ q_dk)
    dk = _reduce(dk[..., :lk, :], hkv, hm_b, kn.dkv_reduce)
    dv = _reduce(dv[..., :lk, :], hkv, hm_b, kn.dkv_reduce) * kn.dv_mult
    out |= {"dQ": dq, "dK": dk, "dV": dv}
    return out
