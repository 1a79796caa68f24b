"""Correct and deliberately broken FP4 kernels, to measure what `fp4sim check` catches.

Quantizers follow the `fp4sim check quantizer` contract ``x -> (packed uint8, scale bytes,
tensor scale or None)`` along the last axis (NumPy in, NumPy out); attention kernels follow
``(q, k, v, causal, sm_scale) -> o`` with autograd, for the ``attn-qat`` recipe.

Each mutant perturbs a small correct implementation in one place, named after the bug:
MUTANTS maps a name to (kind, ``module:attr`` path, format or recipe, description).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fp4sim
from fp4sim import reference
from fp4sim.reference.masks import check_attention_inputs, visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands
from fp4sim.reference.p_quant import quantize_p_tiles
from fp4sim.reference.softmax import log_sum_exp, padded_length, safe_divide_rows, scores

# ---------------------------------------------------------------------------
# quantizers (NVFP4 defaults unless named): built from the emulator's pieces
# ---------------------------------------------------------------------------

# E2M1 magnitudes of codes 0..7 (OCP MX v1.0 section 5.3.3).
_E2M1 = np.array(fp4sim.formats.E2M1_MAGNITUDES, dtype=np.float32)


def _as_float32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _as_float32_tensor(x: Any) -> torch.Tensor:
    """A float32 torch tensor on x's device (CPU for NumPy input)."""
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _pack(codes: np.ndarray) -> np.ndarray:
    """Element 2i in the low nibble (docs/numerics.md, Packing)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def emulator_nvfp4(x: Any) -> tuple[np.ndarray, np.ndarray, None]:
    """Correct: the emulator itself."""
    q = fp4sim.quantize(_as_float32(x), "nvfp4", axis=-1)
    return np.asarray(q.packed), np.asarray(q.scale_bits), None


def emulator_mxfp4(x: Any) -> tuple[np.ndarray, np.ndarray, None]:
    """Correct: the emulator itself (MXFP4, rceil)."""
    q = fp4sim.quantize(_as_float32(x), "mxfp4", axis=-1)
    return np.asarray(q.packed), np.asarray(q.scale_bits), None


def emulator_nvfp4_amax(x: Any) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Correct: the emulator with an amax tensor scale."""
    q = fp4sim.quantize(_as_float32(x), "nvfp4", axis=-1, tensor_scale="amax")
    return np.asarray(q.packed), np.asarray(q.scale_bits), np.float32(q.tensor_scale)


def triton_nvfp4_amax(x: Any) -> Any:
    """Correct (expected): kernels.quantize_fp4 with an amax tensor scale."""
    from fp4sim import kernels
    return kernels.quantize_fp4(_as_float32_tensor(x), "nvfp4", tensor_scale="amax")


def torch_reference_nvfp4(x: Any) -> tuple[np.ndarray, np.ndarray, None]:
    """Correct: the reference's independent torch quantizer."""
    codes, scale_bits, _, _ = reference.quantize_torch(torch.as_tensor(_as_float32(x)), "nvfp4")
    return _pack(codes.numpy()), scale_bits.numpy(), None


def triton_nvfp4(x: Any) -> Any:
    """Correct (expected): kernels.quantize_fp4 (CPU needs TRITON_INTERPRET=1)."""
    from fp4sim import kernels
    return kernels.quantize_fp4(_as_float32_tensor(x), "nvfp4")


def _nvfp4_parts(x: np.ndarray, block: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x blocked (n, block), decoded block scales (n, 1), scale bytes (n,)) as the emulator
    computes them: s = E4M3_RNE(amax / 6) (docs/numerics.md NVFP4)."""
    xb = x.reshape(-1, block)
    amax = np.abs(xb).max(axis=-1)
    scale_bits = np.asarray(fp4sim.e4m3_encode(np.minimum(amax / np.float32(6.0), 448.0)))
    scales = np.asarray(fp4sim.e4m3_decode(scale_bits), dtype=np.float32)
    return xb, scales.reshape(-1, 1), scale_bits.astype(np.uint8)


def _scaled(xb: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """x * (1/s) in float32 (the default scale_op), 0 where s == 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        recip = np.where(scales > 0, np.float32(1.0) / scales, np.float32(0.0)).astype(np.float32)
        return (xb * recip).astype(np.float32)


def _finish(x: np.ndarray, codes: np.ndarray, scale_bits: np.ndarray) -> tuple:
    shape = x.shape
    return _pack(codes.reshape(shape)), scale_bits.reshape(*shape[:-1], -1), None


def mutant_ties_away(x: Any) -> tuple:
    """Bug: E2M1 rounding ties go away from zero (the emulator's codes, except that a
    scaled value exactly on a tie takes the larger magnitude)."""
    x = _as_float32(x)
    q = fp4sim.quantize(x, "nvfp4", axis=-1)
    xb, scales, _ = _nvfp4_parts(x)
    y = np.abs(_scaled(xb, scales)).reshape(x.shape)
    codes = np.asarray(q.codes, dtype=np.uint8).copy()
    # midpoints 0.25, 0.75, ..., 5 between magnitude codes i and i+1 (OCP MX v1.0 5.3.3)
    for i, tie in enumerate((_E2M1[:-1] + _E2M1[1:]) / 2):
        on_tie = y == tie
        codes = np.where(on_tie, (codes & 8) | (i + 1), codes).astype(np.uint8)
    return _pack(codes), np.asarray(q.scale_bits), None


def mutant_swapped_nibbles(x: Any) -> tuple:
    """Bug: element 2i packed into the high nibble."""
    packed, scale_bits, ts = emulator_nvfp4(x)
    return ((packed & 0x0F) << 4) | (packed >> 4), scale_bits, ts


def mutant_scale_rounded_up(x: Any) -> tuple:
    """Bug: the E4M3 block scale rounds amax/6 up instead of to nearest."""
    x = _as_float32(x)
    xb, scales, scale_bits = _nvfp4_parts(x)
    amax6 = np.abs(xb).max(axis=-1) / np.float32(6.0)
    up = np.where(scales.reshape(-1) < amax6, scale_bits + 1, scale_bits).astype(np.uint8)
    up_scales = np.asarray(fp4sim.e4m3_decode(up), dtype=np.float32).reshape(-1, 1)
    codes = np.asarray(fp4sim.e2m1_encode(_scaled(xb, up_scales)), dtype=np.uint8)
    return _finish(x, codes, up)


def mutant_bf16_double_rounding(x: Any) -> tuple:
    """Bug: x * (1/s) is rounded to bfloat16 before the E2M1 rounding."""
    x = _as_float32(x)
    xb, scales, scale_bits = _nvfp4_parts(x)
    y = torch.from_numpy(_scaled(xb, scales)).bfloat16().float().numpy()
    codes = np.asarray(fp4sim.e2m1_encode(y), dtype=np.uint8)
    return _finish(x, codes, scale_bits)


def mutant_block32(x: Any) -> tuple:
    """Bug: NVFP4 scales taken over 32-element blocks (written once per 16-element block)."""
    x = _as_float32(x)
    xb, _, _ = _nvfp4_parts(x)
    amax16 = np.abs(xb).max(axis=-1)
    if amax16.size % 2:  # a last, unpaired 16-element block keeps its own amax
        amax16 = np.append(amax16, 0.0)
    amax = amax16.reshape(-1, 2).max(axis=-1).repeat(2)[: xb.shape[0]]
    scale_bits = np.asarray(fp4sim.e4m3_encode(np.minimum(amax / np.float32(6.0), 448.0)))
    scale_bits = scale_bits.astype(np.uint8)
    scales = np.asarray(fp4sim.e4m3_decode(scale_bits), dtype=np.float32).reshape(-1, 1)
    codes = np.asarray(fp4sim.e2m1_encode(_scaled(xb, scales)), dtype=np.uint8)
    return _finish(x, codes, scale_bits)


# ---------------------------------------------------------------------------
# attention: the reference with one piece changed
# ---------------------------------------------------------------------------

RECIPE = reference.get_recipe("attn-qat")


class _Attention(torch.autograd.Function):
    """Forward ``forward_fn`` (-> ForwardResult-like), backward ``backward_fn``."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, forward_fn, backward_fn):  # noqa: ANN001, ANN205
        fwd = forward_fn(q.detach(), k.detach(), v.detach(), causal, sm_scale)
        ctx.save_for_backward(q, k, v)
        ctx.fwd, ctx.causal, ctx.sm_scale, ctx.backward_fn = fwd, causal, sm_scale, backward_fn
        return fwd.o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(ctx.fwd, q, k, v, do, ctx.causal, ctx.sm_scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _reference_forward(recipe: Any = RECIPE) -> Callable[..., Any]:
    def forward(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
        return reference.fp4_attention_forward(q, k, v, recipe, causal=causal, sm_scale=sm_scale)

    return forward


def _reference_backward(variant: str | None = None, hp_scores: bool = False) -> Callable:
    def backward(fwd, q, k, v, do, causal, sm_scale):  # noqa: ANN001, ANN202
        if hp_scores:  # S recomputed from Q, K rather than the quantized Q^, K^
            fwd = dataclasses.replace(fwd, q_hat=q.float(), k_hat=k.float())
        # the backward is RECIPE's even when the (mutated) forward used another recipe:
        # recipe=None tells the reference not to insist that they match
        fwd = dataclasses.replace(fwd, recipe=None)
        return reference.attention_backward(
            variant or RECIPE.backward, fwd, q, k, v, do, RECIPE, causal=causal, sm_scale=sm_scale
        )

    return backward


def _kernel(forward_fn: Callable, backward_fn: Callable) -> Callable[..., torch.Tensor]:
    def kernel(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
        return _Attention.apply(q, k, v, causal, sm_scale, forward_fn, backward_fn)

    return kernel


def reference_attention(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN201
    """Correct: reference.fp4_attention (attn-qat, float32 accumulation)."""
    return reference.fp4_attention(q, k, v, causal, sm_scale, recipe="attn-qat")


def reference_infer_nvfp4(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN201
    """Correct for the recipe its spec claims (infer-nvfp4, forward only); wrong for the
    default attn-qat (V blocked along keys there)."""
    return reference.fp4_attention_forward(q, k, v, "infer-nvfp4", causal=causal,
                                           sm_scale=sm_scale).o.to(q.dtype)


reference_infer_nvfp4.fp4sim_spec = {"claims": "infer-nvfp4", "backward": False}


def triton_attention(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN201
    """Correct (expected): kernels.attn_qat (CPU needs TRITON_INTERPRET=1)."""
    from fp4sim import kernels
    return kernels.attn_qat(q, k, v, causal, sm_scale, recipe="attn-qat")


def mutant_no_quantization(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN201
    """Bug: plain attention (torch SDPA, nothing quantized) offered as an attn-qat kernel."""
    if causal:  # SDPA aligns a causal mask top-left; the recipe's is bottom-right
        raise ValueError("mutant_no_quantization is checked non-causal only")
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=sm_scale, enable_gqa=k.shape[1] != q.shape[1])


def _drop_diagonal_forward(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
    """Causal mask off by one: query i sees keys j < i + Lk - Lq (its diagonal key masked),
    emulated by an extra zero query row at the end (the mask is bottom-right aligned)."""
    lq = q.shape[-2]
    q_ext = torch.cat([q, torch.zeros_like(q[..., :1, :])], dim=-2)
    fwd = reference.fp4_attention_forward(q_ext, k, v, RECIPE, causal=causal, sm_scale=sm_scale)
    return dataclasses.replace(
        fwd,
        o=fwd.o[..., :lq, :],
        o_hp=fwd.o_hp[..., :lq, :],
        lse=fwd.lse[..., :lq],
        m=fwd.m[..., :lq],
        l=fwd.l[..., :lq],
        q_hat=fwd.q_hat[..., :lq, :],
    )


def _padded_keys_leak_forward(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
    """Padded key slots (beyond Lk) are masked out of the softmax sum and of P~ V, but their
    unmasked P = exp(0 - m) enters the amax of the P block scale."""
    recipe = RECIPE
    _, h, _, lq, lk, d = check_attention_inputs(q, k, v, recipe.nan_policy)
    tau = reference.exact.default_sm_scale(d, sm_scale)
    ops = quantize_operands(q, k, v, recipe, torch.float32)
    lk_pad = padded_length(lk, recipe.block_n)
    vis = visible_mask(lq, lk, lk_pad, causal, q.device)
    s = scores(ops.q_hat, pad_keys(ops.k_hat, h, lk_pad), tau, vis)
    bn = recipe.block_n
    t = lk_pad // bn
    s_t = s.reshape(*s.shape[:-1], t, bn)
    m_tiles = torch.cummax(s_t.amax(dim=-1), dim=-1).values
    m = m_tiles[..., -1]
    p_t = torch.exp(s_t - m_tiles.unsqueeze(-1))
    padded = torch.arange(lk_pad, device=q.device).reshape(t, bn) >= lk
    leak = torch.exp(-m_tiles).unsqueeze(-1).expand_as(p_t)  # S = 0 for a zero padded key
    p_leaky = torch.where(padded, leak, p_t)
    pq = quantize_p_tiles(p_leaky, recipe.p, recipe.p_policy, recipe.block_m)
    p_tilde_t = torch.where(padded, torch.zeros_like(p_t), pq.values)
    rescale = torch.exp(m_tiles - m.unsqueeze(-1)).unsqueeze(-1)
    l = (p_t.sum(dim=-1) * rescale.squeeze(-1)).sum(dim=-1)
    v_pad = pad_keys(ops.v_hat, h, lk_pad)
    o = safe_divide_rows((p_tilde_t * rescale).reshape(s.shape) @ v_pad, l)
    o_hp = safe_divide_rows((p_t * rescale).reshape(s.shape) @ v_pad, l)
    correct = reference.fp4_attention_forward(q, k, v, recipe, causal=causal, sm_scale=sm_scale)
    return dataclasses.replace(correct, o=o, o_hp=o_hp, lse=log_sum_exp(m, l), m=m, l=l)


mutant_v_wrong_axis = _kernel(
    _reference_forward(dataclasses.replace(RECIPE, v_axis="keys")), _reference_backward()
)
mutant_v_wrong_axis.__doc__ = "Bug: V blocked along keys instead of the recipe's head dim."

mutant_p_wrong_max = _kernel(
    _reference_forward(dataclasses.replace(RECIPE, p_policy="consistent")), _reference_backward()
)
mutant_p_wrong_max.__doc__ = "Bug: P quantized against the final row max, not the running max."

mutant_d_from_quantized_o = _kernel(_reference_forward(), _reference_backward("o_only"))
mutant_d_from_quantized_o.__doc__ = "Bug: D = rowsum(dO * O) from the quantized O, not O_hp."

mutant_s_high_precision = _kernel(_reference_forward(), _reference_backward(hp_scores=True))
mutant_s_high_precision.__doc__ = "Bug: the backward recomputes S from Q, K, not Q^, K^."

mutant_causal_off_by_one = _kernel(_drop_diagonal_forward, _reference_backward())
mutant_causal_off_by_one.__doc__ = "Bug: causal mask off by one (the diagonal key masked)."

mutant_padded_keys_leak = _kernel(_padded_keys_leak_forward, _reference_backward())
mutant_padded_keys_leak.__doc__ = "Bug: padded key slots leak into the P block scale."

# name -> (kind, kernel path, format or recipe, extra CLI args, description)
_MOD = "property_tests.mutant_kernels"
MUTANTS: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "ties_away_from_zero": (
        "quantizer",
        f"{_MOD}:mutant_ties_away",
        "nvfp4",
        (),
        "E2M1 ties rounded away from zero",
    ),
    "swapped_nibbles": (
        "quantizer",
        f"{_MOD}:mutant_swapped_nibbles",
        "nvfp4",
        (),
        "element 2i in the high nibble",
    ),
    "scale_rounded_up": (
        "quantizer",
        f"{_MOD}:mutant_scale_rounded_up",
        "nvfp4",
        (),
        "E4M3 block scale rounded up",
    ),
    "bf16_double_rounding": (
        "quantizer",
        f"{_MOD}:mutant_bf16_double_rounding",
        "nvfp4",
        (),
        "x/s rounded to bf16 before E2M1",
    ),
    "block_32_not_16": (
        "quantizer",
        f"{_MOD}:mutant_block32",
        "nvfp4",
        (),
        "NVFP4 scale over 32 elements",
    ),
    "v_wrong_axis": (
        "attention",
        f"{_MOD}:mutant_v_wrong_axis",
        "attn-qat",
        (),
        "V blocked along keys, not d",
    ),
    "p_wrong_max": (
        "attention",
        f"{_MOD}:mutant_p_wrong_max",
        "attn-qat",
        (),
        "P against the final max, not the running max",
    ),
    "d_from_quantized_o": (
        "attention",
        f"{_MOD}:mutant_d_from_quantized_o",
        "attn-qat",
        (),
        "D = rowsum(dO*O), not O_hp",
    ),
    "s_high_precision_bwd": (
        "attention",
        f"{_MOD}:mutant_s_high_precision",
        "attn-qat",
        (),
        "backward S from Q, K",
    ),
    "causal_off_by_one": (
        "attention",
        f"{_MOD}:mutant_causal_off_by_one",
        "attn-qat",
        ("--causal",),
        "diagonal key masked",
    ),
    "padded_keys_leak": (
        "attention",
        f"{_MOD}:mutant_padded_keys_leak",
        "attn-qat",
        (),
        "padded keys in the P block scale",
    ),
    "no_quantization": (
        "attention",
        f"{_MOD}:mutant_no_quantization",
        "attn-qat",
        (),
        "torch SDPA: nothing quantized",
    ),
}

# Triton kernels: run only with CUDA or TRITON_INTERPRET=1 (see test_check_mutants.py).
TRITON_CORRECT: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "triton_nvfp4": ("quantizer", f"{_MOD}:triton_nvfp4", "nvfp4", ()),
    "triton_mxfp4": ("quantizer", f"{_MOD}:triton_mxfp4", "mxfp4", ()),
    "triton_nvfp4_amax": (
        "quantizer",
        f"{_MOD}:triton_nvfp4_amax",
        "nvfp4",
        ("--tensor-scale", "amax"),
    ),
    "triton_attention": (
        "attention",
        f"{_MOD}:triton_attention",
        "attn-qat",
        ("--dtypes", "bfloat16,float16"),
    ),
}

# name -> (kind, kernel path, format or recipe, extra CLI args)
CORRECT: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "emulator_nvfp4": ("quantizer", f"{_MOD}:emulator_nvfp4", "nvfp4", ()),
    "emulator_mxfp4": ("quantizer", f"{_MOD}:emulator_mxfp4", "mxfp4", ()),
    "emulator_nvfp4_amax": (
        "quantizer",
        f"{_MOD}:emulator_nvfp4_amax",
        "nvfp4",
        ("--tensor-scale", "amax"),
    ),
    "torch_reference_nvfp4": ("quantizer", f"{_MOD}:torch_reference_nvfp4", "nvfp4", ()),
    "reference_attention": ("attention", f"{_MOD}:reference_attention", "attn-qat", ()),
    "reference_attention_causal": (
        "attention",
        f"{_MOD}:reference_attention",
        "attn-qat",
        ("--causal",),
    ),
}


def triton_mxfp4(x: Any) -> Any:
    """Correct (expected): kernels.quantize_fp4 MXFP4 (CPU needs TRITON_INTERPRET=1)."""
    from fp4sim import kernels
    return kernels.quantize_fp4(_as_float32_tensor(x), "mxfp4")
