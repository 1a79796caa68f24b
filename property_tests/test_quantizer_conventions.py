"""Value-neutral conventions (fp4sim.testing.quantizer_conventions) must not invent
differences: in a block whose scale byte still differs from the emulator's, the kernel's codes
stay paired with the kernel's scale (OCP MX v1.0 section 5.2: a block's values are its codes
times its own scale)."""

from __future__ import annotations

import numpy as np

import fp4sim
from fp4sim.testing.quantizer_conventions import reconcile


def test_codes_of_blocks_with_another_scale_are_left_alone() -> None:
    x = np.random.default_rng(3).standard_t(3, size=(8, 128)).astype(np.float32)
    floor = fp4sim.quantize(x, "mxfp4", scale_rule="floor")  # a kernel with another scale rule
    expected = fp4sim.quantize(x, "mxfp4")
    fixed = reconcile(x, "mxfp4", {}, floor.packed, floor.scale_bits, None)
    scale_differs = np.asarray(floor.scale_bits) != np.asarray(expected.scale_bits)
    assert scale_differs.any(), "the test needs blocks whose scale rules disagree"
    kernel_codes = fp4sim.unpack_fp4(np.asarray(floor.packed))
    fixed_codes = fp4sim.unpack_fp4(np.asarray(fixed.packed))
    block_mask = np.repeat(scale_differs, 32, axis=-1)
    assert np.array_equal(fixed_codes[block_mask], kernel_codes[block_mask])
    assert fixed.remaining > 0
