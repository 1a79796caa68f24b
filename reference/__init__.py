"""Pure-PyTorch reference FP4 attention: recipes, forward (tiled/dense), backward variants."""

from fp4sim.reference.autograd import fp4_attention
from fp4sim.reference.backward import (
    BackwardParts,
    attention_backward,
    backward_parts,
    ds_rowsum_stats,
)
from fp4sim.reference.exact import attention_exact
from fp4sim.reference.forward import ForwardResult, fp4_attention_forward
from fp4sim.reference.quant_torch import fake_quantize_torch, quantize_torch
from fp4sim.reference.recipes import (
    BACKWARD_VARIANTS,
    P_POLICIES,
    PRESETS,
    RECIPE_NAMES,
    QuantSpec,
    Recipe,
    get_recipe,
)

__all__ = [
    "BACKWARD_VARIANTS",
    "BackwardParts",
    "ForwardResult",
    "P_POLICIES",
    "PRESETS",
    "QuantSpec",
    "RECIPE_NAMES",
    "Recipe",
    "attention_backward",
    "attention_exact",
    "backward_parts",
    "ds_rowsum_stats",
    "fake_quantize_torch",
    "fp4_attention",
    "fp4_attention_forward",
    "get_recipe",
    "quantize_torch",
]
