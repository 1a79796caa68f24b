"""FP4 inference attention on packed FP4 Q, K, V (NVFP4 or MXFP4), P quantized in registers.

Forward only, flash-style over key tiles of ``BLOCK_N = 64`` keys (this module's kernel,
``kernel="tiles"``; ``fp4_inference_attention`` runs the same function by default through
``kernels/prefill.py``, which decodes the operands once); the math is
``docs/attention-math.md`` "Forward" with V blocked along the key axis (the contraction axis of
P.V, as an FP4 tensor-core product needs) and P quantized per tile against the running row max:
the reference recipes ``infer-nvfp4`` / ``infer-mxfp4`` (``reference.fp4_attention_forward(...,
mode="tiled")`` with ``block_n = 64``).

Input layout (``pack_for_inference`` builds it from float tensors with ``quantize_fp4``):

==============  ==========================  =========================================
tensor          shape                       meaning
==============  ==========================  =========================================
``q_packed``    (B, H, Lq, d/2) uint8       Q codes along d, element 2i in the low nibble
``q_scales``    (B, H, Lq, d/blk) uint8     E4M3 (NVFP4, blk 16) / E8M0 (MXFP4, blk 32)
``k_packed``    (B, Hkv, Lk, d/2) uint8     K codes along d
``k_scales``    (B, Hkv, Lk, d/blk) uint8
``v_packed``    (B, Hkv, d, Lkp/2) uint8    V^T: codes along the KEY axis; Lkp = Lk rounded
                                            up to a multiple of blk (zero keys appended)
``v_scales``    (B, Hkv, d, Lkp/blk) uint8  one scale per blk consecutive keys of one channel
==============  ==========================  =========================================

No tensor scale anywhere (the inference recipes use none). Grouped-query attention: query head
h reads kv head ``h // (H // Hkv)``. Causal masks are bottom-right aligned (query i sees key j
iff ``j <= i + Lk - Lq``); rows that see no key output 0. Keys ``>= Lk`` in the last tile are
masked (S = -inf, so P = 0 there: they never change a valid block's amax or scale).

Per key tile j (rows r of the query tile):
``S = tau * Q^ K^_j^T`` (fp32 accumulation), ``m' = max(m, rowmax S)``, ``P = exp(S - m')``,
``P~ = FQ(P)`` (blocks of 16 keys with an E4M3 ``amax/6`` scale for NVFP4; blocks of 32 with
the E8M0 ``rceil`` scale for MXFP4; ``kernels.fp4_jit`` op order, fp4sim defaults),
``l = l e^{m - m'} + rowsum(P)`` (the high-precision P, as the reference), ``acc = acc e^{m -
m'} + P~ V^_j``; finally ``O = acc / l`` in bfloat16.

Products: MXFP4 through ``tl.dot_scaled(..., "e2m1", ...)`` (on Hopper Triton upcasts to bf16
and runs a bf16 MMA). Triton 3.6's interpreter has no ``dot_scaled`` (its builder lacks
``create_dot_scaled``), so under ``TRITON_INTERPRET=1`` the MXFP4 products decode codes and E8M0
scales in registers exactly as the NVFP4 path does (the same bf16 upcast): CPU tests check the
MXFP4 numerics (operand layout, P quantization, scales), and ``tl.dot_scaled`` itself is
tested on the GPU (``property_tests/test_kernels_inference.py``, CUDA only).
NVFP4 by decoding codes and E4M3 scales in registers to bf16 and
``tl.dot``. Every FP4 value times its scale is exact in bf16 (at most 2 + 4 significant bits,
bf16 has 8 and float32's exponent range), so the products are exact and only the float32
accumulation order differs from the reference.

Head dims 64 and 128. CPU tensors run only under ``TRITON_INTERPRET=1``; inputs must be uint8;
non-contiguous inputs are copied (documented cost: one extra pass over that input).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fp4sim.kernels import fp4_jit
from fp4sim.kernels.quantize import BLOCK_SIZES, check_device, format_name, quantize_fp4

BLOCK_N = 64  # key tile width of the P quantization (the reference recipes' block_n)
SUPPORTED_HEAD_DIMS = (64, 128)
# Where the MXFP4 products use tl.dot_scaled (QK^T, PV) by head dim. On the H100 with Triton
# 3.6 (2026-11-25) QK^T through dot_scaled at d = 64 gave wrong outputs inside this kernel
# (relative error 0.77 against the decode path, while a standalone dot_scaled of the same
# shape was exact; benchmarks/gpu_dot_scaled_probe.py, docs/bench/kernels-inference.md), so at
# d = 64 QK^T decodes in registers and only PV uses dot_scaled.
_MX_DOT_SCALED_DEFAULT: dict[int, tuple[bool, bool]] = {64: (False, True), 128: (True, True)}
# The kernels fp4_inference_attention can run (its docstring), and the one it runs by default:
# 'dense' since it measured 1.66x-2.39x SDPA's forward on an H200 against 4.7x-6.7x for 'tiles'
# and 2.8x-4.0x for 'loop' (issue 15's prefill shapes, NVFP4 and MXFP4; BENCHMARKS.md,
# 2026-12-03 17:03 UTC). Decode-shaped calls (few queries) belong to kernels.decode.
KERNELS = ("tiles", "loop", "dense")
DEFAULT_KERNEL = "dense"

__all__ = [
    "BLOCK_N",
    "PackedShape",
    "check_packed_inputs",
    "fp4_inference_attention",
    "pack_for_inference",
]


@triton.jit
def _load_rows(ptr, rows, row_mask, n_cols: tl.constexpr):
    """Load a (R, n_cols) uint8 tile of a row-major matrix with n_cols columns."""
    cols = tl.arange(0, n_cols)
    return tl.load(
        ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=row_mask[:, None], other=0
    )


@triton.jit
def _load_vt_tile(v_base, vs_base, start_n, LKP, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The V^T tile of keys [start_n, start_n + BLOCK_N): (HEAD_DIM, BLOCK_N / 2) code bytes
    along keys and (HEAD_DIM, BLOCK_N / BLOCK) scale bytes; zero past the padded length."""
    offs_d = tl.arange(0, HEAD_DIM)
    vk = start_n // 2 + tl.arange(0, BLOCK_N // 2)
    vks = start_n // BLOCK + tl.arange(0, BLOCK_N // BLOCK)
    v_pk = tl.load(
        v_base + offs_d[:, None].to(tl.int64) * (LKP // 2) + vk[None, :],
        mask=vk[None, :] < LKP // 2,
        other=0,
    )
    v_sb = tl.load(
        vs_base + offs_d[:, None].to(tl.int64) * (LKP // BLOCK) + vks[None, :],
        mask=vks[None, :] < LKP // BLOCK,
        other=0,
    )
    return v_pk, v_sb


@triton.jit
def _decode(packed, sbits, BLOCK: tl.constexpr, IS_MX: tl.constexpr):
    """Packed codes (R, C/2) and scale bytes (R, C/BLOCK) -> float32 values (R, C) (exact)."""
    if IS_MX:
        scale = fp4_jit.e8m0_decode(sbits)
    else:
        scale = fp4_jit.e4m3_decode(sbits)
    return fp4_jit.dequantize_rows(fp4_jit.unpack_fp4_rows(packed), scale, BLOCK)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation; a, b float32 holding values exact in bf16.

    UPCAST (TRITON_INTERPRET=1 only): Triton 3.6's interpreter multiplies the raw bit patterns
    of bfloat16 operands, so the operands stay float32 there (exact, so the math is the same).
    """
    if UPCAST:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)


@triton.jit
def _to_bf16(x, UPCAST: tl.constexpr):
    """float32 -> bfloat16 with round-to-nearest-even (the GPU's cvt.rn.bf16.f32).

    UPCAST (TRITON_INTERPRET=1 only): Triton 3.6's interpreter truncates on this cast, so the
    rounding is done on the bits first (finite values; the kernel's O is finite).
    """
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # RNE to 8 significant bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _fp4_inference_fwd_kernel(
    q_ptr,
    qs_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    vs_ptr,
    o_ptr,
    pc_ptr,
    sm_scale,
    H,
    GROUP,
    LQ,
    LK,
    LKP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
    IS_MX: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_SCALED_QK: tl.constexpr,
    DOT_SCALED_PV: tl.constexpr,
    QUANT_P: tl.constexpr,
    UPCAST: tl.constexpr,
    STATIC_END: tl.constexpr,
    STORE_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    bhkv = (b * (H // GROUP) + hkv).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    D2: tl.constexpr = HEAD_DIM // 2
    DS: tl.constexpr = HEAD_DIM // BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < LQ
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    k_base = k_ptr + bhkv * LK * D2
    ks_base = ks_ptr + bhkv * LK * DS
    v_base = v_ptr + bhkv * HEAD_DIM * (LKP // 2)
    vs_base = vs_ptr + bhkv * HEAD_DIM * (LKP // BLOCK)

    q_pk = _load_rows(q_ptr + bh * LQ * D2, offs_m, m_mask, D2)
    q_sb = _load_rows(qs_ptr + bh * LQ * DS, offs_m, m_mask, DS)
    if not DOT_SCALED_QK:
        q_hat = _decode(q_pk, q_sb, BLOCK, IS_MX)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)

    # Bottom-right causal alignment: query i sees key j iff j <= i + LK - LQ.
    # STATIC_END (the interpreter, whose range() needs a Python int): walk every key tile and
    # let the masks skip the invisible ones; otherwise stop after the last visible tile.
    if CAUSAL:
        n_end = tl.minimum(LK, (pid_m + 1) * BLOCK_M + LK - LQ)
    else:
        n_end = LK
    for start_n in range(0, STATIC_END if STATIC_END else n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < LK
        k_pk = _load_rows(k_base, offs_n, n_mask, D2)
        k_sb = _load_rows(ks_base, offs_n, n_mask, DS)
        if DOT_SCALED_QK:
            qk = tl.dot_scaled(q_pk, q_sb, "e2m1", tl.trans(k_pk), k_sb, "e2m1")
        else:
            k_hat = _decode(k_pk, k_sb, BLOCK, IS_MX)
            qk = _dot(q_hat, tl.trans(k_hat), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST)
        s = qk * sm_scale
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (LK - LQ))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp(s - m_safe[:, None])  # 0 at masked keys
        alpha = tl.exp(m_i - m_safe)  # exp(-inf) = 0 on the first visible tile
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the high-precision P, as the reference
        acc = acc * alpha[:, None]
        m_i = m_new

        # V^T tile: (HEAD_DIM, BLOCK_N) codes along keys, scales (HEAD_DIM, BLOCK_N / BLOCK).
        v_pk, v_sb = _load_vt_tile(v_base, vs_base, start_n, LKP, HEAD_DIM, BLOCK_N, BLOCK)
        if not QUANT_P:  # benchmark ablation only (a different function: P not quantized)
            v_hat = _decode(v_pk, v_sb, BLOCK, IS_MX)
            acc = _dot(p, tl.trans(v_hat), acc, UPCAST)
        else:
            if STORE_P:  # testing aid: the P codes of this tile (general quantizer, same bits)
                if IS_MX:
                    pc_dbg, _sb_dbg, _s_dbg = fp4_jit.mxfp4_quantize_rows(p, BLOCK)
                else:
                    pc_dbg, _sb_dbg, _s_dbg = fp4_jit.nvfp4_quantize_rows(p, BLOCK)
                lkt = tl.cdiv(LK, BLOCK_N) * BLOCK_N
                pc_ptrs = pc_ptr + bh * LQ * lkt + offs_m[:, None].to(tl.int64) * lkt
                tl.store(
                    pc_ptrs + offs_n[None, :],
                    pc_dbg,
                    mask=m_mask[:, None] & (offs_n[None, :] < lkt),
                )
            # P is finite and >= 0: the cheaper non-negative quantizers, bit-identical there.
            if IS_MX:
                p_codes, p_sb, _ps, p_tilde = fp4_jit.mxfp4_quantize_nonneg_rows(p, BLOCK)
            else:
                p_tilde = fp4_jit.nvfp4_fake_quantize_probs(p, BLOCK, not UPCAST)
            if DOT_SCALED_PV:
                acc = tl.dot_scaled(
                    fp4_jit.pack_fp4_rows(p_codes),
                    p_sb,
                    "e2m1",
                    tl.trans(v_pk),
                    v_sb,
                    "e2m1",
                    acc,
                )
            else:
                v_hat = _decode(v_pk, v_sb, BLOCK, IS_MX)
                acc = _dot(p_tilde, tl.trans(v_hat), acc, UPCAST)  # P~ exact in bf16

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(l_i[:, None] > 0, acc / l_safe[:, None], 0.0)  # no visible key -> 0
    o_ptrs = o_ptr + bh * LQ * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, _to_bf16(o, UPCAST), mask=m_mask[:, None])


def _check_uint8(name: str, t: torch.Tensor, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (packed FP4 codes or scale bytes), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


class PackedShape(NamedTuple):
    """Sizes of a validated packed problem (layout in the module docstring)."""

    fmt: str
    block: int
    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    head_dim: int
    lk_padded: int


def check_packed_inputs(
    q_packed: torch.Tensor,
    q_scales: torch.Tensor,
    k_packed: torch.Tensor,
    k_scales: torch.Tensor,
    v_packed: torch.Tensor,
    v_scales: torch.Tensor,
    fmt: object,
    head_dim: int | None = None,
    v_tile: int = 0,
) -> PackedShape:
    """Validate packed Q, K, V (dtypes, device, shapes of the module docstring's layout).

    ``v_tile`` > 0: V in the key-tiled layout of ``kernels.decode.tile_v`` instead, v_packed
    (B, Hkv, T, d, v_tile/2) and v_scales (B, Hkv, T, d, v_tile/blk), T = ceil(Lk / v_tile).
    """
    name = format_name(fmt)
    blk = BLOCK_SIZES[name]
    for nm, t in (
        ("q_packed", q_packed),
        ("q_scales", q_scales),
        ("k_packed", k_packed),
        ("k_scales", k_scales),
        ("v_packed", v_packed),
        ("v_scales", v_scales),
    ):
        _check_uint8(nm, t, 5 if v_tile and nm.startswith("v_") else 4)
    check_device(q_packed, q_scales, k_packed, k_scales, v_packed, v_scales)
    bsz, heads, lq, d2 = q_packed.shape
    d = 2 * d2
    if head_dim is not None and head_dim != d:
        raise ValueError(f"head_dim={head_dim} but q_packed holds d = 2 * {d2} = {d}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head dim {d}; supported: {SUPPORTED_HEAD_DIMS}")
    bk, hkv, lk, dk2 = k_packed.shape
    if bk != bsz or dk2 != d2:
        raise ValueError(
            f"k_packed {tuple(k_packed.shape)} does not match q_packed "
            f"{tuple(q_packed.shape)} in batch or head dim"
        )
    if hkv == 0 or heads % hkv:
        raise ValueError(f"Hkv={hkv} must divide H={heads} (grouped-query attention)")
    if lq == 0 or lk == 0:
        raise ValueError(f"empty attention: Lq={lq}, Lk={lk}")
    if tuple(q_scales.shape) != (bsz, heads, lq, d // blk):
        raise ValueError(
            f"q_scales must have shape {(bsz, heads, lq, d // blk)} for {name}, "
            f"got {tuple(q_scales.shape)}"
        )
    if tuple(k_scales.shape) != (bsz, hkv, lk, d // blk):
        raise ValueError(
            f"k_scales must have shape {(bsz, hkv, lk, d // blk)} for {name}, "
            f"got {tuple(k_scales.shape)}"
        )
    lkp = -(-lk // blk) * blk
    if v_tile:
        nt = -(-lk // v_tile)
        for nm, t, last in (("v_packed", v_packed, v_tile // 2), ("v_scales", v_scales,
                                                                    v_tile // blk)):
            if tuple(t.shape) != (bsz, hkv, nt, d, last):
                raise ValueError(
                    f"tiled {nm} must have shape {(bsz, hkv, nt, d, last)} (kernels.decode."
                    f"tile_v), got {tuple(t.shape)}"
                )
        return PackedShape(name, blk, bsz, heads, hkv, lq, lk, d, lkp)
    if tuple(v_packed.shape) != (bsz, hkv, d, lkp // 2):
        raise ValueError(
            f"v_packed must be V^T packed along keys, shape (B, Hkv, d, Lkp/2) = "
            f"{(bsz, hkv, d, lkp // 2)} (Lkp = Lk rounded up to {blk}), got "
            f"{tuple(v_packed.shape)}; build it with pack_for_inference"
        )
    if tuple(v_scales.shape) != (bsz, hkv, d, lkp // blk):
        raise ValueError(
            f"v_scales must have shape {(bsz, hkv, d, lkp // blk)}, got {tuple(v_scales.shape)}"
        )
    return PackedShape(name, blk, bsz, heads, hkv, lq, lk, d, lkp)


def fp4_inference_attention(
    q_packed: torch.Tensor,
    q_scales: torch.Tensor,
    k_packed: torch.Tensor,
    k_scales: torch.Tensor,
    v_packed: torch.Tensor,
    v_scales: torch.Tensor,
    fmt: object = "nvfp4",
    causal: bool = False,
    sm_scale: float | None = None,
    head_dim: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    mx_dot_scaled: bool | tuple[bool, bool] | None = None,
    _quantize_p: bool = True,
    return_p_codes: bool = False,
    kernel: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP4 attention forward on packed inputs (layout in the module docstring) -> bf16 O.

    ``fmt``: 'nvfp4' or 'mxfp4' (all of Q, K, V, P in that format). ``sm_scale`` defaults to
    1/sqrt(d). ``head_dim``, if given, must equal 2 * q_packed.shape[-1]. ``block_m``,
    ``num_warps``, ``num_stages`` override the launch configuration (tuning only).
    ``mx_dot_scaled``: None (the verified default per head dim, ``_MX_DOT_SCALED_DEFAULT``), a
    bool, or (for QK^T, for PV): whether MXFP4 products use ``tl.dot_scaled`` or decode in
    registers like NVFP4 (a cross-check; under the interpreter always the decode, see the module
    docstring). ``return_p_codes=True`` (testing aid, slower) also returns the forward P codes
    uint8 (B, H, Lq, Lk), each tile's codes against the running max as the reference's tiled
    mode defines them (tiles a causal row never visits hold 0, as P = 0 there).
    ``_quantize_p=False`` is a benchmark ablation only (P is not quantized, so the
    function differs).
    ``kernel``: 'tiles' (this module's kernel), 'loop' (``kernels.decode`` with one split: the
    same function, its fast operand decode; GQA groups share K/V tiles) or 'dense'
    (``kernels.prefill``: Q, K, V decoded once to bf16, then the training forward's key loop
    with the P quantizer; the same function; three bf16 operand tensors while it runs; its
    launch is the training forward's, so ``num_warps``/``num_stages`` are errors
    there); None picks ``DEFAULT_KERNEL`` unless an option above (or a launch override) needs
    this module's kernel.
    Returns O (B, H, Lq, d) in bfloat16.
    """
    shp = check_packed_inputs(
        q_packed, q_scales, k_packed, k_scales, v_packed, v_scales, fmt, head_dim
    )
    name, blk, bsz, heads, hkv, lq, lk, d, lkp = shp
    tiles_only = (
        block_m is not None or mx_dot_scaled is not None or not _quantize_p or return_p_codes
    )
    if kernel is None:
        # a launch override names the tiled (or loop) kernel's launch, so it keeps that kernel
        tuned = num_warps is not None or num_stages is not None
        kernel = "tiles" if tiles_only or tuned else DEFAULT_KERNEL
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "tiles" and tiles_only:
        raise ValueError("block_m, mx_dot_scaled, _quantize_p and return_p_codes need "
                         "kernel='tiles'")
    if kernel == "dense":
        from fp4sim.kernels.prefill import dense_prefill  # lazy: prefill imports this module

        if num_warps is not None or num_stages is not None:
            raise ValueError("num_warps and num_stages are not options of kernel='dense' "
                             "(it runs the training forward's launch)")
        tau = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
        packed = tuple(t.contiguous() for t in (q_packed, q_scales, k_packed, k_scales,
                                                 v_packed, v_scales))
        return dense_prefill(packed, shp, causal, tau)
    if kernel == "loop":
        from fp4sim.kernels.decode import fp4_decode_attention  # lazy: decode imports this

        return fp4_decode_attention(
            q_packed, q_scales, k_packed, k_scales, v_packed, v_scales, fmt=name,
            causal=causal, sm_scale=sm_scale, num_splits=1, num_warps=num_warps,
            num_stages=num_stages,
        )
    tau = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    q_packed, q_scales, k_packed, k_scales, v_packed, v_scales = (
        t.contiguous() for t in (q_packed, q_scales, k_packed, k_scales, v_packed, v_scales)
    )  # documented: non-contiguous inputs are copied
    out = torch.empty((bsz, heads, lq, d), dtype=torch.bfloat16, device=q_packed.device)
    on_gpu = q_packed.device.type == "cuda"
    if block_m is None:
        block_m = 128 if on_gpu else 16
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if num_stages is None:
        num_stages = 2 if d == 128 else 3
    if mx_dot_scaled is None:
        mx_dot_scaled = _MX_DOT_SCALED_DEFAULT.get(d, (False, False))
    elif isinstance(mx_dot_scaled, bool):
        mx_dot_scaled = (mx_dot_scaled, mx_dot_scaled)
    use_ds = name == "mxfp4" and on_gpu
    use_ds_qk, use_ds_pv = use_ds and mx_dot_scaled[0], use_ds and mx_dot_scaled[1]
    grid = (triton.cdiv(lq, block_m), bsz * heads)
    lkt = triton.cdiv(lk, BLOCK_N) * BLOCK_N
    p_codes = torch.zeros(
        (bsz, heads, lq, lkt) if return_p_codes else (1,), dtype=torch.uint8, device=out.device
    )
    _fp4_inference_fwd_kernel[grid](
        q_packed,
        q_scales,
        k_packed,
        k_scales,
        v_packed,
        v_scales,
        out,
        p_codes,
        tau,
        heads,
        heads // hkv,
        lq,
        lk,
        lkp,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK=blk,
        IS_MX=name == "mxfp4",
        CAUSAL=bool(causal),
        DOT_SCALED_QK=use_ds_qk,
        DOT_SCALED_PV=use_ds_pv,
        QUANT_P=_quantize_p,
        UPCAST=not on_gpu,
        STATIC_END=0 if on_gpu else lk,
        STORE_P=bool(return_p_codes),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if return_p_codes:
        return out, p_codes[..., :lk]
    return out


def pack_for_inference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: object = "nvfp4"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float Q, K, V (B, H, L, d) into the packed layout of the module docstring.

    Q and K along d; V transposed to (B, Hkv, d, Lk) and zero keys appended up to a multiple
    of the block size, then quantized along keys (fp4sim ``pad=True`` semantics: padding zeros
    form part of the last block). Returns (q_packed, q_scales, k_packed, k_scales, v_packed,
    v_scales), each bit-exact with ``fp4sim.quantize`` defaults.
    """
    name = format_name(fmt)
    blk = BLOCK_SIZES[name]
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{nm} must be a 4-D tensor (B, H, L, d)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    lk = k.shape[2]
    vt = v.transpose(-1, -2)
    pad = (-lk) % blk
    if pad:
        vt = torch.nn.functional.pad(vt, (0, pad))
    qp, qs, _ = quantize_fp4(q, name)
    kp, ks, _ = quantize_fp4(k, name)
    vp, vs, _ = quantize_fp4(vt.contiguous(), name)
    return qp, qs, kp, ks, vp, vs
