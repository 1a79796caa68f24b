"""FP4 prefill by decoding once: ``fp4_inference_attention(..., kernel="dense")``.

The function is the one of ``kernels/inference.py`` (the reference recipes ``infer-nvfp4`` /
``infer-mxfp4``, tiled mode with ``block_n = 64``); only the schedule differs. On a GPU without
FP4 tensor cores (Hopper: ``tl.dot_scaled`` upcasts to bf16) every product runs on bf16
operands anyway, and a kernel that decodes packed K and V inside its key loop decodes each
tile once per query block: ``Lq / BLOCK_M`` times. Here the packed Q, K and V are decoded once,
in one pass each, into bf16 tensors (exact: an E2M1 value times an E4M3 or E8M0 scale has at
most 2 + 4 significant bits and bf16 has float32's exponent range; the one exception, an MXFP4
value past float32's largest finite number (scale 2^126 or 2^127), is inf in the tiled
kernel's float32 decode as well), and
the training forward kernel (``kernels/attn_qat_forward.py``) runs on them with its operand
quantizer off, its P quantizer on (NVFP4 or MXFP4 blocks along keys, against the running row
max of each 64-key tile) and its high-precision second output off.

Numerics against the tiled kernel: the same tiles, masks, P~, ``l`` from the unquantized P and
``O = acc / l`` (the forward's ``DIV_L``; training uses ``acc * (1 / l)``); on the GPU
``ex2.approx.ftz`` (``attn_qat_jit._exp``; the flushed results change no output) and the MMA's
own summation order. The tests hold both kernels to the same derived bounds
(``property_tests/test_kernels_inference.py``).

Cost: three bf16 tensors (Q^, K^, V^: 2 bytes per element) live during the call, beside the
packed inputs; the decode passes read 0.5625 (NVFP4) or 0.53 (MXFP4) bytes and write 2 bytes
per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4sim.kernels import training_attention as ta
from fp4sim.kernels.inference import BLOCK_N, PackedShape, _decode, _load_vt_tile

__all__ = ["dense_prefill", "decode_operands"]

_ROWS_PER_PROGRAM = 64


@triton.jit
def _decode_rows_kernel(codes_ptr, scales_ptr, out_ptr, n_rows, HEAD_DIM: tl.constexpr,
                        BLOCK: tl.constexpr, IS_MX: tl.constexpr, BLOCK_R: tl.constexpr):
    """out (n_rows, HEAD_DIM) bf16 = the values of packed rows (codes along the row)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows[:, None] < n_rows
    r64 = rows.to(tl.int64)[:, None]
    pk = tl.load(codes_ptr + r64 * (HEAD_DIM // 2) + tl.arange(0, HEAD_DIM // 2)[None, :],
                 mask=ok, other=0)
    sb = tl.load(scales_ptr + r64 * (HEAD_DIM // BLOCK) + tl.arange(0, HEAD_DIM // BLOCK)[None, :],
                 mask=ok, other=0)
    vals = _decode(pk, sb, BLOCK, IS_MX)  # exact in bf16, so the cast below is exact
    tl.store(out_ptr + r64 * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], vals.to(tl.bfloat16),
             mask=ok)


@triton.jit
def _decode_vt_kernel(v_ptr, vs_ptr, out_ptr, LK, LKP, HEAD_DIM: tl.constexpr,
                      BLOCK: tl.constexpr, IS_MX: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (B*Hkv, LK, HEAD_DIM) bf16 from V^T packed along keys (B*Hkv, HEAD_DIM, LKP/2):
    one program per (kv head, BLOCK_K keys); the padding keys >= LK are not written."""
    start_n = tl.program_id(0) * BLOCK_K
    bh = tl.program_id(1).to(tl.int64)
    v_pk, v_sb = _load_vt_tile(v_ptr + bh * HEAD_DIM * (LKP // 2),
                               vs_ptr + bh * HEAD_DIM * (LKP // BLOCK), start_n, LKP, HEAD_DIM,
                               BLOCK_K, BLOCK)
    vals = tl.trans(_decode(v_pk, v_sb, BLOCK, IS_MX))  # (BLOCK_K, HEAD_DIM)
    keys = start_n + tl.arange(0, BLOCK_K)
    ptrs = (out_ptr + (bh * LK + keys.to(tl.int64))[:, None] * HEAD_DIM
            + tl.arange(0, HEAD_DIM)[None, :])
    tl.store(ptrs, vals.to(tl.bfloat16), mask=keys[:, None] < LK)


def _decode_rows(codes: torch.Tensor, scales: torch.Tensor, shp: PackedShape) -> torch.Tensor:
    out = torch.empty((*codes.shape[:-1], shp.head_dim), dtype=torch.bfloat16,
                      device=codes.device)
    n_rows = out.numel() // shp.head_dim
    _decode_rows_kernel[(triton.cdiv(n_rows, _ROWS_PER_PROGRAM),)](
        codes, scales, out, n_rows, HEAD_DIM=shp.head_dim, BLOCK=shp.block,
        IS_MX=shp.fmt == "mxfp4", BLOCK_R=_ROWS_PER_PROGRAM)
    return out


def decode_operands(q_packed: torch.Tensor, q_scales: torch.Tensor, k_packed: torch.Tensor,
                    k_scales: torch.Tensor, v_packed: torch.Tensor, v_scales: torch.Tensor,
                    shp: PackedShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q^ (B, H, Lq, d), K^ and V^ (B, Hkv, Lk, d) in bfloat16 from contiguous packed inputs
    already validated (``inference.check_packed_inputs``); bit-exact values code * scale."""
    q_hat = _decode_rows(q_packed, q_scales, shp)
    k_hat = _decode_rows(k_packed, k_scales, shp)
    v_hat = torch.empty((shp.batch, shp.kv_heads, shp.lk, shp.head_dim), dtype=torch.bfloat16,
                        device=v_packed.device)
    grid = (triton.cdiv(shp.lk, BLOCK_N), shp.batch * shp.kv_heads)
    _decode_vt_kernel[grid](v_packed, v_scales, v_hat, shp.lk, shp.lk_padded,
                            HEAD_DIM=shp.head_dim, BLOCK=shp.block, IS_MX=shp.fmt == "mxfp4",
                            BLOCK_K=BLOCK_N)
    return q_hat, k_hat, v_hat


def dense_prefill(packed: tuple[torch.Tensor, ...], shp: PackedShape, causal: bool,
                  sm_scale: float, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """O (B, H, Lq, d) bf16 of the inference recipe ``infer-<shp.fmt>`` on contiguous packed
    inputs (module docstring). ``config``: (BLOCK_M, warps, stages) of the forward kernel
    (benchmark sweeps); None: the training forward's own, which the H200 sweep of 2026-12-03
    17:03 found fastest or within 0.5 % (BENCHMARKS.md)."""
    q_hat, k_hat, v_hat = decode_operands(*packed, shp)
    launch = ta._Config(config[0], BLOCK_N, config[1], config[2]) if config else None
    fwd = ta._forward_impl(q_hat, k_hat, v_hat, bool(causal), sm_scale, "attn-qat", False,
                           False, False, keep_hp=False, p_mx=shp.fmt == "mxfp4", config=launch)
    return fwd.o
