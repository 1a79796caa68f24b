"""Assertions for FP4 kernels: bit-exact quantizer output, attention under the FP4 rule.

* ``compare_quantized`` / ``assert_quantized_equal``: packed bytes, scale bytes and the
  tensor scale must equal the emulator's exactly; a failure names the first differing
  block with its input values and both sides' bytes and codes.
* ``attention_error`` / ``assert_attention_close``: the FP4 tolerance rule (below).
* ``tie_flip_summary``: how many differing codes sit on rounding ties.

The FP4 tolerance rule itself (its formula, floors and allowances) lives in
``fp4sim.judge.rule``, shared with `fp4sim check` and `fp4sim report`; these functions
re-export it and raise on failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fp4sim.formats import E2M1_MAGNITUDES, E2M1_TIES
from fp4sim.judge.arrays import as_numpy, dtype_name
from fp4sim.judge.rule import (
    RULE_FACTORS,
    UNIT_ROUNDOFF,
    AttentionErrorReport,
    attention_error,
)

__all__ = [
    "RULE_FACTORS",
    "UNIT_ROUNDOFF",
    "AttentionErrorReport",
    "QuantizedDiff",
    "as_numpy",
    "assert_attention_close",
    "assert_quantized_equal",
    "attention_error",
    "dtype_name",
    "compare_quantized",
    "tie_flip_summary",
]

# E2M1 magnitudes of codes 0..7 (bit 3 is the sign) and the rounding ties between adjacent
# magnitudes (OCP MX v1.0 section 5.3.3), from fp4sim.formats.
_E2M1_VALUES = np.array(E2M1_MAGNITUDES)
_E2M1_TIES = np.array(E2M1_TIES)


# ---------------------------------------------------------------------------
# quantizer comparison
# ---------------------------------------------------------------------------


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Element 2i is the low nibble, 2i+1 the high nibble (docs/numerics.md, Packing)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _decode_codes(codes: np.ndarray) -> np.ndarray:
    sign = np.where(codes & 0x8, -1.0, 1.0)
    return sign * _E2M1_VALUES[codes & 0x7]


@dataclass
class QuantizedDiff:
    """Where a kernel's quantized output differs from the emulator's (blocks along the
    last axis after moving the quantized axis there)."""

    what: str  # 'shape', 'tensor_scale' or 'blocks'
    message: str
    n_blocks: int = 0
    differing_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scale_differs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    codes_differ: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    x_blocks: np.ndarray | None = None
    expected_codes: np.ndarray | None = None
    actual_codes: np.ndarray | None = None
    expected_scale_bits: np.ndarray | None = None
    actual_scale_bits: np.ndarray | None = None
    expected_packed: np.ndarray | None = None
    actual_packed: np.ndarray | None = None
    expected_scales: np.ndarray | None = None
    actual_scale_count: int = 0  # scale bytes the kernel wrote (set on a shape difference)

    def __str__(self) -> str:
        return self.message


def _blocks_last(a: np.ndarray, axis: int, block: int | None) -> np.ndarray:
    """Move ``axis`` last and reshape to (n_blocks_total, block) (or (n, 1) for scales)."""
    moved = np.moveaxis(a, axis, -1)
    if block is None:
        return moved.reshape(-1)
    return moved.reshape(-1, block)


def _fmt_bytes(b: np.ndarray) -> str:
    return " ".join(f"{int(v):02x}" for v in np.ravel(b))


def _fmt_codes(c: np.ndarray) -> str:
    return " ".join(f"{int(v):x}" for v in np.ravel(c))


def compare_quantized(
    x: Any,
    expected: Any,
    packed: Any,
    scale_bits: Any,
    tensor_scale: Any = None,
    *,
    axis: int | None = None,
    name: str = "kernel",
    max_values: int = 32,
) -> QuantizedDiff | None:
    """Compare a kernel's (packed, scale_bits, tensor_scale) with the emulator's
    ``expected`` (an ``fp4sim.QuantizedTensor``) bit for bit; None when equal.

    ``packed`` and ``scale_bits`` may be NumPy arrays or torch tensors of any 1-byte dtype;
    a scale array with the expected number of bytes but another shape (e.g. flattened) is
    reshaped. The tensor scale is compared by its float32 bits.
    """
    axis = getattr(expected, "axis", -1) if axis is None else axis
    x_np = as_numpy(x).astype(np.float32)
    exp_codes = np.asarray(expected.codes, dtype=np.uint8)
    exp_packed = np.asarray(expected.packed, dtype=np.uint8)
    exp_scale_bits = np.asarray(expected.scale_bits, dtype=np.uint8)
    try:
        act_packed = as_numpy(packed, raw_bytes=True)
        act_scale_bits = as_numpy(scale_bits, raw_bytes=True)
    except TypeError as err:
        return QuantizedDiff("shape", f"{name}: {err}")
    if act_packed.shape != exp_packed.shape:
        return QuantizedDiff(
            "shape",
            f"{name}: packed shape {act_packed.shape} != expected {exp_packed.shape} "
            f"(two FP4 codes per byte along axis {axis}, element 2i in the low nibble)",
        )
    if act_scale_bits.shape != exp_scale_bits.shape:
        if act_scale_bits.size != exp_scale_bits.size:
            return QuantizedDiff(
                "shape",
                f"{name}: scale shape {act_scale_bits.shape} != expected {exp_scale_bits.shape}"
                " (a wrong block size changes the number of scales)",
                n_blocks=int(exp_scale_bits.size),
                actual_scale_count=int(act_scale_bits.size),
            )
        act_scale_bits = act_scale_bits.reshape(exp_scale_bits.shape)

    ndim = x_np.ndim
    ax = axis % ndim
    n = x_np.shape[ax]
    block = exp_codes.shape[ax] // exp_scale_bits.shape[ax]
    exp_codes_full = exp_codes
    act_codes_full = np.moveaxis(_unpack_nibbles(np.moveaxis(act_packed, ax, -1)), -1, ax)
    padded = exp_codes_full.shape[ax]
    if padded != n:  # pad=True: the block axis was zero-padded up to a multiple of the block
        pad_width = [(0, 0)] * ndim
        pad_width[ax] = (0, padded - n)
        x_np = np.pad(x_np, pad_width)
    xb = _blocks_last(x_np, ax, block)
    ec = _blocks_last(exp_codes_full, ax, block)
    ac = _blocks_last(act_codes_full, ax, block)
    es = _blocks_last(exp_scale_bits, ax, None)
    as_ = _blocks_last(act_scale_bits, ax, None)
    half = block // 2
    ep = _blocks_last(exp_packed, ax, half) if block % 2 == 0 else None
    ap = _blocks_last(act_packed, ax, half) if block % 2 == 0 else None
    exp_scales = getattr(expected, "scales", None)
    es_dec = (
        _blocks_last(np.asarray(exp_scales, dtype=np.float64), ax, None)
        if (exp_scales is not None)
        else None
    )

    codes_differ = np.any(ec != ac, axis=-1)
    scale_differs = es != as_
    differing = np.flatnonzero(codes_differ | scale_differs)

    exp_ts = getattr(expected, "tensor_scale", None)
    ts_message = ""
    if exp_ts is None and tensor_scale is not None:
        ts_message = f"{name}: returned a tensor scale {tensor_scale!r} but none is expected"
    elif exp_ts is not None:
        if tensor_scale is None:
            ts_message = f"{name}: returned no tensor scale; expected {float(exp_ts)!r}"
        else:
            e_bits = np.float32(exp_ts).view(np.uint32)
            a_val = np.float32(as_numpy(tensor_scale).reshape(-1)[0])
            if a_val.view(np.uint32) != e_bits:
                ts_message = (
                    f"{name}: tensor scale {float(a_val)!r} (0x{int(a_val.view(np.uint32)):08x})"
                    f" != expected {float(np.float32(exp_ts))!r} (0x{int(e_bits):08x})"
                )
    if differing.size == 0 and not ts_message:
        return None

    lines = []
    if ts_message:
        lines.append(ts_message)
    if differing.size:
        i = int(differing[0])
        lines.append(
            f"{name}: {differing.size} of {len(es)} blocks differ "
            f"({int(scale_differs.sum())} scale bytes, {int(codes_differ.sum())} blocks with"
            f" codes differing; {int((ec != ac).sum())} codes); block size {block}, axis {axis}"
        )
        index = np.unravel_index(i, np.moveaxis(exp_scale_bits, ax, -1).shape)
        lines.append(f"first differing block: #{i} (index {tuple(int(j) for j in index)})")
        vals = xb[i][:max_values]
        lines.append("  input     : " + np.array2string(vals, precision=8, max_line_width=200))
        decoded = f" (decoded {float(es_dec[i])!r})" if es_dec is not None else ""
        lines.append(f"  scale byte: expected {int(es[i]):02x}{decoded}, {name} {int(as_[i]):02x}")
        lines.append(f"  codes     : expected {_fmt_codes(ec[i][:max_values])}")
        lines.append(f"              {name:8s} {_fmt_codes(ac[i][:max_values])}")
        if ep is not None and ap is not None:
            lines.append(f"  packed    : expected {_fmt_bytes(ep[i])}")
            lines.append(f"              {name:8s} {_fmt_bytes(ap[i])}")
    return QuantizedDiff(
        what="blocks" if differing.size else "tensor_scale",
        message="\n".join(lines),
        n_blocks=len(es),
        differing_blocks=differing,
        scale_differs=scale_differs,
        codes_differ=codes_differ,
        x_blocks=xb,
        expected_codes=ec,
        actual_codes=ac,
        expected_scale_bits=es,
        actual_scale_bits=as_,
        expected_packed=ep,
        actual_packed=ap,
        expected_scales=es_dec,
    )


def assert_quantized_equal(
    x: Any,
    expected: Any,
    packed: Any,
    scale_bits: Any,
    tensor_scale: Any = None,
    *,
    axis: int | None = None,
    name: str = "kernel",
) -> None:
    """Raise AssertionError unless packed bytes, scale bytes and tensor scale equal the
    emulator's ``expected`` (``fp4sim.QuantizedTensor``) exactly; the message shows the
    first differing block (input values, both scale bytes, codes and packed bytes)."""
    diff = compare_quantized(x, expected, packed, scale_bits, tensor_scale, axis=axis, name=name)
    if diff is not None:
        raise AssertionError(diff.message)


def tie_flip_summary(
    x: Any, expected: Any, actual_codes: Any, *, axis: int | None = None
) -> dict[str, int]:
    """Classify code differences by whether the scaled input sat on an E2M1 rounding tie.

    ``expected`` is the emulator's QuantizedTensor, ``actual_codes`` the kernel's unpacked
    codes (same shape as ``expected.codes``). The scaled input is x / (block scale *
    tensor scale) in float64; it is "at a tie" when within 2 float32 ulps of one of
    0.25, 0.75, ..., 5 (so a reciprocal-multiply rounding counts). Returns counts:
    elements, differing, at_tie, differing_at_tie, differing_off_tie, away_from_zero
    (differing codes whose magnitude is larger than expected), sign_flips.
    """
    axis = getattr(expected, "axis", -1) if axis is None else axis
    exp_codes = np.asarray(expected.codes, dtype=np.uint8)
    act = as_numpy(actual_codes).astype(np.uint8)
    if act.shape != exp_codes.shape:
        raise ValueError(f"actual codes shape {act.shape} != expected {exp_codes.shape}")
    ax = axis % exp_codes.ndim
    x_np = as_numpy(x).astype(np.float64)
    if x_np.shape[ax] != exp_codes.shape[ax]:
        pad_width = [(0, 0)] * x_np.ndim
        pad_width[ax] = (0, exp_codes.shape[ax] - x_np.shape[ax])
        x_np = np.pad(x_np, pad_width)
    scales = np.asarray(expected.scales, dtype=np.float64)
    block = exp_codes.shape[ax] // scales.shape[ax]
    s = np.repeat(scales, block, axis=ax)
    ts = expected.tensor_scale
    s = s * (1.0 if ts is None else float(ts))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.abs(x_np / s)
    tol = 2.0 * np.spacing(np.float32(_E2M1_TIES)).astype(np.float64)
    at_tie = np.zeros(y.shape, dtype=bool)
    for tie, t in zip(_E2M1_TIES, tol, strict=True):
        at_tie |= np.abs(y - tie) <= t
    differ = act != exp_codes
    return {
        "elements": int(exp_codes.size),
        "differing": int(differ.sum()),
        "at_tie": int(at_tie.sum()),
        "differing_at_tie": int((differ & at_tie).sum()),
        "differing_off_tie": int((differ & ~at_tie).sum()),
        "away_from_zero": int((differ & ((act & 7) > (exp_codes & 7))).sum()),
        "sign_flips": int((differ & ((act & 8) != (exp_codes & 8))).sum()),
    }


def assert_attention_close(
    out: Any,
    ref_lowprec: Any,
    ref_fp64: Any,
    kind: str = "forward",
    *,
    name: str = "O",
    out_dtype: str | None = None,
    factor: float | None = None,
    floor_abs: Any = 0.0,
    row_allowance: Any = None,
    max_allowance_rows: int = 0,
    flip_allowance: Any = None,
    allowance_reason: str = "",
) -> AttentionErrorReport:
    """Raise AssertionError unless ``out`` satisfies the FP4 tolerance rule (module
    docstring) against ``ref_fp64``, with the bound set by ``ref_lowprec``'s error.
    Returns the report when it passes."""
    report = attention_error(
        out,
        ref_lowprec,
        ref_fp64,
        kind,
        name=name,
        out_dtype=out_dtype,
        factor=factor,
        floor_abs=floor_abs,
        row_allowance=row_allowance,
        max_allowance_rows=max_allowance_rows,
        flip_allowance=flip_allowance,
        allowance_reason=allowance_reason,
    )
    if not report.ok:
        raise AssertionError(report.describe())
    return report
