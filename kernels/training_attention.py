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
- ``exp`` is ``2^(RN(x * log2 e))`` through ``ex2.approx`` (PTX ISA: max rel. error 2^-22;
  ``attn_qat_jit._exp``: the ``.ftz`` form on the GPU, whose results below 2^-126 flush to 0
  and change no output): relative error of P about ``(|x| + 4) * 2^-24`` for the argument
  ``x = S - m``.
- The P V products use bf16/fp16 operands: P~ (code * E4M3 scale, at most 6 significant bits)
  and V^ are exact in bf16/fp16; the unquantized P of ``acc_hp`` and the consistent recipe's
  ``P~ / l`` in the backward are rounded to the input dtype, and so is dS before the dQ, dK
  products (as FlashAttention-2 does).
- O, O_hp, dq, dk, dv are stored in the input dtype; lse, m, l in float32.

Memory: with ``prequantize=True`` (default, fastest) Q^, K^, V^ are materialized once as
tensors of the input dtype (exact: code * scale fits bf16/fp16) for the forward, and saved for
the backward packed (``kernels/attn_qat_packing.py``: NVFP4 codes and E4M3 scale bytes, 0.5625
bytes per element); the backward decodes K^, V^ for the dQ kernel, frees them, then decodes Q^
for the dK/dV kernel (bit-identical values). ``prequantize=False`` quantizes them in registers
inside every kernel (no copies, 4-7x slower on an H100). Saved for the backward beyond what
FlashAttention saves: ``O_hp`` (one output-sized tensor, dropped once D is computed; the ``bf16``
recipe has none) and ``m``, ``l`` (float32, B*H*Lq each).

Implementation switches (``_OPTIONS``; bit-neutral, compared by the tests and
``benchmarks/gpu_attn_qat_bench.py --check``): ``fast_exp``, ``packed``, ``tma`` (tensor
descriptors for the inner-loop tiles; on by default since the GPU suite passed with it on an
H200, BENCHMARKS.md 2026-12-03), ``warp_spec``. Kernel modules:
``kernels/attn_qat_forward.py``, ``kernels/attn_qat_backward.py``, ``kernels/attn_qat_jit.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from fp4sim.kernels import RECIPES
from fp4sim.kernels.attn_qat_backward import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _bwd_preprocess_kernel,
)
from fp4sim.kernels.attn_qat_forward import _attn_fwd_kernel
from fp4sim.kernels.attn_qat_jit import NVFP4_BLOCK, _fake_quantize_probs  # noqa: F401 (tests)
from fp4sim.kernels.attn_qat_packing import decode, fake_quantize

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

# Key tile of the forward: the paper's P~ depends on the running max per tile, so the tile
# width is part of the recipe (reference presets use block_n = 64).
FORWARD_BLOCK_N = 64

# Debug mutations (tests flip these to check that the tests can fail; never set otherwise):
#   "d_from_o": D = rowsum(dO * O) with the quantized O instead of O_hp (breaks principle 2);
#   "s_from_unquantized": the backward recomputes S from the unquantized q, k (breaks principle 1);
#   "causal_shift": added to the causal diagonal offset (1 = off-by-one mask).
_DEBUG_MUTATIONS: dict[str, int] = {"d_from_o": 0, "s_from_unquantized": 0, "causal_shift": 0}


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
    interpreter loops over every tile up to this constant (all masked) instead of skipping
    causally hidden tiles. Hidden tiles hold P = 0 only (a no-op for m, l, acc, dk, dv and
    every P~ block), so the results are the same; the GPU path skips them.
    """
    return triton.cdiv(length, block) * block if _interpreting() else 0


def _static_group(group: int) -> int:
    """GQA group size as a constexpr loop bound under the interpreter (see ``_static_end``)."""
    return group if _interpreting() else 0


# Benchmark hook: {"fwd"|"dkdv"|"dq": _Config} replacing the defaults below (tuning sweeps).
_CONFIG_OVERRIDE: dict[str, _Config] = {}

# Implementation switches (benchmarks compare them; each is bit-neutral, tests check that):
#   "fast_exp": ex2.approx.ftz on the GPU (attn_qat_jit._exp);
#   "packed": save Q^, K^, V^ packed (NVFP4 codes + E4M3 scale bytes) for the backward;
#   "tma": the inner-loop tiles through tensor descriptors (GPU; prequantized inputs);
#   "warp_spec": warp-specialized forward key loop (tl.range(..., warp_specialize=True)).
_OPTIONS: dict[str, bool] = {"fast_exp": True, "packed": True, "tma": True, "warp_spec": False}


def _configs(head_dim: int, on_cuda: bool, quant_p: bool = True) -> dict[str, _Config]:
    """Launch configurations (the FP4 recipes' forward BLOCK_N is fixed by the recipe: 64)."""
    return {**_default_configs(head_dim, on_cuda, quant_p), **_CONFIG_OVERRIDE}


def _default_configs(head_dim: int, on_cuda: bool, quant_p: bool = True) -> dict[str, _Config]:
    if not on_cuda:
        return {
            "fwd": _Config(32, FORWARD_BLOCK_N, 4, 1),
            "dkdv": _Config(32, 32, 4, 1),
            "dq": _Config(32, 32, 4, 1),
        }
    # From the GPU sweep on an H100 with the fast P quantizer (docs/bench/kernels-training.md,
    # 2026-11-25 19:02 UTC): 4 forward, 4 dK/dV and 3 dQ candidates per head dim. Re-swept on an
    # H200 with packed operands and TMA (BENCHMARKS.md, 2026-12-03 13:19 UTC): only dQ at
    # d <= 64 moved (4 warps: whole backward 1.117 -> 1.000 ms bf16, 1.416 -> 1.296 ms attn-qat).
    return {
        "fwd": _Config(64, FORWARD_BLOCK_N, 4, 3),
        "dkdv": _Config(64, 64, 4, 3 if head_dim == 64 else 2),
        "dq": _Config(128, 64, 8 if head_dim > 64 else 4, 3),
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
    return fake_quantize(x)[0]


def _flags(recipe: str) -> tuple[bool, bool, bool]:
    """(quantize Q/K/V, quantize P, consistent policy) of a recipe."""
    return recipe != "bf16", recipe != "bf16", recipe == "attn-qat-consistent"


def _row_descriptors(tensors, block_rows: int):
    """Tensor descriptors of (B, H, L, d) tensors viewed as (B * H, L, d), tiles of
    (1, block_rows, d); rows past L of a head read as 0 (the copy engine fills out-of-bounds
    boxes with zeros)."""
    out = []
    for t in tensors:
        batch, heads, length, d = t.shape
        out.append(TensorDescriptor.from_tensor(t.view(batch * heads, length, d),
                                                [1, block_rows, d]))
    return tuple(out)


def _forward_impl(q, k, v, causal, sm_scale, recipe, quant_inputs_in_kernel, diagnostics, store_p,
                  keep_hp=True, p_mx=False, config=None):
    """The forward kernel's launch. Inference (``kernels/prefill.py``) sets ``keep_hp=False``
    (no O_hp: no backward), ``p_mx`` (P~ in MXFP4, the infer-mxfp4 recipe) and gets O = acc / l
    (the inference kernels' rounding) instead of acc * (1 / l); ``config`` overrides the launch
    configuration (``_Config``; BLOCK_N must stay the recipe's 64 when P is quantized)."""
    batch, heads, lq, head_dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    _quant_qkv, quant_p, consistent = _flags(recipe)
    cfg = config or _configs(head_dim, q.is_cuda, quant_p)["fwd"]
    o = torch.empty_like(q)
    # Without the P quantizer O_hp equals O: the kernel stores O only and O_hp aliases it.
    o_hp = torch.empty_like(q) if quant_p and keep_hp else o
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
    on_gpu = q.is_cuda and not _interpreting()
    use_tma = on_gpu and _OPTIONS["tma"] and not quant_inputs_in_kernel and batch * hkv > 0
    desc_k, desc_v = _row_descriptors((k, v), cfg.block_n) if use_tma else (k, v)
    grid = (triton.cdiv(lq, cfg.block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        desc_k,
        desc_v,
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
        FAST=on_gpu and _OPTIONS["fast_exp"],
        USE_TMA=use_tma,
        WARP_SPEC=on_gpu and _OPTIONS["warp_spec"],
        KEEP_HP=keep_hp,
        P_MX=p_mx,
        DIV_L=not keep_hp,
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


def _backward_delta(do: torch.Tensor, o_hp: torch.Tensor) -> torch.Tensor:
    """D = rowsum(dO * O_hp) (principle 2), float32 (B, H, Lq)."""
    batch, heads, lq, head_dim = do.shape
    delta = torch.empty((batch, heads, lq), device=do.device, dtype=torch.float32)
    n_rows = batch * heads * lq
    _bwd_preprocess_kernel[(triton.cdiv(n_rows, 64),)](
        do, o_hp, delta, n_rows, HEAD_DIM=head_dim, BLOCK_R=64
    )
    return delta


def _backward_impl(
    do, q, k, v, o, o_hp, lse, m, l_sum, causal, sm_scale, recipe, quant_inputs_in_kernel,
    packed=None,
):
    """dq, dk, dv (see ``_backward_kernels``)."""
    do = do.contiguous()
    # Principle 2: D from O_hp (the debug mutation uses the quantized O).
    delta = _backward_delta(do, o if _DEBUG_MUTATIONS["d_from_o"] else o_hp)
    return _backward_kernels(do, delta, q, k, v, lse, m, l_sum, causal, sm_scale, recipe,
                             quant_inputs_in_kernel, packed)


def _backward_kernels(
    do, delta, q, k, v, lse, m, l_sum, causal, sm_scale, recipe, quant_inputs_in_kernel,
    packed=None,
):
    """dq, dk, dv from D. ``packed``: None, or the (codes, scales) pairs of Q^, K^, V^ from
    ``attn_qat_packing.fake_quantize``; then q, k, v give only shapes. The packed path decodes
    K^, V^ (bf16/fp16) for the dQ kernel, frees them, then decodes Q^ for the dK/dV kernel, so
    at most two decoded operands exist at any time; each kernel decodes the operand it keeps
    for its whole program from the packed data itself."""
    batch, heads, lq, head_dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    _quant_qkv, quant_p, consistent = _flags(recipe)
    cfgs = _configs(head_dim, q.is_cuda, quant_p)
    on_gpu = do.is_cuda and not _interpreting()
    common = dict(
        HEAD_DIM=head_dim,
        CAUSAL=causal,
        CAUSAL_SHIFT=_DEBUG_MUTATIONS["causal_shift"],
        QUANT_QKV=quant_inputs_in_kernel,
        QUANT_P=quant_p,
        CONSISTENT=consistent,
        STATIC_GROUP=_static_group(heads // hkv),
        UPCAST=_interpreting(),
        PACKED=packed is not None,
        FAST=on_gpu and _OPTIONS["fast_exp"],
    )
    scalars = (sm_scale, heads, heads // hkv, lq, lk)
    use_tma = on_gpu and _OPTIONS["tma"] and not quant_inputs_in_kernel
    if packed is None:
        packed_args = (q, q, k, k, v, v)
        q_in, k_in, v_in = q, k, v
    else:
        packed_args = tuple(t for pair in packed for t in pair)
        (qc, qs), (kc, ks), (vc, vs) = packed
        k_in = decode(kc, ks, do.dtype)
        v_in = decode(vc, vs, do.dtype)
        q_in = q  # shape stand-in: the dQ kernel decodes its Q^ tile from the packed data

    def run_dq():
        dq = torch.empty(q.shape, device=do.device, dtype=do.dtype)
        c = cfgs["dq"]
        descs = _row_descriptors((k_in, v_in), c.block_n) if use_tma else (k_in, v_in)
        _attn_bwd_dq_kernel[(triton.cdiv(lq, c.block_m), batch * heads)](
            q_in, k_in, v_in, *packed_args, *descs, do, dq, lse, m, l_sum, delta, *scalars,
            STATIC_END=_static_end(lk, c.block_n), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            num_warps=c.num_warps, num_stages=c.num_stages, USE_TMA=use_tma, **common)
        return dq

    def run_dkdv(q_in, k_in, v_in):
        dk = torch.empty(k.shape, device=do.device, dtype=do.dtype)
        dv = torch.empty(v.shape, device=do.device, dtype=do.dtype)
        c = cfgs["dkdv"]
        descs = _row_descriptors((q_in, do), c.block_m) if use_tma else (q_in, do)
        _attn_bwd_dkdv_kernel[(triton.cdiv(lk, c.block_n), batch * hkv)](
            q_in, k_in, v_in, *packed_args, *descs, do, dk, dv, lse, m, l_sum, delta, *scalars,
            STATIC_END=_static_end(lq, c.block_m), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            num_warps=c.num_warps, num_stages=c.num_stages, USE_TMA=use_tma, **common)
        return dk, dv

    if packed is None:
        dk, dv = run_dkdv(q_in, k_in, v_in)
        dq = run_dq()
    else:
        dq = run_dq()
        del k_in, v_in  # freed before Q^ is decoded (peak memory)
        dk, dv = run_dkdv(decode(qc, qs, do.dtype), k, v)
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
        pack = bool(quant_qkv and prequantize and _OPTIONS["packed"]
                    and not _DEBUG_MUTATIONS["s_from_unquantized"])
        packed = None
        if quant_qkv and prequantize:
            (qh, qc, qs), (kh, kc, ks), (vh, vc, vs) = (fake_quantize(t, pack) for t in (q, k, v))
            in_kernel = False
            if pack:
                packed = ((qc, qs), (kc, ks), (vc, vs))
        else:
            qh, kh, vh = q, k, v
            in_kernel = quant_qkv
        res = _forward_impl(qh, kh, vh, causal, sm_scale, recipe, in_kernel, False, False)
        if _DEBUG_MUTATIONS["s_from_unquantized"]:
            qh, kh, vh, in_kernel = q, k, v, False
        # O_hp (a separate tensor only with the P quantizer) is needed for D alone, at the start
        # of the backward: held as an attribute so that the backward can drop it early.
        ctx.o_hp = res.o_hp if res.o_hp is not res.o else None
        if packed is not None:
            # Only the packed operands (0.5625 bytes per element) stay alive for the backward.
            ctx.save_for_backward(qc, qs, kc, ks, vc, vs, res.o, res.lse, res.m, res.l)
            ctx.shapes = (q.shape, k.shape, v.shape)
        else:
            ctx.save_for_backward(qh, kh, vh, res.o, res.lse, res.m, res.l)
            ctx.shapes = None
        ctx.causal, ctx.sm_scale, ctx.recipe, ctx.in_kernel = causal, sm_scale, recipe, in_kernel
        return res.o

    @staticmethod
    def backward(ctx, do):
        if ctx.shapes is not None:
            qc, qs, kc, ks, vc, vs, o, lse, m, l_sum = ctx.saved_tensors
            packed = ((qc, qs), (kc, ks), (vc, vs))
            # q, k, v stand-ins that carry the shapes only (the kernels read the packed data)
            qh, kh, vh = (torch.empty(1, device=do.device, dtype=do.dtype).expand(s)
                          for s in ctx.shapes)
        else:
            qh, kh, vh, o, lse, m, l_sum = ctx.saved_tensors
            packed = None
        do = do.contiguous()
        o_hp = o if ctx.o_hp is None or _DEBUG_MUTATIONS["d_from_o"] else ctx.o_hp
        delta = _backward_delta(do, o_hp)  # principle 2 (the mutation uses the quantized O)
        ctx.o_hp = o_hp = None  # O_hp is not needed any more
        dq, dk, dv = _backward_kernels(
            do, delta, qh, kh, vh, lse, m, l_sum, ctx.causal, ctx.sm_scale, ctx.recipe,
            ctx.in_kernel, packed)
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

    ``prequantize=True`` quantizes Q, K, V once before the kernels (faster; the backward
    keeps them packed, NVFP4 codes + scales); ``False`` quantizes in registers in every kernel.
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
