"""Packing, the Blackwell swizzled scale layout and two-level quantization."""

from __future__ import annotations

import numpy as np
import pytest
from emulator_checks import check_pack_nibble_order
from emulator_inputs import heavy_tailed_arrays
from hypothesis import given
from hypothesis import strategies as st

import fp4sim
from fp4sim.swizzle import blackwell_scale_offsets

CODES = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).integers(0, 16, (3, 2 * (seed % 7 + 1)),
                                                      dtype=np.uint8))


@given(CODES)
def test_pack_nibble_order_and_round_trip(codes):
    check_pack_nibble_order(fp4sim, codes)


def test_pack_known_bytes():
    codes = np.array([1, 2, 15, 0, 7, 8], dtype=np.uint8)
    np.testing.assert_array_equal(fp4sim.pack_fp4(codes), [0x21, 0x0F, 0x87])


@given(CODES)
def test_pack_along_first_axis(codes):
    codes = np.ascontiguousarray(codes.T)  # even length along axis 0
    packed = fp4sim.pack_fp4(codes, axis=0)
    np.testing.assert_array_equal(packed, fp4sim.pack_fp4(codes.T, axis=-1).T)
    np.testing.assert_array_equal(fp4sim.unpack_fp4(packed, axis=0), codes)


def test_pack_errors():
    with pytest.raises(ValueError, match="odd length 3"):
        fp4sim.pack_fp4(np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="0..15"):
        fp4sim.pack_fp4(np.full(2, 16, np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fp4sim.pack_fp4(np.zeros(2, np.int32))


def test_swizzle_offsets_hand_derived():
    # docs/numerics.md formula, worked by hand for a 256 x 8 scale matrix (C = 8: 2 column tiles):
    # (0,0) -> 0; (0,3) -> 3; (1,0) -> 16; (31,0) -> 496; (32,0) -> 4; (96,1) -> 13;
    # (0,4) -> 512 (next column tile); (128,0) -> 512*2 = 1024; (130,5) -> 512*3+2*16+1 = 1569.
    off = blackwell_scale_offsets(256, 8)
    hand = {(0, 0): 0, (0, 3): 3, (1, 0): 16, (31, 0): 496, (32, 0): 4, (96, 1): 13,
            (0, 4): 512, (128, 0): 1024, (130, 5): 1569, (255, 7): 2047}
    for (i, j), want in hand.items():
        assert off[i, j] == want, (i, j, off[i, j], want)


@given(st.integers(1, 300), st.integers(1, 11), st.integers(0, 2**32 - 1))
def test_swizzle_round_trip_and_formula(rows, cols, seed):
    scales = np.random.default_rng(seed).integers(1, 256, (rows, cols), dtype=np.uint8)
    buf = fp4sim.swizzle_scales_blackwell(scales)
    prows, pcols = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert buf.shape == (prows * pcols,)
    off = blackwell_scale_offsets(rows, cols)
    np.testing.assert_array_equal(buf[off], scales)
    padding = np.ones(buf.shape, bool)
    padding[off.reshape(-1)] = False
    assert np.all(buf[padding] == 0)  # padded scales are 0: padded data stays zero
    np.testing.assert_array_equal(fp4sim.unswizzle_scales_blackwell(buf, rows, cols), scales)


def test_swizzle_errors():
    with pytest.raises(ValueError, match="2-D"):
        fp4sim.swizzle_scales_blackwell(np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="need 512"):
        fp4sim.unswizzle_scales_blackwell(np.zeros(100, np.uint8), 1, 1)


@given(heavy_tailed_arrays(block_size=16))
def test_two_level_equals_manual_composition(x):
    p = np.abs(x)  # probabilities are non-negative; the rule does not need it
    tq = fp4sim.quantize_two_level(p, axis=-1)
    rowmax = np.max(p, axis=-1, keepdims=True)
    s1 = (rowmax / np.float32(2688)).astype(np.float32)
    s1 = np.where(s1 == 0, np.float32(1), s1)  # zero or underflowing row max
    np.testing.assert_array_equal(tq.row_scales, s1)
    inner = fp4sim.quantize((p / s1).astype(np.float32), "nvfp4")
    np.testing.assert_array_equal(tq.inner.codes, inner.codes)
    np.testing.assert_array_equal(tq.inner.scale_bits, inner.scale_bits)
    np.testing.assert_array_equal(fp4sim.dequantize_two_level(tq),
                                  (fp4sim.dequantize(inner) * s1).astype(np.float32))


def test_two_level_keeps_small_probability_rows():
    # A long row of P ~ 1/L flushes with plain NVFP4 (amax/6 < 2^-10) but not two-level.
    p = np.full((1, 256), 1.0 / 512, dtype=np.float32)
    assert np.all(fp4sim.fake_quantize(p, "nvfp4") == 0)
    np.testing.assert_array_equal(fp4sim.fake_quantize_two_level(p), p)


def test_two_level_row_scale_never_zero():
    p = np.zeros((3, 16), np.float32)
    p[1, 0] = np.float32(1e-43)  # 1e-43 / 2688 underflows to 0 in float32
    p[2, 0] = np.float32(1e-3)
    tq = fp4sim.quantize_two_level(p)
    np.testing.assert_array_equal(tq.row_scales[:, 0],
                                  np.float32([1, 1, np.float32(1e-3) / np.float32(2688)]))
    assert np.all(np.isfinite(fp4sim.dequantize_two_level(tq)))


def test_two_level_rejects_tensor_scale():
    with pytest.raises(ValueError, match="tensor_scale"):
        fp4sim.quantize_two_level(np.ones((1, 16), np.float32), tensor_scale="amax")
