"""`fp4sim check attention`: an external attention kernel (forward and dQ, dK, dV) against
the reference recipe under the FP4 tolerance rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fp4sim.harness import (
    DEFAULT_TIMEOUT,
    KernelSpec,
    KernelWorker,
    UsageError,
    load_inputs_file,
)
from fp4sim.testing.assertions import AttentionErrorReport, attention_error
from fp4sim.testing.attention_tolerance import accumulation_floors, p_flip_allowances
from fp4sim.testing.check_driver import CheckResult, run_hypothesis
from fp4sim.testing.generators import AttentionInputSpec, generate_attention_inputs, round_to_dtype
from fp4sim.testing.strategies import AttentionCase


@dataclass(frozen=True)
class AttentionCheckConfig:
    """What ``fp4sim check attention`` compares."""

    kernel: str
    recipe: str = "attn-qat"
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
    import torch

    dtype = getattr(torch, case.spec.dtype)
    return tuple(
        torch.from_numpy(a).to(device=device, dtype=dtype).requires_grad_(True)
        for a in (case.q, case.k, case.v)
    )


def _grad_output(case: AttentionCase) -> np.ndarray:
    """dO ~ N(0, 1) from the case seed (+1), rounded to the input dtype (or the captured dO
    of an ``--inputs`` case)."""
    if case.do is not None:
        return round_to_dtype(case.do.astype(np.float32), case.spec.dtype)
    rng = np.random.default_rng(case.seed + 1)
    return round_to_dtype(rng.standard_normal(case.q.shape).astype(np.float32), case.spec.dtype)


def _reference_run(
    recipe: Any, case: AttentionCase, do: np.ndarray, accum: Any, backward: bool
) -> tuple[Any, tuple[Any, Any, Any] | None]:
    import torch

    from fp4sim import reference
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


def call_attention_kernel(
    kernel: Any, case: AttentionCase, config: AttentionCheckConfig, do_np: np.ndarray
) -> KernelRun:
    """Run the kernel on one case: through a ``KernelWorker`` (a child process with a time
    limit) or, for a plain callable, in this process; then check the output contract."""
    import torch

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
            return KernelRun(problem=res.error, causes=["kernel error"])
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
                         causes=["kernel error"])
    for (name, shape), t in zip(want, (o, *(grads or ())), strict=True):
        bad = _output_problem(name, str(t.dtype).removeprefix("torch."), str(t.device),
                              tuple(t.shape), case.spec.dtype, config.device, shape)
        if bad:
            return KernelRun(problem=bad, causes=["kernel output contract"])
    return KernelRun(o=o.detach().cpu(), grads=tuple(g.detach().cpu() for g in grads)
                     if grads is not None else None)  # type: ignore[arg-type]


# Operand rounding unit of a kernel working on inputs of each dtype: bf16 / fp16 MMA
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
    import torch

    from fp4sim import reference
    recipe = reference.get_recipe(config.recipe)
    do_np = _grad_output(case)
    called = call_attention_kernel(kernel, case, config, do_np)
    if called.problem is not None:
        return AttentionOutcome([], [], called.causes, called.problem)
    o, grads = called.o, called.grads
    fwd64, g64 = _reference_run(recipe, case, do_np, torch.float64, config.backward)
    fwd32, g32 = _reference_run(recipe, case, do_np, torch.float32, config.backward)
    o_cpu = o.detach().cpu()
    # FP4 code flips of P that a correct float32 kernel may make on this input (zero away
    # from rounding ties): attention_tolerance.p_flip_allowances
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
    " (attention_tolerance.p_flip_allowances)"
)


def diagnosis_causes(
    kernel: Any, case: AttentionCase, config: AttentionCheckConfig, recipe: Any,
    first: dict[str, Any],
) -> list[str]:
    """The differential diagnosis (fp4sim.testing.diagnosis) of a failing case: the named
    hypothesis that explains the kernel here and on larger re-test inputs, or an honest
    "no known hypothesis explains it"."""
    from fp4sim.testing.diagnosis import diagnose_attention

    def kernel_outputs(c: AttentionCase) -> dict[str, Any] | None:
        run = call_attention_kernel(kernel, c, config, _grad_output(c))
        return None if run.problem is not None else {"O": run.o} | _named_grads(run.grads)

    spec = getattr(kernel, "spec", None)

    def supports(s: AttentionInputSpec, causal: bool) -> bool:
        return spec is None or spec.supports(heads=s.heads, kv_heads=s.kv_heads, lq=s.lq,
                                             lk=s.lk, head_dim=s.head_dim, dtype=s.dtype,
                                             causal=causal)

    try:
        found = diagnose_attention(case, recipe, kernel_outputs,
                                   _grad_output if config.backward else None,
                                   first_outputs=first, supports=supports)
    except NotImplementedError as err:  # a recipe the hypothesis library does not model
        return [f"no diagnosis: {err}"]
    return found.lines()


def _named_grads(grads: Any) -> dict[str, Any]:
    if grads is None:
        return {}
    return {name: g.detach().cpu() for name, g in zip(("dQ", "dK", "dV"), grads, strict=True)}


def _attention_case_key(case: AttentionCase) -> tuple[Any, ...]:
    return (case.spec, case.seed, case.causal, case.sm_scale)


def check_device(device: str) -> None:
    """``--device``: cpu, or cuda only when CUDA is there (never a silent fallback)."""
    if device == "cpu":
        return
    if device.split(":")[0] != "cuda":
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")


def _shortest_length(spec: KernelSpec) -> int:
    m = spec.length_multiple
    return -(-max(spec.min_length, 1) // m) * m


def effective_config(config: AttentionCheckConfig, spec: KernelSpec) -> AttentionCheckConfig:
    """The check restricted to what the kernel declares it supports (``KernelSpec``)."""
    dtypes = tuple(d for d in config.dtypes if d in spec.dtypes)
    if not dtypes:
        raise UsageError(
            f"no dtype left to test: the check draws {', '.join(config.dtypes)}, the kernel"
            f" takes {', '.join(spec.dtypes)} (use --kernel-dtype)"
        )
    if config.causal and not spec.causal:
        raise UsageError(f"--causal, but {config.kernel} declares no causal support")
    shortest = _shortest_length(spec)
    if config.max_len < shortest:
        raise UsageError(
            f"--max-len {config.max_len} is below the kernel's shortest length {shortest}"
            f" (length multiple {spec.length_multiple}); pass --max-len {2 * shortest}"
        )
    return dataclasses.replace(
        config,
        dtypes=dtypes,
        head_dims=spec.head_dims or config.head_dims,
        backward=config.backward and spec.backward,
        max_group=config.max_group if spec.gqa else 1,
    )


def untested_lines(config: AttentionCheckConfig, spec: KernelSpec) -> list[str]:
    """What this check run could not test: the kernel's declared limits and the options."""
    lines = spec.untested()
    if spec.causal and not config.causal:
        lines.append("causal masking (not asked for: pass --causal)")
    if spec.backward and not config.backward:
        lines.append("the backward pass (--forward-only)")
    missing = [d for d in spec.dtypes if d not in config.dtypes]
    if missing:
        lines.append(f"{', '.join(missing)} inputs (not asked for)")
    return lines


def inputs_cases(config: AttentionCheckConfig, spec: KernelSpec) -> list[AttentionCase]:
    """The ``--inputs`` file as one case per tested dtype (values rounded to the dtype)."""
    if not config.inputs:
        return []
    arrays = load_inputs_file(config.inputs)
    q, k = arrays["q"], arrays["k"]
    cases = []
    for dtype in config.dtypes:
        aspec = AttentionInputSpec(
            batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1], lq=q.shape[2],
            lk=k.shape[2], head_dim=q.shape[3], dtype=dtype,
        )
        if not spec.supports(heads=aspec.heads, kv_heads=aspec.kv_heads, lq=aspec.lq,
                             lk=aspec.lk, head_dim=aspec.head_dim, dtype=dtype,
                             causal=config.causal):
            raise UsageError(
                f"--inputs {config.inputs}: q {q.shape}, k {k.shape} ({dtype}"
                f"{', causal' if config.causal else ''}) is outside what the kernel declares"
                f" it supports ({spec})"
            )
        rounded = [round_to_dtype(arrays[n], dtype) for n in ("q", "k", "v")]
        do = arrays.get("do")
        cases.append(AttentionCase(aspec, 0, config.causal, None, *rounded, do=do,
                                   source=config.inputs))
    return cases


def probe_attention(
    kernel: Any, config: AttentionCheckConfig
) -> tuple[str, AttentionCase] | None:
    """Call the kernel once on a tiny Gaussian input that it supports: an exception or an
    unusable result is a usage error (exit 2); a time-out or crash is returned with the
    case."""
    spec = getattr(kernel, "spec", None) or KernelSpec()
    length = max(16, _shortest_length(spec))
    aspec = AttentionInputSpec(lq=length, lk=length, head_dim=config.head_dims[0],
                               dtype=config.dtypes[0])
    q_np, k_np, v_np = generate_attention_inputs(np.random.default_rng(0), aspec)
    case = AttentionCase(aspec, 0, config.causal, None, q_np, k_np, v_np)
    run = call_attention_kernel(kernel, case, config, _grad_output(case))
    if run.problem is None:
        return None
    if run.causes and run.causes[0] in ("kernel timed out", "kernel crashed"):
        return run.problem, case
    shape = f"(1, 1, {length}, {aspec.head_dim}) {aspec.dtype}"
    raise UsageError(f"{config.kernel}(q, k, v, causal, sm_scale) on a {shape} input: "
                     f"{run.problem}")


ProgressLog = Callable[[str], None]


def run_attention_check(
    config: AttentionCheckConfig, *, log: ProgressLog | None = None, progress_every: int = 10,
) -> CheckResult:
    """Load the kernel in a worker process, then check it over ``config.examples`` drawn
    attention inputs the kernel supports (plus the ``--inputs`` file). The result's
    ``untested`` lists what could not be tested."""
    from fp4sim import reference

    try:
        reference.get_recipe(config.recipe)
    except (KeyError, ValueError) as err:  # one line, as in report and simulate
        raise UsageError(f"unknown recipe {config.recipe!r}; valid recipes: "
                         f"{', '.join(reference.RECIPE_NAMES)}") from err
    check_device(config.device)
    with KernelWorker(config.kernel, spec_overrides=config.kernel_overrides,
                      timeout=config.timeout, device=config.device) as worker:
        assert worker.spec is not None
        effective = effective_config(config, worker.spec)
        result = _run_with_worker(worker, effective, log, progress_every)
        result.untested = untested_lines(effective, worker.spec)
        result.restarts = worker.starts - 1
    return result


def _run_with_worker(
    worker: KernelWorker, config: AttentionCheckConfig, log: ProgressLog | None,
    progress_every: int,
) -> CheckResult:
    from fp4sim.testing.strategies import attention_inputs

    spec = worker.spec or KernelSpec()
    for case in inputs_cases(config, spec):
        outcome = evaluate_attention_case(worker, case, config, diagnose=True)
        if not outcome.ok:
            return CheckResult(ok=False, examples_run=1, first_failure_at=1, case=case,
                               diagnosis=outcome.describe(case), causes=outcome.causes)
    probe_failure = probe_attention(worker, config)
    if probe_failure is not None:
        problem, case = probe_failure
        cause = "kernel timed out" if "timed out" in problem else "kernel crashed"
        outcome = AttentionOutcome([], [], [cause], f"{problem} (the first, smallest input)")
        return CheckResult(ok=False, examples_run=1, first_failure_at=1, case=case,
                           diagnosis=outcome.describe(case), causes=[cause])
    hard: dict[Any, AttentionOutcome] = {}
    seen = {"n": 0, "hard": False}

    def evaluate(case: AttentionCase) -> str | None:
        if seen["hard"]:
            # after a time-out or crash, do not shrink: each try could cost a full time-out
            return None
        seen["n"] += 1
        if log is not None and seen["n"] % progress_every == 0:
            log(f"{seen['n']}/{config.examples} examples checked")
        outcome = evaluate_attention_case(worker, case, config, diagnose=False)
        if outcome.causes[:1] in (["kernel timed out"], ["kernel crashed"]):
            seen["hard"] = True
            hard[_attention_case_key(case)] = outcome
        return None if outcome.ok else outcome.describe(case)

    spec_kwargs: dict[str, Any] = {
        "head_dims": config.head_dims,
        "dtypes": config.dtypes,
        "max_len": config.max_len,
        "max_batch": config.max_batch,
        "max_kv_heads": config.max_kv_heads,
        "max_group": config.max_group,
        "length_multiple": spec.length_multiple,
        "min_len": _shortest_length(spec),
        "causal_equal_lengths": not spec.causal_unequal,
    }
    if config.distributions is not None:
        spec_kwargs["distributions"] = config.distributions
    strategy = attention_inputs(causal=config.causal, sm_scales=config.sm_scales, **spec_kwargs)
    result = run_hypothesis(
        strategy,
        evaluate,
        examples=config.examples,
        seed=config.seed,
        shrink_seconds=config.shrink_seconds,
        case_key=_attention_case_key,
    )
    if result.case is not None:  # diagnose the shrunk case only
        outcome = hard.get(_attention_case_key(result.case))
        if outcome is None:
            outcome = evaluate_attention_case(worker, result.case, config, diagnose=True)
        result.causes = outcome.causes
        result.diagnosis = outcome.describe(result.case)
    return result
