"""Kernel system properties (issue 20): metamorphic and runtime checks that a recipe check
on fresh, contiguous, independent inputs cannot see.

``run_system_properties(kernel, spec, recipe=..., device=..., seed=...)`` runs them in
process (they need the tensors: in-place detection, CUDA graphs) and returns one
``Verdict`` per property; ``format_verdicts`` prints one line each. ``fp4sim check
attention`` runs them after the recipe check, ``fp4sim check quantizer`` the four that
apply to a quantizer; the pytest fixture ``fp4_system_properties`` exposes them to users.

Attention properties: independence, batch permutation, key permutation (non-causal
equivariance under permutations of key blocks of 16 and tiles of 64 with V), repeatability,
stale state, CUDA graphs (GPU only), inputs untouched, layouts, outputs, edge lengths,
special values. Quantizer properties: repeatability, inputs untouched, stale state, layouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from fp4sim.harness import KernelSpec
from fp4sim.harness.spec import merge_spec
from fp4sim.judge.attention import DEFAULT_RECIPE
from fp4sim.testing.system.attention import ATTENTION_PROPERTIES
from fp4sim.testing.system.context import AttentionContext, spec_field, timed
from fp4sim.testing.system.quantizer import QUANTIZER_PROPERTIES, QuantizerContext
from fp4sim.testing.system.verdict import Verdict, format_verdicts

__all__ = [
    "ATTENTION_PROPERTIES",
    "QUANTIZER_PROPERTIES",
    "Verdict",
    "assert_system_properties",
    "format_verdicts",
    "run_system_properties",
]


def _declared_spec(kernel: Any) -> Any:
    """What the kernel declares: a ``LoadedKernel``'s spec, else the callable's
    ``fp4sim_spec`` (a KernelSpec or a dict, as ``fp4sim check`` reads it), else every
    capability."""
    spec = getattr(kernel, "spec", None)
    if isinstance(spec, KernelSpec):
        return spec
    declared = getattr(kernel, "fp4sim_spec", None)
    if declared is None:
        return KernelSpec()
    return merge_spec(declared, None, getattr(kernel, "__qualname__", type(kernel).__name__))


def run_system_properties(
    kernel: Callable[..., Any],
    spec: Any = None,
    *,
    recipe: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    quantizer: bool = False,
    dtype: str | None = None,
    head_dim: int | None = None,
    input_type: str = "torch",
    only: Iterable[str] | None = None,
) -> list[Verdict]:
    """Run the system properties on ``kernel`` and return their verdicts, in order.

    Attention: ``kernel(q, k, v, causal, sm_scale) -> o`` with BHLD torch tensors and
    autograd (a ``fp4sim.harness.LoadedKernel`` or a plain callable); ``spec`` is its
    ``KernelSpec`` (None: what the kernel declares, as ``fp4sim check`` reads it: a
    LoadedKernel's spec or the callable's ``fp4sim_spec``, else every capability); ``recipe``
    the reference preset it is compared with where values change (None: the spec's
    ``claims``, else ``DEFAULT_RECIPE``; ``preset@kv_splits=N`` names a split-KV schedule).
    ``dtype`` / ``head_dim`` default to the spec's first.
    Quantizer (``quantizer=True``): ``kernel(x) -> (packed, scale bytes, tensor scale)``,
    ``recipe`` is the format ('nvfp4' or 'mxfp4'; None: 'nvfp4'), ``input_type`` 'torch' or
    'numpy'.
    ``only`` restricts to the named properties.
    """
    if quantizer:
        qctx = QuantizerContext(kernel, recipe or "nvfp4", device, seed, input_type,
                                dtype or "float32")
        props: dict[str, Callable[[Any], Verdict]] = dict(QUANTIZER_PROPERTIES)
        ctx: Any = qctx
    else:
        if spec is None:
            spec = _declared_spec(kernel)
        if recipe is None:
            recipe = spec_field(spec, "claims", None) or DEFAULT_RECIPE
        dtypes = tuple(spec_field(spec, "dtypes", ("float32",)))
        dims = spec_field(spec, "head_dims", None)
        ctx = AttentionContext(
            kernel, spec, recipe, device, seed, dtype or dtypes[0],
            head_dim or (dims[0] if dims else 64),
        )
        props = dict(ATTENTION_PROPERTIES)
    if only is not None:
        wanted = set(only)
        unknown = wanted - set(props)
        if unknown:
            raise ValueError(f"unknown system properties {sorted(unknown)}; known: {list(props)}")
        props = {n: f for n, f in props.items() if n in wanted}
    with _one_cpu_thread(device):
        return [timed(name, lambda f=fn: f(ctx)) for name, fn in props.items()]


@contextlib.contextmanager
def _one_cpu_thread(device: str) -> Iterator[None]:
    """The properties' tensors are small: on a shared CPU, OpenMP threads spin-waiting on a
    preempted peer made them up to 8x slower (measured here), so they run on one thread."""
    if device != "cpu":
        yield
        return

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def assert_system_properties(kernel: Callable[..., Any], spec: Any = None, **kwargs: Any
                             ) -> list[Verdict]:
    """``run_system_properties`` that raises AssertionError (with every line) if one fails."""
    verdicts = run_system_properties(kernel, spec, **kwargs)
    if any(v.status == "fail" for v in verdicts):
        raise AssertionError(format_verdicts(verdicts))
    return verdicts
