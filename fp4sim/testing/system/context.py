"""What every attention property needs: the kernel, its spec, drawn inputs, calls with and
without autograd, bitwise comparison, and the FP4 tolerance rule against the reference."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fp4sim.judge.attention import AttentionCheckConfig, evaluate_attention_case
from fp4sim.judge.inputs import (
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
    round_to_dtype,
)
from fp4sim.testing.system.verdict import Verdict

# Block and tile sizes the properties aim at: the NVFP4 quantization block (16 elements,
# NVIDIA PTX ISA, block-scaled MMA) and the 64-key P tile every reference preset uses.
QUANT_BLOCK = 16
KEY_TILE = 64


def spec_field(spec: Any, name: str, default: Any) -> Any:
    """A KernelSpec field (``spec`` may be None or any object with those attributes)."""
    return default if spec is None else getattr(spec, name, default)


@dataclass
class AttentionContext:
    """A kernel ``fn(q, k, v, causal, sm_scale) -> o`` (BHLD torch tensors, autograd) and
    the choices every property shares."""

    kernel: Callable[..., Any]
    spec: Any
    recipe: str
    device: str
    seed: int
    dtype: str
    head_dim: int
    _repeatable: dict[tuple[int, int], bool] = field(default_factory=dict, repr=False)

    @property
    def gqa(self) -> bool:
        return bool(spec_field(self.spec, "gqa", True))

    @property
    def backward(self) -> bool:
        return bool(spec_field(self.spec, "backward", True))

    def heads(self) -> tuple[int, int]:
        """(H, Hkv): two KV heads, each shared by two query heads when GQA is declared."""
        return (4, 2) if self.gqa else (2, 2)

    def length(self, want: int) -> int:
        """``want`` rounded up to the declared length multiple and minimum."""
        m = int(spec_field(self.spec, "length_multiple", 1))
        return max(-(-want // m) * m, int(spec_field(self.spec, "min_length", 1)))

    def supports(self, *, heads: int, kv_heads: int, lq: int, lk: int, causal: bool,
                 dtype: str | None = None) -> bool:
        if self.spec is None or not hasattr(self.spec, "supports"):
            return True
        return bool(
            self.spec.supports(
                heads=heads, kv_heads=kv_heads, lq=lq, lk=lk, head_dim=self.head_dim,
                dtype=dtype or self.dtype, causal=causal,
            )
        )

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def inputs(
        self, salt: int, *, batch: int = 2, heads: tuple[int, int] | None = None,
        lq: int = 80, lk: int = 80,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gaussian (q, k, v) rounded to the dtype, float32 NumPy (BHLD)."""
        h, hkv = heads or self.heads()
        spec = AttentionInputSpec(
            batch=batch, heads=h, kv_heads=hkv, lq=lq, lk=lk, head_dim=self.head_dim,
            dtype=self.dtype,
        )
        return generate_attention_inputs(self.rng(salt), spec)

    def tensor(self, a: np.ndarray, grad: bool = False) -> Any:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device, getattr(torch, self.dtype))
        return t.requires_grad_(grad)

    def forward(self, q: Any, k: Any, v: Any, causal: bool = False) -> Any:
        """The kernel's O without autograd state kept."""
        with torch.no_grad():
            return self.kernel(q, k, v, causal, None)

    def forward_backward(
        self, q: Any, k: Any, v: Any, do: Any, causal: bool = False
    ) -> tuple[Any, tuple[Any, ...] | None]:
        """(O, (dQ, dK, dV)) for leaf tensors q, k, v (grads None without a backward)."""
        if not self.backward:
            return self.forward(q, k, v, causal), None
        leaves = [t if t.requires_grad else t.detach().requires_grad_(True) for t in (q, k, v)]
        o = self.kernel(*leaves, causal, None)
        grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
        return o.detach(), tuple(g.detach() for g in grads)

    def repeatable(self, lq: int, lk: int) -> bool:
        """Whether two forward calls on the same inputs give the same bits (cached): the
        properties that demand bit-identity are not judged without it."""
        key = (lq, lk)
        if key not in self._repeatable:
            x = self.inputs(99, lq=lq, lk=lk)
            a, b = (self.forward(*(self.tensor(t) for t in x)) for _ in range(2))
            self._repeatable[key] = bits_equal(a, b)
        return self._repeatable[key]

    def grad_output(self, salt: int, shape: tuple[int, ...]) -> Any:
        a = self.rng(salt).standard_normal(shape).astype(np.float32)
        return self.tensor(round_to_dtype(a, self.dtype))

    def rule(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, *, backward: bool,
        seed: int = 0,
    ) -> Any:
        """The recipe check's FP4 tolerance rule (``evaluate_attention_case`` of
        ``fp4sim.judge.attention``, reused, not copied) on these exact inputs; returns its
        outcome (``ok``, ``failed`` reports, ``error``)."""
        spec = AttentionInputSpec(
            batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1], lq=q.shape[2],
            lk=k.shape[2], head_dim=q.shape[3], dtype=self.dtype,
        )
        case = AttentionCase(spec, seed, causal, None, q, k, v)
        config = AttentionCheckConfig(
            kernel="system-properties", recipe=self.recipe, device=self.device,
            backward=backward and self.backward, dtypes=(self.dtype,),
        )
        return evaluate_attention_case(self.kernel, case, config, diagnose=False)


def rule_summary(outcome: Any) -> str:
    """The first failed tensor of a rule outcome, in one line."""
    if outcome.error:
        return outcome.error
    r = outcome.failed[0]
    extra = f", {r.nonfinite} non-finite" if r.nonfinite else ""
    return (
        f"{r.name} max|err| {r.max_error:.3g} vs bound {r.bound:.3g} at {r.worst_index}"
        f" ({r.n_rows_over}/{r.n_rows} rows over{extra})"
    )


def bits_equal(a: Any, b: Any) -> bool:
    """Bit-identical tensors (NaN payloads included): same shape, dtype and bytes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a8 = a.detach().contiguous().reshape(-1).view(torch.uint8)
    b8 = b.detach().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(a8.cpu(), b8.cpu()))


def max_diff(a: Any, b: Any) -> float:
    """max|a - b| in float64 (NaN where exactly one side is NaN counts as inf)."""
    x = a.detach().double().cpu()
    y = b.detach().double().cpu()
    d = (x - y).abs()
    both_nan = x.isnan() & y.isnan()
    same_inf = x.isinf() & (x == y)
    d = d.masked_fill(both_nan | same_inf, 0.0).nan_to_num(nan=float("inf"))
    return float(d.max()) if d.numel() else 0.0


def kernel_error(err: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clear_rejection(err: BaseException) -> bool:
    """A deliberate refusal: a usage-type exception with a message."""
    kinds = (ValueError, TypeError, RuntimeError, NotImplementedError)
    return isinstance(err, kinds) and bool(str(err).strip())


def timed(name: str, fn: Callable[[], Verdict]) -> Verdict:
    """Run one property; an exception inside it becomes a failing verdict naming it."""
    start = time.perf_counter()
    try:
        verdict = fn()
    except Exception as err:  # the kernel's (or the property's) error, reported, not raised
        verdict = Verdict(name, "fail", f"kernel raised {kernel_error(err)}")
    verdict.seconds = time.perf_counter() - start
    return verdict
