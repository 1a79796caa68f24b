"""`fp4sim check attention`: an external attention kernel (forward and dQ, dK, dV) against
the reference recipe under the FP4 tolerance rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fp4sim.testing.assertions import AttentionErrorReport, attention_error
from fp4sim.testing.attention_causes import attention_causes
from fp4sim.testing.attention_tolerance import P_FLIP_STEP, accumulation_floors
from fp4sim.testing.check_driver import CheckResult, run_hypothesis
from fp4sim.testing.generators import AttentionInputSpec, generate_attention_inputs, round_to_dtype
from fp4sim.testing.kernel_loading import UsageError, load_kernel
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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttentionCheckConfig:
        data = dict(data)
        for name in ("dtypes", "head_dims", "sm_scales"):
            data[name] = tuple(data[name])
        if data.get("distributions") is not None:
            data["distributions"] = tuple(data["distributions"])
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
    """dO ~ N(0, 1) from the case seed (+1), rounded to the input dtype."""
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
    q, k, v = _torch_inputs(case, config.device)
    try:
        o = kernel(q, k, v, case.causal, case.sm_scale)
        grads = None
        if config.backward:
            do = torch.from_numpy(do_np).to(device=o.device, dtype=o.dtype)
            grads = torch.autograd.grad(o, (q, k, v), do, allow_unused=False)
    except Exception as err:
        return AttentionOutcome(
            [], [], ["kernel error"], f"kernel raised {type(err).__name__}: {err}"
        )
    if not isinstance(o, torch.Tensor) or tuple(o.shape) != case.q.shape:
        shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
        return AttentionOutcome([], [], [], f"kernel output {shape} != expected {case.q.shape}")
    fwd64, g64 = _reference_run(recipe, case, do_np, torch.float64, config.backward)
    fwd32, g32 = _reference_run(recipe, case, do_np, torch.float32, config.backward)
    o_cpu = o.detach().cpu()
    # one P code flip at a tie may move one row of O by P_FLIP_STEP * max|v^| / l
    l64 = fwd64.l.double()
    vmax = fwd64.v_hat.abs().amax(dim=(-1, -2)).double()  # (B, Hkv)
    group = case.spec.heads // case.spec.kv_heads
    vmax = vmax.repeat_interleave(group, dim=1).unsqueeze(-1)
    o_allow = torch.where(l64 > 0, P_FLIP_STEP * vmax / torch.where(l64 > 0, l64, 1.0), 0.0)
    floors = accumulation_floors(case, fwd64, do_np)
    reports = [
        attention_error(
            o_cpu,
            _round_like(fwd32.o, o_cpu),
            fwd64.o,
            "forward",
            name="O",
            floor_abs=floors["O"],
            row_allowance=o_allow.numpy(),
            max_allowance_rows=1,
        )
    ]
    if config.backward:
        assert grads is not None and g64 is not None and g32 is not None
        do64 = torch.from_numpy(do_np).double()
        # one flip of the backward's P~ (normalized, <= 1) moves one row of dV by
        # P_FLIP_STEP * max|dO|
        dv_allow = P_FLIP_STEP * float(do64.abs().max())
        for name, g, r64, r32, allow in zip(
            ("dQ", "dK", "dV"), grads, g64, g32, (None, None, dv_allow), strict=True
        ):
            g_cpu = g.detach().cpu()
            reports.append(
                attention_error(
                    g_cpu,
                    _round_like(r32, g_cpu),
                    r64,
                    "backward",
                    name=name,
                    floor_abs=floors[name],
                    row_allowance=allow,
                    max_allowance_rows=1 if allow is not None else 0,
                )
            )
    failed = [r for r in reports if not r.ok]
    causes: list[str] = []
    if failed and diagnose:
        causes = attention_causes(
            case, recipe, {"O": o_cpu} | _named_grads(grads), failed, do_np, fwd64
        )
        if case.spec.lk % 16 and any(r.name == "O" for r in failed):
            hint = _partial_block_hint(kernel, case, config)
            if hint:
                causes.append(hint)
    return AttentionOutcome(reports, failed, causes)


def _partial_block_hint(
    kernel: Callable[..., Any], case: AttentionCase, config: AttentionCheckConfig
) -> str | None:
    """Differential test: append random keys up to a multiple of 16 and re-check the forward.
    If the kernel then agrees, the failure needs a partial last key block."""
    lk = case.spec.lk
    extra = (-lk) % 16
    rng = np.random.default_rng(case.seed + 2)
    shape = (*case.k.shape[:2], extra, case.k.shape[-1])
    k2, v2 = (
        np.concatenate([t, round_to_dtype(rng.standard_normal(shape), case.spec.dtype)], axis=2)
        for t in (case.k, case.v)
    )
    spec2 = case.spec.replace(lk=lk + extra)
    case2 = AttentionCase(spec2, case.seed, case.causal, case.sm_scale, case.q, k2, v2)
    outcome = evaluate_attention_case(kernel, case2, dataclasses.replace(config, backward=False))
    if outcome.ok:
        return (
            f"the forward agrees once Lk={lk} is extended to {lk + extra} (a multiple of 16):"
            " padded keys of the last, partial key block likely leak into a P block scale"
            " or the softmax"
        )
    return None


def _named_grads(grads: Any) -> dict[str, Any]:
    if grads is None:
        return {}
    return {name: g.detach().cpu() for name, g in zip(("dQ", "dK", "dV"), grads, strict=True)}


def _attention_case_key(case: AttentionCase) -> tuple[Any, ...]:
    return (case.spec, case.seed, case.causal, case.sm_scale)


def probe_attention(kernel: Callable[..., Any], config: AttentionCheckConfig) -> None:
    """Call the kernel once on a tiny Gaussian input: it must return a tensor of q's shape
    that supports autograd (when the backward is checked)."""
    import torch

    spec = AttentionInputSpec(lq=16, lk=16, head_dim=config.head_dims[0], dtype=config.dtypes[0])
    q_np, k_np, v_np = generate_attention_inputs(np.random.default_rng(0), spec)
    case = AttentionCase(spec, 0, config.causal, None, q_np, k_np, v_np)
    q, k, v = _torch_inputs(case, config.device)
    try:
        o = kernel(q, k, v, config.causal, None)
    except TypeError as err:
        raise UsageError(
            f"{config.kernel}(q, k, v, causal, sm_scale) raised TypeError: {err}"
        ) from err
    if not isinstance(o, torch.Tensor):
        raise UsageError(f"{config.kernel} must return a torch.Tensor, got {type(o).__name__}")
    if config.backward and not o.requires_grad:
        raise UsageError(
            f"{config.kernel}'s output does not require grad: the kernel must support autograd"
            " (or pass --forward-only)"
        )


def run_attention_check(config: AttentionCheckConfig) -> CheckResult:
    """Load the kernel, then check it over ``config.examples`` drawn attention inputs."""
    from fp4sim import reference
    from fp4sim.testing.strategies import attention_inputs

    try:
        reference.get_recipe(config.recipe)
    except (KeyError, ValueError) as err:
        raise UsageError(f"unknown recipe {config.recipe!r}: {err}") from err
    kernel = load_kernel(config.kernel, 5)
    probe_attention(kernel, config)

    def evaluate(case: AttentionCase) -> str | None:
        outcome = evaluate_attention_case(kernel, case, config, diagnose=False)
        return None if outcome.ok else outcome.describe(case)

    spec_kwargs: dict[str, Any] = {
        "head_dims": config.head_dims,
        "dtypes": config.dtypes,
        "max_len": config.max_len,
        "max_batch": config.max_batch,
        "max_kv_heads": config.max_kv_heads,
        "max_group": config.max_group,
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
        outcome = evaluate_attention_case(kernel, result.case, config, diagnose=True)
        result.causes = outcome.causes
        result.diagnosis = outcome.describe(result.case)
    return result
