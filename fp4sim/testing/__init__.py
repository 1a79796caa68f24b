"""fp4sim.testing: generators, Hypothesis strategies, assertions and `fp4sim check`.

Importing this package is cheap (NumPy only); ``strategies`` (Hypothesis) and ``check``
(torch, via the reference) are imported when first accessed.
"""

from __future__ import annotations

import importlib
from typing import Any

from fp4sim.judge.inputs import (
    DISTRIBUTIONS,
    TENSOR_DISTRIBUTIONS,
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
)
from fp4sim.testing.assertions import (
    AttentionErrorReport,
    QuantizedDiff,
    assert_attention_close,
    assert_quantized_equal,
    attention_error,
    compare_quantized,
    tie_flip_summary,
)

__all__ = [
    "DISTRIBUTIONS",
    "TENSOR_DISTRIBUTIONS",
    "AttentionErrorReport",
    "AttentionInputSpec",
    "QuantizedDiff",
    "assert_attention_close",
    "assert_quantized_equal",
    "attention_error",
    "compare_quantized",
    "generate_attention_inputs",
    "generate_tensor",
    "tie_flip_summary",
]

_LAZY_SUBMODULES = ("strategies", "check", "repro", "generators", "assertions", "plugin")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"fp4sim.testing.{name}")
    raise AttributeError(f"module 'fp4sim.testing' has no attribute {name!r}")
