"""Quantized attention operands: Q^, K^, V^ under a recipe, GQA expansion and key padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4sim.reference.masks import expand_kv
from fp4sim.reference.quant_torch import TorchQuantized, quantize_torch_full
from fp4sim.reference.recipes import QuantSpec, Recipe

ACCUM_DTYPES = (torch.float32, torch.float64)


def resolve_accum_dtype(accum_dtype, q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs unless told; float32 otherwise."""
    if accum_dtype is None:
        return torch.float64 if q.dtype == torch.float64 else torch.float32
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype}")
    return accum_dtype


def _quantize_operand(
    x: torch.Tensor, spec: QuantSpec | None, axis: int, pad: bool, name: str
) -> TorchQuantized | None:
    if spec is None:
        return None
    n = x.shape[axis]
    if n % spec.block and not pad:
        what = "head dim d" if axis == -1 else "key length Lk"
        raise ValueError(
            f"{name}: {what}={n} must be a multiple of the {spec.fmt} block size {spec.block}"
        )
    # docs/numerics.md: every quantizer works on the float32 value
    return quantize_torch_full(x.to(torch.float32), spec.fmt, axis, pad=pad, **spec.settings())


@dataclass(frozen=True)
class QuantizedOperands:
    """Dequantized Q^, K^, V^ (accum dtype, input shapes) and their TorchQuantized (or None)."""

    q_hat: torch.Tensor
    k_hat: torch.Tensor
    v_hat: torch.Tensor
    q: TorchQuantized | None
    k: TorchQuantized | None
    v: TorchQuantized | None


def quantize_operands(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: Recipe, accum_dtype: torch.dtype
) -> QuantizedOperands:
    """Q^, K^ blocked along d; V^ along d or keys (zero-padded keys) as the recipe says."""
    qq = _quantize_operand(q, recipe.q, -1, False, "q")
    kq = _quantize_operand(k, recipe.k, -1, False, "k")
    v_axis = -1 if recipe.v_axis == "head_dim" else -2
    vq = _quantize_operand(v, recipe.v, v_axis, v_axis == -2 and recipe.v_pad_keys, "v")

    def hat(x, tq):
        return (x if tq is None else tq.values).to(accum_dtype)

    return QuantizedOperands(hat(q, qq), hat(k, kq), hat(v, vq), qq, kq, vq)


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward value ``value`` bit for bit, gradient identity to
    ``x``. Same gradient as ``x + (fq(x) - x).detach()`` (Bengio et al. 2013, arXiv 1308.3432)."""
    return value.detach() + (x - x.detach())


def pad_keys(x: torch.Tensor, num_heads: int, lk_pad: int) -> torch.Tensor:
    """(B, Hkv, Lk, d) -> (B, H, lk_pad, d): GQA expansion, zero keys appended."""
    x = expand_kv(x, num_heads)
    return torch.nn.functional.pad(x, (0, 0, 0, lk_pad - x.shape[-2]))
