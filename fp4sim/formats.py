"""Number formats as data: element formats (E2M1, E4M3FN, E8M0) and block formats.

Every constant here is a fact about a public format; the source is cited per field group.
Kernels may import this module (it depends on nothing but the standard library).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ElementFormat:
    """A small floating-point format described by its fields.

    ``min_exponent`` is the unbiased exponent of the smallest normal value (1 - bias);
    ``max_code`` is the largest finite magnitude code; ``nan_code`` is the magnitude code
    of NaN (None when the format has no NaN).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    signed: bool
    max_value: float
    min_normal: float
    min_subnormal: float | None
    max_code: int
    nan_code: int | None

    @property
    def min_exponent(self) -> int:
        return 1 - self.bias

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def sign_bit(self) -> int:
        """Mask of the sign bit in a code (0 for unsigned formats)."""
        return (1 << (self.bits - 1)) if self.signed else 0


# OCP MX spec v1.0 section 5.3.3: E2M1, bias 1, max 6, one subnormal 0.5, no Inf/NaN.
E2M1 = ElementFormat(
    name="e2m1", exponent_bits=2, mantissa_bits=1, bias=1, signed=True,
    max_value=6.0, min_normal=1.0, min_subnormal=0.5, max_code=7, nan_code=None,
)
# OCP OFP8 spec (E4M3 "fn"): bias 7, max 448 (code 0x7E), min normal 2^-6, 0x7F is NaN, no Inf.
E4M3FN = ElementFormat(
    name="e4m3fn", exponent_bits=4, mantissa_bits=3, bias=7, signed=True,
    max_value=448.0, min_normal=2.0**-6, min_subnormal=2.0**-9, max_code=0x7E, nan_code=0x7F,
)
# OCP MX spec v1.0 section 5.4.1: E8M0, unsigned, byte b means 2^(b-127), 0xFF is NaN.
E8M0 = ElementFormat(
    name="e8m0", exponent_bits=8, mantissa_bits=0, bias=127, signed=False,
    max_value=2.0**127, min_normal=2.0**-127, min_subnormal=None, max_code=0xFE, nan_code=0xFF,
)


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


def get_block_format(fmt: str | BlockFormat) -> BlockFormat:
    """Return the block format named ``fmt`` ("nvfp4" or "mxfp4") or ``fmt`` itself."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt.lower() in BLOCK_FORMATS:
        return BLOCK_FORMATS[fmt.lower()]
    raise ValueError(f"unknown block format {fmt!r}; expected one of {sorted(BLOCK_FORMATS)} "
                     "or a BlockFormat")
