"""Pure-PyTorch reference FP4 attention: recipes, forward (tiled/dense), backward variants."""

from reference.autograd import fp4_attention
from reference.backward import (
    BackwardParts,
    attention_backward,
    backward_parts,
    d_identity_residual,
)
from reference.exact import attention_exact
from reference.forward import ForwardResult, fp4_attention_forward
from reference.quant_torch import fake_quantize_torch, quantize_torch
from reference.recipes import (
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
    "d_identity_residual",
    "fake_quantize_torch",
    "fp4_attention",
    "fp4_attention_forward",
    "get_recipe",
    "quantize_torch",
]
