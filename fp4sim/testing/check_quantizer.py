"""`fp4sim check quantizer`: an external quantizer against ``fp4sim.quantize``, bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fp4sim.testing.assertions import QuantizedDiff, compare_quantized, tie_flip_summary
from fp4sim.testing.check_driver import CheckResult, run_hypothesis
from fp4sim.testing.generators import generate_tensor, round_to_dtype
from fp4sim.testing.kernel_loading import UsageError, load_kernel
from fp4sim.testing.strategies import BLOCK_SIZES, QUANTIZER_DISTRIBUTIONS, TensorCase


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
    result = run_hypothesis(
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

