"""Training variants: which attention (and which backward) a simulated model uses.

A variant is one of the reference's backward variants run through
``reference.fp4_attention`` with the simulation's FP4 recipe, ``bf16`` (the ``bf16``
recipe, exact backward: the unquantized baseline), or ``kernel``: an external attention
callable ``fn(q, k, v, causal, sm_scale) -> o`` named as ``MODULE:ATTR`` by ``--kernel``.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fp4sim import reference
from fp4sim.harness import UsageError, load_attention_kernel
from fp4sim.simulate.model import AttentionFn

KERNEL_VARIANT = "kernel"

VARIANT_DESCRIPTIONS: dict[str, str] = {
    "bf16": "unquantized attention (recipe bf16) with its exact gradient",
    "attn_qat": "FP4 forward; backward recomputes S from Q^, K^, dV = P~^T dO, "
                "D = rowsum(dO * O_hp) (both principles)",
    "p_only": "FP4 forward; backward recomputes S from Q^, K^, dV = P^T dO with the "
              "high-precision P, D = rowsum(dO * O_hp)",
    "o_only": "FP4 forward; backward recomputes S from Q^, K^, dV = P~^T dO, "
              "D = rowsum(dO * O) with the low-precision O",
    "drop_in": "FP4 forward, then the high-precision FlashAttention backward on Q, K, V "
               "with D = rowsum(dO * O)",
    "ste_autograd": "autograd through the fake-quantized forward (straight-through)",
}
VALID_VARIANTS: tuple[str, ...] = tuple(VARIANT_DESCRIPTIONS)


class SimulationSetupError(ValueError):
    """A variant, recipe, task or kernel named on the command line does not exist."""


@dataclass(frozen=True)
class Variant:
    name: str
    recipe_name: str
    backward: str | None
    description: str
    attention: AttentionFn = dataclasses.field(repr=False, compare=False)


def check_variant_names(names: tuple[str, ...] | list[str], kernel: str | None) -> None:
    valid = VALID_VARIANTS + ((KERNEL_VARIANT,) if kernel else ())
    unknown = [name for name in names if name not in valid]
    if unknown:
        extra = "" if kernel else f" ('{KERNEL_VARIANT}' needs --kernel MODULE:ATTR)"
        raise SimulationSetupError(
            f"unknown variant(s) {', '.join(map(repr, unknown))}; valid variants: "
            f"{', '.join(valid)}{extra}")
    if len(set(names)) != len(names):
        raise SimulationSetupError(f"variants listed twice: {list(names)}")
    if not names:
        raise SimulationSetupError("no variant to train")


def resolve_recipe(name: str, block_n: int | None) -> Any:
    """The reference recipe ``name`` with its P tile width replaced by ``block_n`` and NaN
    inputs propagated (so that a diverging run shows as a non-finite loss, not an error)."""
    try:
        recipe = reference.get_recipe(name)
    except (KeyError, ValueError) as error:
        raise SimulationSetupError(
            f"unknown recipe {name!r}; valid recipes: {', '.join(reference.RECIPE_NAMES)}"
        ) from error
    if block_n is not None and block_n > 0:
        try:
            recipe = dataclasses.replace(recipe, block_n=block_n)
        except ValueError as error:  # e.g. not a multiple of the format's key block
            raise SimulationSetupError(f"--block-n {block_n}: {error}") from error
    if getattr(recipe, "nan_policy", "propagate") != "propagate":
        recipe = dataclasses.replace(recipe, nan_policy="propagate")
    return recipe


def load_kernel(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:ATTR`` with the shared loader (``fp4sim.harness``: the current folder
    first on ``sys.path``, the same messages as ``check`` and ``report``); the callable takes
    and returns BHLD tensors whatever layout its ``fp4sim_spec`` declares."""
    try:
        return load_attention_kernel(spec)
    except UsageError as error:
        raise SimulationSetupError(str(error)) from error


def reference_attention(recipe: Any, backward: str) -> AttentionFn:
    def attention(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202 - AttentionFn
        return reference.fp4_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                       recipe=recipe, backward=backward)

    return attention


KERNEL_DTYPES = ("float32", "bfloat16", "float16")

class KernelTimeout(RuntimeError):
    """The external kernel ran past ``--timeout``: the variant run fails with this line."""


def _call_with_alarm(fn: Callable[[], Any], seconds: float | None) -> Any:
    """``fn()`` stopped by SIGALRM after ``seconds`` (main thread only; elsewhere, or with no
    limit, unguarded). It interrupts Python-level hangs; a kernel stuck inside native code
    ends at its next return to Python."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        return fn()

    def expire(signum: int, frame: object) -> None:
        raise KernelTimeout(f"kernel timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def kernel_attention(kernel: Callable[..., Any], dtype: str = "float32",
                     timeout: float | None = None) -> AttentionFn:
    """``kernel`` called on q, k, v cast to ``dtype`` (kernels that take only 16-bit inputs,
    such as ``fp4sim.kernels:attn_qat``); its output is cast back to the model's dtype.
    ``timeout`` (seconds; SimulationConfig.kernel_timeout) limits each forward call."""
    if dtype not in KERNEL_DTYPES:
        raise SimulationSetupError(f"kernel dtype must be one of {', '.join(KERNEL_DTYPES)}, "
                                   f"got {dtype!r}")

    def attention(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202 - AttentionFn

        cast = getattr(torch, dtype)
        out = _call_with_alarm(
            lambda: kernel(q.to(cast), k.to(cast), v.to(cast), causal, sm_scale), timeout)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the kernel returned {type(out).__name__}, not a torch.Tensor")
        if out.shape != q.shape:
            raise ValueError(f"the kernel returned shape {tuple(out.shape)}, expected"
                             f" {tuple(q.shape)}")
        return out.to(q.dtype)

    return attention


def build_variant(name: str, recipe_name: str, block_n: int | None,
                  kernel_spec: str | None = None, kernel_dtype: str = "float32",
                  kernel_timeout: float | None = None) -> Variant:
    """The variant ``name`` (see :data:`VALID_VARIANTS`) ready to plug into the model."""
    if name == KERNEL_VARIANT:
        if not kernel_spec:
            raise SimulationSetupError("variant 'kernel' needs --kernel MODULE:ATTR")
        return Variant(name=KERNEL_VARIANT, recipe_name=kernel_spec, backward=None,
                       description=f"external attention {kernel_spec}",
                       attention=kernel_attention(load_kernel(kernel_spec), kernel_dtype,
                                                  kernel_timeout))
    check_variant_names([name], kernel_spec)
    if name == "bf16":
        recipe = resolve_recipe("bf16", block_n)
        return Variant(name="bf16", recipe_name="bf16", backward="exact",
                       description=VARIANT_DESCRIPTIONS["bf16"],
                       attention=reference_attention(recipe, "exact"))
    recipe = resolve_recipe(recipe_name, block_n)
    return Variant(name=name, recipe_name=recipe_name, backward=name,
                   description=VARIANT_DESCRIPTIONS[name],
                   attention=reference_attention(recipe, name))
