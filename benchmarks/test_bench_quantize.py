"""NVFP4 quantize of 2^24 float32 values vs ml_dtypes' plain float4_e2m1fn cast of the same
array, in the same run (`tox -e bench`). The emulator's number includes the block amax, the
E4M3 scales, the reciprocal multiply, the E2M1 codes and the packing; the cast only rounds
elements. Target: emulator throughput >= 2x the cast's. Results: docs/bench/emulator.md.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fp4sim

N = 1 << 24
GROUP = "fp4 encode of 2^24 float32 (Student-t, df=3)"


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(20261125).standard_t(3, N).astype(np.float32)


@pytest.mark.benchmark(group=GROUP)
def test_bench_nvfp4_quantize(benchmark, data):
    q = benchmark(fp4sim.quantize, data, "nvfp4")
    # Spot check that the timed call did the real work: the first blocks, bit for bit.
    head = data[:4096].reshape(-1, 16)
    y = head * (np.float32(1) / q.scales[:256])[:, None]
    np.testing.assert_array_equal(q.codes[:4096], fp4sim.e2m1_encode(y).reshape(-1))
    np.testing.assert_array_equal(q.packed[:8], fp4sim.pack_fp4(q.codes[:16]))


@pytest.mark.benchmark(group=GROUP)
def test_bench_mxfp4_quantize(benchmark, data):
    q = benchmark(fp4sim.quantize, data, "mxfp4")
    assert q.scale_bits.shape == (N // 32,) and q.codes[:32].max() <= 15


@pytest.mark.benchmark(group=GROUP)
def test_bench_ml_dtypes_e2m1_cast(benchmark, data):
    out = benchmark(data.astype, ml_dtypes.float4_e2m1fn)
    np.testing.assert_array_equal(out[:4096].view(np.uint8),
                                  fp4sim.e2m1_encode(data[:4096], nan="ml_dtypes"))
