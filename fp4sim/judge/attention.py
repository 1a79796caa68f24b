"""One attention case judged: an external kernel's O (and dQ, dK, dV) against the reference
recipe under the FP4 tolerance rule (``fp4sim.judge.rule``), with the rule's floors and
P-flip allowances (``fp4sim.judge.bounds``) and, on failure, a differential diagnosis
(``fp4sim.judge.diagnosis``).

`fp4sim check attention` (``fp4sim.testing.check_attention``) draws the cases with
Hypothesis and calls ``evaluate_attention_case`` on each; `fp4sim report` calls it on each
scenario for an external kernel. ``AttentionCheckConfig`` is what both pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fp4sim import reference
from fp4sim.harness import DEFAULT_TIMEOUT, UsageError
from fp4sim.judge.bounds import accumulation_floors, p_flip_allowances
from fp4sim.judge.diagnosis import diagnose_attention
from fp4sim.judge.inputs import AttentionCase, AttentionInputSpec, round_to_dtype
from fp4sim.judge.rule import AttentionErrorReport, attention_error

__all__ = [
    "FLIP_REASON",
    "AttentionCheckConfig",
    "AttentionOutcome",
    "KernelRun",
    "call_attention_kernel",
    "diagnosis_causes",
    "evaluate_attention_case",
    "grad_output",
    "reference_run",
]


# The recipe a check compares against when neither the command line nor the kernel names one
DEFAULT_RECIPE = "attn-qat"


@dataclass(frozen=True)
class AttentionCheckConfig:
    """What ``fp4sim check attention`` compares."""

    kernel: str
    # None: the recipe the kernel claims (its fp4sim_spec or --claims), else DEFAULT_RECIPE
    recipe: str | None = None
    causal: bool = False
    device: str = "cpu"
    examples: int = 50
    seed: int = 0
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    head_dims: tuple[int, ...] = (64, 128)
    max_len: int = 80
    max_batch: int = 2
    max_kv_heads: int = 2
    max_group: int = 2
    backward: bool = True
    distributions: tuple[str, ...] | None = None
    sm_scales: tuple[float | None, ...] = (None, 0.0625)
    shrink_seconds: float = 60.0
    # the kernel harness (fp4sim.harness): per-call time limit, capability overrides from
    # the command line (KernelSpec fields), captured activations checked as one more case
    timeout: float = DEFAULT_TIMEOUT
    kernel_overrides: dict[str, Any] = field(default_factory=dict)
    inputs: str | None = None
    # a split-KV kernel's schedule (--kv-splits N or --kv-split-keys L): the recipe checked
    # is RECIPE@kv_splits=N or RECIPE@kv_split_keys=L
    kv_splits: int = 1
    kv_split_keys: int = 0

    def recipe_name(self, claims: str | None = None) -> str:
        """The recipe checked against: ``recipe`` when named, else the kernel's ``claims``,
        else ``DEFAULT_RECIPE``; with a split-KV schedule as ``NAME@kv_splits=N`` or
        ``NAME@kv_split_keys=L``."""
        base = self.recipe or claims or DEFAULT_RECIPE
        options = [f"{name}={value}" for name, value, unset in (
            ("kv_splits", self.kv_splits, 1), ("kv_split_keys", self.kv_split_keys, 0))
            if value != unset]
        if not options:
            return base
        if len(options) > 1 or "@" in base:
            flags = ", ".join(f"--{o.partition('=')[0].replace('_', '-')}" for o in options)
            raise UsageError(f"{flags} with the recipe {base!r}: give one split-KV schedule")
        return f"{base}@{options[0]}"

    def __post_init__(self) -> None:
        # usage errors before any work (issue 14): exit 2 with one line
        if self.max_len < 1 or self.max_batch < 1 or self.max_kv_heads < 1 or self.max_group < 1:
            raise UsageError("--max-len (and the batch, head and group limits) must be >= 1")
        if not self.head_dims or any(int(h) < 1 for h in self.head_dims):
            raise UsageError(f"--head-dims must be positive integers, got {self.head_dims}")
        if self.examples < 1:
            raise UsageError("--examples must be >= 1")
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {self.timeout}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttentionCheckConfig:
        data = dict(data)
        for name in ("dtypes", "head_dims", "sm_scales"):
            data[name] = tuple(data[name])
        if data.get("distributions") is not None:
            data["distributions"] = tuple(data["distributions"])
        overrides = dict(data.get("kernel_overrides") or {})
        for name in ("dtypes", "head_dims"):
            if overrides.get(name) is not None:
                overrides[name] = tuple(overrides[name])
        data["kernel_overrides"] = overrides
        return cls(**data)


@dataclass
class AttentionOutcome:
    """All tensors' rule reports for one case, the verdict and a diagnosis."""

    reports: list[AttentionErrorReport]
    failed: list[AttentionErrorReport]
    causes: list[str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.error is None

    def describe(self, case: AttentionCase) -> str:
        lines = [f"case: {case!r}"]
        if self.error:
            lines.append(self.error)
        lines += [r.describe() for r in self.reports]
        lines += [f"likely cause: {c}" for c in self.causes]
        return "\n".join(lines)


def _torch_inputs(case: AttentionCase, device: str) -> tuple[Any, Any, Any]:
    dtype = getattr(torch, case.spec.dtype)
    return tuple(
        torch.from_numpy(a).to(device=device, dtype=dtype).requires_grad_(True)
        for a in (case.q, case.k, case.v)
    )


def grad_output(case: AttentionCase) -> np.ndarray:
    """dO ~ N(0, 1) from the case seed (+1), rounded to the input dtype (or the captured dO
    of an ``--inputs`` case)."""
    if case.do is not None:
        return round_to_dtype(case.do.astype(np.float32), case.spec.dtype)
    rng = np.random.default_rng(case.seed + 1)
    return round_to_dtype(rng.standard_normal(case.q.shape).astype(np.float32), case.spec.dtype)


def reference_run(
    recipe: Any, case: AttentionCase, do: np.ndarray, accum: Any, backward: bool
) -> tuple[Any, tuple[Any, Any, Any] | None]:
    q, k, v = (torch.from_numpy(a).to(accum) for a in (case.q, case.k, case.v))
    fwd = reference.fp4_attention_forward(
        q, k, v, recipe, causal=case.causal, sm_scale=case.sm_scale, accum_dtype=accum
    )
    grads = None
    if backward:
        grads = reference.attention_backward(
            recipe.backward,
            fwd,
            q,
            k,
            v,
            torch.from_numpy(do).to(accum),
            recipe,
            causal=case.causal,
            sm_scale=case.sm_scale,
        )
    return fwd, grads


@dataclass
class KernelRun:
    """The kernel's O (and dQ, dK, dV) on the CPU in the kernel's own dtype, or the problem
    that stopped the case (an exception, a time-out, a crash, a wrong dtype/shape/device)."""

    o: Any = None
    grads: tuple[Any, Any, Any] | None = None
    problem: str | None = None
    causes: list[str] = field(default_factory=list)


def _output_problem(
    name: str, dtype: str, device: str, shape: tuple[int, ...], want_dtype: str,
    want_device: str, want_shape: tuple[int, ...],
) -> str | None:
    """The output contract: same dtype, device type and shape as the matching input."""
    if tuple(shape) != tuple(want_shape):
        return f"kernel {name} shape {tuple(shape)} != expected {tuple(want_shape)}"
    if dtype != want_dtype:
        return (f"kernel {name} dtype {dtype} != input dtype {want_dtype} (an attention kernel"
                " returns its inputs' dtype)")
    if device.split(":")[0] != want_device.split(":")[0]:
        return f"kernel {name} on device {device}, inputs on {want_device}"
    return None


def _error_causes(case: AttentionCase) -> list[str]:
    """Causes of a kernel that raised: with a hint where the input was GQA, the commonest
    thing a kernel declines (its spec or ``--no-gqa`` keeps such inputs away)."""
    heads, kv_heads = case.q.shape[1], case.k.shape[1]
    if kv_heads == heads:
        return ["kernel error"]
    return ["kernel error",
            f"the input was GQA ({heads} query heads, {kv_heads} k/v heads): if the kernel "
            "does not support GQA, pass --no-gqa (or declare fp4sim_spec = {\"gqa\": False})"]


def call_attention_kernel(
    kernel: Any, case: AttentionCase, config: AttentionCheckConfig, do_np: np.ndarray
) -> KernelRun:
    """Run the kernel on one case: through a ``KernelWorker`` (a child process with a time
    limit) or, for a plain callable, in this process; then check the output contract."""
    want = [("O", case.q.shape)]
    if config.backward:
        want += [("dQ", case.q.shape), ("dK", case.k.shape), ("dV", case.v.shape)]
    if hasattr(kernel, "attention"):
        res = kernel.attention(case.q, case.k, case.v, do_np if config.backward else None,
                               causal=case.causal, sm_scale=case.sm_scale,
                               dtype=case.spec.dtype, backward=config.backward)
        if res.failure is not None:
            cause = "kernel timed out" if "timed out" in res.failure else "kernel crashed"
            return KernelRun(problem=f"kernel {res.failure}", causes=[cause])
        if res.error is not None:
            return KernelRun(problem=res.error, causes=_error_causes(case))
        tensors = {}
        for name, shape in want:
            dtype, device, got = res.info[name]
            bad = _output_problem(name, dtype, device, got, case.spec.dtype, config.device, shape)
            if bad:
                return KernelRun(problem=bad, causes=["kernel output contract"])
            tensors[name] = torch.from_numpy(res.outputs[name]).to(getattr(torch, dtype))
        grads = tuple(tensors[n] for n in ("dQ", "dK", "dV")) if config.backward else None
        return KernelRun(o=tensors["O"], grads=grads)  # type: ignore[arg-type]
    q, k, v = _torch_inputs(case, config.device)
    try:
        o = kernel(q, k, v, case.causal, case.sm_scale)
        if not isinstance(o, torch.Tensor):
            return KernelRun(problem=f"kernel returned {type(o).__name__}, not a torch.Tensor",
                             causes=["kernel output contract"])
        grads = None
        if config.backward:
            # a copy: a kernel that writes into its dO must not corrupt the reference's dO
            do = torch.from_numpy(do_np.copy()).to(device=o.device, dtype=o.dtype)
            grads = torch.autograd.grad(o, (q, k, v), do, allow_unused=False)
    except Exception as err:
        return KernelRun(problem=f"kernel raised {type(err).__name__}: {err}",
                         causes=_error_causes(case))
    for (name, shape), t in zip(want, (o, *(grads or ())), strict=True):
        bad = _output_problem(name, str(t.dtype).removeprefix("torch."), str(t.device),
                              tuple(t.shape), case.spec.dtype, config.device, shape)
        if bad:
            return KernelRun(problem=bad, causes=["kernel output contract"])
    return KernelRun(o=o.detach().cpu(), grads=tuple(g.detach().cpu() for g in grads)
                     if grads is not None else None)  # type: ignore[arg-type]


def _round_like(x: Any, like: Any) -> Any:
    """The float32 reference rounded to the kernel's dtype (then back to float64 for error)."""
    return x.to(like.dtype).double()


def evaluate_attention_case(
    kernel: Callable[..., Any],
    case: AttentionCase,
    config: AttentionCheckConfig,
    diagnose: bool = True,
) -> AttentionOutcome:
    """Run the kernel and the reference on one case and apply the FP4 tolerance rule;
    ``diagnose`` looks for likely causes when it fails (several more reference runs)."""
    recipe = reference.get_recipe(config.recipe_name())
    do_np = grad_output(case)
    called = call_attention_kernel(kernel, case, config, do_np)
    if called.problem is not None:
        return AttentionOutcome([], [], called.causes, called.problem)
    o, grads = called.o, called.grads
    fwd64, g64 = reference_run(recipe, case, do_np, torch.float64, config.backward)
    fwd32, g32 = reference_run(recipe, case, do_np, torch.float32, config.backward)
    o_cpu = o.detach().cpu()
    # FP4 code flips of P that a correct float32 kernel may make on this input (zero away
    # from rounding ties): fp4sim.judge.bounds.p_flip_allowances
    flips = p_flip_allowances(case, recipe, fwd64, do_np if config.backward else None)
    floors = accumulation_floors(case, fwd64, do_np)
    reports = [
        attention_error(
            o_cpu,
            _round_like(fwd32.o, o_cpu),
            fwd64.o,
            "forward",
            name="O",
            floor_abs=floors["O"],
            flip_allowance=flips.get("O", 0.0),
            allowance_reason=FLIP_REASON,
        )
    ]
    if config.backward:
        assert grads is not None and g64 is not None and g32 is not None
        for name, g, r64, r32 in zip(("dQ", "dK", "dV"), grads, g64, g32, strict=True):
            g_cpu = g.detach().cpu()
            reports.append(
                attention_error(
                    g_cpu,
                    _round_like(r32, g_cpu),
                    r64,
                    "backward",
                    name=name,
                    floor_abs=floors[name],
                    flip_allowance=flips.get(name, 0.0),
                    allowance_reason=FLIP_REASON,
                )
            )
    failed = [r for r in reports if not r.ok]
    causes: list[str] = []
    if failed and diagnose:
        causes = diagnosis_causes(kernel, case, config, recipe, {"O": o_cpu} | _named_grads(grads))
    return AttentionOutcome(reports, failed, causes)


# printed whenever a row passes only through the P-flip allowance
FLIP_REASON = (
    "an FP4 code of P sits within a float32 kernel's error of a rounding boundary there"
    " (fp4sim.judge.bounds.p_flip_allowances)"
)


def diagnosis_causes(
    kernel: Any, case: AttentionCase, config: AttentionCheckConfig, recipe: Any,
    first: dict[str, Any],
) -> list[str]:
    """The differential diagnosis (fp4sim.judge.diagnosis) of a failing case: the named
    hypothesis that explains the kernel here and on larger re-test inputs, or an honest
    "no known hypothesis explains it"."""
    def kernel_outputs(c: AttentionCase) -> dict[str, Any] | None:
        run = call_attention_kernel(kernel, c, config, grad_output(c))
        return None if run.problem is not None else {"O": run.o} | _named_grads(run.grads)

    spec = getattr(kernel, "spec", None)

    def supports(s: AttentionInputSpec, causal: bool) -> bool:
        return spec is None or spec.supports(heads=s.heads, kv_heads=s.kv_heads, lq=s.lq,
                                             lk=s.lk, head_dim=s.head_dim, dtype=s.dtype,
                                             causal=causal)

    try:
        found = diagnose_attention(case, recipe, kernel_outputs,
                                   grad_output if config.backward else None,
                                   first_outputs=first, supports=supports)
    except NotImplementedError as err:  # a recipe the hypothesis library does not model
        return [f"no diagnosis: {err}"]
    return found.lines()


def _named_grads(grads: Any) -> dict[str, Any]:
    if grads is None:
        return {}
    return {name: g.detach().cpu() for name, g in zip(("dQ", "dK", "dV"), grads, strict=True)}
