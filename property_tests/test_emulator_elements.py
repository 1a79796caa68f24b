"""Element formats: E2M1 (RNE and stochastic), E4M3, E8M0 against independent references."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from emulator_checks import (
    check_e2m1_matches_slow_reference,
    check_e2m1_monotone,
    check_e2m1_round_trip,
    check_e2m1_saturation,
    check_e2m1_sign_symmetry,
    check_e2m1_stochastic_matches_slow,
    check_e2m1_stochastic_unbiased,
)
from emulator_inputs import element_arrays, float32_specials
from hypothesis import given
from hypothesis import strategies as st

import fp4sim


@given(element_arrays(), st.sampled_from(["ptx", "ml_dtypes"]))
def test_e2m1_matches_slow_reference(x, nan):
    check_e2m1_matches_slow_reference(fp4sim, x, nan)


def test_e2m1_round_trip_of_every_code():
    check_e2m1_round_trip(fp4sim)


@given(element_arrays())
def test_e2m1_sign_symmetry(x):
    check_e2m1_sign_symmetry(fp4sim, x)


@given(element_arrays())
def test_e2m1_monotone(x):
    check_e2m1_monotone(fp4sim, x)


@given(element_arrays())
def test_e2m1_saturation(x):
    check_e2m1_saturation(fp4sim, x)


def test_e2m1_ties_go_to_even_and_one_ulp_above_goes_up():
    # docs/numerics.md: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
    np.testing.assert_array_equal(fp4sim.e2m1_decode(fp4sim.e2m1_encode(ties)),
                                  [0, 1, 1, 2, 2, 4, 4])
    above = np.nextafter(ties, np.float32(np.inf))
    np.testing.assert_array_equal(fp4sim.e2m1_decode(fp4sim.e2m1_encode(above)),
                                  [0.5, 1, 1.5, 2, 3, 4, 6])
    below = np.nextafter(ties, np.float32(0))
    np.testing.assert_array_equal(fp4sim.e2m1_decode(fp4sim.e2m1_encode(below)),
                                  [0, 0.5, 1, 1.5, 2, 3, 4])


def test_e2m1_specials_documented_bytes():
    x = np.array([np.inf, -np.inf, np.nan, -np.nan, -0.0, 0.0, -1e-30, 7.0, -1e38],
                 dtype=np.float32)
    # PTX policy: +-Inf saturate, NaN -> +6 (code 7) whatever its sign, -0 keeps its sign.
    np.testing.assert_array_equal(fp4sim.e2m1_encode(x, nan="ptx"), [7, 15, 7, 7, 8, 0, 8, 7, 15])
    # ml_dtypes policy: NaN -> zero with the sign flipped.
    np.testing.assert_array_equal(fp4sim.e2m1_encode(x, nan="ml_dtypes"),
                                  [7, 15, 8, 0, 8, 0, 8, 7, 15])
    oracle = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    np.testing.assert_array_equal(fp4sim.e2m1_encode(x, nan="ml_dtypes"), oracle)


@given(st.integers(0, 2**32 - 1), st.integers(1, 64))
def test_e2m1_stochastic_matches_exact_fraction_formula(seed, size):
    rng = np.random.default_rng(seed)
    magnitudes = rng.choice([0.3, 1.1, 2.7, 5.5, 7.0, 1e-3, 0.25, 0.75, 3.5], size)
    x = (magnitudes * rng.uniform(0.5, 1.5, size) * rng.choice([-1, 1], size)).astype(np.float32)
    x[: size // 8] = rng.choice(float32_specials(), size // 8)
    words = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    # Words next to the carry boundary test the exact comparison.
    words[::5] = np.uint32(2**32 - 1)
    words[1::5] = 0
    check_e2m1_stochastic_matches_slow(fp4sim, x, words)


def test_e2m1_stochastic_unbiased_over_all_byte_words():
    x = np.linspace(-6, 6, 481, dtype=np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(7)), np.float32([1e-3, -2.0**-20])])
    check_e2m1_stochastic_unbiased(fp4sim, x)


def test_e2m1_stochastic_statistically_unbiased_with_uint32_words():
    # Sampled uint32 words: the mean of N draws has standard deviation <= q/2/sqrt(N), so a
    # 6-sigma bound fails by chance with probability < 1e-8 (seeded: deterministic anyway).
    rng = np.random.default_rng(20261125)
    n = 20000
    for value in (0.1, 0.6, 1.3, 2.2, 3.9, 4.5, 5.9):
        x = np.full(n, value, dtype=np.float32)
        words = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
        mean = fp4sim.e2m1_decode(fp4sim.e2m1_encode(x, rounding="stochastic", rbits=words)).mean()
        q = 0.5 if value < 2 else (1.0 if value < 4 else 2.0)
        assert abs(mean - np.float32(value)) <= 6 * (q / 2) / math.sqrt(n)


def test_e2m1_stochastic_argument_errors():
    with pytest.raises(ValueError, match="rbits"):
        fp4sim.e2m1_encode(np.ones(4, np.float32), rounding="stochastic")
    with pytest.raises(ValueError, match="shape"):
        fp4sim.e2m1_encode(np.ones(4, np.float32), rounding="stochastic",
                           rbits=np.zeros(3, np.uint32))
    with pytest.raises(TypeError, match="uint32 or uint8"):
        fp4sim.e2m1_encode(np.ones(4, np.float32), rounding="stochastic",
                           rbits=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="rounding"):
        fp4sim.e2m1_encode(np.ones(4, np.float32), rounding="rna")
    with pytest.raises(ValueError, match="only used"):
        fp4sim.e2m1_encode(np.ones(4, np.float32), rbits=np.zeros(4, np.uint32))


def test_e2m1_decode_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        fp4sim.e2m1_decode(np.array([16], np.uint8))
    with pytest.raises(TypeError):
        fp4sim.e2m1_decode(np.array([1.0]))


@given(st.integers(0, 2**32 - 1))
def test_e4m3_matches_ml_dtypes_and_saturates(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    with np.errstate(invalid="ignore", over="ignore"):
        x = bits.view(np.float32) * np.float32(2.0**-110)  # pull most values into range
        x = np.concatenate([x, bits.view(np.float32)])
        oracle = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(fp4sim.e4m3_encode(x, overflow="nan", nan="ml_dtypes"), oracle)
    sat = fp4sim.e4m3_encode(x)
    finite = np.isfinite(x) & (np.abs(x) < 464)  # 464 is the tie between 448 and 480
    np.testing.assert_array_equal(sat[finite], oracle[finite])
    over = ~np.isnan(x) & (np.abs(x) >= 464)
    np.testing.assert_array_equal(sat[over], np.where(np.signbit(x[over]), 0xFE, 0x7E))
    assert np.all(sat[np.isnan(x)] == 0x7F)


def test_e4m3_decode_matches_ml_dtypes_for_all_bytes():
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = fp4sim.e4m3_decode(codes)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)],
                                  want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(got[[0x7F, 0xFF]]).all()


def test_e8m0_decode_and_powers_of_two_match_ml_dtypes():
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = fp4sim.e8m0_decode(codes)
    np.testing.assert_array_equal(got[:255].view(np.uint32), want[:255].view(np.uint32))
    assert np.isnan(got[255])
    powers = got[:255]
    for rounding in ("floor", "ceil"):
        np.testing.assert_array_equal(fp4sim.e8m0_encode(powers, rounding), codes[:255])


@given(st.integers(0, 2**32 - 1))
def test_e8m0_floor_ceil_match_frexp(seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 0x7F800000, 256, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    for rounding in ("floor", "ceil"):
        got = fp4sim.e8m0_encode(x, rounding).astype(np.int64)
        want = []
        for v in x.astype(np.float64):
            floor_log2 = math.frexp(v)[1] - 1
            e = floor_log2 + (rounding == "ceil" and v != 2.0**floor_log2)
            want.append(min(max(e + 127, 0), 254))
        np.testing.assert_array_equal(got, want)


def test_e8m0_specials():
    x = np.array([0.0, np.nan, -1.0, np.inf, 2.0**127 * 1.5], dtype=np.float32)
    np.testing.assert_array_equal(fp4sim.e8m0_encode(x, "ceil"), [0, 255, 255, 254, 254])
    np.testing.assert_array_equal(fp4sim.e8m0_encode(x, "ceil", overflow="nan"),
                                  [0, 255, 255, 255, 255])
