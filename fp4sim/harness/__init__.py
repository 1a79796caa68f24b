"""The one kernel contract shared by ``fp4sim check``, ``report`` and ``simulate``.

* ``load_kernel`` / ``load_attention_kernel``: ``MODULE:ATTR`` with the current folder first
  on ``sys.path``; the same error messages everywhere (``UsageError``, exit 2).
* ``KernelSpec``: what an attention kernel supports (``fp4sim_spec`` attribute or flags).
* ``add_kernel_options`` / ``kernel_spec_from_args``: the shared command-line options.
* ``KernelWorker``: kernels run in a child process with a per-call time limit; a hang or a
  crash is that call's failure and the child is restarted.
* ``load_inputs_file``: captured q, k, v (and dO) from .npz, .pt or .safetensors.

Torch is imported lazily (only where tensors are made), so this package loads with NumPy.
"""

from fp4sim.harness.inputs import load_inputs_file
from fp4sim.harness.loader import LoadedKernel, load_attention_kernel, load_kernel
from fp4sim.harness.options import (
    DEFAULT_TIMEOUT,
    add_kernel_options,
    kernel_spec_from_args,
    one_line_errors,
    positive_int,
)
from fp4sim.harness.spec import DTYPES, KernelSpec, UsageError
from fp4sim.harness.worker import KernelCallResult, KernelWorker, describe_exit

__all__ = [
    "DEFAULT_TIMEOUT",
    "DTYPES",
    "KernelCallResult",
    "KernelSpec",
    "KernelWorker",
    "LoadedKernel",
    "UsageError",
    "add_kernel_options",
    "describe_exit",
    "kernel_spec_from_args",
    "load_attention_kernel",
    "load_inputs_file",
    "load_kernel",
    "one_line_errors",
    "positive_int",
]
