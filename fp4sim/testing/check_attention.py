"""`fp4sim check attention`: an external attention kernel (forward and dQ, dK, dV) against
the reference recipe under the FP4 tolerance rule, over inputs drawn by Hypothesis.

How one case is judged (``evaluate_attention_case``, ``AttentionCheckConfig``) lives in
``fp4sim.judge.attention``, shared with `fp4sim report`; this module draws the cases,
shrinks a failure and reports what could not be tested."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fp4sim import reference
from fp4sim.harness import KernelSpec, KernelWorker, UsageError, load_inputs_file
from fp4sim.judge.attention import (
    AttentionCheckConfig,
    AttentionOutcome,
    call_attention_kernel,
    evaluate_attention_case,
    grad_output,
)
from fp4sim.judge.inputs import (
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
    round_to_dtype,
)
from fp4sim.testing.check_driver import CheckResult
from fp4sim.testing.check_shards import CaseJudge, Shards, run_check
from fp4sim.testing.strategies import attention_inputs

__all__ = [
    "AttentionCheckConfig",
    "AttentionOutcome",
    "ProgressLog",
    "check_device",
    "effective_config",
    "evaluate_attention_case",
    "inputs_cases",
    "probe_attention",
    "run_attention_check",
    "untested_lines",
]


def _attention_case_key(case: AttentionCase) -> tuple[Any, ...]:
    return (case.spec, case.seed, case.causal, case.sm_scale)


def check_device(device: str) -> None:
    """``--device``: cpu, or cuda only when CUDA is there (never a silent fallback)."""
    if device == "cpu":
        return
    if device.split(":")[0] != "cuda":
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")


def _shortest_length(spec: KernelSpec) -> int:
    m = spec.length_multiple
    return -(-max(spec.min_length, 1) // m) * m


def _check_recipe(name: str) -> None:
    try:
        reference.get_recipe(name)
    except (KeyError, ValueError) as err:  # one line, as in report and simulate
        raise UsageError(str(err)) from err


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
        recipe=config.recipe_name(spec.claims),
        kv_splits=1,  # now part of the recipe's name
        kv_split_keys=0,
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
    run = call_attention_kernel(kernel, case, config, grad_output(case))
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
    shards: Shards | None = None,
) -> CheckResult | None:
    """Load the kernel in a worker process, then check it over ``config.examples`` drawn
    attention inputs the kernel supports (plus the ``--inputs`` file). The result's
    ``untested`` lists what could not be tested. Under torchrun (``shards``) the drawn
    examples are judged over the ranks (``fp4sim.testing.check_shards``): rank 0 returns
    the result, the other ranks None."""
    if config.recipe is not None:  # named: a usage error before any work
        _check_recipe(config.recipe_name())
    check_device(config.device)
    with KernelWorker(config.kernel, spec_overrides=config.kernel_overrides,
                      timeout=config.timeout, device=config.device) as worker:
        assert worker.spec is not None
        effective = effective_config(config, worker.spec)
        _check_recipe(effective.recipe)  # the kernel's claims
        result = _run_with_worker(worker, effective, log, progress_every, shards)
        if result is not None:
            result.untested = untested_lines(effective, worker.spec)
            result.restarts = worker.starts - 1
            result.recipe = effective.recipe
    return result


def _before_drawing(worker: KernelWorker, config: AttentionCheckConfig) -> CheckResult | None:
    """The ``--inputs`` cases, then the probe: a failing verdict, or None to go on."""
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
    return None


_HARD = (["kernel timed out"], ["kernel crashed"])


def _run_with_worker(
    worker: KernelWorker, config: AttentionCheckConfig, log: ProgressLog | None,
    progress_every: int, shards: Shards | None = None,
) -> CheckResult | None:
    spec = worker.spec or KernelSpec()
    # rank 0 alone runs the --inputs cases and the probe; the ranks then meet (a usage
    # error or rank 0's early verdict stops them all)
    early = _before_drawing(worker, config) if shards is None or shards.leader else None
    if shards is not None and not shards.meet(done=early is not None):
        return early
    if early is not None:
        return early
    if log is not None:
        log(f"{config.kernel} loaded in a worker process; drawing {config.examples} examples")
    hard: dict[Any, AttentionOutcome] = {}
    seen = {"hard": False}

    def judge(case: AttentionCase) -> AttentionOutcome:
        return evaluate_attention_case(worker, case, config, diagnose=False)

    def absorb(case: AttentionCase, outcome: AttentionOutcome) -> str | None:
        if outcome.causes[:1] in _HARD:
            # after a time-out or crash, do not shrink: each try could cost a full time-out
            seen["hard"] = True
            hard[_attention_case_key(case)] = outcome
        return None if outcome.ok else outcome.describe(case)

    case_judge = CaseJudge(judge, absorb, failed=lambda o: not o.ok,
                           stopped=lambda: seen["hard"])
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
    result = run_check(
        strategy,
        case_judge,
        examples=config.examples,
        seed=config.seed,
        shrink_seconds=config.shrink_seconds,
        case_key=_attention_case_key,
        log=log,
        progress_every=progress_every,
        shards=shards,
    )
    if result is not None and result.case is not None:  # diagnose the shrunk case only
        outcome = hard.get(_attention_case_key(result.case))
        if outcome is None:
            if log is not None:  # several reference runs on re-test inputs: tens of seconds
                log("diagnosing the shrunk case (named hypotheses, re-tested on larger inputs)")
            outcome = evaluate_attention_case(worker, result.case, config, diagnose=True)
        result.causes = outcome.causes
        result.diagnosis = outcome.describe(result.case)
    return result
