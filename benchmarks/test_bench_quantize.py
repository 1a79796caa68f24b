"""NVFP4 and MXFP4 ``quantize`` against ml_dtypes' plain ``float4_e2m1fn`` cast of the same
float32 array, at 2^20, 2^22 and 2^24 elements, in one process (`tox -e bench`).

The emulator's time includes the block amax, the scales, the data multiply, the E2M1 codes
and the packing; the cast only rounds elements. Target (issue 15): emulator throughput at
least 2x the cast's at every size. pytest-benchmark shows one group per size. A last
benchmark times the three again round robin (interleaved, so machine load hits all of them
alike) and prints, and records in its extra_info, the ratio per size and format.
"""

from __future__ import annotations

import os
import time

import ml_dtypes
import numpy as np
import pytest

import fp4sim

SIZES = (20, 22, 24)  # log2 of the element count
FORMATS = ("nvfp4", "mxfp4")
ROUND_ROBIN_REPS = 15  # per size: min and median of at least 15 interleaved repetitions
SEED = 20261125


def _group(log2_n: int) -> str:
    return f"fp4 encode of 2^{log2_n} float32 (Student-t, df=3)"


@pytest.fixture(scope="module")
def arrays() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(SEED)
    big = rng.standard_t(3, 1 << max(SIZES)).astype(np.float32)
    # Each size is its own contiguous array (not a view), as a caller's tensor would be.
    return {p: big[: 1 << p].copy() for p in SIZES}


def _cast(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.float4_e2m1fn)


def _check_nvfp4(x: np.ndarray, q: fp4sim.QuantizedTensor) -> None:
    """The timed call did the real work: the first 256 blocks, bit for bit."""
    head = x[:4096].reshape(-1, 16)
    y = head * (np.float32(1) / q.scales[:256])[:, None]
    np.testing.assert_array_equal(q.codes[:4096], fp4sim.e2m1_encode(y).reshape(-1))
    np.testing.assert_array_equal(q.packed[:2048], fp4sim.pack_fp4(q.codes[:4096]))


def _check_mxfp4(x: np.ndarray, q: fp4sim.QuantizedTensor) -> None:
    head = x[:4096].reshape(-1, 32)
    y = head / q.scales[:128][:, None]  # scales are powers of two: exact
    np.testing.assert_array_equal(q.codes[:4096], fp4sim.e2m1_encode(y).reshape(-1))
    np.testing.assert_array_equal(q.packed[:2048], fp4sim.pack_fp4(q.codes[:4096]))


CHECKS = {"nvfp4": _check_nvfp4, "mxfp4": _check_mxfp4}


@pytest.mark.parametrize("log2_n", SIZES)
def test_bench_ml_dtypes_e2m1_cast(benchmark, arrays, log2_n):
    benchmark.group = _group(log2_n)
    x = arrays[log2_n]
    out = benchmark(_cast, x)
    np.testing.assert_array_equal(out[:4096].view(np.uint8),
                                  fp4sim.e2m1_encode(x[:4096], nan="ml_dtypes"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("log2_n", SIZES)
def test_bench_quantize(benchmark, arrays, log2_n, fmt):
    benchmark.group = _group(log2_n)
    x = arrays[log2_n]
    q = benchmark(fp4sim.quantize, x, fmt)
    CHECKS[fmt](x, q)


def _round_robin(arrays: dict[int, np.ndarray]) -> list[dict[str, object]]:
    """Per size: the cast, NVFP4 and MXFP4, one after the other, ROUND_ROBIN_REPS times."""
    rows = []
    for log2_n in SIZES:
        x = arrays[log2_n]
        calls = {"cast": lambda x=x: _cast(x)}
        calls.update({fmt: (lambda x=x, fmt=fmt: fp4sim.quantize(x, fmt)) for fmt in FORMATS})
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(ROUND_ROBIN_REPS):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        row: dict[str, object] = {"log2_n": log2_n, "load1": os.getloadavg()[0]}
        for name, values in times.items():
            row[f"{name}_min_ms"] = 1e3 * min(values)
            row[f"{name}_median_ms"] = 1e3 * float(np.median(values))
        for fmt in FORMATS:
            for stat in ("min", "median"):
                row[f"{fmt}_ratio_{stat}"] = row[f"cast_{stat}_ms"] / row[f"{fmt}_{stat}_ms"]
        rows.append(row)
    return rows


def test_bench_ratio_round_robin(benchmark, arrays, capsys):
    """Throughput ratio quantize / cast (= cast time / quantize time), interleaved."""
    benchmark.group = "ratio to the ml_dtypes cast, round robin"
    rows = benchmark.pedantic(_round_robin, args=(arrays,), rounds=1, iterations=1)
    benchmark.extra_info["round_robin"] = rows
    lines = [f"quantize throughput / ml_dtypes cast throughput, round robin of "
             f"{ROUND_ROBIN_REPS} (min, median of each), {os.cpu_count()} CPUs:"]
    for row in rows:
        parts = [f"2^{row['log2_n']}: cast {row['cast_min_ms']:.1f} / "
                 f"{row['cast_median_ms']:.1f} ms"]
        for fmt in FORMATS:
            parts.append(f"{fmt} {row[f'{fmt}_min_ms']:.1f} / {row[f'{fmt}_median_ms']:.1f} ms "
                         f"= {row[f'{fmt}_ratio_min']:.2f}x, {row[f'{fmt}_ratio_median']:.2f}x")
        lines.append("  " + "; ".join(parts) + f" (load {row['load1']:.2f})")
    with capsys.disabled():  # shown in the `tox -e bench` log, above pytest-benchmark's table
        print("\n" + "\n".join(lines))
