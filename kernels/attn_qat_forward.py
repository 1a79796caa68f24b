"""Forward kernel of the Attn-QAT training attention (``@triton.jit``): ``_attn_fwd_kernel``.

Numerics and recipes: ``kernels/training_attention.py`` (module docstring). One program owns
BLOCK_M query rows of one (batch, head) and walks the key tiles of width BLOCK_N (64 for the
FP4 recipes, where the tile width is part of the recipe).

Cost structure (why the loop is split): the key-range / causal mask costs about 4 SASS
instructions per score element, so it is applied only on the tiles that need it: the key
tiles ``[0, n_full)`` are visible to every row of the program and run unmasked; the tiles
``[n_full, hi)`` (the ragged last tile, and for causal attention the diagonal band) run
masked. Masking a tile that is all visible is the identity, so the split changes no bit.
Under the interpreter (``STATIC_END``) every tile runs masked (see
``training_attention._static_end``).

``USE_TMA`` (GPU only): K and V tiles come through host-built tensor descriptors (Hopper's
bulk tensor copy engine), viewed as (B * Hkv, Lk, d) so that rows past Lk read as 0.
``WARP_SPEC``: ``tl.range(..., warp_specialize=True)`` on the key loops (Triton decides
whether the target supports it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4sim.formats import MXFP4
from fp4sim.kernels.attn_qat_jit import (
    _cast,
    _dot,
    _exp,
    _fake_quantize_probs,
    _load_tile,
    _visible,
)
from fp4sim.kernels.fp4_jit import mxfp4_quantize_nonneg_rows

# MXFP4 block length of P~ when P_MX (OCP MX v1.0 5.3: 32-element blocks, E8M0 scale).
_MX_BLOCK = tl.constexpr(MXFP4.block_size)


@triton.jit
def _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM: tl.constexpr,
             BLOCK_N: tl.constexpr, QUANT_QKV: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        k = tl.reshape(desc_k.load([bhk, start_n, 0]), (BLOCK_N, HEAD_DIM))
        v = tl.reshape(desc_v.load([bhk, start_n, 0]), (BLOCK_N, HEAD_DIM))
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        v = _load_tile(v_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
    return k, v


@triton.jit
def _row_stats_tile(q, k, offs_m, start_n, m_i, l_i, sm_scale, Lq, Lk, BLOCK_N: tl.constexpr,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr,
                    FAST: tl.constexpr, UPCAST: tl.constexpr):
    """Consistent policy, pass 1: running max m and l of the unquantized P over one tile."""
    s = _dot(q, tl.trans(k), UPCAST) * sm_scale
    if MASK:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * _exp(m_i - m_safe, FAST) + tl.sum(_exp(s - m_safe[:, None], FAST), 1)
    return m_new, l_i


@triton.jit
def _fwd_tile(q, k, v, offs_m, start_n, m_i, l_i, lq_i, acc, acc_hp, sm_scale, Lq, Lk,
              PDBG, PQDBG, pid_bh, LK_PAD, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr, QUANT_P: tl.constexpr,
              CONSISTENT: tl.constexpr, DIAG: tl.constexpr, STORE_P: tl.constexpr,
              FAST: tl.constexpr, UPCAST: tl.constexpr, KEEP_HP: tl.constexpr,
              P_MX: tl.constexpr):
    """One key tile of the forward (docs/attention-math.md forward 3-4)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # S = tau Q^ K^T (docs/attention-math.md forward 3), float32 accumulation. On the GPU the
    # compiler contracts S - m below into fma(QK^T, tau, -m) in unmasked tiles (a mask's select
    # sits between them otherwise): one rounding fewer than the reference's RN(RN(tau QK^T) - m),
    # the same bits when tau is a power of two (d = 64), within the derived bounds otherwise.
    s = _dot(q, tl.trans(k), UPCAST) * sm_scale
    if MASK:
        # Padded / causally hidden keys -> -inf -> P = 0 before the P block amax, so they
        # never enter a valid block's scale.
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
    if CONSISTENT:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        # e = exp(S - m_final) in (0, 1] (consistent policy).
        p = _exp(s - m_safe[:, None], FAST)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # P = exp(S - m') against the running max (FlashAttention-2 online softmax).
        p = _exp(s - m_safe[:, None], FAST)
        alpha = _exp(m_i - m_safe, FAST)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if QUANT_P and KEEP_HP:
            acc_hp = acc_hp * alpha[:, None]
        if DIAG:
            lq_i = lq_i * alpha
        m_i = m_new
    if QUANT_P and P_MX:
        # MXFP4 P~ (the inference recipe infer-mxfp4): blocks of 32 keys, E8M0 rceil scale.
        _pc, _psb, _ps, pq = mxfp4_quantize_nonneg_rows(p, _MX_BLOCK)
    elif QUANT_P:
        # P~ = FQ(P), blocks of 16 along keys, E4M3 scale, no tensor scale (attention-math.md).
        pq = _fake_quantize_probs(p, UPCAST)
    else:
        pq = p
    if DIAG:
        lq_i += tl.sum(pq, 1)
    if STORE_P:
        pofs = (pid_bh.to(tl.int64) * Lq + offs_m[:, None]) * LK_PAD + offs_n[None, :]
        pmask = offs_m[:, None] < Lq
        tl.store(PDBG + pofs, p, mask=pmask)
        tl.store(PQDBG + pofs, pq, mask=pmask)
    # P~ is exact in bf16/fp16 (code * E4M3 scale), so the cast below is lossless.
    acc += _dot(_cast(pq, v.dtype, UPCAST), v, UPCAST)
    if QUANT_P and KEEP_HP:
        acc_hp += _dot(_cast(p, v.dtype, UPCAST), v, UPCAST)
    return m_i, l_i, lq_i, acc, acc_hp


@triton.jit
def _first_masked_key(start_m, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr):
    """Start of the first key tile that some row in [start_m, start_m + BLOCK_M) cannot see
    entirely (a multiple of BLOCK_N): the ragged end of the keys, or the causal diagonal."""
    n_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # Row start_m sees keys j <= start_m + Lk - Lq + shift; later rows see more.
        last = start_m + (Lk - Lq) + CAUSAL_SHIFT + 1
        n_full = tl.minimum(n_full, tl.maximum(last, 0) // BLOCK_N * BLOCK_N)
    return n_full


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    desc_k,
    desc_v,
    O,
    OHP,
    M_OUT,
    L_OUT,
    LSE_OUT,
    LQ_OUT,
    PDBG,
    PQDBG,
    sm_scale,
    H,
    GROUP,
    Lq,
    Lk,
    LK_PAD,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    CAUSAL_SHIFT: tl.constexpr,
    QUANT_QKV: tl.constexpr,
    QUANT_P: tl.constexpr,
    CONSISTENT: tl.constexpr,
    DIAG: tl.constexpr,
    STORE_P: tl.constexpr,
    STATIC_END: tl.constexpr,
    STATIC_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
    KEEP_HP: tl.constexpr = True,
    P_MX: tl.constexpr = False,
    DIV_L: tl.constexpr = False,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    bhk = b * Hkv + hk
    q_base = Q + (pid_bh.to(tl.int64) * Lq) * HEAD_DIM
    k_base = K + (bhk.to(tl.int64) * Lk) * HEAD_DIM
    v_base = V + (bhk.to(tl.int64) * Lk) * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(q_base, offs_m, Lq, HEAD_DIM, QUANT_QKV)

    # Key range: causal tiles entirely above the diagonal are skipped (they hold P = 0 only,
    # so skipping them changes neither m, l nor any P~ block).
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq) + CAUSAL_SHIFT)
        hi = tl.maximum(hi, 0)
    n_full = tl.minimum(_first_masked_key(start_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL,
                                          CAUSAL_SHIFT), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lq_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_hp = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if CONSISTENT:
        # Pass 1 (docs/attention-math.md, consistent policy): the final row max m and l from
        # the unquantized P, by the online-softmax recurrence (FlashAttention-2, Alg. 1).
        if STATIC_END:
            for start_n in range(0, STATIC_END, BLOCK_N):
                k, _v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM,
                                 BLOCK_N, QUANT_QKV, False)
                m_i, l_i = _row_stats_tile(q, k, offs_m, start_n, m_i, l_i, sm_scale, Lq, Lk,
                                           BLOCK_N, True, CAUSAL, CAUSAL_SHIFT, FAST, UPCAST)
        else:
            for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
                k, _v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM,
                                 BLOCK_N, QUANT_QKV, USE_TMA)
                m_i, l_i = _row_stats_tile(q, k, offs_m, start_n, m_i, l_i, sm_scale, Lq, Lk,
                                           BLOCK_N, False, CAUSAL, CAUSAL_SHIFT, FAST, UPCAST)
            for start_n in range(n_full, hi, BLOCK_N):
                k, _v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM,
                                 BLOCK_N, QUANT_QKV, USE_TMA)
                m_i, l_i = _row_stats_tile(q, k, offs_m, start_n, m_i, l_i, sm_scale, Lq, Lk,
                                           BLOCK_N, True, CAUSAL, CAUSAL_SHIFT, FAST, UPCAST)

    if STATIC_END:
        for start_n in range(0, STATIC_END, BLOCK_N):
            k, v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM, BLOCK_N,
                            QUANT_QKV, False)
            m_i, l_i, lq_i, acc, acc_hp = _fwd_tile(
                q, k, v, offs_m, start_n, m_i, l_i, lq_i, acc, acc_hp, sm_scale, Lq, Lk, PDBG,
                PQDBG, pid_bh, LK_PAD, BLOCK_N, True, CAUSAL, CAUSAL_SHIFT, QUANT_P, CONSISTENT,
                DIAG, STORE_P, FAST, UPCAST, KEEP_HP, P_MX)
    else:
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            k, v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM, BLOCK_N,
                            QUANT_QKV, USE_TMA)
            m_i, l_i, lq_i, acc, acc_hp = _fwd_tile(
                q, k, v, offs_m, start_n, m_i, l_i, lq_i, acc, acc_hp, sm_scale, Lq, Lk, PDBG,
                PQDBG, pid_bh, LK_PAD, BLOCK_N, False, CAUSAL, CAUSAL_SHIFT, QUANT_P, CONSISTENT,
                DIAG, STORE_P, FAST, UPCAST, KEEP_HP, P_MX)
        for start_n in range(n_full, hi, BLOCK_N):
            k, v = _load_kv(k_base, v_base, desc_k, desc_v, bhk, start_n, Lk, HEAD_DIM, BLOCK_N,
                            QUANT_QKV, USE_TMA)
            m_i, l_i, lq_i, acc, acc_hp = _fwd_tile(
                q, k, v, offs_m, start_n, m_i, l_i, lq_i, acc, acc_hp, sm_scale, Lq, Lk, PDBG,
                PQDBG, pid_bh, LK_PAD, BLOCK_N, True, CAUSAL, CAUSAL_SHIFT, QUANT_P, CONSISTENT,
                DIAG, STORE_P, FAST, UPCAST, KEEP_HP, P_MX)

    # O = acc / l, O_hp = acc_hp / l, LSE = m + log l (docs/attention-math.md forward 4); rows
    # that see no key: l = 0 -> output 0, LSE = -inf. Such rows divide and take the log of 1
    # instead of 0 (their results are replaced anyway), so that no lane computes 1/0 or log(0).
    l_pos = tl.where(l_i > 0, l_i, 1.0)
    inv_l = tl.where(l_i > 0, 1.0 / l_pos, 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_pos), float("-inf"))
    o_offs = (pid_bh.to(tl.int64) * Lq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    row_ok = offs_m < Lq
    o_ptrs = O + o_offs  # before the product, as the training epilogue always had it
    if DIV_L:
        # O = acc / l, rounded once (the inference kernels' and reference's order)
        o_val = tl.where(l_i[:, None] > 0, acc / l_pos[:, None], 0.0)
    else:
        o_val = acc * inv_l[:, None]
    tl.store(o_ptrs, _cast(o_val, O.dtype.element_ty, UPCAST), mask=row_ok[:, None])
    if QUANT_P and KEEP_HP:
        # Without the P quantizer O_hp is O: the host passes O itself and nothing is stored;
        # without KEEP_HP (inference) nobody needs O_hp.
        tl.store(
            OHP + o_offs,
            _cast(acc_hp * inv_l[:, None], OHP.dtype.element_ty, UPCAST),
            mask=row_ok[:, None],
        )
    row_offs = pid_bh.to(tl.int64) * Lq + offs_m
    tl.store(M_OUT + row_offs, m_i, mask=row_ok)
    tl.store(L_OUT + row_offs, l_i, mask=row_ok)
    tl.store(LSE_OUT + row_offs, lse, mask=row_ok)
    if DIAG:
        tl.store(LQ_OUT + row_offs, lq_i, mask=row_ok)
