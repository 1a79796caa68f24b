"""Operand quantization of the Attn-QAT training attention: Q^, K^, V^ (NVFP4 along d).

``fake_quantize(x, pack=False) -> (x_hat, codes, scales)``: one pass over ``x`` (B, H, L, d)
that writes the fake-quantized ``x_hat`` (same dtype; values code * E4M3 scale, exact in
bf16/fp16) and, with ``pack=True``, the same numbers packed for the backward: ``codes``
(B, H, L, d / 2) uint8, element 2i in the low nibble, and ``scales`` (B, H, L, d / 16) E4M3FN
bytes (fp4sim's NVFP4 defaults, no tensor scale; ``kernels/fp4_jit.py``). The forward reads
``x_hat``; only the packed form (0.5625 bytes per element instead of 2) is saved for the
backward.

``decode(codes, scales, dtype) -> x_hat``: the inverse (bit-identical to the ``x_hat`` of
``fake_quantize``), run by the backward just before the kernel that reads the tensor in its
inner loop.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fp4sim.kernels.attn_qat_jit import NVFP4_BLOCK, _load_packed_tile
from fp4sim.kernels.fp4_jit import dequantize_rows, nvfp4_quantize_rows, pack_fp4_rows

_BLOCK_CX = tl.constexpr(NVFP4_BLOCK)


@triton.jit
def _quantize_rows_kernel(X, Y, CODES, SCALES, n_rows, HEAD_DIM: tl.constexpr,
                          BLOCK_R: tl.constexpr, PACK: tl.constexpr):
    """Y = NVFP4 fake quantization of X (n_rows, HEAD_DIM) along the last axis; with PACK also
    the packed codes (n_rows, HEAD_DIM / 2) and E4M3 scale bytes (n_rows, HEAD_DIM / 16)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r64 = rows.to(tl.int64)[:, None]
    mask = rows[:, None] < n_rows
    x = tl.load(X + r64 * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], mask=mask, other=0.0)
    codes, scale_bits, scale = nvfp4_quantize_rows(x.to(tl.float32), _BLOCK_CX)
    y = dequantize_rows(codes, scale, _BLOCK_CX)
    tl.store(Y + r64 * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], y.to(Y.dtype.element_ty),
             mask=mask)
    if PACK:
        HALF: tl.constexpr = HEAD_DIM // 2
        NB: tl.constexpr = HEAD_DIM // _BLOCK_CX
        tl.store(CODES + r64 * HALF + tl.arange(0, HALF)[None, :], pack_fp4_rows(codes),
                 mask=mask)
        tl.store(SCALES + r64 * NB + tl.arange(0, NB)[None, :], scale_bits, mask=mask)


@triton.jit
def _decode_rows_kernel(CODES, SCALES, Y, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                        FAST: tl.constexpr):
    """Y (n_rows, HEAD_DIM) = the values of packed NVFP4 rows (codes and E4M3 scale bytes)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    y = _load_packed_tile(CODES, SCALES, rows, n_rows, HEAD_DIM, Y.dtype.element_ty, FAST)
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(Y + offs, y, mask=rows[:, None] < n_rows)


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
           fast: bool = True) -> torch.Tensor:
    """x_hat (..., d) in ``dtype`` from ``fake_quantize``'s packed codes and scale bytes.

    ``fast`` selects the bit-move decode on the GPU (ignored under the interpreter)."""
    d = codes.shape[-1] * 2
    y = torch.empty((*codes.shape[:-1], d), device=codes.device, dtype=dtype)
    n_rows = y.numel() // d
    block_r = 64
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if n_rows:
        _decode_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            codes, scales, y, n_rows, HEAD_DIM=d, BLOCK_R=block_r,
            FAST=fast and codes.is_cuda and not interpreting)
    return y


def fake_quantize(
    x: torch.Tensor, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x_hat, codes, scales) of a contiguous (..., d) tensor; codes/scales None unless pack."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    if pack:
        codes = torch.empty((*x.shape[:-1], d // 2), device=x.device, dtype=torch.uint8)
        scales = torch.empty((*x.shape[:-1], d // NVFP4_BLOCK), device=x.device,
                             dtype=torch.uint8)
    else:
        codes = scales = None
    n_rows = x.numel() // d
    block_r = 64
    if n_rows:
        _quantize_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            x, y, codes if pack else y, scales if pack else y, n_rows, HEAD_DIM=d,
            BLOCK_R=block_r, PACK=pack)
    return y, codes, scales


__all__ = ["decode", "fake_quantize"]
