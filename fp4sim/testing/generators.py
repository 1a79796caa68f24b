"""The public name of the NumPy input generators (``fp4sim.testing.generators``).

Their one home is ``fp4sim.judge.inputs``, below the comparison layers, so that `fp4sim
report` uses them without importing ``fp4sim.testing``; this module re-exports them.
"""

from fp4sim.judge.inputs import (
    DISTRIBUTIONS,
    DTYPES,
    E2M1_TIES,
    TENSOR_DISTRIBUTIONS,
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
    round_to_dtype,
)

__all__ = [
    "DISTRIBUTIONS",
    "DTYPES",
    "E2M1_TIES",
    "TENSOR_DISTRIBUTIONS",
    "AttentionCase",
    "AttentionInputSpec",
    "generate_attention_inputs",
    "generate_tensor",
    "round_to_dtype",
]
