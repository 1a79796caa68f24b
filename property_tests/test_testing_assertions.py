"""fp4sim.testing assertions: exact quantizer comparison, the FP4 rule, tie-flip summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp4sim
from fp4sim.testing import (
    assert_attention_close,
    assert_quantized_equal,
    attention_error,
    generate_tensor,
    tie_flip_summary,
)


def _x(shape: tuple[int, ...] = (3, 64), distribution: str = "gaussian") -> np.ndarray:
    return generate_tensor(np.random.default_rng(0), shape, distribution)


def test_equal_output_passes_numpy_and_torch() -> None:
    x = _x()
    q = fp4sim.quantize(x, "nvfp4")
    assert_quantized_equal(x, q, q.packed, q.scale_bits)
    assert_quantized_equal(
        x,
        q,
        torch.from_numpy(np.asarray(q.packed)),
        torch.from_numpy(np.asarray(q.scale_bits)).view(torch.float8_e4m3fn),
    )
    # a flattened scale array with the right number of bytes is accepted
    assert_quantized_equal(x, q, q.packed, np.asarray(q.scale_bits).reshape(-1))


def test_one_flipped_code_names_the_block() -> None:
    x = _x()
    q = fp4sim.quantize(x, "nvfp4")
    packed = np.asarray(q.packed).copy()
    packed[1, 9] ^= 0x10  # element 19 of row 1: block (1, 1)
    with pytest.raises(AssertionError) as info:
        assert_quantized_equal(x, q, packed, q.scale_bits)
    message = str(info.value)
    assert "1 of 12 blocks differ" in message and "index (1, 1)" in message
    assert f"{x[1, 16]:.6f}"[:6] in message  # the block's inputs are printed


def test_scale_and_shape_and_tensor_scale_mismatches() -> None:
    x = _x()
    q = fp4sim.quantize(x, "nvfp4")
    scales = np.asarray(q.scale_bits).copy()
    scales[2, 3] += 1
    with pytest.raises(AssertionError, match="1 scale bytes"):
        assert_quantized_equal(x, q, q.packed, scales)
    with pytest.raises(AssertionError, match="block size"):
        assert_quantized_equal(x, q, q.packed, scales[:, :2])
    with pytest.raises(AssertionError, match="tensor scale"):
        assert_quantized_equal(x, q, q.packed, q.scale_bits, np.float32(1.0))
    qt = fp4sim.quantize(x, "nvfp4", tensor_scale="amax")
    assert_quantized_equal(x, qt, qt.packed, qt.scale_bits, torch.tensor(qt.tensor_scale))
    with pytest.raises(AssertionError, match="0x"):
        assert_quantized_equal(
            x,
            qt,
            qt.packed,
            qt.scale_bits,
            np.nextafter(np.float32(qt.tensor_scale), np.float32(1)),
        )


def test_tie_flip_summary_counts_ties() -> None:
    x = _x((4, 64), "ties")
    q = fp4sim.quantize(x, "nvfp4")
    codes = np.asarray(q.codes).copy()
    summary = tie_flip_summary(x, q, codes)
    assert summary["differing"] == 0 and summary["at_tie"] == 4 * 64 - 16  # all but amaxes
    magnitude = codes & 7
    bumped = np.where(
        (magnitude < 7) & (magnitude % 2 == 0) & (np.abs(x) > 0), codes + 1, codes
    ).astype(np.uint8)
    summary = tie_flip_summary(x, q, bumped)
    assert summary["differing"] > 0
    assert summary["differing"] == summary["differing_at_tie"] == summary["away_from_zero"]


def test_attention_rule() -> None:
    rng = np.random.default_rng(0)
    ref64 = rng.standard_normal((1, 2, 8, 16))
    low = (ref64 + 1e-6 * rng.standard_normal(ref64.shape)).astype(np.float32)
    ref_error = np.abs(low - ref64).max()
    ok = ref64 + 1.9 * ref_error * np.sign(rng.standard_normal(ref64.shape))
    assert_attention_close(ok.astype(np.float32), low, ref64, "forward")
    bad = ref64.copy()
    bad[0, 1, 3, 5] += 3 * ref_error
    with pytest.raises(AssertionError, match=r"rows over bound 1/16"):
        assert_attention_close(bad.astype(np.float32), low, ref64, "forward")
    assert_attention_close(bad.astype(np.float32), low, ref64, "backward")  # factor 3
    # a single row may use its allowance (one P code flip), two may not
    report = attention_error(bad, low, ref64, "forward", row_allowance=1.0, max_allowance_rows=1)
    assert report.ok
    bad[0, 0, 0, 0] += 3 * ref_error
    report = attention_error(bad, low, ref64, "forward", row_allowance=1.0, max_allowance_rows=1)
    assert not report.ok and report.n_rows_over == 2
    nan = ref64.copy()
    nan[0, 0, 0, 0] = np.nan
    assert not attention_error(nan, low, ref64, "forward").ok
