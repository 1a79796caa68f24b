"""Hypothesis strategies for FP4 quantizer and attention inputs.

Every strategy draws a small description (a distribution name, its parameters, a shape)
and an integer seed, then calls the NumPy generators of ``fp4sim.judge.inputs``.
The description is drawn so that Hypothesis shrinks toward the simplest case:
``sampled_from`` lists start with the simple choice (Gaussian, no outliers, head dim 64,
float32), integers shrink toward their lower bound (small shapes), and the seed toward 0.

Public strategies:

* ``attention_specs(...)`` -> ``AttentionInputSpec``;
* ``attention_inputs(...)`` -> ``AttentionCase`` (spec, seed, q, k, v, causal, sm_scale);
* ``tensor_cases(...)`` -> ``TensorCase`` (distribution, params, seed, x);
* ``fp4_arrays(...)`` -> float32 ``numpy.ndarray`` whose last axis is a multiple of the block;
* ``tie_values(...)`` -> float32 arrays on (or one ulp from) E2M1 rounding ties after scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from fp4sim.formats import BLOCK_SIZES  # re-exported: block length of each format
from fp4sim.judge.inputs import (
    DISTRIBUTIONS,
    DTYPES,
    TENSOR_DISTRIBUTIONS,
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
)

__all__ = [
    "ATTENTION_DISTRIBUTIONS",
    "BLOCK_SIZES",
    "QUANTIZER_DISTRIBUTIONS",
    "AttentionCase",
    "TensorCase",
    "attention_inputs",
    "attention_specs",
    "fp4_arrays",
    "seeds",
    "tensor_cases",
    "tie_values",
]

# Simplest first: Hypothesis shrinks sampled_from toward index 0.
ATTENTION_DISTRIBUTIONS: tuple[str, ...] = (
    "gaussian",
    "student_t",
    "lognormal",
    "sparse_outliers",
    "outlier_channels",
    "key_bias",
    "massive_activations",
    "attention_sink",
    "peaky",
    "flat",
)
QUANTIZER_DISTRIBUTIONS: tuple[str, ...] = (
    "gaussian",
    "ties",
    "near_ties",
    "reciprocal_ties",
    "scale_ties",
    "student_t",
    "lognormal",
    "sparse_outliers",
    "zero_blocks",
    "below_flush",
    "specials",
)
assert set(ATTENTION_DISTRIBUTIONS) == set(DISTRIBUTIONS)
assert set(QUANTIZER_DISTRIBUTIONS) == set(TENSOR_DISTRIBUTIONS)


def seeds() -> st.SearchStrategy[int]:
    """Generator seeds, shrinking toward 0."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def _validated_choices(
    choices: Sequence[str] | None, default: Sequence[str], known: object, what: str
) -> tuple[str, ...]:
    chosen = tuple(default if choices is None else choices)
    unknown = [c for c in chosen if c not in known]  # type: ignore[operator]
    if not chosen or unknown:
        raise ValueError(f"invalid {what}: {unknown or 'empty list'}")
    return chosen


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


@st.composite
def attention_specs(
    draw: st.DrawFn,
    *,
    distributions: Sequence[str] | None = None,
    head_dims: Sequence[int] = (64, 128),
    dtypes: Sequence[str] = DTYPES,
    max_batch: int = 2,
    max_kv_heads: int = 2,
    max_group: int = 2,
    min_len: int = 1,
    max_len: int = 80,
    lq_le_lk: bool = False,
    length_multiple: int = 1,
    equal_lengths: bool = False,
) -> AttentionInputSpec:
    """Draw an ``AttentionInputSpec``.

    Shapes: batch in [1, max_batch], kv_heads in [1, max_kv_heads], heads = kv_heads *
    group with group in [1, max_group] (GQA when group > 1), lq and lk independent in
    [min_len, max_len] (ragged, Lq != Lk); ``lq_le_lk`` keeps lq <= lk (so that every row
    of a bottom-right-aligned causal mask sees at least one key). ``length_multiple``
    draws lengths that are multiples of it (a kernel's tile); ``equal_lengths`` draws
    lq == lk. Distribution parameters are drawn from short lists whose first entry is the
    mildest.
    """
    names = _validated_choices(
        distributions, ATTENTION_DISTRIBUTIONS, DISTRIBUTIONS, "distribution"
    )
    if not head_dims or not dtypes:
        raise ValueError("head_dims and dtypes must be non-empty")
    distribution = draw(st.sampled_from(names))
    batch = draw(st.integers(1, max_batch))
    kv_heads = draw(st.integers(1, max_kv_heads))
    group = draw(st.integers(1, max_group))
    head_dim = draw(st.sampled_from(tuple(head_dims)))
    m = length_multiple
    low, high = -(-min_len // m), max_len // m  # lengths in units of m
    if m < 1 or high < max(low, 1):
        raise ValueError(f"no length in [{min_len}, {max_len}] is a multiple of {m}")
    low = max(low, 1)
    lk = m * draw(st.integers(low, high))
    lq = lk if equal_lengths else m * draw(st.integers(low, lk // m if lq_le_lk else high))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    params: dict[str, object] = {}
    if distribution == "student_t":
        params["df"] = draw(st.sampled_from((30.0, 5.0, 3.0, 2.0, 1.5)))
    elif distribution == "lognormal":
        params["sigma"] = draw(st.sampled_from((0.5, 1.0, 1.5, 2.0)))
    elif distribution == "sparse_outliers":
        params["outlier_fraction"] = draw(st.sampled_from((0.001, 0.01, 0.05)))
        params["outlier_scale"] = draw(st.sampled_from((10.0, 30.0, 100.0)))
    elif distribution == "outlier_channels":
        params["outlier_channels"] = draw(st.integers(1, 4))
        params["outlier_channel_scale"] = draw(st.sampled_from((5.0, 10.0, 20.0)))
    elif distribution == "key_bias":
        params["key_bias"] = draw(st.sampled_from((1.0, 3.0, 10.0)))
    elif distribution == "massive_activations":
        params["massive_tokens"] = draw(st.integers(1, 3))
        params["massive_scale"] = draw(st.sampled_from((10.0, 30.0, 100.0)))
    elif distribution == "attention_sink":
        params["sink_strength"] = draw(st.sampled_from((2.0, 3.0, 4.0)))
    elif distribution == "peaky":
        params["logit_scale"] = draw(st.sampled_from((2.0, 4.0, 8.0)))
    elif distribution == "flat":
        params["logit_scale"] = draw(st.sampled_from((0.5, 0.1, 0.01)))
    return AttentionInputSpec(
        batch=batch,
        heads=kv_heads * group,
        kv_heads=kv_heads,
        lq=lq,
        lk=lk,
        head_dim=head_dim,
        distribution=distribution,
        dtype=dtype,
        **params,  # type: ignore[arg-type]
    )


@st.composite
def attention_inputs(
    draw: st.DrawFn,
    *,
    causal: bool | None = False,
    sm_scales: Sequence[float | None] = (None,),
    **spec_kwargs: object,
) -> AttentionCase:
    """Draw an ``AttentionCase``: a spec (see ``attention_specs`` for ``spec_kwargs``), a
    seed, and the generated float32 (q, k, v).

    ``causal=None`` draws the flag (False first). When causal, lq <= lk is enforced
    (lq == lk with ``causal_equal_lengths``, for kernels without bottom-right alignment).
    ``sm_scales`` lists the softmax scales to draw from (None = 1/sqrt(d), first).
    """
    equal = bool(spec_kwargs.pop("causal_equal_lengths", False))
    is_causal = draw(st.booleans()) if causal is None else bool(causal)
    if is_causal:
        spec_kwargs = {**spec_kwargs, "lq_le_lk": True, "equal_lengths": equal}
    spec = draw(attention_specs(**spec_kwargs))  # type: ignore[arg-type]
    seed = draw(seeds())
    sm_scale = draw(st.sampled_from(tuple(sm_scales)))
    q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
    return AttentionCase(spec=spec, seed=seed, causal=is_causal, sm_scale=sm_scale, q=q, k=k, v=v)


# ---------------------------------------------------------------------------
# quantizer inputs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorCase:
    """One drawn quantizer input: regenerate it with ``generate_tensor(
    numpy.random.default_rng(seed), shape, distribution, block_size=..., dtype=..., **params)``.
    """

    distribution: str
    params: tuple[tuple[str, float], ...]
    shape: tuple[int, ...]
    block_size: int
    dtype: str
    seed: int
    x: np.ndarray = field(repr=False, compare=False)


_TENSOR_PARAMS: dict[str, dict[str, tuple[float, ...]]] = {
    "student_t": {"df": (30.0, 5.0, 3.0, 2.0, 1.2)},
    "lognormal": {"sigma": (0.5, 1.0, 2.0, 4.0)},
    "sparse_outliers": {"outlier_fraction": (0.01, 0.1), "outlier_scale": (10.0, 100.0, 1e4)},
    "ties": {"min_exp": (0, -4, -10), "max_exp": (0, 4, 10)},
    "near_ties": {"min_exp": (0, -4, -10), "max_exp": (0, 4, 10)},
    "reciprocal_ties": {"min_exp": (0, -4, -6), "max_exp": (0, 4, 7)},
    "scale_ties": {"min_exp": (0, -6, -9), "max_exp": (0, 6, 8)},
    "zero_blocks": {"zero_fraction": (0.5, 0.1, 0.9)},
    "below_flush": {"min_exp": (-16, -20), "max_exp": (-4, -8)},
    "specials": {"special_fraction": (0.05, 0.3)},
}


@st.composite
def tensor_cases(
    draw: st.DrawFn,
    *,
    fmt: str = "nvfp4",
    distributions: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32",),
    max_rows: int = 4,
    max_blocks: int = 4,
    ragged: bool = False,
) -> TensorCase:
    """Draw a ``TensorCase``: a (rows, n) float32 array, n a multiple of the format's block
    (``ragged=True`` allows any n >= 1), from a quantizer-input distribution."""
    if fmt not in BLOCK_SIZES:
        raise ValueError(f"fmt must be one of {sorted(BLOCK_SIZES)}, got {fmt!r}")
    names = _validated_choices(
        distributions, QUANTIZER_DISTRIBUTIONS, TENSOR_DISTRIBUTIONS, "tensor distribution"
    )
    block = BLOCK_SIZES[fmt]
    distribution = draw(st.sampled_from(names))
    rows = draw(st.integers(1, max_rows))
    if ragged:
        n = draw(st.integers(1, max_blocks * block))
    else:
        n = block * draw(st.integers(1, max_blocks))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    params = tuple(
        (name, draw(st.sampled_from(values)))
        for name, values in _TENSOR_PARAMS.get(distribution, {}).items()
    )
    if distribution in ("ties", "near_ties", "reciprocal_ties", "scale_ties", "below_flush"):
        low, high = dict(params)["min_exp"], dict(params)["max_exp"]
        params = (("min_exp", int(min(low, high))), ("max_exp", int(max(low, high))))
    seed = draw(seeds())
    x = generate_tensor(
        np.random.default_rng(seed),
        (rows, n),
        distribution,
        block_size=block,
        dtype=dtype,
        **dict(params),
    )
    return TensorCase(
        distribution=distribution,
        params=params,
        shape=(rows, n),
        block_size=block,
        dtype=dtype,
        seed=seed,
        x=x,
    )


def fp4_arrays(
    *,
    fmt: str = "nvfp4",
    distributions: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32",),
    max_rows: int = 4,
    max_blocks: int = 4,
    ragged: bool = False,
) -> st.SearchStrategy[np.ndarray]:
    """Float32 arrays (rows, n) for an FP4 quantizer, from ``tensor_cases`` (same arguments);
    values are exactly representable in the drawn dtype."""
    return tensor_cases(
        fmt=fmt,
        distributions=distributions,
        dtypes=dtypes,
        max_rows=max_rows,
        max_blocks=max_blocks,
        ragged=ragged,
    ).map(lambda case: case.x)


def tie_values(
    *, fmt: str = "nvfp4", one_ulp_off: bool | None = None, max_rows: int = 4, max_blocks: int = 4
) -> st.SearchStrategy[np.ndarray]:
    """Arrays whose non-amax elements sit exactly on E2M1 rounding ties after block scaling
    (``one_ulp_off=False``), one float32 ulp away (``True``), or either (``None``)."""
    if one_ulp_off is None:
        names: tuple[str, ...] = ("ties", "near_ties")
    else:
        names = ("near_ties",) if one_ulp_off else ("ties",)
    return fp4_arrays(fmt=fmt, distributions=names, max_rows=max_rows, max_blocks=max_blocks)
