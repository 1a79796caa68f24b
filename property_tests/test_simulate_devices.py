"""`fp4sim simulate --jobs N --device cuda` spreads the variants over the visible GPUs
(fp4sim.simulate.runner.device_for_job; issue 16), and a torchrun rank of `fp4sim check`
gives its kernel workers its own GPU (fp4sim.harness.ranks). Pure functions: no GPU needed.
"""

from __future__ import annotations

from collections import Counter

import pytest

from fp4sim.harness.ranks import World, own_gpu_only, visible_gpu
from fp4sim.simulate.runner import device_for_job


def test_cuda_jobs_go_round_robin_over_every_gpu() -> None:
    devices = [device_for_job(i, "cuda", 4) for i in range(10)]
    assert devices[:5] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    # every GPU used, loads differ by at most one job
    counts = Counter(devices)
    assert set(counts) == {f"cuda:{g}" for g in range(4)}
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(("device", "n_gpus", "expected"), [
    ("cuda", 1, "cuda"),  # one GPU: unchanged (and the same as a sequential run)
    ("cuda", 0, "cuda"),
    ("cpu", 8, "cpu"),  # the CPU is one device
    ("cuda:3", 8, "cuda:3"),  # an explicit GPU keeps every job there
])
def test_devices_that_stay_as_they_are(device: str, n_gpus: int, expected: str) -> None:
    assert [device_for_job(i, device, n_gpus) for i in range(5)] == [expected] * 5


def test_each_rank_sees_its_own_gpu() -> None:
    assert visible_gpu(1, None) == "1"
    assert visible_gpu(1, "4,6,7") == "6"  # the local rank-th of the GPUs already visible
    with pytest.raises(ValueError, match="local rank 3 has no GPU"):
        visible_gpu(3, "4,6")
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "2,3"}
    own_gpu_only(World(rank=3, size=4, local_rank=1), env)
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    single: dict[str, str] = {}
    own_gpu_only(World(), single)  # one process: every GPU stays visible
    assert single == {}
