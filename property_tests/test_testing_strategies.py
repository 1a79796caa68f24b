"""fp4sim.testing.strategies: coverage of the drawn cases and shrinking toward simple ones."""

from __future__ import annotations

import numpy as np
from hypothesis import find, given, settings
from hypothesis import strategies as st

from fp4sim.testing.strategies import (
    attention_inputs,
    attention_specs,
    fp4_arrays,
    tensor_cases,
    tie_values,
)


def test_attention_inputs_shrink_to_the_simplest_case() -> None:
    case = find(attention_inputs(), lambda c: True)
    spec = case.spec
    assert (spec.batch, spec.heads, spec.kv_heads, spec.lq, spec.lk) == (1, 1, 1, 1, 1)
    assert (spec.head_dim, spec.distribution, spec.dtype, case.seed) == (
        64,
        "gaussian",
        "float32",
        0,
    )
    assert spec.outlier_fraction == 0.0 and spec.massive_tokens == 0


def test_shrinking_keeps_only_what_the_failure_needs() -> None:
    # a "bug" that needs GQA and Lq != Lk shrinks to the smallest such case
    case = find(
        attention_inputs(),
        lambda c: c.spec.heads > c.spec.kv_heads and c.spec.lq != c.spec.lk,
        settings=settings(max_examples=500, database=None),
    )
    spec = case.spec
    assert (spec.heads, spec.kv_heads, spec.distribution) == (2, 1, "gaussian")
    assert abs(spec.lq - spec.lk) == 1 and min(spec.lq, spec.lk) == 1


def test_tensor_cases_shrink_to_gaussian_single_block() -> None:
    case = find(tensor_cases(fmt="mxfp4"), lambda c: True)
    assert (case.distribution, case.shape, case.seed) == ("gaussian", (1, 32), 0)


@settings(max_examples=20, database=None)
@given(attention_inputs(causal=None, dtypes=("bfloat16",), max_len=40))
def test_attention_cases_are_consistent(case) -> None:  # noqa: ANN001
    spec = case.spec
    assert case.q.shape == (spec.batch, spec.heads, spec.lq, spec.head_dim)
    assert case.k.shape == case.v.shape == (spec.batch, spec.kv_heads, spec.lk, spec.head_dim)
    assert spec.heads % spec.kv_heads == 0 and spec.dtype == "bfloat16"
    if case.causal:
        assert spec.lq <= spec.lk
    assert "array(" not in repr(case)  # the repr names spec and seed, not the arrays


@settings(max_examples=40, database=None)
@given(st.data())
def test_specs_cover_the_listed_structures(data: st.DataObject) -> None:
    spec = data.draw(attention_specs(head_dims=(128,), max_len=8))
    assert spec.head_dim == 128 and 1 <= spec.lq <= 8 and 1 <= spec.lk <= 8


@settings(max_examples=15, database=None)
@given(fp4_arrays(fmt="nvfp4"), tie_values(fmt="mxfp4", one_ulp_off=False))
def test_array_strategies(x: np.ndarray, ties: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.shape[-1] % 16 == 0
    assert ties.shape[-1] % 32 == 0 and np.isfinite(ties).all()
