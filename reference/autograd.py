"""fp4_attention: the FP4 forward plus a chosen backward, as a torch.autograd.Function."""

from __future__ import annotations

import torch

from fp4sim.reference.backward import attention_backward
from fp4sim.reference.forward import fp4_attention_forward
from fp4sim.reference.recipes import BACKWARD_VARIANTS, Recipe, get_recipe


class _FP4Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, recipe, variant, accum_dtype):
        fwd = fp4_attention_forward(
            q.detach(), k.detach(), v.detach(), recipe, causal, sm_scale, "tiled", accum_dtype
        )
        ctx.save_for_backward(q, k, v)
        ctx.fwd = fwd
        ctx.args = (causal, sm_scale, recipe, variant)
        # a copy: returning the saved tensor itself would keep every step's results alive
        return fwd.o.to(q.dtype, copy=True)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        causal, sm_scale, recipe, variant = ctx.args
        dq, dk, dv = attention_backward(variant, ctx.fwd, q, k, v, do, recipe, causal, sm_scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def fp4_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    recipe: str | Recipe = "attn-qat",
    backward: str | None = None,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable FP4 attention (tiled forward); output in q's dtype, shape (B, H, Lq, d).

    ``backward=None`` uses ``recipe.backward``; ``accum_dtype=None`` means float64 for float64
    inputs, float32 otherwise. Works on CPU and CUDA tensors; k, v may have fewer heads (GQA).
    """
    recipe = get_recipe(recipe)
    variant = recipe.backward if backward is None else backward
    if variant not in BACKWARD_VARIANTS:
        raise ValueError(f"unknown backward variant {variant!r}; valid: {BACKWARD_VARIANTS}")
    return _FP4Attention.apply(q, k, v, causal, sm_scale, recipe, variant, accum_dtype)
