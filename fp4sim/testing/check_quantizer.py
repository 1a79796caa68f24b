"""`fp4sim check quantizer`: an external quantizer against ``fp4sim.quantize``, bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import fp4sim
from fp4sim.harness import DEFAULT_TIMEOUT, KernelWorker, UsageError
from fp4sim.judge.diagnosis.quantizer import (
    quantizer_cause_lines,
    rank_quantizer_hypotheses,
    separate_tied,
    shape_hypotheses,
    written_values,
)
from fp4sim.judge.inputs import generate_tensor
from fp4sim.testing.assertions import QuantizedDiff, compare_quantized, tie_flip_summary
from fp4sim.testing.check_attention import check_device
from fp4sim.testing.check_driver import CheckResult
from fp4sim.testing.check_shards import CaseJudge, Shards, run_check
from fp4sim.testing.quantizer_conventions import reconcile
from fp4sim.testing.strategies import BLOCK_SIZES, QUANTIZER_DISTRIBUTIONS, TensorCase, tensor_cases


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
    timeout: float = DEFAULT_TIMEOUT  # per kernel call (fp4sim.harness.KernelWorker)

    def __post_init__(self) -> None:
        # usage errors before any work (issue 14): exit 2 with one line
        if self.max_rows < 1 or self.max_blocks < 1:
            raise UsageError(
                f"--max-rows and --max-blocks must be >= 1, got {self.max_rows},"
                f" {self.max_blocks}"
            )
        if self.examples < 1:
            raise UsageError("--examples must be >= 1")
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {self.timeout}")
        ts = dict(self.settings).get("tensor_scale")
        if isinstance(ts, int | float) and not (ts > 0 and np.isfinite(ts)):
            raise UsageError(f"--tensor-scale must be a positive finite number, got {ts}")
        if self.device == "cuda" and self.input_type == "numpy":
            raise UsageError("--device cuda needs torch inputs (--input torch or auto)")
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

    return torch.from_numpy(x.copy()).to(device=device, dtype=getattr(torch, dtype))


def _call_quantizer(kernel: Callable[..., Any], x: Any) -> tuple[Any, Any, Any]:
    """In-process call of a plain callable (the worker does the same in its child)."""
    result = kernel(x)
    if not isinstance(result, tuple | list) or len(result) != 3:
        raise UsageError(
            "a quantizer kernel must return (packed uint8, scale bytes, tensor scale or None);"
            f" got {type(result).__name__}"
            + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
        )
    return result[0], result[1], result[2]


def call_quantizer_kernel(
    kernel: Any, x: np.ndarray, dtype: str, input_type: str, device: str
) -> tuple[tuple[Any, Any, Any] | None, str | None, list[str]]:
    """((packed, scale bytes, tensor scale) or None, problem or None, causes): through a
    ``KernelWorker`` (a child process with a time limit) or a plain callable in-process.
    An unusable result is a usage error (``UsageError``)."""
    if hasattr(kernel, "quantize"):
        res = kernel.quantize(x, dtype=dtype, input_type=input_type)
        if res.failure is not None:
            cause = "kernel timed out" if "timed out" in res.failure else "kernel crashed"
            return None, f"kernel {res.failure}", [cause]
        if res.bad_output:
            raise UsageError(res.error)
        if res.error is not None:
            return None, res.error, ["kernel error"]
        out = res.outputs or {}
        return (out["packed"], out["scales"], out["tensor_scale"]), None, []
    try:
        return _call_quantizer(kernel, _to_kernel_input(x, dtype, input_type, device)), None, []
    except UsageError:
        raise
    except Exception as err:
        return None, f"kernel raised {type(err).__name__}: {err}", ["kernel error"]


def probe_quantizer(kernel: Any, config: QuantizerCheckConfig) -> str:
    """Find the input type the kernel accepts (torch first) on a small Gaussian input and
    check the shape of its result; returns 'torch' or 'numpy' or raises UsageError. With
    ``--device cuda`` only torch inputs are tried (a NumPy call would not test the GPU)."""
    x = generate_tensor(np.random.default_rng(0), (2, 2 * BLOCK_SIZES[config.fmt]))
    if config.input_type != "auto":
        kinds: tuple[str, ...] = (config.input_type,)
    else:
        kinds = ("torch",) if config.device != "cpu" else ("torch", "numpy")
    errors = []
    for kind in kinds:
        _, problem, causes = call_quantizer_kernel(kernel, x, "float32", kind, config.device)
        if problem is not None and causes[:1] in (["kernel timed out"], ["kernel crashed"]):
            raise UsageError(f"{config.kernel} {problem.removeprefix('kernel ')} on a"
                             f" (2, {x.shape[1]}) float32 {kind} input")
        if problem is not None:  # the kernel's own error on this input type
            errors.append(f"{kind} input: {problem.removeprefix('kernel raised ')}")
            continue
        return kind
    raise UsageError(
        f"{config.kernel} failed on a (2, {x.shape[1]}) float32 input: " + "; ".join(errors)
    )


def emulate_quantizer(x: np.ndarray, fmt: str, settings: dict[str, Any]) -> Any:
    """The emulator's answer (``fp4sim.QuantizedTensor``) for ``x`` along the last axis."""
    return fp4sim.quantize(x, fmt, axis=-1, **settings)


def diagnose_quantizer(
    x: np.ndarray, expected: Any, diff: QuantizedDiff, fmt: str, settings: dict[str, Any],
    kernel_values: Callable[[np.ndarray], np.ndarray | None] | None = None,
    probe_dtype: str = "float32",
) -> list[str]:
    """Likely causes of a quantizer disagreement: the differential diagnosis of
    ``fp4sim.judge.diagnosis.quantizer`` (one-setting deviations of the emulator, ranked
    by the codes and scale bytes each reproduces), then a count of the code differences.
    ``kernel_values`` (the kernel's dequantized values of another input): explanations that
    tie on ``x`` are re-tested on drawn inputs (values of ``probe_dtype``, the dtype the
    kernel is called with) where they disagree (``separate_tied``)."""
    if diff.what == "shape":
        if diff.actual_scale_count:
            return shape_hypotheses(np.asarray(x), fmt, diff.actual_scale_count, diff.n_blocks)
        return []
    if diff.what == "tensor_scale":
        return ["tensor scale computed differently (amax/(448*6) in float32 expected)"]
    ec, ac = diff.expected_codes, diff.actual_codes
    es, as_ = diff.expected_scale_bits, diff.actual_scale_bits
    assert ec is not None and ac is not None and es is not None and as_ is not None
    scores = rank_quantizer_hypotheses(np.asarray(x), fmt, settings, ac, as_, ec, es)
    exact = [sc for sc in scores if sc.exact]
    confirmed = None
    if kernel_values is not None and len(exact) > 1:
        confirmed = separate_tied(exact, fmt, _probe_inputs(fmt, probe_dtype), kernel_values)
    causes = quantizer_cause_lines(scores, confirmed=confirmed)
    if diff.x_blocks is not None and not (scores and scores[0].exact):
        summary = tie_flip_summary(
            diff.x_blocks.reshape(-1, diff.x_blocks.shape[-1]),
            _BlockView(expected_codes=ec, scales=_scale_values(diff), tensor_scale=_ts(expected)),
            ac,
            axis=-1,
        )
        causes.append(
            f"{summary['differing']} code(s) differ ({summary['differing_at_tie']} at ties,"
            f" {summary['away_from_zero']} larger in magnitude, {summary['sign_flips']} sign"
            f" flips); {int(diff.scale_differs.sum())} scale byte(s) differ"
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
    kernel: Callable[..., Any], case: TensorCase, config: QuantizerCheckConfig, input_type: str,
    retest: bool = False,
) -> tuple[str | None, list[str]]:
    """(diagnosis or None, likely causes) for one input; ``retest``: explanations that tie on
    it are re-tested on more inputs through the kernel (the final case only: it costs calls)."""
    settings = config.settings_dict()
    expected = emulate_quantizer(case.x, config.fmt, settings)
    out, problem, problem_causes = call_quantizer_kernel(
        kernel, case.x, case.dtype, input_type, config.device
    )
    if out is None:
        return problem, problem_causes
    packed, scale_bits, tensor_scale = out
    diff = compare_quantized(case.x, expected, packed, scale_bits, tensor_scale, axis=-1)
    if diff is None:
        return None, []
    # bits that differ with no effect on values are conventions, not bugs (issue 12)
    conv = reconcile(case.x, config.fmt, settings, packed, scale_bits, tensor_scale)
    note = ""
    if conv is not None:
        if conv.agrees:
            return None, [f"convention: {conv.note()}"]
        note = f"compared after conventions: {conv.note()}\n"
        settings = conv.settings
        expected = emulate_quantizer(case.x, config.fmt, settings)
        packed, scale_bits = conv.packed, conv.scale_bits
        diff = compare_quantized(case.x, expected, packed, scale_bits, tensor_scale, axis=-1)
        assert diff is not None  # conv.remaining > 0 differences in values
    rerun = (_kernel_values(kernel, config, case.dtype, input_type, settings)
             if retest else None)
    causes = diagnose_quantizer(case.x, expected, diff, config.fmt, settings, rerun,
                                case.dtype)
    text = note + diff.message + "".join(f"\nlikely cause: {c}" for c in causes)
    return text, causes


def _probe_inputs(fmt: str, dtype: str) -> list[np.ndarray]:
    """Inputs on which tied explanations are re-tested: three (4, 4 blocks) arrays of every
    quantizer distribution (fixed seeds), float32 values of the case's dtype."""
    block = BLOCK_SIZES[fmt]
    return [generate_tensor(np.random.default_rng(seed), (4, 4 * block), name,
                            block_size=block, dtype=dtype)
            for seed in range(3) for name in QUANTIZER_DISTRIBUTIONS]


def _kernel_values(kernel: Any, config: QuantizerCheckConfig, dtype: str, input_type: str,
                   settings: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray | None]:
    """x -> the kernel's dequantized values on the emulator's block grid (None if it fails)."""

    def run(x: np.ndarray) -> np.ndarray | None:
        out, _problem, _causes = call_quantizer_kernel(kernel, x, dtype, input_type,
                                                       config.device)
        if out is None:
            return None
        expected = emulate_quantizer(x, config.fmt, settings)
        diff = compare_quantized(x, expected, *out, axis=-1)
        if diff is None:  # the kernel agrees with the emulator here
            codes = np.asarray(expected.codes, np.uint8).reshape(-1, BLOCK_SIZES[config.fmt])
            return written_values(codes, np.asarray(expected.scale_bits, np.uint8).reshape(-1),
                                  config.fmt)
        if diff.actual_codes is None or diff.actual_scale_bits is None:
            return None
        return written_values(diff.actual_codes, diff.actual_scale_bits, config.fmt)

    return run


def _tensor_case_key(case: TensorCase) -> tuple[Any, ...]:
    return (case.distribution, case.params, case.shape, case.dtype, case.seed)


def run_quantizer_check(
    config: QuantizerCheckConfig, *, log: Callable[[str], None] | None = None,
    progress_every: int = 50, shards: Shards | None = None,
) -> CheckResult | None:
    """Load the kernel in a worker process, then check it over ``config.examples`` drawn
    inputs. The result's ``conventions`` lists value-neutral conventions the kernel follows
    (e.g. "agrees with `--zero-scale-codes reciprocal`"). Under torchrun (``shards``) the
    drawn examples are judged over the ranks (``fp4sim.testing.check_shards``): rank 0
    returns the result, the other ranks None."""
    check_device(config.device)
    with KernelWorker(config.kernel, kind="quantizer", timeout=config.timeout,
                      device=config.device) as worker:
        input_type = probe_quantizer(worker, config)  # every rank probes its own worker
        if shards is not None:
            shards.meet()  # a usage error on any rank stops them all
        if log is not None:
            log(f"{config.kernel} loaded in a worker process ({input_type} input); drawing"
                f" {config.examples} examples")
        causes_of: dict[Any, list[str]] = {}
        conventions: dict[str, int] = {}
        seen = {"hard": False}

        def judge(case: TensorCase) -> tuple[str | None, list[str]]:
            return evaluate_quantizer_case(worker, case, config, input_type)

        def absorb(case: TensorCase, outcome: tuple[str | None, list[str]]) -> str | None:
            text, causes = outcome
            if causes[:1] in (["kernel timed out"], ["kernel crashed"]):
                seen["hard"] = True  # after a time-out or crash, no shrinking (each try
                # could hang)
            for cause in causes:
                if text is None and cause.startswith("convention: "):
                    note = cause.removeprefix("convention: ")
                    conventions[note] = conventions.get(note, 0) + 1
            causes_of[_tensor_case_key(case)] = causes
            return text

        case_judge = CaseJudge(judge, absorb, failed=lambda o: o[0] is not None,
                               stopped=lambda: seen["hard"])
        strategy = tensor_cases(
            fmt=config.fmt,
            distributions=config.distributions,
            dtypes=config.dtypes,
            max_rows=config.max_rows,
            max_blocks=config.max_blocks,
        )
        result = run_check(
            strategy,
            case_judge,
            examples=config.examples,
            seed=config.seed,
            shrink_seconds=config.shrink_seconds,
            case_key=_tensor_case_key,
            log=log,
            progress_every=progress_every,
            shards=shards,
        )
        if result is None:  # a rank other than 0: rank 0 holds the verdict
            return None
        result.causes = (causes_of.get(_tensor_case_key(result.case), [])
                         if result.case is not None else [])
        if result.case is not None and not seen["hard"]:
            # the final case again, its tied explanations re-tested through the kernel
            text, causes = evaluate_quantizer_case(worker, result.case, config, input_type,
                                                   retest=True)
            if text is not None:
                result.diagnosis, result.causes = text, causes
        result.restarts = worker.starts - 1
    result.conventions = [
        f"{note} ({n} case(s))" for note, n in conventions.items()
    ]
    return result
