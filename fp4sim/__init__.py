"""fp4sim: bit-exact NumPy emulation of FP4 (E2M1) with block scales (NVFP4, MXFP4).

The core imports only NumPy. See docs/DESIGN.md for the API contract and
fp4sim.quantize for the exact arithmetic and special-value rules.
"""

# The one home of the version: pyproject.toml reads it from here (setuptools dynamic attr).
__version__ = "0.1.0"

from fp4sim.block_scale import MX_SCALE_RULES, mx_scale_bits, nvfp4_block_scale_bits
from fp4sim.e2m1 import E2M1_VALUES, e2m1_decode, e2m1_encode, e2m1_nan_code
from fp4sim.e4m3 import e4m3_decode, e4m3_encode
from fp4sim.e8m0 import e8m0_decode, e8m0_encode
from fp4sim.formats import (
    E2M1,
    E4M3FN,
    E8M0,
    MXFP4,
    NVFP4,
    BlockFormat,
    ElementFormat,
    get_block_format,
)
from fp4sim.packing import pack_fp4, unpack_fp4
from fp4sim.quantize import (
    QuantizedTensor,
    QuantizeSettings,
    block_flush_mask,
    dequantize,
    fake_quantize,
    quantize,
)
from fp4sim.swizzle import swizzle_scales_blackwell, unswizzle_scales_blackwell
from fp4sim.two_level import (
    TwoLevelQuantized,
    dequantize_two_level,
    fake_quantize_two_level,
    quantize_two_level,
)

__all__ = [
    "E2M1", "E2M1_VALUES", "E4M3FN", "E8M0", "MXFP4", "MX_SCALE_RULES", "NVFP4",
    "BlockFormat", "ElementFormat", "QuantizeSettings", "QuantizedTensor", "TwoLevelQuantized",
    "block_flush_mask", "dequantize", "dequantize_two_level", "e2m1_decode", "e2m1_encode",
    "e2m1_nan_code", "e4m3_decode", "e4m3_encode", "e8m0_decode", "e8m0_encode",
    "fake_quantize", "fake_quantize_two_level", "get_block_format", "mx_scale_bits",
    "nvfp4_block_scale_bits",
    "pack_fp4", "quantize", "quantize_two_level", "swizzle_scales_blackwell",
    "unpack_fp4", "unswizzle_scales_blackwell",
]
