"""Adapter: FastVideo's Attn-QAT Triton training kernel (``attn_qat_train``), as FastVideo's
training backend calls it.

Source read: github.com/hao-ai-lab/FastVideo at commit 2f3d4074 (2026-08-21),
``fastvideo-kernel/python/fastvideo_kernel/triton_kernels/attn_qat_train.py`` (the kernel and
its autograd Function ``attention``), ``quant_utils.py`` and ``nvfp4_utils.py`` beside it (the
fake quantizers), and ``fastvideo/attention/backends/attn_qat_train.py`` (the backend's flags).
Nothing of it is copied here: the package is imported on the first call, from PYTHONPATH.

Flags, as the backend sets them (backends/attn_qat_train.py:75-90): QAT on, STE backward from
the quantized Q, K, V, no K or Q smoothing, no two-level P, P re-quantized in the backward for
dV, D from the high-precision output, no per-tile global scale for P nor for Q, K, V; warp
specialization off on Blackwell (capability 10 and 12), on elsewhere.

What the kernel supports (``fp4sim_spec``): BHLD contiguous bfloat16 (the P.V operand type is
fixed to bfloat16, attn_qat_train.py:287); the same number of heads for q and k, v (k, v are
indexed with q's head count, attn_qat_train.py:325: no GQA); head dims 64 and 128 declared
(the kernel asserts {16, ..., 256} at :1062 and needs d >= its 32-key tile at :288; the
backend lists 128); causal only with Lq == Lk: with Lq != Lk the forward's mask is aligned
top-left (:136) and the cross-length backward kernels apply no mask at all (:689).
It claims the ``fastvideo-attn-qat`` recipe (fp4sim.reference.recipes cites the numerics).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fp4sim.adapters.importing import import_kernel_module
from fp4sim.harness.spec import KernelSpec

__all__ = ["KERNEL_MODULE", "SPEC", "attention", "backend_flags"]

KERNEL_MODULE = "fastvideo_kernel.triton_kernels.attn_qat_train"
KERNEL_NAME = "FastVideo's attn_qat_train"

SPEC = KernelSpec(
    gqa=False,
    causal=True,
    causal_unequal=False,
    head_dims=(64, 128),
    dtypes=("bfloat16",),
    length_multiple=1,
    layout="bhld",
    backward=True,
    claims="fastvideo-attn-qat",
)


def backend_flags(capability_major: int) -> tuple[Any, ...]:
    """The positional flags after (q, k, v, causal, sm_scale), in the order of the kernel's
    autograd Function, as FastVideo's training backend passes them."""
    warp_specialize = capability_major not in (10, 12)
    return (
        True,   # use_qat_qkv_backward: dQ, dK, dV from the fake-quantized Q, K, V
        False,  # smooth_k
        warp_specialize,
        True,   # IS_QAT
        False,  # two_level_quant_P
        True,   # fake_quant_P: quantized P for dV in the backward
        True,   # use_high_prec_o: D = rowsum(dO * O_hp)
        False,  # smooth_q
        False,  # use_global_sf_P: plain NVFP4 blocks for P (no per-tile FP32 scale)
        False,  # use_global_sf_QKV: plain NVFP4 blocks for Q, K, V
    )


def _check_inputs(q: Any, k: Any, v: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != torch.bfloat16:
            raise ValueError(f"{KERNEL_NAME} takes bfloat16 {name}, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{KERNEL_NAME} takes 4-D BHLD {name}, got shape {tuple(x.shape)}")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        # the kernel would index k, v with q's head count: out-of-bounds reads, not an error
        raise ValueError(
            f"{KERNEL_NAME} has no GQA: q has {q.shape[1]} heads, k {k.shape[1]}, v {v.shape[1]}"
        )


def attention(q: Any, k: Any, v: Any, causal: bool, sm_scale: float | None) -> Any:
    """O = attn_qat_train(q, k, v) for BHLD bfloat16 CUDA tensors; differentiable."""
    _check_inputs(q, k, v)
    kernel = import_kernel_module(KERNEL_MODULE, KERNEL_NAME)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    major = torch.cuda.get_device_capability(q.device)[0]
    # the kernel's descriptors assume contiguous BHLD; .contiguous() keeps autograd intact
    return kernel.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), bool(causal), float(sm_scale),
        *backend_flags(major),
    )


attention.fp4sim_spec = SPEC  # type: ignore[attr-defined]
