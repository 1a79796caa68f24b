"""e2m1_encode and e4m3_encode against ml_dtypes' casts (independent oracles).

Exhaustive (marker ``exhaustive``, `tox -e exhaustive`): all 2^32 float32 bit patterns, in
chunks of 2^24, for both encoders and both NaN policies. Finite inputs must match ml_dtypes
exactly; NaN inputs match ml_dtypes under nan='ml_dtypes' and give the documented code under
nan='ptx'. For E4M3, overflow='nan' matches ml_dtypes everywhere; overflow='saturate' matches
it for |x| < 464 (the tie between 448 and the first out-of-range value) and gives +-448 above.

Default run (sampled, about a second): every E2M1 tie and E4M3 rounding tie (the midpoint of
consecutive E4M3 values, every binade) with +-1..4 ulp neighbours, both signs, scaled by every
power of two that keeps them finite (E2M1); all float32 subnormals of both signs; every
top-16-bit pattern with low halves 0, 1, 0x7FFF, 0xFFFF (each entry of the lookup tables at
both ends); specials; and a random sample of 2^20 patterns from seed 20261125.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from emulator_inputs import float32_specials

import fp4sim

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn
CHUNK = 1 << 24
SAMPLE_SEED = 20261125


def assert_e2m1_matches_oracle(x: np.ndarray) -> None:
    with np.errstate(invalid="ignore", over="ignore"):
        oracle = x.astype(F4).view(np.uint8)
    got = fp4sim.e2m1_encode(x, nan="ml_dtypes")
    bad = np.flatnonzero(got != oracle)
    assert bad.size == 0, (f"{bad.size} mismatches, e.g. bits {x.view(np.uint32)[bad[:4]]}: "
                           f"got {got[bad[:4]]}, ml_dtypes {oracle[bad[:4]]}")
    ptx = fp4sim.e2m1_encode(x, nan="ptx")
    nan = np.isnan(x)
    np.testing.assert_array_equal(ptx[~nan], oracle[~nan])
    assert np.all(ptx[nan] == 7)


def assert_e4m3_matches_oracle(x: np.ndarray) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        oracle = x.astype(F8).view(np.uint8)
    got = fp4sim.e4m3_encode(x, overflow="nan", nan="ml_dtypes")
    bad = np.flatnonzero(got != oracle)
    assert bad.size == 0, (f"{bad.size} mismatches, e.g. bits {x.view(np.uint32)[bad[:4]]}: "
                           f"got {got[bad[:4]]}, ml_dtypes {oracle[bad[:4]]}")
    sat = fp4sim.e4m3_encode(x)
    nan = np.isnan(x)
    in_range = ~nan & (np.abs(x) < 464)
    np.testing.assert_array_equal(sat[in_range], oracle[in_range])
    over = ~nan & ~in_range
    np.testing.assert_array_equal(sat[over], np.where(np.signbit(x[over]), 0xFE, 0x7E))
    assert np.all(sat[nan] == 0x7F)


def _with_neighbours(values: np.ndarray, max_ulps: int = 4) -> np.ndarray:
    magnitude = np.abs(values.astype(np.float32)).view(np.int32).astype(np.int64)
    steps = np.arange(-max_ulps, max_ulps + 1)
    bits = np.clip(magnitude[:, None] + steps[None, :], 0, 0x7F7FFFFF).reshape(-1)
    near = bits.astype(np.int32).view(np.float32)
    return np.concatenate([near, -near])


def _e2m1_tie_inputs() -> np.ndarray:
    ties = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0])
    scaled = [ties * np.float32(2.0**k) for k in range(-149, 125)]
    with np.errstate(over="ignore"):
        values = np.concatenate(scaled)
    return _with_neighbours(values[np.isfinite(values) & (values > 0)])


def _e4m3_tie_inputs() -> np.ndarray:
    positives = fp4sim.e4m3_decode(np.arange(0x7F, dtype=np.uint8)).astype(np.float64)
    midpoints = ((positives[:-1] + positives[1:]) / 2).astype(np.float32)  # exact in float32
    edges = np.float32([448, 464, 480, 2.0**-10, 2.0**-9])
    return _with_neighbours(np.concatenate([midpoints, positives.astype(np.float32), edges]))


def _table_probe_inputs() -> np.ndarray:
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = np.uint32([0, 1, 0x7FFF, 0xFFFF])
    return (high[:, None] | lows[None, :]).reshape(-1).view(np.float32)


def _subnormal_inputs() -> np.ndarray:
    bits = np.arange(1 << 23, dtype=np.uint32)
    return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


def _random_sample() -> np.ndarray:
    rng = np.random.default_rng(SAMPLE_SEED)
    return rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)


SAMPLED_SETS = {
    "e2m1_ties": _e2m1_tie_inputs,
    "e4m3_ties": _e4m3_tie_inputs,
    "table_probes": _table_probe_inputs,
    "subnormals": _subnormal_inputs,
    "specials": float32_specials,
    "random_sample": _random_sample,
}


@pytest.mark.parametrize("name", sorted(SAMPLED_SETS))
def test_sampled_patterns_match_ml_dtypes(name):
    x = SAMPLED_SETS[name]()
    assert_e2m1_matches_oracle(x)
    assert_e4m3_matches_oracle(x)


@pytest.mark.exhaustive
@pytest.mark.parametrize("encoder", ["e2m1", "e4m3"])
def test_all_float32_bit_patterns_match_ml_dtypes(encoder):
    check = assert_e2m1_matches_oracle if encoder == "e2m1" else assert_e4m3_matches_oracle
    n_chunks = (1 << 32) // CHUNK
    for index in range(n_chunks):
        start = index * CHUNK
        bits = np.arange(start, start + CHUNK, dtype=np.uint64).astype(np.uint32)
        check(bits.view(np.float32))
        if index % 16 == 15:
            print(f"{encoder}: {index + 1}/{n_chunks} chunks of 2^24 patterns checked", flush=True)
