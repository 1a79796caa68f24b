"""Backward kernels of the Attn-QAT training attention (``@triton.jit``).

Numerics and recipes: ``kernels/training_attention.py`` (module docstring). FlashAttention-2's
split: ``_bwd_preprocess_kernel`` (D = rowsum(dO * O_hp)), ``_attn_bwd_dkdv_kernel`` (one
program per key tile, loops over the query tiles of every head of its GQA group) and
``_attn_bwd_dq_kernel`` (one program per query tile, loops over the key tiles).

As in the forward (``kernels/attn_qat_forward.py``), the mask is applied only on the tiles
that need it: in dK/dV the query tiles that cross the causal diagonal, or every tile of a
program whose key tile crosses Lk; in dQ the key tiles from the first one that some row of
the program cannot see entirely. Rows past Lq need no mask: they load as 0 with
LSE = -inf (P = 0) or l = 0 (consistent: P = e * 0 = 0), so they add nothing.

``PACKED``: the operand a program keeps for its whole life (K^, V^ in dK/dV; Q^ in dQ) comes
as packed NVFP4 codes and E4M3 scale bytes (``kernels/attn_qat_packing.py``), decoded once per
program (``attn_qat_jit._load_packed_tile``, bit-identical to the materialized tensor); the
operands of the inner loop are read as bf16/fp16 tensors, which the host decodes just before
the kernel that needs them (a decode per inner tile would cost about 4 instructions per
element on every reload).

``USE_TMA`` (GPU): the inner-loop tiles (Q^ and dO in dK/dV, K^ and V^ in dQ) come through
host-built tensor descriptors over (B * heads, L, d), rows past L read as 0 (as the masked
loads do), which removes the per-element address arithmetic from the loops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4sim.kernels.attn_qat_forward import _first_masked_key
from fp4sim.kernels.attn_qat_jit import (
    NVFP4_BLOCK,
    _cast,
    _dot,
    _exp,
    _fake_quantize_probs,
    _load_packed_tile,
    _load_tile,
    _visible,
)

_NB_CX = tl.constexpr(NVFP4_BLOCK)


@triton.jit
def _bwd_preprocess_kernel(DO, OHP, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """D = rowsum(dO * O_hp) (docs/attention-math.md backward, principle 2), float32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    mask = rows[:, None] < n_rows
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(OHP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(do * o, 1), mask=rows < n_rows)


@triton.jit
def _bwd_probabilities(s, m_row, l_row, lse_row, QUANT_P: tl.constexpr, CONSISTENT: tl.constexpr,
                       FAST: tl.constexpr, UPCAST: tl.constexpr):
    """(P, P~) of one (BLOCK_M, BLOCK_N) tile of masked scores (masked entries are -inf)."""
    if CONSISTENT:
        # Consistent policy: P~ = FQ(exp(S - m)) / l with the forward's m, l (the same numbers
        # the forward quantized); P = exp(S - m) / l.
        m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        # rows without keys (l = 0) divide 1 by 1, not 0; their inv_l is 0 all the same
        inv_l = tl.where(l_row > 0, 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
        e = _exp(s - m_safe[:, None], FAST)
        p = e * inv_l[:, None]
        if QUANT_P:
            pq = _fake_quantize_probs(e, UPCAST) * inv_l[:, None]
        else:
            pq = p
    else:
        # P = exp(S - LSE), normalized (FlashAttention-2 backward); fully masked rows have
        # LSE = -inf: use +inf so that P = 0.
        lse_safe = tl.where(lse_row == float("-inf"), float("inf"), lse_row)
        p = _exp(s - lse_safe[:, None], FAST)
        if QUANT_P:
            # Attn-QAT principle 1: P~ = FQ(P) of the normalized P, blocks of 16 along keys.
            pq = _fake_quantize_probs(p, UPCAST)
        else:
            pq = p
    return p, pq


@triton.jit
def _load_operand(ptr, codes, scales, row0, offs_rows, n_rows, HEAD_DIM: tl.constexpr,
                  dtype: tl.constexpr, QUANT_QKV: tl.constexpr, PACKED: tl.constexpr,
                  FAST: tl.constexpr):
    """Rows ``row0 + offs_rows`` (int64 row0) of Q^, K^ or V^: packed, materialized or
    quantized in registers."""
    if PACKED:
        return _load_packed_tile(codes + row0 * (HEAD_DIM // 2),
                                 scales + row0 * (HEAD_DIM // _NB_CX), offs_rows, n_rows,
                                 HEAD_DIM, dtype, FAST)
    else:
        return _load_tile(ptr + row0 * HEAD_DIM, offs_rows, n_rows, HEAD_DIM, QUANT_QKV)


@triton.jit
def _dkdv_tile(k, v, dk, dv, Q, DO, desc_q, desc_do, LSE, M_IN, L_IN, DELTA, bh, start_m,
               offs_n, sm_scale, Lq, Lk, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr,
               QUANT_QKV: tl.constexpr, QUANT_P: tl.constexpr, CONSISTENT: tl.constexpr,
               FAST: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV contributions of one query tile (docs/attention-math.md backward)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Lq
    if USE_TMA:
        q = tl.reshape(desc_q.load([bh.to(tl.int32), start_m, 0]), (BLOCK_M, HEAD_DIM))
        do = tl.reshape(desc_do.load([bh.to(tl.int32), start_m, 0]), (BLOCK_M, HEAD_DIM))
    else:
        q = _load_tile(Q + bh * Lq * HEAD_DIM, offs_m, Lq, HEAD_DIM, QUANT_QKV)
        do = _load_tile(DO + bh * Lq * HEAD_DIM, offs_m, Lq, HEAD_DIM, False)
    if CONSISTENT:
        m_row = tl.load(M_IN + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
        l_row = tl.load(L_IN + bh * Lq + offs_m, mask=row_ok, other=0.0)
        lse_row = m_row
    else:
        lse_row = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
        m_row = lse_row
        l_row = lse_row
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    # Principle 1: S recomputed from Q^, K^ (docs/attention-math.md backward).
    s = _dot(q, tl.trans(k), UPCAST) * sm_scale
    if MASK:
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
    p, pq = _bwd_probabilities(s, m_row, l_row, lse_row, QUANT_P, CONSISTENT, FAST, UPCAST)
    # dV = P~^T dO.
    dv += _dot(tl.trans(_cast(pq, do.dtype, UPCAST)), do, UPCAST)
    # dP = dO V^T, dS = P (dP - D) (FlashAttention-2 backward, D from O_hp).
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    # dK = tau dS^T Q^.
    dk += _dot(tl.trans(_cast(ds, q.dtype, UPCAST)), q, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    QC,
    QS,
    KC,
    KS,
    VC,
    VS,
    desc_a,
    desc_b,
    DO,
    DK,
    DV,
    LSE,
    M_IN,
    L_IN,
    DELTA,
    sm_scale,
    H,
    GROUP,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    CAUSAL_SHIFT: tl.constexpr,
    QUANT_QKV: tl.constexpr,
    QUANT_P: tl.constexpr,
    CONSISTENT: tl.constexpr,
    STATIC_END: tl.constexpr,
    STATIC_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PACKED: tl.constexpr = False,
    FAST: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
):
    """dK, dV of one key tile, summed over the query heads of its GQA group."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    dtype: tl.constexpr = DO.dtype.element_ty
    row0 = pid_bhk.to(tl.int64) * Lk
    k = _load_operand(K, KC, KS, row0, offs_n, Lk, HEAD_DIM, dtype, QUANT_QKV, PACKED, FAST)
    v = _load_operand(V, VC, VS, row0, offs_n, Lk, HEAD_DIM, dtype, QUANT_QKV, PACKED, FAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    lo = 0
    m_split = 0
    if CAUSAL:
        # First query that sees key start_n: i >= j - (Lk - Lq).
        lo = tl.maximum(start_n - (Lk - Lq) - CAUSAL_SHIFT, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        # First query that sees the whole key tile, rounded up to a query tile.
        first_full = tl.maximum(start_n + BLOCK_N - 1 - (Lk - Lq) - CAUSAL_SHIFT, 0)
        m_split = tl.maximum((first_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    # A key tile that crosses Lk needs the key mask on every query tile.
    m_end = (Lq + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_split = tl.where(start_n + BLOCK_N <= Lk, tl.minimum(m_split, m_end), m_end)
    TMA_LOOP: tl.constexpr = USE_TMA and not STATIC_END
    for g in range(0, STATIC_GROUP if STATIC_GROUP else GROUP):
        bh = (b * H + hk * GROUP + g).to(tl.int64)
        if STATIC_END:
            for start_m in range(0, STATIC_END, BLOCK_M):
                dk, dv = _dkdv_tile(k, v, dk, dv, Q, DO, desc_a, desc_b, LSE, M_IN, L_IN, DELTA,
                                    bh, start_m, offs_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_M, True,
                                    CAUSAL, CAUSAL_SHIFT, QUANT_QKV, QUANT_P, CONSISTENT, FAST,
                                    TMA_LOOP, UPCAST)
        else:
            for start_m in range(lo, m_split, BLOCK_M):
                dk, dv = _dkdv_tile(k, v, dk, dv, Q, DO, desc_a, desc_b, LSE, M_IN, L_IN, DELTA,
                                    bh, start_m, offs_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_M, True,
                                    CAUSAL, CAUSAL_SHIFT, QUANT_QKV, QUANT_P, CONSISTENT, FAST,
                                    TMA_LOOP, UPCAST)
            for start_m in range(m_split, Lq, BLOCK_M):
                dk, dv = _dkdv_tile(k, v, dk, dv, Q, DO, desc_a, desc_b, LSE, M_IN, L_IN, DELTA,
                                    bh, start_m, offs_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_M, False,
                                    CAUSAL, CAUSAL_SHIFT, QUANT_QKV, QUANT_P, CONSISTENT, FAST,
                                    TMA_LOOP, UPCAST)
    dk = dk * sm_scale
    out_offs = row0 * HEAD_DIM + offs_n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    n_ok = offs_n[:, None] < Lk
    tl.store(DK + out_offs, _cast(dk, DK.dtype.element_ty, UPCAST), mask=n_ok)
    tl.store(DV + out_offs, _cast(dv, DV.dtype.element_ty, UPCAST), mask=n_ok)


@triton.jit
def _dq_tile(q, do, dq, m_row, l_row, lse_row, delta, K, V, desc_k, desc_v, bhk, kv_row0,
             offs_m, start_n, sm_scale, Lq, Lk, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr,
             QUANT_QKV: tl.constexpr, CONSISTENT: tl.constexpr, FAST: tl.constexpr,
             USE_TMA: tl.constexpr, UPCAST: tl.constexpr):
    """dQ contribution of one key tile: tau dS K^."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = tl.reshape(desc_k.load([bhk, start_n, 0]), (BLOCK_N, HEAD_DIM))
        v = tl.reshape(desc_v.load([bhk, start_n, 0]), (BLOCK_N, HEAD_DIM))
    else:
        k = _load_tile(K + kv_row0 * HEAD_DIM, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        v = _load_tile(V + kv_row0 * HEAD_DIM, offs_n, Lk, HEAD_DIM, QUANT_QKV)
    s = _dot(q, tl.trans(k), UPCAST) * sm_scale
    if MASK:
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
    p, _pq = _bwd_probabilities(s, m_row, l_row, lse_row, False, CONSISTENT, FAST, UPCAST)
    dp = _dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    # dQ = tau dS K^ (docs/attention-math.md backward).
    return dq + _dot(_cast(ds, k.dtype, UPCAST), k, UPCAST)


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    QC,
    QS,
    KC,
    KS,
    VC,
    VS,
    desc_a,
    desc_b,
    DO,
    DQ,
    LSE,
    M_IN,
    L_IN,
    DELTA,
    sm_scale,
    H,
    GROUP,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    CAUSAL_SHIFT: tl.constexpr,
    QUANT_QKV: tl.constexpr,
    QUANT_P: tl.constexpr,
    CONSISTENT: tl.constexpr,
    STATIC_END: tl.constexpr,
    STATIC_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PACKED: tl.constexpr = False,
    FAST: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
):
    """dQ of one query tile: dQ = tau dS K^ over all visible keys."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Hkv = H // GROUP
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)
    bhk = b * Hkv + hk
    kv_row0 = bhk.to(tl.int64) * Lk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    dtype: tl.constexpr = DO.dtype.element_ty
    q = _load_operand(Q, QC, QS, bh * Lq, offs_m, Lq, HEAD_DIM, dtype, QUANT_QKV, PACKED, FAST)
    do = _load_tile(DO + bh * Lq * HEAD_DIM, offs_m, Lq, HEAD_DIM, False)
    lse_row = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
    m_row = tl.load(M_IN + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
    l_row = tl.load(L_IN + bh * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq) + CAUSAL_SHIFT)
        hi = tl.maximum(hi, 0)
    n_full = tl.minimum(_first_masked_key(start_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL,
                                          CAUSAL_SHIFT), hi)
    TMA_LOOP: tl.constexpr = USE_TMA and not STATIC_END
    if STATIC_END:
        for start_n in range(0, STATIC_END, BLOCK_N):
            dq = _dq_tile(q, do, dq, m_row, l_row, lse_row, delta, K, V, desc_a, desc_b, bhk,
                          kv_row0, offs_m, start_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_N, True,
                          CAUSAL, CAUSAL_SHIFT, QUANT_QKV, CONSISTENT, FAST, TMA_LOOP, UPCAST)
    else:
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_tile(q, do, dq, m_row, l_row, lse_row, delta, K, V, desc_a, desc_b, bhk,
                          kv_row0, offs_m, start_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_N, False,
                          CAUSAL, CAUSAL_SHIFT, QUANT_QKV, CONSISTENT, FAST, TMA_LOOP, UPCAST)
        for start_n in range(n_full, hi, BLOCK_N):
            dq = _dq_tile(q, do, dq, m_row, l_row, lse_row, delta, K, V, desc_a, desc_b, bhk,
                          kv_row0, offs_m, start_n, sm_scale, Lq, Lk, HEAD_DIM, BLOCK_N, True,
                          CAUSAL, CAUSAL_SHIFT, QUANT_QKV, CONSISTENT, FAST, TMA_LOOP, UPCAST)
    dq = dq * sm_scale
    offs = bh * Lq * HEAD_DIM + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + offs, _cast(dq, DQ.dtype.element_ty, UPCAST), mask=row_ok[:, None])
