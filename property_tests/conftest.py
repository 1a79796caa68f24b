"""Suite-wide settings for the property tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # The tensors here are small: on a 2-core CI machine that other jobs share, OpenMP
    # spin-waits on a preempted peer thread made single cases up to 10x slower.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
