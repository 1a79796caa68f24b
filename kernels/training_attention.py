"""Fused Attn-QAT training attention (Triton): FP4 fake-quantized forward and backward.

Public API (``docs/DESIGN.md``):

- ``attn_qat(q, k, v, causal=False, sm_scale=None, recipe="attn-qat") -> o``: a
  ``torch.autograd.Function``; gradients flow to ``q``, ``k``, ``v`` through the
  straight-through estimator (STE) of every fake quantizer.
- ``attn_qat_forward(q, k, v, causal=False, sm_scale=None, recipe="attn-qat",
  diagnostics=False) -> AttnQatForward`` with ``o, o_hp, lse, m, l`` (and diagnostics).

Shapes: ``q`` (B, H, Lq, d); ``k``, ``v`` (B, Hkv, Lk, d) with ``H % Hkv == 0`` (grouped-query
attention: query head h reads key/value head ``h // (H // Hkv)``; dk, dv are summed over the
group). ``d`` must be 64 or 128 (checked; a multiple of the NVFP4 block 16). dtypes bfloat16
and float16 (q, k, v alike); all accumulation in float32.
Non-contiguous inputs are copied (``.contiguous()``). CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``; anything else raises ``ValueError``/``TypeError``/``RuntimeError``.
The causal mask is bottom-right aligned (query i sees key j iff ``j <= i + Lk - Lq``, as
FlashAttention >= 2.1); a query row that sees no key gets output 0, ``m = lse = -inf``, ``l = 0``.

Recipes (``docs/attention-math.md``; arXiv 2603.00040):

- ``bf16``: no quantizer; ordinary FlashAttention-2 forward/backward through the same kernels.
- ``attn-qat``: Q, K, V fake-quantized NVFP4 along d (blocks of 16, E4M3 scale RNE(amax/6),
  no tensor scale, data ``x * (1/s)`` RNE to E2M1: fp4sim's defaults, ``kernels.fp4_jit``).
  Forward per key tile of ``BLOCK_N = 64``: ``S = tau Q^ K^T``, running max ``m'``,
  ``P = exp(S - m')``, ``P~ = FQ(P)`` (blocks of 16 along keys; a block whose scale rounds to
  0 flushes; ``_fake_quantize_probs``, bit-identical to ``fp4_jit.nvfp4_fake_quantize_rows``
  on P >= 0), ``l`` from the unquantized P, ``acc += P~ V^``, ``acc_hp += P V^``;
  ``O = acc / l``, ``O_hp = acc_hp / l``, ``LSE = m + log l``. Backward: ``S`` from Q^, K^,
  ``P = exp(S - LSE)``, ``P~ = FQ(P)`` (normalized P), ``dV = P~^T dO``, ``dP = dO V^T``,
  ``D = rowsum(dO * O_hp)`` (principle 2), ``dS = P (dP - D)``, ``dQ = tau dS K^``,
  ``dK = tau dS^T Q^``.
- ``attn-qat-consistent``: forward in two passes over the keys; pass 1 gives the final row
  max m and l; pass 2 quantizes ``e = exp(S - m)`` and accumulates ``FQ(e) V^``; ``O = acc/l``.
  The backward recomputes ``P~ = FQ(exp(S - m)) / l`` from the saved m and l, so both passes
  quantize the same numbers, and the gradients are the STE gradients of the forward.

Numerics that are not exact, with their bounds (used by the tests):

- ``S`` is a float32 ``tl.dot`` of bf16/fp16 operands (products exact, sums rounded in an
  order set by the MMA unit): ``|dS| <= d * 2^-24 * tau * (|Q^| |K^|^T)`` (standard bound
  gamma_d, Higham ch. 3) per element; ``S * tau - m`` may be contracted into one fma on the
  GPU (one rounding fewer than the reference, inside the same bound).
- ``exp`` is ``tl.exp`` (on NVIDIA lowered to ``ex2.approx.f32(x * log2 e)``, PTX ISA: max
  rel. error 2^-22 for ex2.approx): relative error of P about ``(|x| + 4) * 2^-24`` for the
  argument ``x = S - m``.
- The P V products use bf16/fp16 operands: P~ (code * E4M3 scale, at most 6 significant bits)
  and V^ are exact in bf16/fp16; the unquantized P of ``acc_hp`` and the consistent recipe's
  ``P~ / l`` in the backward are rounded to the input dtype, and so is dS before the dQ, dK
  products (as FlashAttention-2 does).
- O, O_hp, dq, dk, dv are stored in the input dtype; lse, m, l in float32.

Memory: with ``prequantize=True`` (default, fastest) Q^, K^, V^ are materialized once as
tensors of the input dtype (exact: code * scale fits bf16/fp16) and saved for the backward in
place of q, k, v; ``prequantize=False`` quantizes them in registers inside every kernel (no
copies, 4-7x slower on an H100). Saved for the backward beyond what FlashAttention saves:
``O_hp`` (one output-sized tensor) and ``m``, ``l`` (float32, B*H*Lq each); measurements in
``docs/bench/kernels-training.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fp4sim.formats import NVFP4
from fp4sim.kernels import RECIPES
from fp4sim.kernels.fp4_jit import nvfp4_fake_quantize_probs, nvfp4_fake_quantize_rows

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

# NVFP4 block length (docs/numerics.md, NVFP4: 16-element blocks), from fp4sim.formats; the
# @triton.jit code reads it as a constexpr (compiled exactly as the literal 16).
NVFP4_BLOCK = NVFP4.block_size
_NVFP4_BLOCK_CX = tl.constexpr(NVFP4_BLOCK)
# Key tile of the forward: the paper's P~ depends on the running max per tile, so the tile
# width is part of the recipe (reference presets use block_n = 64).
FORWARD_BLOCK_N = 64

# Debug mutations (tests flip these to check that the tests can fail; never set otherwise):
#   "d_from_o": D = rowsum(dO * O) with the quantized O instead of O_hp (breaks principle 2);
#   "s_from_unquantized": the backward recomputes S from the unquantized q, k (breaks principle 1);
#   "causal_shift": added to the causal diagonal offset (1 = off-by-one mask).
_DEBUG_MUTATIONS: dict[str, int] = {"d_from_o": 0, "s_from_unquantized": 0, "causal_shift": 0}


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_rows_kernel(X, Y, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y = NVFP4 fake quantization of X (n_rows, HEAD_DIM) along the last axis."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = nvfp4_fake_quantize_rows(x, _NVFP4_BLOCK_CX)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quantize_probs(p, INTERPRET: tl.constexpr):
    """NVFP4 fake quantization (blocks of 16 along the last axis, no tensor scale) of a tile of
    probabilities ``p >= 0`` (finite), bit-identical to ``fp4_jit.nvfp4_fake_quantize_rows``:
    ``fp4_jit.nvfp4_fake_quantize_probs`` (hardware E4M3 cast and fma-corrected divisions on the
    GPU, the exact integer path under the interpreter). A block whose scale rounds to 0 flushes.
    """
    return nvfp4_fake_quantize_probs(p, _NVFP4_BLOCK_CX, not INTERPRET)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation (bf16/fp16 operands: products exact in float32).

    UPCAST (set under TRITON_INTERPRET=1 only): Triton 3.6's interpreter computes bfloat16
    ``tl.dot`` wrongly (it multiplies the raw 16-bit patterns), so operands go to float32
    first; that is exact for bf16/fp16 values, so the math is unchanged.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even.

    FIX_BF16 (set under TRITON_INTERPRET=1 only): Triton 3.6's interpreter truncates on
    float32 -> bfloat16 casts, so the value is first rounded to the nearest bf16 with ties to
    even on the float32 bits (add 0x7FFF + lsb, clear the low 16 bits); the cast is then exact.
    On the GPU the cast is cvt.rn.bf16.f32 (PTX ISA), already RNE.
    """
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr):
    """Mask of valid (query, key) pairs: key in range and, if causal, j <= i + Lk - Lq."""
    mask = offs_n[None, :] < Lk
    if CAUSAL:
        # Bottom-right aligned causal mask (FlashAttention >= 2.1; docs/DESIGN.md).
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq) + CAUSAL_SHIFT)
    return mask


@triton.jit
def _load_tile(ptr, offs_rows, n_rows, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile (rows past n_rows read as 0); fake-quantize if QUANT."""
    cols = tl.arange(0, HEAD_DIM)
    offs = offs_rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    x = tl.load(ptr + offs, mask=offs_rows[:, None] < n_rows, other=0.0)
    if QUANT:
        # Q^, K^, V^: NVFP4 along d (docs/attention-math.md forward 1-2); exact in bf16/fp16.
        x = nvfp4_fake_quantize_rows(x.to(tl.float32), _NVFP4_BLOCK_CX).to(ptr.dtype.element_ty)
    return x


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
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
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    q_base = Q + (pid_bh.to(tl.int64) * Lq) * HEAD_DIM
    k_base = K + ((b * Hkv + hk).to(tl.int64) * Lk) * HEAD_DIM
    v_base = V + ((b * Hkv + hk).to(tl.int64) * Lk) * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(q_base, offs_m, Lq, HEAD_DIM, QUANT_QKV)

    # Key range: causal tiles entirely above the diagonal are skipped (they hold P = 0 only,
    # so skipping them changes neither m, l nor any P~ block).
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + (Lk - Lq) + CAUSAL_SHIFT)
        hi = tl.maximum(hi, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lq_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_hp = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if CONSISTENT:
        # Pass 1 (docs/attention-math.md, consistent policy): the final row max m and l from the
        # unquantized P, by the online-softmax recurrence (FlashAttention-2, Alg. 1).
        for start_n in range(0, STATIC_END if STATIC_END else hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
            s = _dot(q, tl.trans(k), UPCAST) * sm_scale
            s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new

    for start_n in range(0, STATIC_END if STATIC_END else hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        v = _load_tile(v_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        # S = tau Q^ K^T (docs/attention-math.md forward 3), float32 accumulation.
        s = _dot(q, tl.trans(k), UPCAST) * sm_scale
        # Padded / causally hidden keys -> -inf -> P = 0 before the P block amax, so they never
        # enter a valid block's scale.
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
        if CONSISTENT:
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            # e = exp(S - m_final) in (0, 1] (consistent policy).
            p = tl.exp(s - m_safe[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # P = exp(S - m') against the running max (FlashAttention-2 online softmax).
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc_hp = acc_hp * alpha[:, None]
            lq_i = lq_i * alpha
            m_i = m_new
        if QUANT_P:
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
        if QUANT_P:
            acc_hp += _dot(_cast(p, v.dtype, UPCAST), v, UPCAST)

    if not QUANT_P:
        acc_hp = acc
    # O = acc / l, O_hp = acc_hp / l, LSE = m + log l (docs/attention-math.md forward 4); rows that
    # see no key: l = 0 -> output 0, LSE = -inf.
    # Such rows divide and take the log of 1 instead of 0 (their results are replaced anyway),
    # so that no lane computes 1/0 or log(0).
    l_pos = tl.where(l_i > 0, l_i, 1.0)
    inv_l = tl.where(l_i > 0, 1.0 / l_pos, 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log(l_pos), float("-inf"))
    o_offs = (pid_bh.to(tl.int64) * Lq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    row_ok = offs_m < Lq
    tl.store(
        O + o_offs, _cast(acc * inv_l[:, None], O.dtype.element_ty, UPCAST), mask=row_ok[:, None]
    )
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
def _bwd_probabilities(
    s, m_row, l_row, lse_row, QUANT_P: tl.constexpr, CONSISTENT: tl.constexpr, UPCAST: tl.constexpr
):
    """(P, P~) of one (BLOCK_M, BLOCK_N) tile of masked scores (masked entries are -inf)."""
    if CONSISTENT:
        # Consistent policy: P~ = FQ(exp(S - m)) / l with the forward's m, l (the same numbers
        # the forward quantized); P = exp(S - m) / l.
        m_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        # rows without keys (l = 0) divide 1 by 1, not 0; their inv_l is 0 all the same
        inv_l = tl.where(l_row > 0, 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
        e = tl.exp(s - m_safe[:, None])
        p = e * inv_l[:, None]
        pq = _fake_quantize_probs(e, UPCAST) * inv_l[:, None]
    else:
        # P = exp(S - LSE), normalized (FlashAttention-2 backward); fully masked rows have
        # LSE = -inf: use +inf so that P = 0.
        lse_safe = tl.where(lse_row == float("-inf"), float("inf"), lse_row)
        p = tl.exp(s - lse_safe[:, None])
        if QUANT_P:
            # Attn-QAT principle 1: P~ = FQ(P) of the normalized P, blocks of 16 along keys.
            pq = _fake_quantize_probs(p, UPCAST)
        else:
            pq = p
    return p, pq


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
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
):
    """dK, dV of one key tile, summed over the query heads of its GQA group."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bhk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_base = (pid_bhk.to(tl.int64) * Lk) * HEAD_DIM
    k = _load_tile(K + kv_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
    v = _load_tile(V + kv_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    lo = 0
    if CAUSAL:
        # First query that sees key start_n: i >= j - (Lk - Lq).
        lo = tl.maximum(start_n - (Lk - Lq) - CAUSAL_SHIFT, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, STATIC_GROUP if STATIC_GROUP else GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int64)
        q_base = Q + bh * Lq * HEAD_DIM
        do_base = DO + bh * Lq * HEAD_DIM
        for start_m in range(0 if STATIC_END else lo, STATIC_END if STATIC_END else Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Lq
            q = _load_tile(q_base, offs_m, Lq, HEAD_DIM, QUANT_QKV)
            do = _load_tile(do_base, offs_m, Lq, HEAD_DIM, False)
            lse_row = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
            m_row = tl.load(M_IN + bh * Lq + offs_m, mask=row_ok, other=float("-inf"))
            l_row = tl.load(L_IN + bh * Lq + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
            # Principle 1: S recomputed from Q^, K^ (docs/attention-math.md backward).
            s = _dot(q, tl.trans(k), UPCAST) * sm_scale
            s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
            p, pq = _bwd_probabilities(s, m_row, l_row, lse_row, QUANT_P, CONSISTENT, UPCAST)
            # dV = P~^T dO.
            dv += _dot(tl.trans(_cast(pq, do.dtype, UPCAST)), do, UPCAST)
            # dP = dO V^T, dS = P (dP - D) (FlashAttention-2 backward, D from O_hp).
            dp = _dot(do, tl.trans(v), UPCAST)
            ds = p * (dp - delta[:, None])
            # dK = tau dS^T Q^.
            dk += _dot(tl.trans(_cast(ds, q.dtype, UPCAST)), q, UPCAST)
    dk = dk * sm_scale
    col = offs_d[None, :]
    out_offs = kv_base + offs_n.to(tl.int64)[:, None] * HEAD_DIM + col
    n_ok = offs_n[:, None] < Lk
    tl.store(DK + out_offs, _cast(dk, DK.dtype.element_ty, UPCAST), mask=n_ok)
    tl.store(DV + out_offs, _cast(dv, DV.dtype.element_ty, UPCAST), mask=n_ok)


@triton.jit(do_not_specialize=["H", "GROUP", "Lq", "Lk"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
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
):
    """dQ of one query tile: dQ = tau dS K^ over all visible keys."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    Hkv = H // GROUP
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)
    kv_base = ((b * Hkv + hk).to(tl.int64) * Lk) * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = _load_tile(Q + bh * Lq * HEAD_DIM, offs_m, Lq, HEAD_DIM, QUANT_QKV)
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
    for start_n in range(0, STATIC_END if STATIC_END else hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + kv_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        v = _load_tile(V + kv_base, offs_n, Lk, HEAD_DIM, QUANT_QKV)
        s = _dot(q, tl.trans(k), UPCAST) * sm_scale
        s = tl.where(_visible(offs_m, offs_n, Lq, Lk, CAUSAL, CAUSAL_SHIFT), s, float("-inf"))
        p, _pq = _bwd_probabilities(s, m_row, l_row, lse_row, False, CONSISTENT, UPCAST)
        dp = _dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        # dQ = tau dS K^ (docs/attention-math.md backward).
        dq += _dot(_cast(ds, k.dtype, UPCAST), k, UPCAST)
    dq = dq * sm_scale
    offs = bh * Lq * HEAD_DIM + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + offs, _cast(dq, DQ.dtype.element_ty, UPCAST), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


@dataclass
class AttnQatForward:
    """Result of ``attn_qat_forward``.

    ``o``, ``o_hp``: (B, H, Lq, d) in the input dtype; ``lse``, ``m``, ``l``: (B, H, Lq)
    float32. ``diagnostics`` (when asked for): ``p_mass_kept`` (B, H, Lq) float32 =
    rowsum(P~) / rowsum(P) of the forward (P relative to the running max for ``attn-qat``, to
    the final max for ``attn-qat-consistent``, so the ratio is the fraction of softmax mass the
    forward kept), ``p_mass_kept_mean`` (float), and with ``store_p=True`` ``p`` and ``p_tilde``
    (B, H, Lq, Lk padded to the key tile) float32: the pre-quantization P of every tile and its
    fake quantization, exactly as the kernel used them (debug; tiny shapes only).
    """

    o: torch.Tensor
    o_hp: torch.Tensor
    lse: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    diagnostics: dict | None = None


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _static_end(length: int, block: int) -> int:
    """Loop end passed as a constexpr under the interpreter, 0 (= dynamic bounds) on the GPU.

    Under TRITON_INTERPRET=1 (Triton 3.6 with NumPy >= 2.4) a scalar kernel argument or a value
    derived from ``tl.program_id`` is a 1-element array that ``range`` rejects, so the
    interpreter loops over every tile up to this constant instead of skipping causally hidden
    tiles. Hidden tiles hold P = 0 only (a no-op for m, l, acc, dk, dv and every P~ block), so
    the results are the same; the GPU path skips them.
    """
    return triton.cdiv(length, block) * block if _interpreting() else 0


def _static_group(group: int) -> int:
    """GQA group size as a constexpr loop bound under the interpreter (see ``_static_end``)."""
    return group if _interpreting() else 0


# Benchmark hook: {"fwd"|"dkdv"|"dq": _Config} replacing the defaults below (tuning sweeps).
_CONFIG_OVERRIDE: dict[str, _Config] = {}


def _configs(head_dim: int, on_cuda: bool) -> dict[str, _Config]:
    """Launch configurations (forward BLOCK_N is fixed by the recipe: 64)."""
    return {**_default_configs(head_dim, on_cuda), **_CONFIG_OVERRIDE}


def _default_configs(head_dim: int, on_cuda: bool) -> dict[str, _Config]:
    if not on_cuda:
        return {
            "fwd": _Config(32, FORWARD_BLOCK_N, 4, 1),
            "dkdv": _Config(32, 32, 4, 1),
            "dq": _Config(32, 32, 4, 1),
        }
    # From the GPU sweep on an H100 with the fast P quantizer (docs/bench/kernels-training.md,
    # 2026-11-25 19:02 UTC): 4 forward, 4 dK/dV and 3 dQ candidates per head dim.
    return {
        "fwd": _Config(64, FORWARD_BLOCK_N, 4, 3),
        "dkdv": _Config(64, 64, 4, 3 if head_dim == 64 else 2),
        "dq": _Config(128, 64, 8, 3),
    }


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: str):
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, d), got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be bfloat16 or float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"attn_qat runs on CUDA tensors; got device {q.device.type!r}. Set TRITON_INTERPRET=1 "
            "to run the Triton kernels on the CPU (slow; small shapes only)."
        )
    batch, heads, _lq, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B or d")
    if heads == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        # B = 0 runs (empty results); no heads, queries or keys has no attention to compute
        raise ValueError(
            f"empty attention: H={heads}, Lq={q.shape[2]}, Lk={k.shape[2]} (each must be >= 1)"
        )
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads {heads} must be a multiple of the number "
            f"of key/value heads {k.shape[1]}"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim must be one of {SUPPORTED_HEAD_DIMS} (a multiple of the NVFP4 "
            f"block {NVFP4_BLOCK}), got {head_dim}"
        )


def _fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization along the last axis, same dtype (values exact in bf16/fp16)."""
    y = torch.empty_like(x)
    n_rows = x.numel() // x.shape[-1]
    block_r = 64
    _fake_quant_rows_kernel[(triton.cdiv(n_rows, block_r),)](
        x, y, n_rows, HEAD_DIM=x.shape[-1], BLOCK_R=block_r
    )
    return y


def _flags(recipe: str) -> tuple[bool, bool, bool]:
    """(quantize Q/K/V, quantize P, consistent policy) of a recipe."""
    return recipe != "bf16", recipe != "bf16", recipe == "attn-qat-consistent"


def _forward_impl(q, k, v, causal, sm_scale, recipe, quant_inputs_in_kernel, diagnostics, store_p):
    batch, heads, lq, head_dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    _quant_qkv, quant_p, consistent = _flags(recipe)
    cfg = _configs(head_dim, q.is_cuda)["fwd"]
    o = torch.empty_like(q)
    o_hp = torch.empty_like(q)
    rows = (batch, heads, lq)
    m = torch.empty(rows, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    lse = torch.empty_like(m)
    lq_sum = torch.empty_like(m) if diagnostics else m
    lk_pad = triton.cdiv(max(lk, 1), cfg.block_n) * cfg.block_n
    if store_p:
        p_dbg = torch.zeros((batch, heads, lq, lk_pad), device=q.device, dtype=torch.float32)
        pq_dbg = torch.zeros_like(p_dbg)
    else:
        p_dbg = pq_dbg = m
    grid = (triton.cdiv(lq, cfg.block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        o_hp,
        m,
        l_sum,
        lse,
        lq_sum,
        p_dbg,
        pq_dbg,
        sm_scale,
        heads,
        heads // hkv,
        lq,
        lk,
        lk_pad,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        CAUSAL_SHIFT=_DEBUG_MUTATIONS["causal_shift"],
        QUANT_QKV=quant_inputs_in_kernel,
        QUANT_P=quant_p,
        CONSISTENT=consistent,
        DIAG=diagnostics,
        STORE_P=store_p,
        STATIC_END=_static_end(lk, cfg.block_n),
        STATIC_GROUP=_static_group(heads // hkv),
        UPCAST=_interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    diag = None
    if diagnostics:
        has_keys = l_sum > 0
        kept = torch.where(has_keys, lq_sum / l_sum.clamp_min(1e-38), torch.ones_like(l_sum))
        diag = {
            "p_mass_kept": kept,
            "p_mass_kept_mean": float(kept[has_keys].mean()) if has_keys.any() else 1.0,
            "p_mass_kept_row_min": float(kept.min()) if kept.numel() else 1.0,
        }
        if store_p:
            diag["p"] = p_dbg
            diag["p_tilde"] = pq_dbg
    return AttnQatForward(o=o, o_hp=o_hp, lse=lse, m=m, l=l_sum, diagnostics=diag)


def _backward_impl(
    do, q, k, v, o, o_hp, lse, m, l_sum, causal, sm_scale, recipe, quant_inputs_in_kernel
):
    batch, heads, lq, head_dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    _quant_qkv, quant_p, consistent = _flags(recipe)
    cfgs = _configs(head_dim, q.is_cuda)
    do = do.contiguous()
    delta = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    n_rows = batch * heads * lq
    # Principle 2: D from O_hp (the debug mutation uses the quantized O).
    o_for_d = o if _DEBUG_MUTATIONS["d_from_o"] else o_hp
    _bwd_preprocess_kernel[(triton.cdiv(n_rows, 64),)](
        do, o_for_d, delta, n_rows, HEAD_DIM=head_dim, BLOCK_R=64
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        CAUSAL_SHIFT=_DEBUG_MUTATIONS["causal_shift"],
        QUANT_QKV=quant_inputs_in_kernel,
        QUANT_P=quant_p,
        CONSISTENT=consistent,
        STATIC_GROUP=_static_group(heads // hkv),
        UPCAST=_interpreting(),
    )
    c = cfgs["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(lk, c.block_n), batch * hkv)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        m,
        l_sum,
        delta,
        sm_scale,
        heads,
        heads // hkv,
        lq,
        lk,
        STATIC_END=_static_end(lq, c.block_m),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        **common,
    )
    c = cfgs["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(lq, c.block_m), batch * heads)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        m,
        l_sum,
        delta,
        sm_scale,
        heads,
        heads // hkv,
        lq,
        lk,
        STATIC_END=_static_end(lk, c.block_n),
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
        **common,
    )
    return dq, dk, dv


def _prepare(q, k, v, recipe, sm_scale):
    _check_inputs(q, k, v, recipe)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if not math.isfinite(float(sm_scale)):
        raise ValueError(f"sm_scale must be finite, got {sm_scale!r}")
    return q, k, v, float(sm_scale)


class _AttnQatFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, recipe, prequantize):
        quant_qkv = recipe != "bf16"
        if quant_qkv and prequantize:
            qh, kh, vh = _fake_quantize(q), _fake_quantize(k), _fake_quantize(v)
            in_kernel = False
        else:
            qh, kh, vh = q, k, v
            in_kernel = quant_qkv
        res = _forward_impl(qh, kh, vh, causal, sm_scale, recipe, in_kernel, False, False)
        if _DEBUG_MUTATIONS["s_from_unquantized"]:
            qh, kh, vh, in_kernel = q, k, v, False
        ctx.save_for_backward(qh, kh, vh, res.o, res.o_hp, res.lse, res.m, res.l)
        ctx.causal, ctx.sm_scale, ctx.recipe, ctx.in_kernel = causal, sm_scale, recipe, in_kernel
        return res.o

    @staticmethod
    def backward(ctx, do):
        qh, kh, vh, o, o_hp, lse, m, l_sum = ctx.saved_tensors
        dq, dk, dv = _backward_impl(
            do,
            qh,
            kh,
            vh,
            o,
            o_hp,
            lse,
            m,
            l_sum,
            ctx.causal,
            ctx.sm_scale,
            ctx.recipe,
            ctx.in_kernel,
        )
        # STE: the fake quantizers pass dQ, dK, dV through unchanged.
        return dq, dk, dv, None, None, None, None


def attn_qat(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    recipe: str = "attn-qat",
    prequantize: bool = True,
) -> torch.Tensor:
    """Fused FP4 Attn-QAT attention; differentiable in q, k, v (see the module docstring).

    ``prequantize=True`` materializes Q^, K^, V^ once (faster; three input-sized tensors that
    replace q, k, v among the saved tensors); ``False`` quantizes in registers in every kernel.
    """
    q, k, v, sm_scale = _prepare(q, k, v, recipe, sm_scale)
    return _AttnQatFunction.apply(q, k, v, bool(causal), sm_scale, recipe, bool(prequantize))


def attn_qat_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    recipe: str = "attn-qat",
    diagnostics: bool = False,
    store_p: bool = False,
    prequantize: bool = False,
) -> AttnQatForward:
    """Forward only (no autograd): ``o, o_hp, lse, m, l`` and optional diagnostics.

    ``store_p=True`` (implies diagnostics) also returns every tile's pre-quantization P and its
    fake quantization P~ as the kernel used them (for P-code checks on tiny shapes).
    """
    q, k, v, sm_scale = _prepare(q, k, v, recipe, sm_scale)
    quant_qkv = recipe != "bf16"
    in_kernel = quant_qkv
    if quant_qkv and prequantize:
        q, k, v = _fake_quantize(q), _fake_quantize(k), _fake_quantize(v)
        in_kernel = False
    with torch.no_grad():
        return _forward_impl(
            q, k, v, bool(causal), sm_scale, recipe, in_kernel, diagnostics or store_p, store_p
        )


def attn_qat_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fwd: AttnQatForward,
    causal: bool = False,
    sm_scale: float | None = None,
    recipe: str = "attn-qat",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels alone, from a forward result (q, k, v unquantized; quantized in-kernel)."""
    q, k, v, sm_scale = _prepare(q, k, v, recipe, sm_scale)
    with torch.no_grad():
        return _backward_impl(
            do,
            q,
            k,
            v,
            fwd.o,
            fwd.o_hp,
            fwd.lse,
            fwd.m,
            fwd.l,
            bool(causal),
            sm_scale,
            recipe,
            recipe != "bf16",
        )
