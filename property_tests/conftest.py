"""Suite-wide settings for the property tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, without initializing CUDA (which would freeze
    CUDA_VISIBLE_DEVICES): the variable itself, else nvidia-smi's list, else none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [x.strip() for x in listed.split(",") if x.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [x.strip() for x in out.splitlines() if x.strip()]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist on a multi-GPU machine, worker gwN takes GPU N mod #GPUs, so that
    parallel workers do not share one device (subprocesses inherit the choice).

    Run from a source tree (``PYTHONPATH=.``, not installed) the plugin's entry point is
    absent; it is loaded here so the suite gets the same profiles and fixtures either way."""
    manager = config.pluginmanager
    if not (manager.has_plugin("fp4sim") or manager.has_plugin("fp4sim.testing.plugin")):
        manager.import_plugin("fp4sim.testing.plugin")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    gpus = _visible_gpus()
    if len(gpus) <= 1:
        return
    index = int(worker[2:]) % len(gpus)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.set_device(index)  # too late for the variable: pick the device instead
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # The tensors here are small: on a 2-core CI machine that other jobs share, OpenMP
    # spin-waits on a preempted peer thread made single cases up to 10x slower.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
