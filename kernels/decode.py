"""FP4 decode attention: flash-decoding with split KV on packed NVFP4 / MXFP4 K and V.

The same packed layout as ``kernels.inference`` (``pack_for_inference`` builds it; Q, K along d,
V^T along keys), the same function inside one split, and an exact merge across splits.

Schedule (what a reference must reproduce, ``property_tests/test_kernels_decode.py`` does):

* Keys are cut into tiles of ``BLOCK_N = 64`` (the reference recipes' ``block_n``) and the
  tiles into ``num_splits`` contiguous splits of ``tiles_per_split`` tiles each (the last may be
  shorter); split s covers keys ``[64 s T, min(64 (s + 1) T, Lk))`` with T = tiles_per_split.
  Split boundaries are multiples of 64, hence of both V block sizes (16, 32): a split never
  cuts a V block.
* Each split is an independent flash pass over its keys, exactly the inference kernel's loop
  (``docs/attention-math.md`` "Forward"; ``kernels.inference`` docstring) started with
  ``m = -inf, l = 0, acc = 0`` at the split's first key: per tile ``S = tau Q^ K^T``,
  ``m' = max(m, rowmax S)``, ``P = exp(S - m')``, ``P~ = FQ(P)`` per block of 16 (NVFP4,
  E4M3 ``amax/6`` scale) or 32 (MXFP4, E8M0 ``rceil``) keys against the split's running max,
  ``l = l e^{m - m'} + rowsum P``, ``acc = acc e^{m - m'} + P~ V^``. So the P bits of a tile
  depend on the split it falls in (its running max starts at that split).
* Merge in float32: ``M = max_s m_s``, ``w_s = exp(m_s - M)`` (0 for a split in which the row
  sees no key), ``L = sum_s w_s l_s``, ``O = (sum_s w_s acc_s) / L`` (IEEE division), bf16
  out; a row that sees no key at all outputs 0. With ``num_splits = 1`` no merge runs and the
  result is the function of ``fp4_inference_attention`` (same tiles, same running max).
  ``merge="blocked"`` (default) reads a block of splits and columns of d per step in programs
  spread over rows and d (``merge_blocks`` has the block sizes); ``merge="serial"`` runs one
  program per (batch, kv head, 16 rows) over the splits one at a time. The same formula,
  float32 sums in another order, so the same bound; on the H200 the blocked merge made one kv
  head with 342 splits 4.4x faster end to end (BENCHMARKS.md).

Float32 details (same function, rounding only): S and the maxima are kept in log2 units
(``S log2 e`` with ``tau log2 e`` folded into one multiply; ``P = 2^(S' - m')``, one
``ex2.approx.ftz`` on the GPU: P below 2^-126 flushes to 0); ``alpha`` is exactly 1 in a row
whose max did not move (selected, not computed); masks are applied only to tiles that hold an
invisible key. ``return_partials`` gives m back in natural-log units.

Grouped-query attention is read once per kv head: one program holds all ``G * Lq`` query rows
(G = H / Hkv) of a kv head (up to 128 rows; more are cut into row blocks), so each K/V tile is
decoded once for the whole group. Causal masks are bottom-right aligned as in
``kernels.inference`` (query i sees key j iff ``j <= i + Lk - Lq``).

Operand decode (products exact in every mode; only float32 accumulation order differs):

* ``decode="exact"`` (the interpreter, and a GPU cross-check): ``kernels.inference``'s decode
  (codes and scales to float32 in registers), then bf16 (GPU) or float32 (interpreter).
* ``decode="asm"`` / ``"ops"`` (GPU): an E2M1 code ``s e1 e0 m`` rewritten as the E4M3 byte
  ``s 0 0 0 e1 e0 m 0`` is the same value times 2^-6 (E4M3 bias 7 against E2M1's 1, and the
  E2M1 subnormal 0.5 lands on an E4M3 subnormal), so the hardware E4M3 -> f16 conversion
  (``cvt.rn.f16x2.e4m3x2``) decodes two codes per instruction exactly. "asm" rewrites four
  bytes (eight codes) per 32-bit register in PTX; "ops" does the byte rewrite with Triton ops.
  NVFP4 then multiplies by ``64 * scale`` in f16 (E2M1 times E4M3 has at most 6 significant
  bits and lies in [2^-10, 2688], exact in f16) and runs f16 MMAs; MXFP4 runs bf16 MMAs on
  values exact inside bf16's range, as ``kernels.inference``.
* Split products (fast modes only; ``use_halves`` has the rule): the low-nibble values (even
  columns) and the high-nibble ones (odd columns) stay in two tiles and each product is split
  the same way: ``S = Q^_even K^_even^T + Q^_odd K^_odd^T`` along d, ``acc += P~_even
  V^_even + P~_odd V^_odd`` along keys. This saves re-pairing the decoded halves into column
  order (one byte permute per two values); the float32 sums run in another order. MXFP4 there
  ("asm") builds the E2M1 values in bf16 from bit moves (``attn_qat_jit.E2M1_BF16_EXACT_ASM``)
  and multiplies by the bf16 scale 2^(e - 127) (bf16 has float32's exponent range, so the
  product is exact wherever the float32 one is finite); otherwise (and in "ops") it multiplies
  in float32 by 64 and by 2^e. SASS counts and timings: BENCHMARKS.md.

Cost model (d = 128, per key and kv head): NVFP4 K and V 2 * (64 + 8) = 144 bytes, MXFP4 136,
bf16 512 (3.6x / 3.8x fewer). The split partials add ``2 * 4 * (d + 2)`` bytes per query row
and split (written, then read by the merge; mostly in L2); ``default_num_splits`` has the rule.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fp4sim.kernels import fp4_jit
from fp4sim.kernels import inference as _inf
from fp4sim.kernels.attn_qat_jit import E2M1_BF16_EXACT_ASM
from fp4sim.kernels.inference import check_packed_inputs

BLOCK_N = _inf.BLOCK_N  # key tile of the P quantization (the reference recipes' block_n = 64)
MAX_BLOCK_M = 128  # query rows per program; more rows form further row blocks
DECODE_MODES = {"exact": 0, "asm": 1, "ops": 2}
MERGE_MODES = ("blocked", "serial")
# Blocked merge: float32 partials one program holds per step (rows x splits x columns of d;
# 4 warps, 32 a thread), columns of d a program, splits a step of the max pass (rows x splits)
_MERGE_TILE, _MERGE_BLOCK_D, _MERGE_MAX_TILE = 4096, 16, 4096
_LOG2E = 1.4426950408889634  # S and the row maxima are kept in log2 units (exp2 is native)
# Implementation switch (benchmarks and tests set it; products exact either way, float32 sums
# in another order): "halves" None: ``use_halves``'s rule; True / False: always / never.
_OPTIONS: dict[str, bool | None] = {"halves": None}

__all__ = [
    "BLOCK_N",
    "DECODE_MODES",
    "DecodePartials",
    "MERGE_MODES",
    "default_num_splits",
    "default_unroll",
    "fp4_decode_attention",
    "merge_blocks",
    "split_bounds",
    "tile_v",
    "use_halves",
]

# Four packed bytes -> the E4M3 bytes of their low and high nibbles -> f16 pairs (value / 64).
# Low nibble: magnitude bits 0-2 to bits 2-4, sign bit 3 to bit 7; high nibble: bits 4-6 to
# 2-4, sign bit 7 stays. cvt.rn.f16x2.e4m3x2 puts the low byte's value in the low half.
_E2M1_TO_F16_ASM = tl.constexpr("""
{
.reg .b32 a, b, lo, hi;
.reg .b16 l0, l1, h0, h1;
shl.b32 a, $4, 2;
and.b32 a, a, 0x1C1C1C1C;
shl.b32 b, $4, 4;
and.b32 b, b, 0x80808080;
or.b32 lo, a, b;
shr.b32 a, $4, 2;
and.b32 a, a, 0x1C1C1C1C;
and.b32 b, $4, 0x80808080;
or.b32 hi, a, b;
mov.b32 {l0, l1}, lo;
mov.b32 {h0, h1}, hi;
cvt.rn.f16x2.e4m3x2 $0, l0;
cvt.rn.f16x2.e4m3x2 $1, l1;
cvt.rn.f16x2.e4m3x2 $2, h0;
cvt.rn.f16x2.e4m3x2 $3, h1;
}
""")


@triton.jit
def _exp2(x, FTZ: tl.constexpr):
    """2^x in float32; FTZ (GPU): one ``ex2.approx.ftz.f32`` (results below 2^-126 flush to 0,
    which no FP4 P block can resolve against a row maximum of 1), else ``tl.math.exp2``."""
    if FTZ:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.exp2(x)


@triton.jit
def _op(x, OPK: tl.constexpr):
    """Cast a tile to the MMA operand type: 0 float32 (interpreter), 1 bf16, 2 f16."""
    if OPK == 1:
        return x.to(tl.bfloat16)
    elif OPK == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _mma(a, b, acc, OPK: tl.constexpr):
    """acc + a @ b, float32 accumulation (IEEE float32 products in the interpreter)."""
    if OPK == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _e2m1_nibbles_f16(packed, DECODE: tl.constexpr):
    """Packed bytes (R, C/2) -> (low-nibble values, high-nibble values) f16, each E2M1 / 64."""
    if DECODE == 1:
        lo, hi = tl.inline_asm_elementwise(
            _E2M1_TO_F16_ASM,
            "=r,=r,=r,=r,r",
            [packed],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=4,
        )
    else:
        lo_b = ((packed & 7) << 2) | ((packed & 8) << 4)
        hi_b = ((packed >> 2) & 0x1C) | (packed & 0x80)
        lo = lo_b.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        hi = hi_b.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return lo, hi


@triton.jit
def _decode_tile(
    packed, sbits, BLOCK: tl.constexpr, IS_MX: tl.constexpr, DECODE: tl.constexpr,
    OPK: tl.constexpr,
):
    """Packed codes (R, C/2) and scale bytes (R, C / BLOCK) -> exact values (R, C), MMA type."""
    R: tl.constexpr = packed.shape[0]
    C: tl.constexpr = 2 * packed.shape[1]
    NB: tl.constexpr = C // BLOCK
    if DECODE == 0:
        return _op(_inf._decode(packed, sbits, BLOCK, IS_MX), OPK)
    else:
        lo, hi = _e2m1_nibbles_f16(packed, DECODE)
        v = tl.reshape(tl.join(lo, hi), (R, NB, BLOCK))  # element 2i = low nibble of byte i
        if IS_MX:
            scale = fp4_jit.e8m0_decode(sbits)
            vals = (v.to(tl.float32) * 64.0) * scale[:, :, None]  # both multiplies exact
            return tl.reshape(vals, (R, C)).to(tl.bfloat16)
        else:
            # E4M3 scale bytes through the same hardware cast (exact in f16, 0x7F -> NaN).
            scale16 = sbits.to(tl.float8e4nv, bitcast=True).to(tl.float16) * 64.0
            return tl.reshape(v * scale16[:, :, None], (R, C))


@triton.jit
def _e2m1_nibbles_bf16(packed, DECODE: tl.constexpr):
    """Packed bytes (R, C/2) -> (low-nibble values, high-nibble values) bf16, exact."""
    if DECODE == 1:
        lo, hi = tl.inline_asm_elementwise(
            E2M1_BF16_EXACT_ASM, "=r,=r,=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4)
    else:
        lo, hi = _e2m1_nibbles_f16(packed, DECODE)  # E2M1 / 64: exact in float32 and bf16
        lo = (lo.to(tl.float32) * 64.0).to(tl.bfloat16)
        hi = (hi.to(tl.float32) * 64.0).to(tl.bfloat16)
    return lo, hi


@triton.jit
def _e8m0_bf16(sbits):
    """E8M0 bytes -> bf16 2^(b - 127), exact (bf16 has float32's exponent range; byte 0 is the
    subnormal 2^-127, 0x40) and 0xFF -> NaN (OCP MX v1.0 5.4.1)."""
    b = sbits.to(tl.uint16)
    bits = tl.where(b == 0, 0x40, tl.where(b == 255, 0x7FC0, b << 7))
    return bits.to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode_halves(packed, sbits, BLOCK: tl.constexpr, IS_MX: tl.constexpr,
                   DECODE: tl.constexpr):
    """Packed codes (R, C/2) and scale bytes -> (even columns, odd columns), each (R, C/2),
    exact, in the MMA type: the low and high nibbles kept apart (no re-pairing)."""
    R: tl.constexpr = packed.shape[0]
    C2: tl.constexpr = packed.shape[1]
    NB: tl.constexpr = 2 * C2 // BLOCK
    if IS_MX:
        lo, hi = _e2m1_nibbles_bf16(packed, DECODE)
        lo = tl.reshape(lo, (R, NB, BLOCK // 2))
        hi = tl.reshape(hi, (R, NB, BLOCK // 2))
        scale = _e8m0_bf16(sbits)[:, :, None]
        ev = lo * scale
        od = hi * scale
    else:
        lo, hi = _e2m1_nibbles_f16(packed, DECODE)
        lo = tl.reshape(lo, (R, NB, BLOCK // 2))
        hi = tl.reshape(hi, (R, NB, BLOCK // 2))
        scale16 = (sbits.to(tl.float8e4nv, bitcast=True).to(tl.float16) * 64.0)[:, :, None]
        ev = lo * scale16
        od = hi * scale16
    return tl.reshape(ev, (R, C2)), tl.reshape(od, (R, C2))


@triton.jit
def _key_tile(
    t, t_lo, t_hi, last_key, m_i, l_i, acc, q_hat, q_odd, qi, qk_scale, k_base, ks_base, v_ptr,
    vs_ptr, v_base, vs_base, bhkv, LQ, LK, LKP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
    IS_MX: tl.constexpr, CAUSAL: tl.constexpr, DECODE: tl.constexpr, OPK: tl.constexpr,
    UPCAST: tl.constexpr, STATIC_TILES: tl.constexpr, V_TILED: tl.constexpr,
    HALVES: tl.constexpr,
):
    """One 64-key tile of a split's flash pass (module docstring): (m, l, acc) -> updated."""
    D2: tl.constexpr = HEAD_DIM // 2
    DS: tl.constexpr = HEAD_DIM // BLOCK
    offs_d = tl.arange(0, HEAD_DIM)
    start_n = t * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < LK
    if STATIC_TILES:
        n_mask = n_mask & (t >= t_lo) & (t < t_hi)
    k_pk = _inf._load_rows(k_base, offs_n, n_mask, D2)
    k_sb = _inf._load_rows(ks_base, offs_n, n_mask, DS)
    if HALVES:
        # even and odd columns of d in two products (q_hat, q_odd: Q^'s even and odd columns)
        k_ev, k_od = _decode_halves(k_pk, k_sb, BLOCK, IS_MX, DECODE)
        s = _mma(q_hat, tl.trans(k_ev), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), OPK)
        s = _mma(q_odd, tl.trans(k_od), s, OPK)
    else:
        k_hat = _decode_tile(k_pk, k_sb, BLOCK, IS_MX, DECODE, OPK)
        s = _mma(q_hat, tl.trans(k_hat), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), OPK)
    s = s * qk_scale  # log2 units: tau * log2(e) folded into one multiply
    # Masks only where a key of the tile may be invisible: past Lk, outside this split
    # (interpreter), or (causal) past some row's last visible key.
    if (start_n + BLOCK_N - 1 > last_key) or STATIC_TILES:
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qi[:, None] + (LK - LQ))
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = _exp2(s - m_safe[:, None], not UPCAST)  # = exp(S - m); 0 at masked keys
    # alpha = exp(m - m') where the row max moved, exactly 1 where it did not (a select, not a
    # block-wide branch: no barrier, and the products by 1 keep acc and l bit for bit).
    alpha = tl.where(m_new > m_i, _exp2(m_i - m_safe, not UPCAST), 1.0)
    l_i = l_i * alpha + tl.sum(p, axis=1)  # the high-precision P, as the reference
    acc = acc * alpha[:, None]

    if V_TILED:  # (.., tiles, d, 32) bytes: the tile's V^T is one contiguous 4 KiB block
        VB: tl.constexpr = BLOCK_N // 2
        VS: tl.constexpr = BLOCK_N // BLOCK
        t64 = (bhkv * tl.cdiv(LK, BLOCK_N) + t) * HEAD_DIM
        v_pk = tl.load(v_ptr + (t64 + offs_d[:, None]) * VB + tl.arange(0, VB)[None, :])
        v_sb = tl.load(vs_ptr + (t64 + offs_d[:, None]) * VS + tl.arange(0, VS)[None, :])
    else:
        v_pk, v_sb = _inf._load_vt_tile(v_base, vs_base, start_n, LKP, HEAD_DIM, BLOCK_N, BLOCK)
    # P is finite and >= 0: the inference kernel's non-negative quantizers (same bits).
    if IS_MX:
        _pc, _psb, _ps, p_tilde = fp4_jit.mxfp4_quantize_nonneg_rows(p, BLOCK)
    else:
        p_tilde = fp4_jit.nvfp4_fake_quantize_probs(p, BLOCK, not UPCAST)
    if HALVES:
        # even and odd keys in two products: V^T's low / high nibbles, P~'s even / odd columns
        v_ev, v_od = _decode_halves(v_pk, v_sb, BLOCK, IS_MX, DECODE)
        p_ev, p_od = tl.split(tl.reshape(_op(p_tilde, OPK), (BLOCK_M, BLOCK_N // 2, 2)))
        acc = _mma(p_ev, tl.trans(v_ev), acc, OPK)
        acc = _mma(p_od, tl.trans(v_od), acc, OPK)
    else:
        v_hat = _decode_tile(v_pk, v_sb, BLOCK, IS_MX, DECODE, OPK)
        acc = _mma(_op(p_tilde, OPK), tl.trans(v_hat), acc, OPK)  # P~ exact in bf16 / f16
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr,
    qs_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    vs_ptr,
    o_ptr,
    ws_acc,
    ws_m,
    ws_l,
    qk_scale,
    H,
    HKV,
    LQ,
    LK,
    LKP,
    ROWS,
    TILES_PER_SPLIT,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
    IS_MX: tl.constexpr,
    CAUSAL: tl.constexpr,
    DECODE: tl.constexpr,
    OPK: tl.constexpr,
    UPCAST: tl.constexpr,
    STATIC_TILES: tl.constexpr,
    DIRECT: tl.constexpr,
    V_TILED: tl.constexpr,
    UNROLL: tl.constexpr,
    HALVES: tl.constexpr = False,
):
    pid_r = tl.program_id(0)  # row blocks of one split launch together: shared K/V in L2
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)  # b * HKV + kv head
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    group = H // HKV
    D2: tl.constexpr = HEAD_DIM // 2
    DS: tl.constexpr = HEAD_DIM // BLOCK
    bhkv = pid_bh.to(tl.int64)

    # Rows r = g * LQ + i of the group's query heads are contiguous in (B, H, LQ, .) storage.
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < ROWS
    qi = rows % LQ
    grow = ((b * H + hkv * group) * LQ).to(tl.int64) + rows
    q_pk = _inf._load_rows(q_ptr, grow, r_mask, D2)
    q_sb = _inf._load_rows(qs_ptr, grow, r_mask, DS)
    if HALVES:
        q_hat, q_odd = _decode_halves(q_pk, q_sb, BLOCK, IS_MX, DECODE)
    else:
        q_hat = _decode_tile(q_pk, q_sb, BLOCK, IS_MX, DECODE, OPK)
        q_odd = q_hat

    k_base = k_ptr + bhkv * LK * D2
    ks_base = ks_ptr + bhkv * LK * DS
    v_base = v_ptr + bhkv * HEAD_DIM * (LKP // 2)
    vs_base = vs_ptr + bhkv * HEAD_DIM * (LKP // BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)

    n_tiles = tl.cdiv(LK, BLOCK_N)
    t_lo = pid_s * TILES_PER_SPLIT
    t_hi = tl.minimum(t_lo + TILES_PER_SPLIT, n_tiles)
    # Causal (bottom-right): this block's rows see keys up to q_hi + LK - LQ at most, and every
    # row sees keys up to q_lo + LK - LQ; tiles past the first bound are skipped, tiles within
    # the second need no mask.
    last_key = LK - 1
    if CAUSAL:
        q_hi = tl.max(tl.where(r_mask, qi, 0), axis=0)
        q_lo = tl.min(tl.where(r_mask, qi, LQ), axis=0)
        t_hi = tl.minimum(t_hi, tl.cdiv(q_hi + LK - LQ + 1, BLOCK_N))
        last_key = tl.minimum(q_lo + LK - LQ, LK - 1)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    if STATIC_TILES:
        # The interpreter, whose range() needs a Python int: walk every tile and mask the ones
        # outside this split (S = -inf there, so nothing changes).
        for t in range(0, STATIC_TILES):
            m_i, l_i, acc = _key_tile(
                t, t_lo, t_hi, last_key, m_i, l_i, acc, q_hat, q_odd, qi, qk_scale, k_base, ks_base,
                v_ptr, vs_ptr, v_base, vs_base, bhkv, LQ, LK, LKP, HEAD_DIM, BLOCK_M, BLOCK_N,
                BLOCK, IS_MX, CAUSAL, DECODE, OPK, UPCAST, True, V_TILED, HALVES,
            )
    else:
        # UNROLL = 2: two tiles an iteration, one after the other (the same operations in the
        # same order, so the same bits); the second tile's loads, decode and Q K^T do not wait
        # for the first's softmax, so one warp has independent work in flight. An odd last tile
        # runs alone after the loop.
        t_pairs = t_lo + tl.maximum(t_hi - t_lo, 0) // UNROLL * UNROLL
        for t in range(t_lo, t_pairs, UNROLL):
            m_i, l_i, acc = _key_tile(
                t, t_lo, t_hi, last_key, m_i, l_i, acc, q_hat, q_odd, qi, qk_scale, k_base, ks_base,
                v_ptr, vs_ptr, v_base, vs_base, bhkv, LQ, LK, LKP, HEAD_DIM, BLOCK_M, BLOCK_N,
                BLOCK, IS_MX, CAUSAL, DECODE, OPK, UPCAST, False, V_TILED, HALVES,
            )
            if UNROLL == 2:
                m_i, l_i, acc = _key_tile(
                    t + 1, t_lo, t_hi, last_key, m_i, l_i, acc, q_hat, q_odd, qi, qk_scale, k_base,
                    ks_base, v_ptr, vs_ptr, v_base, vs_base, bhkv, LQ, LK, LKP, HEAD_DIM,
                    BLOCK_M, BLOCK_N, BLOCK, IS_MX, CAUSAL, DECODE, OPK, UPCAST, False, V_TILED,
                    HALVES,
                )
        if UNROLL == 2:
            for t in tl.range(t_pairs, t_hi, num_stages=1):  # at most one tile
                m_i, l_i, acc = _key_tile(
                    t, t_lo, t_hi, last_key, m_i, l_i, acc, q_hat, q_odd, qi, qk_scale, k_base,
                    ks_base, v_ptr, vs_ptr, v_base, vs_base, bhkv, LQ, LK, LKP, HEAD_DIM,
                    BLOCK_M, BLOCK_N, BLOCK, IS_MX, CAUSAL, DECODE, OPK, UPCAST, False, V_TILED,
                    HALVES,
                )

    if DIRECT:  # one split: normalize here, exactly as kernels.inference
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = tl.where(l_i[:, None] > 0, acc / l_safe[:, None], 0.0)
        o_ptrs = o_ptr + grow[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, _inf._to_bf16(o, UPCAST), mask=r_mask[:, None])
    else:
        wrow = (bhkv * NUM_SPLITS + pid_s) * ROWS + rows
        tl.store(ws_m + wrow, m_i, mask=r_mask)
        tl.store(ws_l + wrow, l_i, mask=r_mask)
        tl.store(
            ws_acc + wrow[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=r_mask[:, None]
        )


@triton.jit
def _store_merged(o_ptr, o, l_sum, pid_bh, H, HKV, LQ, rows, r_mask, offs_d,
                  HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Both merges' last step: O = sum w acc / L (IEEE division; 0 for a row that saw no key),
    bf16, stored at the rows' heads (row r = g * Lq + i of kv head hkv is head hkv * G + g)."""
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)
    out = tl.math.div_rn(o, tl.broadcast_to(l_safe[:, None], o.shape))
    out = tl.where(l_sum[:, None] > 0, out, 0.0)
    grow = ((b * H + hkv * (H // HKV)) * LQ).to(tl.int64) + rows
    tl.store(
        o_ptr + grow[:, None] * HEAD_DIM + offs_d[None, :],
        _inf._to_bf16(out, UPCAST),
        mask=r_mask[:, None],
    )


@triton.jit
def _merge_kernel(
    ws_acc,
    ws_m,
    ws_l,
    o_ptr,
    H,
    HKV,
    LQ,
    ROWS,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    STATIC_SPLITS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < ROWS
    offs_d = tl.arange(0, HEAD_DIM)
    base = pid_bh.to(tl.int64) * NUM_SPLITS * ROWS + rows
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for s in range(STATIC_SPLITS if STATIC_SPLITS else NUM_SPLITS):  # interpreter: an int
        m = tl.maximum(m, tl.load(ws_m + base + s * ROWS, mask=r_mask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no visible key in any split
    l_sum = tl.zeros((BLOCK_R,), tl.float32)
    o = tl.zeros((BLOCK_R, HEAD_DIM), tl.float32)
    for s in range(STATIC_SPLITS if STATIC_SPLITS else NUM_SPLITS):  # interpreter: an int
        w = _exp2(
            tl.load(ws_m + base + s * ROWS, mask=r_mask, other=float("-inf")) - m_safe, not UPCAST
        )
        l_sum += w * tl.load(ws_l + base + s * ROWS, mask=r_mask, other=0.0)
        a = tl.load(
            ws_acc + (base + s * ROWS)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=r_mask[:, None],
            other=0.0,
        )
        o += w[:, None] * a
    _store_merged(o_ptr, o, l_sum, pid_bh, H, HKV, LQ, rows, r_mask, offs_d, HEAD_DIM, UPCAST)


@triton.jit
def _merge_blocked_kernel(
    ws_acc,
    ws_m,
    ws_l,
    o_ptr,
    H,
    HKV,
    LQ,
    ROWS,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    STATIC_SPLITS: tl.constexpr,
):
    # The merge of _merge_kernel over [BLOCK_S splits, BLOCK_R rows] tiles and a BLOCK_D slice
    # of d: a kv head with S splits takes S / BLOCK_SM + S / BLOCK_S dependent steps (the loads
    # of one step are issued together) instead of 2 S, and HEAD_DIM / BLOCK_D programs instead
    # of one read its partials. Each step only adds into per-split lanes; the sums over the
    # lanes (cross-thread) run once at the end.
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < ROWS
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    base = pid_bh.to(tl.int64) * NUM_SPLITS * ROWS
    m_lanes = tl.full((BLOCK_SM, BLOCK_R), float("-inf"), tl.float32)
    for s0 in range(0, STATIC_SPLITS if STATIC_SPLITS else NUM_SPLITS, BLOCK_SM):
        s = s0 + tl.arange(0, BLOCK_SM)
        mask = (s < NUM_SPLITS)[:, None] & r_mask[None, :]
        idx = base + s[:, None] * ROWS + rows[None, :]
        m_lanes = tl.maximum(m_lanes, tl.load(ws_m + idx, mask=mask, other=float("-inf")))
    m = tl.max(m_lanes, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no visible key in any split
    l_lanes = tl.zeros((BLOCK_S, BLOCK_R), tl.float32)
    o_lanes = tl.zeros((BLOCK_S, BLOCK_R, BLOCK_D), tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, STATIC_SPLITS if STATIC_SPLITS else NUM_SPLITS, BLOCK_S):
        s = s0 + offs_s
        mask = (s < NUM_SPLITS)[:, None] & r_mask[None, :]
        idx = base + s[:, None] * ROWS + rows[None, :]
        w = _exp2(tl.load(ws_m + idx, mask=mask, other=float("-inf")) - m_safe[None, :],
                  not UPCAST)  # 0 for padded splits and for splits where the row sees no key
        l_lanes += w * tl.load(ws_l + idx, mask=mask, other=0.0)
        a = tl.load(
            ws_acc + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=mask[:, :, None],
            other=0.0,
        )
        o_lanes += w[:, :, None] * a
    l_sum = tl.sum(l_lanes, axis=0)
    o = tl.sum(o_lanes, axis=0)
    _store_merged(o_ptr, o, l_sum, pid_bh, H, HKV, LQ, rows, r_mask, offs_d, HEAD_DIM, UPCAST)


def tile_v(v_packed: torch.Tensor, v_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_for_inference``'s V^T (B, Hkv, d, Lkp/2) codes and (B, Hkv, d, Lkp/blk) scales
    -> the key-tiled layout (B, Hkv, T, d, 32) and (B, Hkv, T, d, 64/blk), T = ceil(Lk / 64):
    each 64-key tile's V^T is one contiguous block (4 KiB of codes at d = 128), where the
    untiled rows give 32-byte pieces 1/2 Lkp bytes apart. Keys appended up to 64 T are zero
    codes with zero scales (masked: P = 0 there). Same values, so the same function."""
    if v_packed.dim() != 4 or v_scales.dim() != 4:
        raise ValueError("tile_v takes pack_for_inference's 4-D V^T codes and scales")
    b, h, d, half = v_packed.shape
    nb = v_scales.shape[-1]
    blk = 2 * half // nb
    n_t = -(-2 * half // BLOCK_N)
    pad_codes = n_t * BLOCK_N // 2 - half
    pad_scales = n_t * BLOCK_N // blk - nb
    vp = torch.nn.functional.pad(v_packed, (0, pad_codes))
    vs = torch.nn.functional.pad(v_scales, (0, pad_scales))
    vp = vp.reshape(b, h, d, n_t, BLOCK_N // 2).permute(0, 1, 3, 2, 4).contiguous()
    vs = vs.reshape(b, h, d, n_t, BLOCK_N // blk).permute(0, 1, 3, 2, 4).contiguous()
    return vp, vs


def merge_blocks(rows: int, head_dim: int, num_splits: int) -> tuple[int, int, int, int]:
    """Blocked merge sizes (rows, splits a step, splits a max-pass step, columns of d) for
    ``rows`` query rows per kv head and ``num_splits`` splits: rows a program = next power of
    two (2 to 16); splits a step = as many as fit ``_MERGE_TILE`` float32 values at 16 columns
    (at most 64, at most the splits' next power of two); then columns widened into what is left
    of the tile (few splits: fewer, wider programs, no masked lanes)."""
    block_r = min(16, max(2, triton.next_power_of_2(rows)))
    splits_p2 = triton.next_power_of_2(max(1, num_splits))
    block_d = min(_MERGE_BLOCK_D, head_dim)
    block_s = min(64, splits_p2, _MERGE_TILE // (block_r * block_d))
    block_d = min(head_dim, max(block_d, _MERGE_TILE // (block_r * block_s)))
    return block_r, block_s, min(splits_p2, _MERGE_MAX_TILE // block_r), block_d


def use_halves(is_mx: bool, block_m: int) -> bool:
    """Whether a fast decode mode runs split products (module docstring): MXFP4 always (its
    bf16 decode lives there), NVFP4 at 16-row programs; ``_OPTIONS["halves"]`` overrides.
    H200, 2026-12-03 19:27 (BENCHMARKS.md, 10 decode shapes split and joined): NVFP4 16-row
    programs 2-8 % faster, 64-row 8-10 % and 128-row 1-4 % slower; MXFP4 faster at 7 shapes
    (1-9 %), equal at 2, 2 % slower at 1."""
    forced = _OPTIONS["halves"]
    return (is_mx or block_m <= 16) if forced is None else bool(forced)


def default_unroll(block_m: int) -> int:
    """Key tiles a loop iteration: 2 for programs of 128 query rows, else 1. H200, 2026-12-03
    (BENCHMARKS.md): two tiles made (1, 8/1, 16, 131072) 4 % faster, 16-row shapes from 1 %
    faster to 21 % slower (123 -> 167 registers: 3 programs a multiprocessor instead of 4) and
    a 64-row shape 24 % slower."""
    return 2 if block_m >= 128 else 1


def split_bounds(lk: int, num_splits: int) -> tuple[int, list[tuple[int, int]]]:
    """(tiles_per_split, key ranges [start, end) of the splits actually used)."""
    n_tiles = -(-lk // BLOCK_N)
    num_splits = max(1, min(int(num_splits), n_tiles))
    tps = -(-n_tiles // num_splits)
    n_used = -(-n_tiles // tps)
    return tps, [(s * tps * BLOCK_N, min((s + 1) * tps * BLOCK_N, lk)) for s in range(n_used)]


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Programs of this many query rows that fit on one multiprocessor at once (registers: about
# 160 per thread at 16 rows / 4 warps, 250 at 64 rows / 4 warps and 128 rows / 8 warps; sm_90
# compile of 2026-12-02).
_PROGRAMS_PER_SM = {16: 3, 32: 2, 64: 1, 128: 1}
# More waves of programs pay where each split still walks enough key tiles: (waves, least
# tiles a split), most waves first (H200 sweeps, BENCHMARKS.md 2026-12-03 15:27 and 17:20).
_WAVES_AND_MIN_TILES = ((4, 32), (2, 16))


def default_num_splits(batch_kv_heads: int, row_blocks: int, block_m: int, lk: int,
                       sm_count: int) -> int:
    """Splits per (batch, kv head): the most waves of resident programs in
    ``_WAVES_AND_MIN_TILES`` whose splits keep at least that many key tiles each, else one
    wave; at least 2 key tiles (128 keys) per split. Each split costs rows * (d + 2) float32 of
    partials (written, then read by the merge). H200 split sweeps of 2026-12-03 (BENCHMARKS.md):
    two waves against one, 3 to 20 % faster at 8 and 64 kv heads with 131072 or 32768 keys (21
    to 342 tiles a split), 3 % slower at (8, 32/8, 16, 8192) (21 tiles a split) and 12 to 53 %
    slower at one kv head (1 to 8 tiles a split); four against two, 8 % faster at (8, 32/8, 1,
    131072) (26 splits of 79 tiles: 0.747 against 0.813 ms), 19 % at (8, 32/8, 16, 131072) (10
    splits of 205 tiles: 1.388 against 1.705 ms) and 8-10 % at (8, 32/8, 16, 32768) (7 and 10
    splits of 73 and 51 tiles: 0.410 and 0.421 against 0.455 ms); blocked merge throughout."""
    n_tiles = -(-lk // BLOCK_N)
    slots = sm_count * _PROGRAMS_PER_SM.get(block_m, 1)
    programs = max(1, batch_kv_heads * row_blocks)
    want = -(-slots // programs)
    for waves, min_tiles in _WAVES_AND_MIN_TILES:
        if n_tiles >= min_tiles * -(-waves * slots // programs):
            want = -(-waves * slots // programs)
            break
    return max(1, min(want, max(1, n_tiles // 2)))


class DecodePartials(tuple):
    """(m, l, acc): per-split row max, row sum (B, H, Lq, S) and accumulator (B, H, Lq, S, d),
    float32, as the split kernel wrote them (before the merge)."""

    __slots__ = ()


def fp4_decode_attention(
    q_packed: torch.Tensor,
    q_scales: torch.Tensor,
    k_packed: torch.Tensor,
    k_scales: torch.Tensor,
    v_packed: torch.Tensor,
    v_scales: torch.Tensor,
    fmt: object = "nvfp4",
    causal: bool = False,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    decode: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    return_partials: bool = False,
    out: torch.Tensor | None = None,
    merge: str = "blocked",
    unroll: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DecodePartials]:
    """Split-KV FP4 attention on packed inputs (``kernels.inference`` layout) -> bf16 O.

    ``num_splits``: splits per (batch, kv head); None uses ``default_num_splits`` (1 on the
    CPU); it is clamped to the number of 64-key tiles and reduced so that no split is empty
    (``split_bounds``). ``decode``: 'exact', 'asm' or 'ops' (module docstring); None picks
    'asm' on the GPU, 'exact' in the interpreter (the only mode there). ``return_partials``
    (testing aid) also returns the split partials (``DecodePartials``) and always runs the
    merge kernel. ``out``: optional contiguous bf16 (B, H, Lq, d) tensor to write O into.
    ``merge``: 'blocked' (default) or 'serial' (module docstring; same formula and bound).
    ``unroll``: key tiles per loop iteration on the GPU, 1 or 2 (None: ``default_unroll``);
    the same bits either way.
    Returns O (B, H, Lq, d) bfloat16.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {list(MERGE_MODES)}, got {merge!r}")
    if unroll not in (None, 1, 2):
        raise ValueError(f"unroll must be 1 or 2, got {unroll!r}")
    v_tiled = isinstance(v_packed, torch.Tensor) and v_packed.dim() == 5
    shp = check_packed_inputs(
        q_packed, q_scales, k_packed, k_scales, v_packed, v_scales, fmt,
        v_tile=BLOCK_N if v_tiled else 0,
    )
    name, blk, bsz, heads, hkv, lq, lk, d, lkp = shp
    tau = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    q_packed, q_scales, k_packed, k_scales, v_packed, v_scales = (
        t.contiguous() for t in (q_packed, q_scales, k_packed, k_scales, v_packed, v_scales)
    )  # documented in kernels.inference: non-contiguous inputs are copied
    dev = q_packed.device
    on_gpu = dev.type == "cuda"
    if decode is None:
        decode = "asm" if on_gpu else "exact"
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {sorted(DECODE_MODES)}, got {decode!r}")
    if not on_gpu and decode != "exact":
        raise ValueError("the interpreter has no inline PTX or fp8 casts: use decode='exact'")
    mode = DECODE_MODES[decode]
    is_mx = name == "mxfp4"
    if not on_gpu:
        opk = 0
    elif mode == 0 or is_mx:
        opk = 1
    else:
        opk = 2
    group = heads // hkv
    rows = group * lq
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))
    if unroll is None:
        unroll = default_unroll(block_m)
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = (
            default_num_splits(bsz * hkv, row_blocks, block_m, lk, _sm_count(dev))
            if on_gpu
            else 1
        )
    tps, ranges = split_bounds(lk, num_splits)
    n_splits = len(ranges)
    direct = n_splits == 1 and not return_partials
    if out is None:
        out = torch.empty((bsz, heads, lq, d), dtype=torch.bfloat16, device=dev)
    elif (
        out.dtype != torch.bfloat16
        or tuple(out.shape) != (bsz, heads, lq, d)
        or not out.is_contiguous()
        or out.device != dev
    ):
        raise ValueError(f"out must be a contiguous bf16 tensor of shape {(bsz, heads, lq, d)}")
    if direct:
        ws_acc = ws_m = ws_l = out  # unused pointers
    else:
        ws_acc = torch.empty((bsz * hkv, n_splits, rows, d), dtype=torch.float32, device=dev)
        ws_m = torch.empty((bsz * hkv, n_splits, rows), dtype=torch.float32, device=dev)
        ws_l = torch.empty_like(ws_m)
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if num_stages is None:
        num_stages = 3
    grid = (row_blocks, n_splits, bsz * hkv)
    _decode_split_kernel[grid](
        q_packed,
        q_scales,
        k_packed,
        k_scales,
        v_packed,
        v_scales,
        out,
        ws_acc,
        ws_m,
        ws_l,
        tau * _LOG2E,
        heads,
        hkv,
        lq,
        lk,
        lkp,
        rows,
        tps,
        n_splits,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK=blk,
        IS_MX=is_mx,
        CAUSAL=bool(causal),
        DECODE=mode,
        OPK=opk,
        UPCAST=not on_gpu,
        STATIC_TILES=0 if on_gpu else triton.cdiv(lk, BLOCK_N),
        DIRECT=direct,
        V_TILED=v_tiled,
        UNROLL=unroll,
        HALVES=mode != 0 and use_halves(is_mx, block_m),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct and merge == "blocked":
        block_r, block_s, block_sm, block_d = merge_blocks(rows, d, n_splits)
        _merge_blocked_kernel[(bsz * hkv, triton.cdiv(rows, block_r), d // block_d)](
            ws_acc,
            ws_m,
            ws_l,
            out,
            heads,
            hkv,
            lq,
            rows,
            n_splits,
            HEAD_DIM=d,
            BLOCK_R=block_r,
            BLOCK_S=block_s,
            BLOCK_SM=block_sm,
            BLOCK_D=block_d,
            UPCAST=not on_gpu,
            STATIC_SPLITS=0 if on_gpu else n_splits,
            num_warps=4,
        )
    elif not direct:
        block_r = 16
        _merge_kernel[(bsz * hkv, triton.cdiv(rows, block_r))](
            ws_acc,
            ws_m,
            ws_l,
            out,
            heads,
            hkv,
            lq,
            rows,
            n_splits,
            HEAD_DIM=d,
            BLOCK_R=block_r,
            UPCAST=not on_gpu,
            STATIC_SPLITS=0 if on_gpu else n_splits,
            num_warps=4,
        )
    if not return_partials:
        return out

    def _rows_to_heads(x: torch.Tensor) -> torch.Tensor:
        # (B*Hkv, S, G*Lq, ...) -> (B, H, Lq, S, ...); row r = g * Lq + i, head = hkv * G + g
        tail = x.shape[3:]
        x = x.reshape(bsz, hkv, n_splits, group, lq, *tail)
        x = x.permute(0, 1, 3, 4, 2, *range(5, 5 + len(tail)))
        return x.reshape(bsz, heads, lq, n_splits, *tail)

    m_nat = ws_m / _LOG2E  # back to natural-log units (-inf stays -inf)
    return out, DecodePartials(
        (_rows_to_heads(m_nat), _rows_to_heads(ws_l), _rows_to_heads(ws_acc))
    )
