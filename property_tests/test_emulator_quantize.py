"""Block quantization (NVFP4, MXFP4): bit-exact against the independent reference, algebraic
properties on heavy-tailed inputs, every setting, special values and input validation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from emulator_checks import (
    check_block_monotone,
    check_fake_quantize_idempotent,
    check_nvfp4_flush_threshold,
    check_power_of_two_invariance,
    check_quantize_matches_reference,
    check_quantize_sign_symmetry,
    reference_quantize,
)
from emulator_inputs import E4M3_MIDPOINTS, heavy_tailed_arrays
from hypothesis import assume, given
from hypothesis import strategies as st

import fp4sim

NVFP4_ARRAYS = heavy_tailed_arrays(block_size=16)
MXFP4_ARRAYS = heavy_tailed_arrays(block_size=32)
FORMAT_ARRAYS = st.one_of(NVFP4_ARRAYS.map(lambda x: ("nvfp4", x)),
                          MXFP4_ARRAYS.map(lambda x: ("mxfp4", x)))
NVFP4_SETTINGS = st.fixed_dictionaries({}, optional={
    "scale_op": st.sampled_from(["reciprocal", "divide"]),
    "scale_amax_op": st.sampled_from(["divide", "reciprocal"]),
    "scale_lower_clamp": st.booleans(),
    "tensor_scale": st.one_of(st.none(), st.just("amax"), st.sampled_from([0.01, 3.0, 1e-6])),
    "zero_scale_codes": st.sampled_from(["zeros", "reciprocal"]),
    "nan": st.sampled_from(["ptx", "ml_dtypes"]),
})


@given(FORMAT_ARRAYS)
def test_quantize_default_matches_reference(fmt_x):
    fmt, x = fmt_x
    check_quantize_matches_reference(fp4sim, x, fmt)


@pytest.mark.parametrize("scale_amax_op", ["divide", "reciprocal"])
def test_nvfp4_scale_at_every_e4m3_tie(scale_amax_op):
    # Block maxima 6 * m +- 4 ulps for every E4M3 midpoint m: amax / 6 and amax * float32(1/6)
    # round differently for some of them, so each op must match its own reference.
    amax = (6.0 * E4M3_MIDPOINTS.astype(np.float64)).astype(np.float32)
    near = amax.view(np.int32)[:, None] + np.arange(-4, 5)[None, :]
    amax = near.astype(np.int32).view(np.float32).reshape(-1)
    x = np.zeros((amax.size, 16), np.float32)
    x[:, 0] = amax
    x[:, 1:] = amax[:, None] * np.linspace(-0.9, 0.9, 15, dtype=np.float32)
    check_quantize_matches_reference(fp4sim, x, "nvfp4", scale_amax_op=scale_amax_op)
    other = "reciprocal" if scale_amax_op == "divide" else "divide"
    assert np.any(fp4sim.quantize(x, scale_amax_op=other).scale_bits
                  != fp4sim.quantize(x, scale_amax_op=scale_amax_op).scale_bits)


@given(NVFP4_ARRAYS, NVFP4_SETTINGS, st.integers(-30, 0))
def test_nvfp4_settings_match_reference(x, settings, exponent):
    # Shifting the input down exercises tiny blocks (flushes, the lower clamp).
    check_quantize_matches_reference(fp4sim, x * np.float32(2.0**exponent), "nvfp4", **settings)


@pytest.mark.parametrize("rule", fp4sim.MX_SCALE_RULES)
@given(x=MXFP4_ARRAYS, exponent=st.integers(-140, 110))
def test_mx_scale_rules_match_defining_formula(x, rule, exponent):
    scaled = (x.astype(np.float64) * 2.0**exponent).astype(np.float32)
    check_quantize_matches_reference(fp4sim, scaled, "mxfp4", scale_rule=rule)


@given(FORMAT_ARRAYS)
def test_fake_quantize_idempotent(fmt_x):
    fmt, x = fmt_x
    check_fake_quantize_idempotent(fp4sim, x, fmt)


# Inputs shifted up so that most block scales are normal E4M3 (the property's domain).
IN_RANGE_ARRAYS = st.one_of(
    heavy_tailed_arrays(block_size=16, exponents=(2, 10)).map(lambda x: ("nvfp4", x)),
    heavy_tailed_arrays(block_size=32, exponents=(-12, 12)).map(lambda x: ("mxfp4", x)))


@given(IN_RANGE_ARRAYS, st.integers(-6, 6))
def test_power_of_two_scaling_leaves_codes_unchanged(fmt_x, k):
    fmt, x = fmt_x
    assume(check_power_of_two_invariance(fp4sim, x, fmt, k))


@given(FORMAT_ARRAYS)
def test_sign_symmetry(fmt_x):
    fmt, x = fmt_x
    check_quantize_sign_symmetry(fp4sim, x, fmt)


@given(FORMAT_ARRAYS)
def test_monotone_within_blocks(fmt_x):
    fmt, x = fmt_x
    check_block_monotone(fp4sim, x, fmt)


def test_nvfp4_flush_threshold():
    check_nvfp4_flush_threshold(fp4sim)


@given(NVFP4_ARRAYS)
def test_nvfp4_saturation_flags_and_codes(x):
    q = fp4sim.quantize(x, "nvfp4")
    s_eff = q.scales.astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        y = x.reshape(x.shape[0], -1, 16) * (np.float32(1) / s_eff)[..., None]
    over = np.abs(y) > 6
    codes = q.codes.reshape(y.shape)
    assert np.all((codes[over & (s_eff[..., None] > 0)] & 7) == 7)
    np.testing.assert_array_equal(q.saturated_blocks, (over & (s_eff[..., None] > 0)).any(-1))


def test_mx_floor_rule_clips_and_rceil_does_not():
    # docs/numerics.md: with `floor`, amax in (6*2^k, 8*2^k) saturates; `rceil` never does.
    x = np.zeros(32, np.float32)
    x[0] = 7.0
    floor = fp4sim.quantize(x, "mxfp4", scale_rule="floor")
    rceil = fp4sim.quantize(x, "mxfp4", scale_rule="rceil")
    assert floor.scale_bits[0] == 127 and floor.codes[0] == 7 and floor.saturated_blocks[0]
    assert rceil.scale_bits[0] == 128 and rceil.codes[0] == 6 and not rceil.saturated_blocks[0]


def test_all_zero_blocks_documented_bytes():
    x = np.zeros((2, 32), np.float32)
    x[1] = -0.0
    nv = fp4sim.quantize(x, "nvfp4")
    assert np.all(nv.scale_bits == 0) and np.all(nv.codes == 0)
    assert not nv.flushed_blocks.any()  # nothing was lost
    mx = fp4sim.quantize(x, "mxfp4")
    assert np.all(mx.scale_bits == 0) and np.all(mx.codes == 0)
    assert np.all(fp4sim.dequantize(mx) == 0) and np.all(fp4sim.dequantize(nv) == 0)


@pytest.mark.parametrize("nan", ["ptx", "ml_dtypes"])
def test_nan_and_inf_documented_bytes(nan):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    x[0, 3] = np.nan
    x[1, 5] = np.inf
    x[1, 6] = -np.inf
    positive_nan = 7 if nan == "ptx" else 8
    nv = fp4sim.quantize(x, "nvfp4", nan=nan)
    assert nv.scale_bits[0, 0] == 0x7F and np.all(nv.codes[0, :16] == positive_nan)
    assert nv.scale_bits[1, 0] == 0x7E  # Inf saturates the scale to 448
    assert nv.codes[1, 5] == 7 and nv.codes[1, 6] == 15
    assert np.isnan(fp4sim.dequantize(nv)[0, :16]).all()
    assert np.isfinite(fp4sim.dequantize(nv)[:, 16:]).all()
    mx = fp4sim.quantize(x, "mxfp4", nan=nan)
    assert mx.scale_bits[0, 0] == 0xFF and np.all(mx.codes[0] == positive_nan)
    # Inf counts as FLT_MAX: rceil gives ceil(log2(FLT_MAX / 6)) = 126, byte 253.
    assert mx.scale_bits[1, 0] == 253 and mx.codes[1, 5] == 7 and mx.codes[1, 6] == 15


def test_zero_scale_codes_reciprocal():
    x = np.zeros((1, 16), np.float32)
    x[0, :4] = [1e-4, -1e-4, 0.0, -0.0]
    zeros = fp4sim.quantize(x, "nvfp4")
    recip = fp4sim.quantize(x, "nvfp4", zero_scale_codes="reciprocal")
    assert np.all(zeros.codes == 0)
    # x * (1/0): +-Inf -> +-6; 0 * Inf = NaN -> the positive-NaN code (PTX: 7).
    np.testing.assert_array_equal(recip.codes[0, :4], [7, 15, 7, 7])
    assert np.all(fp4sim.dequantize(recip) == 0) and recip.flushed_blocks.all()


def test_tensor_scale_amax_order_of_operations():
    rng = np.random.default_rng(7)
    x = rng.standard_t(2, (4, 64)).astype(np.float32)
    q = fp4sim.quantize(x, "nvfp4", tensor_scale="amax")
    t = np.float32(np.max(np.abs(x)) / np.float32(2688))
    assert q.tensor_scale == t
    codes, scale_bits = reference_quantize(x, "nvfp4", tensor_scale="amax")
    np.testing.assert_array_equal(q.scale_bits, scale_bits)
    deq = fp4sim.dequantize(q)
    want = fp4sim.e2m1_decode(codes).reshape(4, 4, 16) * (q.scales * t)[..., None]
    np.testing.assert_array_equal(deq, want.reshape(4, 64))


@given(FORMAT_ARRAYS.filter(lambda fx: fx[1].shape[0] >= 1))
def test_any_axis_equals_last_axis_of_transpose(fmt_x):
    fmt, x = fmt_x
    q_last = fp4sim.quantize(x, fmt, axis=-1)
    q_first = fp4sim.quantize(np.ascontiguousarray(x.T), fmt, axis=0)
    np.testing.assert_array_equal(q_first.codes, q_last.codes.T)
    np.testing.assert_array_equal(q_first.scale_bits, q_last.scale_bits.T)
    np.testing.assert_array_equal(q_first.packed, q_last.packed.T)
    np.testing.assert_array_equal(fp4sim.dequantize(q_first), fp4sim.dequantize(q_last).T)


def test_padding_semantics():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    with pytest.raises(ValueError, match=r"axis 1 .* length 20.* block size 16"):
        fp4sim.quantize(x, "nvfp4")
    q = fp4sim.quantize(x, "nvfp4", pad=True)
    assert q.codes.shape == (3, 32) and q.scale_bits.shape == (3, 2) and q.shape == (3, 20)
    padded = np.pad(x, [(0, 0), (0, 12)])
    full = fp4sim.quantize(padded, "nvfp4")
    np.testing.assert_array_equal(q.codes, full.codes)
    assert np.all(q.codes[:, 20:] == 0)
    np.testing.assert_array_equal(fp4sim.dequantize(q), fp4sim.dequantize(full)[:, :20])


def test_input_validation():
    with pytest.raises(TypeError, match="dtype int64"):
        fp4sim.quantize(np.ones((2, 16), np.int64))
    with pytest.raises(TypeError, match="dtype object"):
        fp4sim.quantize(np.array([[1.0] * 16], dtype=object))
    with pytest.raises(TypeError, match="bool"):
        fp4sim.quantize(np.ones((1, 16), bool))
    with pytest.raises(TypeError):
        fp4sim.e2m1_encode(np.ones(3, np.complex64))
    with pytest.raises(ValueError, match="unknown block format"):
        fp4sim.quantize(np.ones(16, np.float32), "fp8")
    with pytest.raises(ValueError, match="scale_rule"):
        fp4sim.quantize(np.ones(16, np.float32), "nvfp4", scale_rule="floor")
    with pytest.raises(ValueError, match="tensor_scale"):
        fp4sim.quantize(np.ones(32, np.float32), "mxfp4", tensor_scale="amax")
    with pytest.raises(ValueError, match="tensor_scale"):
        fp4sim.quantize(np.ones(16, np.float32), "nvfp4", tensor_scale=-1.0)
    with pytest.raises(ValueError, match="scale_op"):
        fp4sim.quantize(np.ones(16, np.float32), "nvfp4", scale_op="multiply")
    with pytest.raises(ValueError, match="out of range"):
        fp4sim.quantize(np.ones(16, np.float32), "nvfp4", axis=1)


def test_half_precision_inputs_convert_exactly():
    rng = np.random.default_rng(5)
    x32 = rng.standard_t(2, (2, 32)).astype(np.float32)
    x16 = x32.astype(np.float16)
    q16 = fp4sim.quantize(x16)
    q32 = fp4sim.quantize(x16.astype(np.float32))
    np.testing.assert_array_equal(q16.codes, q32.codes)
    swapped = x32.astype(x32.dtype.newbyteorder())
    np.testing.assert_array_equal(fp4sim.quantize(swapped).codes, fp4sim.quantize(x32).codes)
    bf16 = x32.astype(ml_dtypes.bfloat16)
    exact = bf16.astype(np.float32)
    np.testing.assert_array_equal(fp4sim.quantize(bf16).codes, fp4sim.quantize(exact).codes)
    np.testing.assert_array_equal(fp4sim.quantize(bf16).scale_bits,
                                  fp4sim.quantize(exact).scale_bits)


@given(st.integers(0, 2**32 - 1))
def test_stochastic_quantize_uses_one_word_per_element(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (2, 32)).astype(np.float32)
    words = rng.integers(0, 2**32, x.shape, dtype=np.uint64).astype(np.uint32)
    q = fp4sim.quantize(x, "nvfp4", rounding="stochastic", rbits=words)
    rne = fp4sim.quantize(x, "nvfp4")
    np.testing.assert_array_equal(q.scale_bits, rne.scale_bits)
    y = x.reshape(2, 2, 16) * (np.float32(1) / q.scales)[..., None]
    want = fp4sim.e2m1_encode(y.reshape(2, 32), rounding="stochastic", rbits=words)
    np.testing.assert_array_equal(q.codes, want)


def test_block_flush_mask_counts_flushed_blocks():
    x = np.ones((1, 64), np.float32)
    x[0, 16:32] = 1e-3  # amax/6 < 2^-10: flushed
    x[0, 32:48] = 0.0  # nothing to lose: not flushed
    q = fp4sim.quantize(x)
    np.testing.assert_array_equal(fp4sim.block_flush_mask(q), [[False, True, False, False]])


def test_large_input_split_across_threads_matches_reference():
    # Above 2^20 elements quantize splits the blocks across threads and chunks of 2^16
    # elements; an odd block count checks the part and chunk boundaries.
    rng = np.random.default_rng(11)
    x = rng.standard_t(2, ((1 << 16) + 3) * 16).astype(np.float32).reshape(-1, 16)
    x[12345, 3] = np.nan
    x[54321] = 1e-5
    check_quantize_matches_reference(fp4sim, x, "nvfp4")
    check_quantize_matches_reference(fp4sim, x[:-1].reshape(-1, 32), "mxfp4")
