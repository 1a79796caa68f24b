"""Adapter: FastVideo's Blackwell FP4 inference attention (``attn_qat_infer``, derived from
SageAttention3). UNVERIFIED ON HARDWARE: no Blackwell card was available; the marshalling is
tested against a stand-in module of the same API (property_tests/test_adapters_fastvideo.py).

Source read: github.com/hao-ai-lab/FastVideo at commit 2f3d4074, ``fastvideo-kernel/
attn_qat_infer/api.py`` (the Python API), ``quantization/fp4_quantization_4d.cu`` (the data
and scale layouts its quantizers write) and ``blackwell/api.cu`` (what the attention core
``fp4attn_cuda.fwd`` checks). Nothing of it is copied here; the package is imported on use.

Two callables, both ``fn(q, k, v, causal, sm_scale) -> o`` on BHLD tensors, forward only:

* ``attention``: quantizes Q, K, V with the fp4sim emulator (NVFP4: Q, K along d, V along
  keys) and hands the packed FP4 data and E4M3 scales, laid out as the kernel's own quantizers
  lay them out, to the attention core ``fp4attn_cuda.fwd``. The kernel then only does what is
  its own (S, the online softmax, P's quantization, P.V), so a disagreement is the core's.
* ``attention_api``: the kernel's public entry ``attn_qat_infer.sageattn_blackwell`` with its
  own quantizers, as FastVideo's inference backend calls it.

Layouts (fp4_quantization_4d.cu): tokens padded with zeros to a multiple of 128 (api.py:28,
91-96); packed bytes hold element 2i in the low nibble (PTX ``cvt.rn.satfinite.e2m1x2.f32``
puts its second operand in the low nibble, :87); Q as (B, H, L, d/2); K the same with the
tokens of each aligned group of 32 reordered (:162-168, ``k_token_order``); V transposed,
(B, H, d, L/2), blocked along tokens (:266-376). Each scale matrix (rows = tokens for Q, K,
rows = d for V; one E4M3 byte per 16 elements) is stored in 64-row groups, each group's
4-column slabs of 256 bytes in column order, row ``16 b + a`` of a slab at byte
``16 a + 4 b + column`` (:247-254, :378-388). That 64-row slab is the first half of the
standard 128 x 4 Blackwell scale tile (``fp4sim.swizzle_scales_blackwell``) with row
``16 b + a`` placed at tile row ``32 b + a``; ``sage3_swizzle_scales`` builds it that way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

import fp4sim
from fp4sim.adapters.importing import import_kernel_module
from fp4sim.harness.spec import KernelSpec

__all__ = [
    "API_MODULE",
    "CORE_MODULE",
    "SPEC",
    "TOKEN_BLOCK",
    "attention",
    "attention_api",
    "k_token_order",
    "marshal_qkv",
    "sage3_swizzle_scales",
]

API_MODULE = "attn_qat_infer"
CORE_MODULE = "fp4attn_cuda"
KERNEL_NAME = "FastVideo's attn_qat_infer"
TOKEN_BLOCK = 128  # BLOCK_M = BLOCK_N = 128 (api.py:28-29)
SCALE_GROUP_ROWS = 64
SLAB_COLS = 4
FP4_BLOCK = 16

SPEC = KernelSpec(
    gqa=False,  # api.cu:262
    causal=True,
    causal_unequal=False,  # not checked: declared unsupported until seen on hardware
    head_dims=(64, 128),  # the quantizers dispatch 64 and 128 only (fp4_quantization_4d.cu:46)
    dtypes=("bfloat16", "float16"),
    length_multiple=1,
    layout="bhld",
    backward=False,
    claims="fastvideo-attn-qat-infer",
)


def k_token_order(n: int) -> np.ndarray:
    """int64 [n]: row r of the kernel's K layout holds token ``order[r]`` (n a multiple of 32).

    Within each aligned group of 32, position r = 8 i + 2 j + t (i < 4, j < 4, t < 2) holds
    token 2 i + 8 j + t."""
    if n % 32:
        raise ValueError(f"K's token order works on groups of 32 tokens, got {n}")
    r = np.arange(n, dtype=np.int64)
    local = r % 32
    return (r - local) + (local // 8) * 2 + ((local % 8) // 2) * 8 + local % 2


def sage3_swizzle_scales(scale_bytes_2d: np.ndarray) -> np.ndarray:
    """Flat uint8 buffer of a [rows, cols] scale matrix in the kernel's 64-row layout (rows a
    multiple of 64, cols of 4), built from ``fp4sim.swizzle_scales_blackwell``."""
    s = np.asarray(scale_bytes_2d)
    if s.dtype != np.uint8 or s.ndim != 2:
        raise ValueError(f"scale bytes must be a 2-D uint8 matrix, got {s.dtype} {s.shape}")
    rows, cols = s.shape
    if rows % SCALE_GROUP_ROWS or cols % SLAB_COLS:
        raise ValueError(f"scale matrix {rows}x{cols}: rows must be a multiple of 64, cols of 4")
    groups, slabs = rows // SCALE_GROUP_ROWS, cols // SLAB_COLS
    # slab (g, c): rows 16 b + a of group g, columns 4 c .. 4 c + 3, as [g, c, b, a, col]
    slab = s.reshape(groups, 4, 16, slabs, SLAB_COLS).transpose(0, 3, 1, 2, 4)
    # each slab in a 128 x 4 tile at rows 32 b + a (a < 16); rows 32 b + 16.. stay 0
    tiles = np.zeros((groups, slabs, 4, 32, SLAB_COLS), dtype=np.uint8)
    tiles[:, :, :, :16, :] = slab
    flat = fp4sim.swizzle_scales_blackwell(tiles.reshape(-1, SLAB_COLS))
    # the swizzled tile puts rows with (row % 32) < 16 in its first 256 bytes
    return np.ascontiguousarray(flat.reshape(groups * slabs, 2, 256)[:, 0, :]).reshape(-1)


def _pad_tokens(x: np.ndarray, axis: int) -> np.ndarray:
    n = x.shape[axis]
    extra = (-n) % TOKEN_BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(x, widths)


def _swizzle_each(scale_bits: np.ndarray) -> np.ndarray:
    """Per (batch, head) matrix of a (B, H, rows, cols) scale array, same shape out."""
    b, h, rows, cols = scale_bits.shape
    out = np.empty((b, h, rows * cols), dtype=np.uint8)
    for i in range(b):
        for j in range(h):
            out[i, j] = sage3_swizzle_scales(np.ascontiguousarray(scale_bits[i, j]))
    return out.reshape(b, h, rows, cols)


def marshal_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Quantize float32 BHLD q, k, v (NVFP4, emulator defaults) into the kernel's layouts.

    Returns uint8 arrays ``q``, ``k`` (B, H, L', d/2), ``v`` (B, H, d, Lk'/2), their scale
    bytes ``sfq``, ``sfk`` (B, H, L', d/16), ``sfv`` (B, H, d, Lk'/16) in the 64-row layout,
    and float32 ``delta_s`` zeros (B, H, Lq'/128, Lk') (no Q smoothing, api.py:108-110);
    L' is L padded to a multiple of 128."""
    d = q.shape[-1]
    if d % (FP4_BLOCK * SLAB_COLS):
        raise ValueError(f"head dim {d} must be a multiple of 64 for the kernel's scale layout")
    qp, kp = _pad_tokens(q, 2), _pad_tokens(k, 2)
    vt = np.ascontiguousarray(np.swapaxes(_pad_tokens(v, 2), -1, -2))  # (B, H, d, Lk')
    quant_q = fp4sim.quantize(qp, "nvfp4")
    quant_k = fp4sim.quantize(kp, "nvfp4")
    quant_v = fp4sim.quantize(vt, "nvfp4")
    order = k_token_order(kp.shape[2])
    b, h, lq_pad = qp.shape[:3]
    lk_pad = kp.shape[2]
    return {
        "q": np.ascontiguousarray(quant_q.packed),
        "sfq": _swizzle_each(quant_q.scale_bits),
        "k": np.ascontiguousarray(quant_k.packed[:, :, order]),
        "sfk": _swizzle_each(np.ascontiguousarray(quant_k.scale_bits[:, :, order])),
        "v": np.ascontiguousarray(quant_v.packed),
        "sfv": _swizzle_each(quant_v.scale_bits),
        "delta_s": np.zeros((b, h, lq_pad // TOKEN_BLOCK, lk_pad), dtype=np.float32),
    }


def _check_inputs(q: Any, k: Any, v: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{KERNEL_NAME} takes bfloat16 or float16 {name}, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{KERNEL_NAME} takes 4-D BHLD {name}, got shape {tuple(x.shape)}")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(f"{KERNEL_NAME} has no GQA (api.cu:262)")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"{KERNEL_NAME} takes head dims 64 and 128, got {q.shape[-1]}")


def attention(q: Any, k: Any, v: Any, causal: bool, sm_scale: float | None) -> Any:
    """O from the kernel's attention core on emulator-quantized Q, K, V (BHLD; forward only)."""
    _check_inputs(q, k, v)
    core = import_kernel_module(CORE_MODULE, f"{KERNEL_NAME} (its attention core)")
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)  # the kernel's own default (api.py:152)
    host = [x.detach().float().cpu().numpy() for x in (q, k, v)]
    m = marshal_qkv(*host)

    def dev(name: str) -> Any:
        return torch.from_numpy(m[name]).to(q.device)

    scales = [dev(name).view(torch.float8_e4m3fn) for name in ("sfq", "sfk", "sfv")]
    out = core.fwd(
        dev("q"), dev("k"), dev("v"), *scales, dev("delta_s"), lk, None, float(sm_scale),
        bool(causal),
        True,   # per_block_mean, as sageattn_blackwell passes it (api.py:193-198)
        q.dtype == torch.bfloat16,
        True,   # single_level_p_quant: sageattn_blackwell's default (api.py:163)
    )[0]
    return out[:, :, :lq, :].contiguous()


def attention_api(q: Any, k: Any, v: Any, causal: bool, sm_scale: float | None) -> Any:
    """O from ``attn_qat_infer.sageattn_blackwell`` with the kernel's own quantizers."""
    _check_inputs(q, k, v)
    api = import_kernel_module(API_MODULE, KERNEL_NAME)
    return api.sageattn_blackwell(
        q.contiguous(), k.contiguous(), v.contiguous(), is_causal=bool(causal), sm_scale=sm_scale
    )


attention.fp4sim_spec = SPEC  # type: ignore[attr-defined]
attention_api.fp4sim_spec = SPEC  # type: ignore[attr-defined]
