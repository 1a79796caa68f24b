"""`fp4sim check`: property-check an external FP4 quantizer or attention kernel.

A quantizer kernel is a callable ``x -> (packed uint8, scale bytes, tensor scale or None)``
quantizing along the last axis; it is compared bit for bit with ``fp4sim.quantize``.
An attention kernel is a callable ``(q, k, v, causal, sm_scale) -> o`` supporting autograd;
its output and its gradients dQ, dK, dV are compared with the reference's recipe (forward
``reference.fp4_attention_forward``, backward the recipe's own variant via
``reference.attention_backward``, which is ``ste_autograd`` when the recipe says so) under
the FP4 tolerance rule of ``fp4sim.testing.assertions``.

Hypothesis draws the inputs (``fp4sim.testing.strategies``), stops at the first
disagreement and shrinks it; the result carries the minimal case, a diagnosis (which
tensor, which blocks, how far, and a likely cause when a known signature matches) and the
data a reproduction script needs (``fp4sim.testing.repro``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fp4sim.testing.assertions import (
    AttentionErrorReport,
    QuantizedDiff,
    attention_error,
    compare_quantized,
    tie_flip_summary,
)
from fp4sim.testing.generators import (
    AttentionInputSpec,
    generate_attention_inputs,
    generate_tensor,
    round_to_dtype,
)
from fp4sim.testing.strategies import (
    BLOCK_SIZES,
    QUANTIZER_DISTRIBUTIONS,
    AttentionCase,
    TensorCase,
)

__all__ = [
    "AttentionCheckConfig",
    "CheckResult",
    "QuantizerCheckConfig",
    "UsageError",
    "evaluate_attention_case",
    "evaluate_quantizer_case",
    "load_kernel",
    "run_attention_check",
    "run_quantizer_check",
]

# One E2M1 code flip of P changes P~ by at most one step (2, between 4 and 6) times the
# block scale, which is at most amax/6 rounded up to E4M3 (relative step 2^-3): P <= 1, so
# |dP~| <= 2 * (1/6) * (1 + 2^-3) = 0.375 (FP4_FORMATS.md E2M1 and E4M3).
P_FLIP_STEP = 2.0 * (1.0 / 6.0) * (1.0 + 2.0**-3)


class UsageError(Exception):
    """Bad command-line use: unimportable kernel, not callable, wrong signature (exit 2)."""


# ---------------------------------------------------------------------------
# kernel loading
# ---------------------------------------------------------------------------


def load_kernel(path: str, n_args: int) -> Callable[..., Any]:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and check it takes ``n_args`` positional
    arguments. The current directory is put on ``sys.path`` (as ``python -m`` does)."""
    if ":" not in path:
        raise UsageError(
            f"--kernel must be MODULE:ATTR (e.g. mypkg.kernels:quantize), got {path!r}"
        )
    module_name, attr_path = path.split(":", 1)
    if not module_name or not attr_path:
        raise UsageError(f"--kernel must be MODULE:ATTR, got {path!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure is a usage problem for the CLI
        raise UsageError(
            f"cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{path} is not callable (got {type(obj).__name__})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some extension callables have no signature: trust them
    try:
        signature.bind(*range(n_args))
    except TypeError as err:
        raise UsageError(
            f"{path}{signature} cannot be called with {n_args} positional argument(s): {err}"
        ) from err
    return obj


def _hypothesis_blob(err: BaseException) -> str | None:
    """The ``@reproduce_failure(...)`` line Hypothesis attaches to a failure, if any."""
    for note in getattr(err, "__notes__", []) or []:
        found = re.search(r"@reproduce_failure\([^)]*\)", note)
        if found:
            return found.group(0)
    return None


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Outcome of a check run. ``first_failure_at`` counts examples (1-based) up to the first
    disagreement; ``case`` is the shrunk failing case; ``diagnosis`` the printable report."""

    ok: bool
    examples_run: int
    first_failure_at: int | None = None
    case: Any = None
    diagnosis: str = ""
    causes: list[str] = field(default_factory=list)
    blob: str | None = None
    shrink_seconds: float = 0.0


class _Disagreement(AssertionError):
    """Raised inside the Hypothesis test for a real disagreement."""


def _run_hypothesis(
    strategy: Any,
    evaluate: Callable[[Any], str | None],
    *,
    examples: int,
    seed: int,
    shrink_seconds: float,
    case_key: Callable[[Any], Any],
) -> CheckResult:
    """Run ``evaluate`` (None = agreement, else a diagnosis) over drawn cases; stop at the
    first disagreement and shrink for at most ``shrink_seconds``."""
    from hypothesis import HealthCheck, Phase, given, reject, settings
    from hypothesis import seed as hypothesis_seed

    counter = {"calls": 0, "first": None, "t_fail": None}
    failures: dict[Any, str] = {}
    passes: set[Any] = set()
    last: dict[str, Any] = {}

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        print_blob=True,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def property_holds(case: Any) -> None:
        key = case_key(case)
        if key in passes:
            return
        if key in failures:
            diagnosis = failures[key]
        else:
            if counter["first"] is not None:
                if time.monotonic() - counter["t_fail"] > shrink_seconds:
                    reject()  # shrink budget spent: only known cases from here on
            else:
                counter["calls"] += 1
            diagnosis = evaluate(case)
            if diagnosis is None:
                passes.add(key)
                return
            if counter["first"] is None:
                counter["first"] = counter["calls"]
                counter["t_fail"] = time.monotonic()
            failures[key] = diagnosis
        last["case"], last["diagnosis"] = case, diagnosis
        raise _Disagreement(diagnosis)

    try:
        property_holds()
    except Exception as err:  # _Disagreement, or Hypothesis wrapping it (Flaky, groups)
        if "case" not in last:
            raise
        return CheckResult(
            ok=False,
            examples_run=counter["calls"],
            first_failure_at=counter["first"],
            case=last.get("case"),
            diagnosis=last.get("diagnosis", str(err)),
            blob=_hypothesis_blob(err),
            shrink_seconds=time.monotonic() - (counter["t_fail"] or time.monotonic()),
        )
    return CheckResult(ok=True, examples_run=counter["calls"])


# ---------------------------------------------------------------------------
# quantizer check
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizerCheckConfig:
    """What ``fp4sim check quantizer`` compares: format, emulator settings, inputs."""

    kernel: str
    fmt: str = "nvfp4"
    settings: tuple[tuple[str, Any], ...] = ()
    examples: int = 100
    seed: int = 0
    distributions: tuple[str, ...] = QUANTIZER_DISTRIBUTIONS
    dtypes: tuple[str, ...] = ("float32",)
    input_type: str = "auto"  # 'auto', 'torch' or 'numpy'
    device: str = "cpu"
    max_rows: int = 4
    max_blocks: int = 4
    shrink_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.fmt not in BLOCK_SIZES:
            raise UsageError(f"--format must be one of {sorted(BLOCK_SIZES)}, got {self.fmt!r}")
        if self.input_type not in ("auto", "torch", "numpy"):
            raise UsageError(f"input type must be auto, torch or numpy, got {self.input_type!r}")
        unknown = [d for d in self.distributions if d not in QUANTIZER_DISTRIBUTIONS]
        if unknown or not self.distributions:
            raise UsageError(f"unknown distributions {unknown}; known: {QUANTIZER_DISTRIBUTIONS}")

    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["settings"] = [list(kv) for kv in self.settings]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantizerCheckConfig:
        data = dict(data)
        data["settings"] = tuple((k, v) for k, v in data.get("settings", ()))
        data["distributions"] = tuple(data["distributions"])
        data["dtypes"] = tuple(data["dtypes"])
        return cls(**data)


def _to_kernel_input(x: np.ndarray, dtype: str, input_type: str, device: str) -> Any:
    if input_type == "numpy":
        return x.copy()
    import torch

    return torch.from_numpy(x.copy()).to(device=device, dtype=getattr(torch, dtype))


def _call_quantizer(kernel: Callable[..., Any], x: Any) -> tuple[Any, Any, Any]:
    result = kernel(x)
    if not isinstance(result, tuple | list) or len(result) != 3:
        raise UsageError(
            "a quantizer kernel must return (packed uint8, scale bytes, tensor scale or None);"
            f" got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
        )
    return result[0], result[1], result[2]


def probe_quantizer(kernel: Callable[..., Any], config: QuantizerCheckConfig) -> str:
    """Find the input type the kernel accepts (torch first) on a small Gaussian input and
    check the shape of its result; returns 'torch' or 'numpy' or raises UsageError."""
    x = generate_tensor(np.random.default_rng(0), (2, 2 * BLOCK_SIZES[config.fmt]))
    kinds = ("torch", "numpy") if config.input_type == "auto" else (config.input_type,)
    errors = []
    for kind in kinds:
        try:
            _call_quantizer(kernel, _to_kernel_input(x, "float32", kind, config.device))
        except UsageError:
            raise
        except Exception as err:  # the kernel's own error on this input type
            errors.append(f"{kind} input: {type(err).__name__}: {err}")
            continue
        return kind
    raise UsageError(
        f"{config.kernel} failed on a (2, {x.shape[1]}) float32 input: " + "; ".join(errors)
    )


def emulate_quantizer(x: np.ndarray, fmt: str, settings: dict[str, Any]) -> Any:
    """The emulator's answer (``fp4sim.QuantizedTensor``) for ``x`` along the last axis."""
    import fp4sim

    return fp4sim.quantize(x, fmt, axis=-1, **settings)


def _e2m1_rne_codes(y: np.ndarray) -> np.ndarray:
    """E2M1 codes of float values by RNE with saturation (OCP MX v1.0 section 5.3.3)."""
    import fp4sim

    return np.asarray(fp4sim.e2m1_encode(np.asarray(y, dtype=np.float32)), dtype=np.uint8)


def _swap_nibbles(b: np.ndarray) -> np.ndarray:
    return ((b & 0x0F) << 4) | (b >> 4)


def diagnose_quantizer(
    x: np.ndarray, expected: Any, diff: QuantizedDiff, fmt: str, settings: dict[str, Any]
) -> list[str]:
    """Likely causes of a quantizer disagreement, from known signatures."""
    causes: list[str] = []
    if diff.what == "shape":
        if "scale shape" in diff.message:
            causes.append("wrong block size (the number of scales per row differs)")
        return causes
    if diff.what == "tensor_scale":
        causes.append("tensor scale computed differently (amax/(448*6) in float32 expected)")
        return causes
    blocks = diff.differing_blocks
    ec, ac = diff.expected_codes, diff.actual_codes
    es, as_ = diff.expected_scale_bits, diff.actual_scale_bits
    ep, ap = diff.expected_packed, diff.actual_packed
    assert ec is not None and ac is not None and es is not None and as_ is not None
    scale_diff = diff.scale_differs[blocks]
    if ep is not None and ap is not None and not scale_diff.any():
        if np.array_equal(ap[blocks], _swap_nibbles(ep[blocks])):
            causes.append("nibble order swapped (element 2i belongs in the low nibble)")
            return causes
    if scale_diff.any():
        sb = blocks[scale_diff]
        delta = as_[sb].astype(int) - es[sb].astype(int)
        if np.all(delta == 1):
            causes.append(
                "block scale rounded up (every differing scale byte is one step above the"
                " emulator's round-to-nearest)"
            )
        elif np.all(delta == -1):
            causes.append("block scale rounded down (one step below round-to-nearest)")
        block = diff.x_blocks.shape[-1] if diff.x_blocks is not None else 0
        if fmt == "nvfp4" and block and not settings.get("tensor_scale"):
            import fp4sim

            xb = diff.x_blocks.astype(np.float32)
            amax = np.abs(xb).max(axis=-1)
            pair = (
                np.repeat(np.maximum(amax[0::2], amax[1::2] if amax.size > 1 else amax[0::2]), 2)[
                    : amax.size
                ]
                if amax.size % 2 == 0
                else None
            )
            if pair is not None:
                bytes32 = np.asarray(
                    fp4sim.e4m3_encode(np.minimum(pair / np.float32(6.0), 448.0)), dtype=np.uint8
                )
                if np.array_equal(bytes32[sb], as_[sb]):
                    causes.append(
                        "scales computed over 32-element blocks instead of 16 (each scale"
                        " equals the amax/6 of its 32-element pair)"
                    )
        return causes
    # scales agree: codes differ
    summary = tie_flip_summary(
        diff.x_blocks.reshape(-1, diff.x_blocks.shape[-1]),
        _BlockView(expected_codes=ec, scales=_scale_values(diff), tensor_scale=_ts(expected)),
        ac,
        axis=-1,
    )
    if summary["differing"] and summary["differing_off_tie"] == 0:
        if summary["away_from_zero"] == summary["differing"]:
            causes.append("ties rounded away from zero instead of to even (all flips at ties)")
        else:
            causes.append("rounding at ties differs from round-to-nearest-even")
    block_scales = _scale_values(diff)
    if block_scales is not None:
        scales = block_scales * (_ts(expected) or 1.0)
        xb = diff.x_blocks.astype(np.float32)
        with np.errstate(divide="ignore"):
            recip = np.where(scales > 0, np.float32(1.0) / scales.astype(np.float32), 0.0)
        recip = recip.astype(np.float32)
        with np.errstate(all="ignore"):
            y = xb * recip
        bf = round_to_dtype(y, "bfloat16")
        candidate = _e2m1_rne_codes(bf)
        if np.array_equal(candidate[blocks], ac[blocks]):
            causes.append(
                "scaled values rounded to bfloat16 before E2M1 (double rounding):"
                f" {summary['differing']} code(s) differ, {summary['differing_off_tie']} off ties"
            )
    if not causes:
        causes.append(
            f"{summary['differing']} code(s) differ ({summary['differing_at_tie']} at ties,"
            f" {summary['away_from_zero']} larger in magnitude, {summary['sign_flips']} sign flips)"
        )
    return causes


@dataclass
class _BlockView:
    """Quacks like a QuantizedTensor for tie_flip_summary on blocked (n, block) arrays."""

    expected_codes: np.ndarray
    scales: np.ndarray | None
    tensor_scale: float | None

    @property
    def codes(self) -> np.ndarray:
        return self.expected_codes

    axis = -1


def _scale_values(diff: QuantizedDiff) -> np.ndarray | None:
    return None if diff.expected_scales is None else diff.expected_scales.reshape(-1, 1)


def _ts(expected: Any) -> float | None:
    ts = getattr(expected, "tensor_scale", None)
    return None if ts is None else float(ts)


def evaluate_quantizer_case(
    kernel: Callable[..., Any], case: TensorCase, config: QuantizerCheckConfig, input_type: str
) -> tuple[str | None, list[str]]:
    """(diagnosis or None, likely causes) for one input."""
    settings = config.settings_dict()
    expected = emulate_quantizer(case.x, config.fmt, settings)
    try:
        packed, scale_bits, tensor_scale = _call_quantizer(
            kernel, _to_kernel_input(case.x, case.dtype, input_type, config.device)
        )
    except UsageError:
        raise
    except Exception as err:
        return f"kernel raised {type(err).__name__}: {err}", ["kernel error"]
    diff = compare_quantized(case.x, expected, packed, scale_bits, tensor_scale, axis=-1)
    if diff is None:
        return None, []
    causes = diagnose_quantizer(case.x, expected, diff, config.fmt, settings)
    text = diff.message + "".join(f"\nlikely cause: {c}" for c in causes)
    return text, causes


def _tensor_case_key(case: TensorCase) -> tuple[Any, ...]:
    return (case.distribution, case.params, case.shape, case.dtype, case.seed)


def run_quantizer_check(config: QuantizerCheckConfig) -> CheckResult:
    """Load the kernel, then check it over ``config.examples`` drawn inputs."""
    from fp4sim.testing.strategies import tensor_cases

    kernel = load_kernel(config.kernel, 1)
    input_type = probe_quantizer(kernel, config)
    causes_of: dict[Any, list[str]] = {}

    def evaluate(case: TensorCase) -> str | None:
        text, causes = evaluate_quantizer_case(kernel, case, config, input_type)
        causes_of[_tensor_case_key(case)] = causes
        return text

    strategy = tensor_cases(
        fmt=config.fmt,
        distributions=config.distributions,
        dtypes=config.dtypes,
        max_rows=config.max_rows,
        max_blocks=config.max_blocks,
    )
    result = _run_hypothesis(
        strategy,
        evaluate,
        examples=config.examples,
        seed=config.seed,
        shrink_seconds=config.shrink_seconds,
        case_key=_tensor_case_key,
    )
    if result.case is not None:
        result.causes = causes_of.get(_tensor_case_key(result.case), [])
    return result


# ---------------------------------------------------------------------------
# attention check
# ---------------------------------------------------------------------------


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

    import reference

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
# operands (8 / 11 significant bits), and TF32 (11 bits) for float32, which Triton's tl.dot
# uses by default on tensor cores (IEEE 754 precisions; NVIDIA TF32 format).
OPERAND_UNIT: dict[str, float] = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-11}


def accumulation_floors(case: AttentionCase, fwd64: Any, do_np: np.ndarray) -> dict[str, Any]:
    """Componentwise bounds on float32 rounding error of the attention formulas (float64
    tensors shaped like O, dQ, dK, dV), used as ``floor_abs`` of the FP4 rule.

    Higham, Accuracy and Stability of Numerical Algorithms (2002), eq. 3.13: a float32 matrix
    product in any summation order satisfies |fl(AB) - AB| <= gamma_n |A||B|,
    gamma_n = n u / (1 - n u), u = 2^-24. With P the normalized probabilities (float64),
    E_S = gamma_d tau |Q^||K^|^T + u |S| (error of S and of exp's argument) and
    P~ <= 2 P (E2M1 rounds a value up by at most a factor 2, FP4_FORMATS.md; P~ itself is
    exact unless a code flips at a tie, which the row allowance covers):

    * O:  gamma_Lk (2P)|V^| + |O| (gamma_Lk + rowmax E_S + u T)   (T key tiles; l's error)
    * dS = P (dP - D):  err <= P (gamma_d (|dO||V^|^T + rowsum|dO o O_hp|) + |dP - D| (E_S + u))
    * dQ: tau (gamma_Lk |dS| + err dS)|K^|;  dK: tau (gamma_Lq' |dS| + err dS)^T |Q^|;
      dV: gamma_Lq' (2P)^T |dO|   (Lq' = Lq * group, summed over the query heads of a group)

    A kernel may round matmul operands to its operand precision u_op (``OPERAND_UNIT`` of
    the input dtype): Q^, K^, V^, P~ and dO are exact there (an E2M1 code times an E4M3 scale
    has at most 6 significant bits), but dS, P and the saved O_hp are not, so the dQ, dK, dV
    products use gamma_n + 2 u_op and D carries u_op rowsum|dO o O_hp|.
    """
    import torch

    u = 2.0**-24
    u_op = OPERAND_UNIT[case.spec.dtype]

    def gamma(n: int) -> float:
        return n * u / (1.0 - n * u)

    def product(n: int) -> float:
        return gamma(n) + 2 * u_op

    spec = case.spec
    group = spec.heads // spec.kv_heads
    q_hat = fwd64.q_hat.double()
    k_hat = fwd64.k_hat.double().repeat_interleave(group, dim=1)
    v_hat = fwd64.v_hat.double().repeat_interleave(group, dim=1)
    tau = float(fwd64.sm_scale)
    lq, lk, d = spec.lq, spec.lk, spec.head_dim
    s = tau * q_hat @ k_hat.transpose(-1, -2)
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if case.causal:  # bottom-right aligned (DESIGN.md): query i sees key j iff j <= i + Lk - Lq
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    lse = fwd64.lse.double().unsqueeze(-1)
    finite = torch.isfinite(lse)
    p = torch.where(
        visible & finite,
        torch.exp(torch.where(visible, s, 0.0) - torch.where(finite, lse, 0.0)),
        0.0,
    )
    e_s = gamma(d) * tau * (q_hat.abs() @ k_hat.abs().transpose(-1, -2)) + u * s.abs()
    e_s = torch.where(visible, e_s, 0.0)
    tiles = -(-lk // 64)
    o = fwd64.o.double()
    floor_o = gamma(lk) * (2 * p) @ v_hat.abs() + o.abs() * (
        gamma(lk) + e_s.amax(dim=-1, keepdim=True) + u * tiles
    )
    out = {"O": floor_o}
    do = torch.from_numpy(do_np).double()
    o_hp = fwd64.o_hp.double()
    dp = do @ v_hat.transpose(-1, -2)
    d_row = (do * o_hp).sum(dim=-1, keepdim=True)
    d_abs = (do.abs() * o_hp.abs()).sum(dim=-1, keepdim=True)
    ds_abs = (p * (dp - d_row)).abs()
    ds_err = p * (
        gamma(d) * (do.abs() @ v_hat.abs().transpose(-1, -2) + d_abs)
        + u_op * d_abs
        + (dp - d_row).abs() * (e_s + u)
    )
    lq_group = lq * group

    def reduce_group(x: Any) -> Any:
        b, h, n, dd = x.shape
        return x.reshape(b, h // group, group, n, dd).sum(dim=2)

    out["dQ"] = tau * (product(lk) * ds_abs + ds_err) @ k_hat.abs()
    out["dK"] = reduce_group(
        tau * (product(lq_group) * ds_abs + ds_err).transpose(-1, -2) @ q_hat.abs()
    ) * (1 + gamma(group))
    out["dV"] = reduce_group(product(lq_group) * (2 * p).transpose(-1, -2) @ do.abs())
    return {name: t.numpy() for name, t in out.items()}


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

    import reference

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


# ---------------------------------------------------------------------------
# attention diagnosis: compare the kernel with reference variants of known bugs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    cause: str
    recipe: Any
    causal: bool
    backward_variant: str | None = None  # None: the recipe's own
    hp_scores: bool = False  # backward S from Q, K instead of Q^, K^
    drop_diagonal: bool = False  # causal mask shifted: the diagonal key masked
    pad_keys_unmasked: bool = False  # keys zero-padded to a multiple of 16, not masked


def _candidates(recipe: Any, causal: bool, lk: int, forward_failed: bool) -> list[_Candidate]:
    out: list[_Candidate] = []
    if forward_failed:
        if recipe.v is not None:
            other = "keys" if recipe.v_axis == "head_dim" else "head_dim"
            out.append(
                _Candidate(
                    f"V blocked along the wrong axis ({other} instead of {recipe.v_axis})",
                    dataclasses.replace(recipe, v_axis=other, v_pad_keys=True),
                    causal,
                )
            )
        if recipe.p_policy == "block":
            out.append(
                _Candidate(
                    "P quantized against the wrong max (the final row max instead of the"
                    " running max of its key tile)",
                    dataclasses.replace(recipe, p_policy="consistent"),
                    causal,
                )
            )
        if recipe.p_policy == "consistent":
            out.append(
                _Candidate(
                    "P quantized against the wrong max (the running max instead of the final)",
                    dataclasses.replace(recipe, p_policy="block"),
                    causal,
                )
            )
        for bn in (32, 128):
            if bn != recipe.block_n:
                try:
                    variant = dataclasses.replace(recipe, block_n=bn)
                except ValueError:
                    continue
                out.append(
                    _Candidate(
                        f"P tiles of {bn} keys instead of {recipe.block_n} (running max differs)",
                        variant,
                        causal,
                    )
                )
        if recipe.p is not None:
            out.append(
                _Candidate(
                    "P not quantized (or its mass flushed differently)",
                    dataclasses.replace(recipe, p=None, p_policy="none"),
                    causal,
                )
            )
        if causal:
            out.append(
                _Candidate(
                    "causal mask off by one (the diagonal key masked)",
                    recipe,
                    True,
                    drop_diagonal=True,
                )
            )
        out.append(
            _Candidate(f"causal flag {'ignored' if causal else 'applied'}", recipe, not causal)
        )
        if lk % 16 and not causal:
            out.append(
                _Candidate(
                    "padded keys not masked (zero keys enter the softmax and the P block scale)",
                    recipe,
                    causal,
                    pad_keys_unmasked=True,
                )
            )
    else:
        own = recipe.backward
        table = {
            "o_only": "D from the quantized O (rowsum(dO*O) instead of rowsum(dO*O_hp))",
            "p_only": "dV from the unquantized P (P instead of P~ in dV = P^T dO)",
            "drop_in": "drop-in high-precision backward (S from Q, K; D from O; dV from P)",
            "attn_qat": "Attn-QAT surrogate backward instead of the STE ground truth",
            "ste_autograd": "STE autograd backward instead of the Attn-QAT surrogate",
            "exact": "exact (unquantized) attention backward",
        }
        for variant, cause in table.items():
            if variant != own:
                out.append(_Candidate(cause, recipe, causal, backward_variant=variant))
        out.append(
            _Candidate(
                "backward recomputes S in high precision (from Q, K instead of Q^, K^)",
                recipe,
                causal,
                hp_scores=True,
            )
        )
    return out


def _candidate_outputs(
    cand: _Candidate, case: AttentionCase, do_np: np.ndarray, want_grads: bool
) -> dict[str, Any]:
    import torch

    import reference

    q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
    lq = q.shape[-2]
    if cand.drop_diagonal:
        q = torch.cat([q, torch.zeros_like(q[..., :1, :])], dim=-2)
    if cand.pad_keys_unmasked:
        extra = (-k.shape[-2]) % 16
        k = torch.nn.functional.pad(k, (0, 0, 0, extra))
        v = torch.nn.functional.pad(v, (0, 0, 0, extra))
    fwd = reference.fp4_attention_forward(
        q,
        k,
        v,
        cand.recipe,
        causal=cand.causal,
        sm_scale=case.sm_scale,
        accum_dtype=torch.float64,
    )
    out = {"O": fwd.o[..., :lq, :]}
    if want_grads and not (cand.drop_diagonal or cand.pad_keys_unmasked):
        if cand.hp_scores:
            fwd = dataclasses.replace(fwd, q_hat=q, k_hat=k)
        variant = cand.backward_variant or cand.recipe.backward
        do = torch.from_numpy(do_np).double()
        dq, dk, dv = reference.attention_backward(
            variant, fwd, q, k, v, do, cand.recipe, causal=cand.causal, sm_scale=case.sm_scale
        )
        out |= {"dQ": dq, "dK": dk, "dV": dv}
    return out


def _key_blocks_over(report_name: str, actual: Any, truth: Any, bound: float, lk: int) -> str:
    """For dK, dV: which 16-key blocks hold the rows over the bound."""
    err = (actual.double() - truth.double()).abs().amax(dim=-1)  # (B, Hkv, Lk)
    over_keys = sorted({int(j) for j in (err > bound).nonzero()[:, -1].tolist()})
    if not over_keys:
        return ""
    blocks = sorted({j // 16 for j in over_keys})
    text = (
        f"{report_name}: keys over the bound {over_keys[:12]}{'...' if len(over_keys) > 12 else ''}"
    )
    text += f" in 16-key blocks {blocks}"
    last_block = (lk - 1) // 16
    if lk % 16 and lk > 16 and blocks == [last_block]:
        text += (
            f"; only the last, partial key block (Lk={lk}, {lk % 16} valid keys of 16):"
            " likely padded keys leaking into a block scale"
        )
    return text


def attention_causes(
    case: AttentionCase,
    recipe: Any,
    actual: dict[str, Any],
    failed: list[AttentionErrorReport],
    do_np: np.ndarray,
    fwd64: Any,
) -> list[str]:
    """Likely causes of an attention disagreement: a known bug whose reference emulation
    agrees with the kernel at least 10x better than the recipe does, plus where it is."""
    import torch

    causes: list[str] = []
    names = [r.name for r in failed if r.name in actual]
    forward_failed = "O" in names
    truth_err = {r.name: r.max_error for r in failed}
    for cand in _candidates(recipe, case.causal, case.spec.lk, forward_failed):
        try:
            outs = _candidate_outputs(cand, case, do_np, not forward_failed)
        except Exception:  # a candidate that does not apply to this shape
            continue
        compared = [n for n in names if n in outs]
        if not compared:
            continue
        explained = True
        for n in compared:
            err = float((actual[n].double() - outs[n].double()).abs().max())
            if not (err <= 0.1 * truth_err[n]) or not np.isfinite(err):
                explained = False
                break
        if explained:
            causes.append(cand.cause + " (matches a reference emulation of it)")
    for r in failed:
        if r.name in ("dK", "dV"):
            truth = _reference_grads(case, recipe, do_np, fwd64).get(r.name)
            if truth is not None:
                where = _key_blocks_over(r.name, actual[r.name], truth, r.bound, case.spec.lk)
                if where:
                    causes.append(where)
    if forward_failed and recipe.p is not None:
        import reference

        q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
        diag = (
            reference.fp4_attention_forward(
                q,
                k,
                v,
                recipe,
                causal=case.causal,
                sm_scale=case.sm_scale,
                accum_dtype=torch.float64,
                diagnostics=True,
            ).diagnostics
            or {}
        )
        frac = diag.get("p_fwd_flushed_block_fraction", 0.0)
        if frac and frac > 0:
            causes.append(
                f"{frac:.1%} of the forward's nonzero P blocks flush to zero in the reference"
                " (amax below 6*2^-10): a kernel that keeps that P mass disagrees"
            )
    return causes


def _reference_grads(case: AttentionCase, recipe: Any, do_np: np.ndarray, fwd64: Any) -> dict:
    """The recipe's float64 gradients for ``case`` (recomputed; cheap at test sizes)."""
    import torch

    import reference

    q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
    dq, dk, dv = reference.attention_backward(
        recipe.backward,
        fwd64,
        q,
        k,
        v,
        torch.from_numpy(do_np).double(),
        recipe,
        causal=case.causal,
        sm_scale=case.sm_scale,
    )
    return {"dQ": dq, "dK": dk, "dV": dv}


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
    import reference
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
    result = _run_hypothesis(
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
