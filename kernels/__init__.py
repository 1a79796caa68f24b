"""Triton kernels for FP4 attention: quantization, fused Attn-QAT training, FP4 inference.

The package stands alone (it imports no other layer except the constants of
``fp4sim.formats``). Submodules are imported lazily so that ``import fp4sim.kernels`` does not
import Triton until a kernel is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# The recipes the fused training kernels (``attn_qat``) implement, named as the reference's
# presets (fp4sim.reference.recipes); the comparison layers import this tuple from here.
RECIPES: tuple[str, ...] = ("bf16", "attn-qat", "attn-qat-consistent")

_EXPORTS = {
    "quantize_fp4": "fp4sim.kernels.quantize",
    "attn_qat": "fp4sim.kernels.training_attention",
    "attn_qat_forward": "fp4sim.kernels.training_attention",
    "attn_qat_backward": "fp4sim.kernels.training_attention",
    "fp4_inference_attention": "fp4sim.kernels.inference",
    "fp4_decode_attention": "fp4sim.kernels.decode",
    "pack_for_inference": "fp4sim.kernels.inference",
    "tile_v": "fp4sim.kernels.decode",
}

__all__ = sorted([*_EXPORTS, "RECIPES"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fp4sim.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
