"""fp4sim.formats derives every value of a format from its bit layout: check the derived values
against ml_dtypes, the independent oracle (its finfo and its decoding of every code)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from fp4sim import formats
from fp4sim.formats import E2M1, E4M3FN, E8M0, ElementFormat
from fp4sim.minifloat import decode_table

# ml_dtypes' type for each of our formats (E8M0 is ml_dtypes' "fnu": finite, NaN, unsigned).
ORACLES = [(E2M1, ml_dtypes.float4_e2m1fn), (E4M3FN, ml_dtypes.float8_e4m3fn),
           (E8M0, ml_dtypes.float8_e8m0fnu)]
IDS = [fmt.name for fmt, _ in ORACLES]


def _oracle_values(dtype: type) -> np.ndarray:
    """float64 value of every code of ``dtype`` as ml_dtypes decodes it."""
    bits = ml_dtypes.finfo(dtype).bits
    return np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float64)


@pytest.mark.parametrize(("fmt", "dtype"), ORACLES, ids=IDS)
def test_derived_limits_match_ml_dtypes_finfo(fmt: ElementFormat, dtype: type) -> None:
    info = ml_dtypes.finfo(dtype)
    assert (fmt.bits, fmt.exponent_bits, fmt.mantissa_bits) == (info.bits, info.nexp, info.nmant)
    assert fmt.max_value == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_exponent == info.minexp
    assert fmt.max_exponent == info.maxexp - 1  # finfo.maxexp is one past the largest exponent
    # Without subnormals ml_dtypes reports the smallest normal as the smallest subnormal.
    smallest = fmt.min_subnormal if fmt.min_subnormal is not None else fmt.min_normal
    assert smallest == float(info.smallest_subnormal)
    assert fmt.sign_bit == (1 << (info.bits - 1) if fmt.signed else 0)


@pytest.mark.parametrize(("fmt", "dtype"), ORACLES, ids=IDS)
def test_every_code_decodes_as_ml_dtypes_decodes_it(fmt: ElementFormat, dtype: type) -> None:
    oracle = _oracle_values(dtype)
    magnitude_codes = 1 << (fmt.exponent_bits + fmt.mantissa_bits)
    assert fmt.magnitudes() == tuple(oracle[: fmt.max_code + 1])
    # Codes above max_code are NaN (the NaN code), and only those.
    assert np.isnan(oracle[fmt.max_code + 1: magnitude_codes]).all()
    assert (fmt.nan_code is None) == (fmt.max_code + 1 == magnitude_codes)
    assert not np.isnan(oracle[: fmt.max_code + 1]).any()
    # The float32 table the decoders index: same values (NaN where ml_dtypes has NaN).
    table = decode_table(fmt)
    assert table.dtype == np.float32 and table.shape == oracle.shape
    np.testing.assert_array_equal(table, oracle.astype(np.float32))
    assert not table.flags.writeable


def test_e2m1_value_list_and_ties() -> None:
    # OCP MX v1.0 section 5.3.3 lists the E2M1 magnitudes; the ties are their midpoints.
    oracle = _oracle_values(ml_dtypes.float4_e2m1fn)
    assert formats.E2M1_CODE_VALUES == tuple(oracle)
    assert formats.E2M1_TIES == tuple((oracle[1:8] + oracle[:7]) / 2)


def test_block_sizes_and_tensor_scale_divisor_are_the_specs() -> None:
    # NVIDIA NVFP4: 16-element blocks; OCP MX v1.0 section 6.3: 32-element MX blocks.
    assert formats.BLOCK_SIZES == {"nvfp4": 16, "mxfp4": 32}
    assert {n: f.block_size for n, f in formats.BLOCK_FORMATS.items()} == formats.BLOCK_SIZES
    # docs/numerics.md: s_tensor = amax / (448 * 6), exact in float32.
    assert formats.NVFP4_TENSOR_SCALE_DIVISOR == 2688.0 == float(np.float32(2688.0))


def test_layouts_are_checked() -> None:
    with pytest.raises(ValueError, match="nan must be one of"):
        ElementFormat(name="x", exponent_bits=2, mantissa_bits=1, bias=1, signed=True, nan="inf")
    with pytest.raises(ValueError, match="magnitude codes lie in 0..7"):
        E2M1.magnitude(8)
