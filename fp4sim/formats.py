"""Number formats as data: element formats (E2M1, E4M3FN, E8M0) and block formats.

Each element format is given by its bit layout alone (exponent and mantissa bits, bias, sign,
NaN and subnormal conventions); every value of it (max, min normal, min subnormal, the largest
finite code, the NaN code, the magnitude of every code) is derived from that layout, as
ml_dtypes derives ``finfo``. property_tests/test_formats.py checks the derived values against
ml_dtypes. This module is the one home of these facts: the reference and the kernels import
their constants from here (it depends on nothing but the standard library).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

NAN_CONVENTIONS = ("none", "all_ones")


@dataclass(frozen=True)
class ElementFormat:
    """A small floating-point format described by its bit layout.

    ``nan``: 'none' (every code is a finite number) or 'all_ones' (the magnitude code with
    every bit set is NaN, as in the OCP "fn" formats; there is no Inf in either case).
    ``subnormals``: whether exponent field 0 holds subnormals m * 2^(1 - bias - mantissa_bits);
    when False (E8M0) exponent field 0 is an ordinary binade and the format has no zero.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    signed: bool
    nan: str = "none"
    subnormals: bool = True

    def __post_init__(self) -> None:
        if self.nan not in NAN_CONVENTIONS:
            raise ValueError(f"nan must be one of {NAN_CONVENTIONS}, got {self.nan!r}")
        if self.exponent_bits < 1 or self.mantissa_bits < 0:
            raise ValueError("a format needs >= 1 exponent bit and >= 0 mantissa bits")

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def sign_bit(self) -> int:
        """Mask of the sign bit in a code (0 for unsigned formats)."""
        return (1 << (self.bits - 1)) if self.signed else 0

    @property
    def nan_code(self) -> int | None:
        """Magnitude code of NaN (all exponent and mantissa bits set), or None."""
        if self.nan == "none":
            return None
        return (1 << (self.exponent_bits + self.mantissa_bits)) - 1

    @property
    def max_code(self) -> int:
        """The largest finite magnitude code (the one below NaN when NaN takes all ones)."""
        all_ones = (1 << (self.exponent_bits + self.mantissa_bits)) - 1
        return all_ones - (self.nan != "none")

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal value: 1 - bias (0 - bias without
        subnormals, where exponent field 0 is a normal binade)."""
        return int(self.subnormals) - self.bias

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite value (floor(log2 max_value))."""
        return (self.max_code >> self.mantissa_bits) - self.bias

    def magnitude(self, code: int) -> float:
        """The (exact) value of the finite magnitude code ``code`` (sign bit clear)."""
        if not 0 <= code <= self.max_code:
            raise ValueError(f"{self.name} magnitude codes lie in 0..{self.max_code}, got {code}")
        exponent, mantissa = divmod(code, 1 << self.mantissa_bits)
        if self.subnormals and exponent == 0:
            return math.ldexp(mantissa, self.min_exponent - self.mantissa_bits)
        significand = (1 << self.mantissa_bits) + mantissa  # implicit leading 1
        return math.ldexp(significand, exponent - self.bias - self.mantissa_bits)

    def magnitudes(self) -> tuple[float, ...]:
        """The values of magnitude codes 0..max_code, in code order (increasing)."""
        return tuple(self.magnitude(code) for code in range(self.max_code + 1))

    @property
    def max_value(self) -> float:
        return self.magnitude(self.max_code)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    @property
    def min_subnormal(self) -> float | None:
        """The smallest positive value below min_normal, or None when there is none."""
        if not self.subnormals or self.mantissa_bits == 0:
            return None
        return math.ldexp(1.0, self.min_exponent - self.mantissa_bits)


# OCP MX spec v1.0 section 5.3.3: E2M1, bias 1, no Inf/NaN (values 0, 0.5, 1, 1.5, 2, 3, 4, 6).
E2M1 = ElementFormat(name="e2m1", exponent_bits=2, mantissa_bits=1, bias=1, signed=True)
# OCP OFP8 spec (E4M3 "fn"): bias 7, S.1111.111 is NaN, no Inf (max 448, min normal 2^-6).
E4M3FN = ElementFormat(name="e4m3fn", exponent_bits=4, mantissa_bits=3, bias=7, signed=True,
                       nan="all_ones")
# OCP MX spec v1.0 section 5.4.1: E8M0, unsigned, byte b means 2^(b-127), 0xFF is NaN.
E8M0 = ElementFormat(name="e8m0", exponent_bits=8, mantissa_bits=0, bias=127, signed=False,
                     nan="all_ones", subnormals=False)

# E2M1 values by code 0..15: the magnitudes, then their negatives (bit 3 is the sign).
E2M1_MAGNITUDES: tuple[float, ...] = E2M1.magnitudes()
E2M1_CODE_VALUES: tuple[float, ...] = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)
# The rounding ties: midpoints of adjacent magnitudes (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5).
E2M1_TIES: tuple[float, ...] = tuple(
    (E2M1_MAGNITUDES[i] + E2M1_MAGNITUDES[i + 1]) / 2 for i in range(len(E2M1_MAGNITUDES) - 1))


@dataclass(frozen=True)
class BlockFormat:
    """A block-scaled format: ``block_size`` elements share one ``scale`` value."""

    name: str
    block_size: int
    element: ElementFormat
    scale: ElementFormat
    supports_tensor_scale: bool

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"block_size must be even and >= 2, got {self.block_size}")


# docs/numerics.md (NVIDIA NVFP4): 16 elements, E4M3 block scale, optional FP32 tensor scale.
NVFP4 = BlockFormat(name="nvfp4", block_size=16, element=E2M1, scale=E4M3FN,
                    supports_tensor_scale=True)
# OCP MX spec v1.0 section 6.3 (MXFP4): 32 elements, E8M0 scale.
MXFP4 = BlockFormat(name="mxfp4", block_size=32, element=E2M1, scale=E8M0,
                    supports_tensor_scale=False)

BLOCK_FORMATS: dict[str, BlockFormat] = {"nvfp4": NVFP4, "mxfp4": MXFP4}
# Read-only: many modules share this one table.
BLOCK_SIZES: Mapping[str, int] = MappingProxyType(
    {name: f.block_size for name, f in BLOCK_FORMATS.items()})

# docs/numerics.md (NVFP4 tensor scale): s_tensor = amax_tensor / (448 * 6), the largest
# E4M3 scale times the largest E2M1 value (2688, exact in float32).
NVFP4_TENSOR_SCALE_DIVISOR: float = NVFP4.scale.max_value * NVFP4.element.max_value


def get_block_format(fmt: str | BlockFormat) -> BlockFormat:
    """Return the block format named ``fmt`` ("nvfp4" or "mxfp4") or ``fmt`` itself."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in BLOCK_FORMATS:
        return BLOCK_FORMATS[fmt.lower()]
    raise ValueError(f"unknown block format {fmt!r}; expected one of {sorted(BLOCK_FORMATS)} "
                     "or a BlockFormat")
