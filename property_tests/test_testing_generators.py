"""fp4sim.testing.generators: shapes, determinism and the corner cases each distribution builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp4sim
from fp4sim.testing.generators import (
    DISTRIBUTIONS,
    E2M1_TIES,
    TENSOR_DISTRIBUTIONS,
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
    round_to_dtype,
)

SPEC = AttentionInputSpec(
    batch=2,
    heads=4,
    kv_heads=2,
    lq=5,
    lk=9,
    head_dim=64,
    df=3.0,
    outlier_fraction=0.1,
    outlier_scale=50.0,
    outlier_channels=2,
    outlier_channel_scale=20.0,
    key_bias=3.0,
    massive_tokens=2,
    massive_scale=100.0,
    sink_strength=3.0,
    logit_scale=4.0,
)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_attention_inputs_shapes_dtype_and_determinism(name: str, dtype: str) -> None:
    spec = SPEC.replace(distribution=name, dtype=dtype)
    q, k, v = generate_attention_inputs(np.random.default_rng(7), spec)
    assert q.shape == (2, 4, 5, 64) and k.shape == v.shape == (2, 2, 9, 64)
    assert q.dtype == k.dtype == v.dtype == np.float32
    for t in (q, k, v):
        assert np.isfinite(t).all()
        # exactly representable in the spec's dtype: torch's cast is the oracle
        cast = torch.from_numpy(t).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(cast, t)
    again = generate_attention_inputs(np.random.default_rng(7), spec)
    for a, b in zip((q, k, v), again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_structures_are_present() -> None:
    rng = np.random.default_rng(0)
    big = SPEC.replace(lq=64, lk=64)
    _, k, _ = generate_attention_inputs(rng, big.replace(distribution="key_bias", key_bias=10.0))
    # a bias shared by all keys: the mean key is far from 0 relative to per-key noise
    assert np.abs(k.mean(axis=2)).max() > 5.0
    q, k, _ = generate_attention_inputs(
        rng, big.replace(distribution="attention_sink", sink_strength=4.0)
    )
    s = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, 2, axis=1)) / 8.0
    assert (s.argmax(axis=-1) == 0).mean() > 0.9  # key 0 takes the max for most queries
    q, _, _ = generate_attention_inputs(rng, big.replace(distribution="massive_activations"))
    row_norm = np.linalg.norm(q, axis=-1)
    assert (row_norm > 30 * np.median(row_norm)).sum(axis=-1).min() >= 1


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="kv_heads"):
        AttentionInputSpec(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="unknown distribution"):
        AttentionInputSpec(distribution="cauchy")
    with pytest.raises(ValueError, match="dtype"):
        AttentionInputSpec(dtype="int8")


@pytest.mark.parametrize("name", sorted(TENSOR_DISTRIBUTIONS))
def test_tensor_distributions_shape_and_determinism(name: str) -> None:
    a = generate_tensor(np.random.default_rng(3), (3, 48), name)
    b = generate_tensor(np.random.default_rng(3), (3, 48), name)
    assert a.shape == (3, 48) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_ties_are_ties_after_scaling(fmt: str) -> None:
    block = 16 if fmt == "nvfp4" else 32
    x = generate_tensor(np.random.default_rng(1), (8, 4 * block), "ties", block_size=block)
    q = fp4sim.quantize(x, fmt)
    scaled = np.abs(x) / np.repeat(np.asarray(q.scales, dtype=np.float64), block, axis=-1)
    on_tie = np.isin(scaled, E2M1_TIES)
    is_amax = scaled == 6.0
    assert (on_tie | is_amax).all()
    # RNE: each tie goes to the neighbour with the even code (OCP MX v1.0 5.3.3)
    assert (np.asarray(q.codes)[on_tie] & 1 == 0).all()


def test_near_ties_are_one_ulp_away() -> None:
    x = generate_tensor(np.random.default_rng(2), (4, 64), "near_ties")
    ties = generate_tensor(np.random.default_rng(2), (4, 64), "ties")
    ulps = np.abs(x.view(np.int32).astype(np.int64) - ties.view(np.int32).astype(np.int64))
    assert set(np.unique(ulps)) <= {0, 1}
    assert (ulps == 1).mean() > 0.8


def test_reciprocal_ties_separate_the_two_ways_of_applying_a_scale() -> None:
    """x / s sits exactly on an E2M1 tie (t s / s = t) for every non-amax element, the block
    scales are E4M3 values with an inexact float32 reciprocal, and the emulator's two
    ``scale_op`` settings give different codes on the array (what the distribution is for)."""
    x = generate_tensor(np.random.default_rng(6), (16, 64), "reciprocal_ties")
    blocks = x.reshape(16, 4, 16)
    s = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(6.0)
    mant = s / 2.0 ** np.floor(np.log2(s)) - 1.0
    assert set(np.unique(mant * 8)) == {7.0}  # 1.875 * 2^e
    y = np.abs(blocks) / s
    on_tie = np.isin(y, np.asarray(E2M1_TIES, np.float32))
    assert (on_tie | (y == 6.0)).all()
    a = fp4sim.quantize(x, "nvfp4", scale_op="reciprocal")
    b = fp4sim.quantize(x, "nvfp4", scale_op="divide")
    assert not np.array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_scale_ties_sit_on_e4m3_midpoints() -> None:
    x = generate_tensor(np.random.default_rng(4), (16, 16), "scale_ties")
    amax6 = np.abs(x).max(axis=-1) / np.float32(6.0)
    mant = amax6 / 2.0 ** np.floor(np.log2(amax6)) - 1.0  # in [0, 1)
    np.testing.assert_array_equal((mant * 16) % 2, np.ones_like(mant))  # odd sixteenths


def test_zero_blocks_and_below_flush() -> None:
    z = generate_tensor(np.random.default_rng(5), (8, 64), "zero_blocks", zero_fraction=0.5)
    amax = np.abs(z.reshape(8, 4, 16)).max(axis=-1)
    assert (amax == 0).any() and (amax > 0).any()
    f = generate_tensor(np.random.default_rng(5), (32, 64), "below_flush")
    amax = np.abs(f.reshape(32, 4, 16)).max(axis=-1)
    threshold = 6 * 2.0**-10  # docs/numerics.md: NVFP4 blocks below this flush to 0
    assert (amax < threshold).any() and (amax > threshold).any()


def test_specials_include_nan_and_inf() -> None:
    x = generate_tensor(np.random.default_rng(6), (16, 64), "specials", special_fraction=0.3)
    assert np.isnan(x).any() and np.isinf(x).any() and (np.signbit(x) & (x == 0)).any()


def test_round_to_bfloat16_matches_torch() -> None:
    bits = np.random.default_rng(8).integers(0, 2**32, size=20000, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    expected = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(round_to_dtype(x, "bfloat16"), expected)
