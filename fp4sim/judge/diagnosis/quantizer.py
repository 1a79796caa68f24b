"""Differential diagnosis of a quantizer: which setting, changed from the emulator's, makes the
emulator write the kernel's bytes.

Each hypothesis re-quantizes the input with one deviation (fake_quant.QuantKnobs, or the
nibble order of the packing) and is scored by the codes and scale bytes it explains: of the
positions where the kernel differs from the emulator, how many the hypothesis reproduces,
minus the positions where the emulator agreed with the kernel and the hypothesis does not.
A hypothesis that reproduces every byte *explains* the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

import fp4sim
from fp4sim.formats import BLOCK_SIZES as BLOCKS  # NVFP4 16, MXFP4 32
from fp4sim.judge.diagnosis.fake_quant import QuantKnobs, quantize_parts


@dataclass(frozen=True)
class QuantHypothesis:
    name: str
    text: str
    knobs: QuantKnobs
    swap_nibbles: bool = False


@dataclass
class QuantScore:
    hypothesis: QuantHypothesis
    codes_explained: int
    codes_differing: int
    scales_explained: int
    scales_differing: int
    broken: int  # bytes the emulator got right and the hypothesis gets wrong

    @property
    def exact(self) -> bool:
        """Every differing element value reproduced (scale bytes that change no value may
        differ); with no value differing, every differing scale byte."""
        if self.codes_differing == 0:
            return (self.broken == 0 and self.scales_differing > 0
                    and self.scales_explained == self.scales_differing)
        return self.broken == 0 and self.codes_explained == self.codes_differing

    @property
    def net(self) -> int:
        return self.codes_explained + self.scales_explained - self.broken

    def describe(self) -> str:
        return (f"{self.hypothesis.text} [{self.hypothesis.name}: explains"
                f" {self.codes_explained}/{self.codes_differing} differing codes and"
                f" {self.scales_explained}/{self.scales_differing} scale bytes"
                + (f", breaks {self.broken} that agreed" if self.broken else "") + "]")


def base_knobs(fmt: str, settings: dict[str, Any]) -> QuantKnobs | None:
    """QuantKnobs equal to ``fp4sim.quantize(x, fmt, **settings)`` (None: not modelled)."""
    ts = settings.get("tensor_scale")
    if ts is not None and ts != "amax":
        return None
    if settings.get("rounding", "rne") != "rne" or settings.get("pad", False):
        return None
    return QuantKnobs(
        fmt=fmt, block=BLOCKS[fmt], scale_op=settings.get("scale_op", "reciprocal"),
        amax_op=settings.get("scale_amax_op", "divide"),
        lower_clamp=bool(settings.get("scale_lower_clamp", False)), tensor_scale=ts,
        scale_rule=settings.get("scale_rule", "rceil"), nan=settings.get("nan", "ptx"),
        zero_scale_codes=settings.get("zero_scale_codes", "zeros"),
    )


def quantizer_hypotheses(base: QuantKnobs) -> list[QuantHypothesis]:
    """One deviation per hypothesis, generated over the settings' alternatives."""
    nv = base.fmt == "nvfp4"
    rows: list[tuple[str, str, dict[str, Any]]] = [
        ("ties:away", "E2M1 ties rounded away from zero instead of to even",
         {"elem_round": "away"}),
        ("ties:away_add_half", "E2M1 ties rounded away from zero by floor(x + 0.5) in float32"
         " (values just below a tie also round up)", {"elem_round": "add_half"}),
        ("ties:zero", "E2M1 ties rounded toward zero instead of to even", {"elem_round": "zero"}),
        ("ties:trunc", "E2M1 values truncated toward zero (no rounding)", {"elem_round": "trunc"}),
        ("double:bf16", "scaled values rounded to bfloat16 before E2M1 (double rounding, the"
         " sticky bits lost)", {"pre_round": "bfloat16"}),
        ("double:fp16", "scaled values rounded to float16 before E2M1 (double rounding, the"
         " sticky bits lost)", {"pre_round": "float16"}),
        ("nan:other", "NaN inputs coded by the other convention",
         {"nan": "ml_dtypes" if base.nan == "ptx" else "ptx"}),
        ("nan:to_zero", "NaN inputs replaced by 0 before quantizing (the block keeps a finite"
         " scale)", {"nan_input": "zero"}),
        ("nan:ignored_in_amax", "the block amax ignores NaN elements (the block keeps a finite"
         " scale)", {"nan_input": "skip_amax"}),
        ("neg_zero:positive", "negative values that round to 0 written as +0 (code 0x0, not"
         " -0 0x8)", {"neg_zero": False}),
        ("zero_scale:other", "codes of a zero-scale block by the other convention",
         {"zero_scale_codes": "reciprocal" if base.zero_scale_codes == "zeros" else "zeros"}),
    ]
    for blk in (8, 16, 32, 64):
        if blk != base.block:
            rows.append((f"block:{blk}", f"scales computed over {blk}-element blocks instead of"
                         f" {base.block}", {"block": blk}))
    if nv:
        rows += [
            ("scale:e4m3_up", "E4M3 block scale rounded up instead of to nearest",
             {"e4m3_round": "up"}),
            ("scale:e4m3_down", "E4M3 block scale rounded down instead of to nearest",
             {"e4m3_round": "down"}),
            ("scale:div4", "block scale amax/4 instead of amax/6", {"divisor": 4.0}),
            ("scale:div8", "block scale amax/8 instead of amax/6", {"divisor": 8.0}),
            ("scale:op", "data " + ("divided by the scale (x / s) instead of x * (1/s)"
                                    if base.scale_op == "reciprocal" else
                                    "multiplied by 1/s instead of divided by s"),
             {"scale_op": "divide" if base.scale_op == "reciprocal" else "reciprocal"}),
            ("scale:amax_op", "block scale " + ("amax * (1/6) instead of amax / 6"
                                                if base.amax_op == "divide" else
                                                "amax / 6 instead of amax * (1/6)"),
             {"amax_op": "reciprocal" if base.amax_op == "divide" else "divide"}),
            ("scale:lower_clamp", "block scale " + ("clamped below at 2^-6" if not
                                                    base.lower_clamp else "not clamped below"),
             {"lower_clamp": not base.lower_clamp}),
            ("scale:no_upper_clamp", "amax/6 not clamped to 448 before the E4M3 cast",
             {"upper_clamp": False}),
            ("scale:tensor", "tensor scale " + ("missing" if base.tensor_scale else
                                                "applied (amax/(448*6)) though none expected"),
             {"tensor_scale": None if base.tensor_scale else "amax"}),
            ("scale:pow2", "block scale rounded up to a power of two (E8M0-like)",
             {"scale_dtype": "e8m0"}),
            ("scale:amax_bf16", "amax/6 rounded to bfloat16 before E4M3 (double rounding of"
             " the scale)", {"scale_pre_round": "bfloat16"}),
            ("scale:amax_fp16", "amax/6 rounded to float16 before E4M3 (double rounding of"
             " the scale)", {"scale_pre_round": "float16"}),
        ]
    else:
        for rule in ("rceil", "floor", "ceil", "even"):
            if rule != base.scale_rule:
                rows.append((f"scale:mx_{rule}", f"MX scale by the {rule} rule instead of"
                             f" {base.scale_rule}", {"scale_rule": rule}))
    out = [QuantHypothesis(n, t, replace(base, **kw)) for n, t, kw in rows]
    out.append(QuantHypothesis("nibbles:swapped", "nibble order swapped (element 2i belongs in"
                               " the low nibble)", base, swap_nibbles=True))
    return out


def _hyp_bytes(x: np.ndarray, hyp: QuantHypothesis, block: int) -> tuple[Any, Any]:
    """The hypothesis' codes (n_blocks, block) and scale bytes (n_blocks,) on the emulator's
    block grid (a larger block's scale repeated over the smaller blocks it covers)."""
    x2 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
    codes, sbytes, _ = quantize_parts(x2, hyp.knobs)
    cols = x2.shape[-1]
    codes = codes.reshape(codes.shape[0], -1)[:, :cols].numpy()
    if hyp.swap_nibbles:
        swapped = codes.copy()
        swapped[:, 0::2], swapped[:, 1::2] = codes[:, 1::2], codes[:, 0::2]
        codes = swapped
    hb = hyp.knobs.block
    if sbytes is None:
        return None, None
    sb = sbytes.numpy()
    if hb > block:
        sb = np.repeat(sb, hb // block, axis=-1)[:, : -(-cols // block)]
    elif hb < block:
        return None, None  # more scales than the grid holds: compared by shape instead
    pad = (-cols) % block
    codes = np.pad(codes, ((0, 0), (0, pad)))
    return codes.reshape(-1, block), sb.reshape(-1)


def written_values(codes: np.ndarray, scale_bits: np.ndarray, fmt: str) -> np.ndarray:
    """Dequantized values (without a tensor scale) of blocked codes (n_blocks, block) and
    their scale bytes: what a quantizer wrote, compared by value."""
    dec = np.asarray(fp4sim.e2m1_decode(np.asarray(codes, np.uint8)), dtype=np.float64)
    sb = np.asarray(scale_bits, np.uint8)
    scale = fp4sim.e4m3_decode(sb) if fmt == "nvfp4" else fp4sim.e8m0_decode(sb)
    with np.errstate(invalid="ignore", over="ignore"):
        return dec * np.asarray(scale, dtype=np.float64).reshape(-1, 1)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def rank_quantizer_hypotheses(
    x: np.ndarray, fmt: str, settings: dict[str, Any], act_codes: np.ndarray,
    act_scale_bits: np.ndarray, exp_codes: np.ndarray, exp_scale_bits: np.ndarray,
) -> list[QuantScore]:
    """Every hypothesis scored against the kernel's codes/scale bytes on the emulator's
    block grid ((n_blocks, block) and (n_blocks,), blocks in row order)."""
    base = base_knobs(fmt, settings)
    if base is None:
        return []
    block = exp_codes.shape[-1]
    # the code of a NaN input is a convention (quantizer_conventions): not scored
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    x2 = np.pad(x2, ((0, 0), (0, (-x2.shape[-1]) % block))).reshape(-1, block)
    care = ~np.isnan(x2) if x2.shape == act_codes.shape else np.ones(act_codes.shape, bool)
    # bits with no effect on values are conventions (quantizer_conventions, issue 12): an
    # element counts by its dequantized value, code x block scale
    act_v = written_values(act_codes, act_scale_bits, fmt)
    d_codes = ~_same(act_v, written_values(exp_codes, exp_scale_bits, fmt)) & care
    d_scales = act_scale_bits != exp_scale_bits
    out = []
    for hyp in quantizer_hypotheses(base):
        try:
            codes, sbytes = _hyp_bytes(x, hyp, block)
        except (ValueError, RuntimeError):
            continue
        if codes is None or codes.shape != act_codes.shape or sbytes.shape != d_scales.shape:
            continue
        c_ok = _same(written_values(codes, sbytes, fmt), act_v) | ~care
        s_ok = sbytes == act_scale_bits
        out.append(QuantScore(
            hyp,
            codes_explained=int((d_codes & c_ok).sum()), codes_differing=int(d_codes.sum()),
            scales_explained=int((d_scales & s_ok).sum()),
            scales_differing=int(d_scales.sum()),
            broken=int((~d_codes & ~c_ok).sum()),
        ))
    out.sort(key=lambda s: (not s.exact, -s.net))
    return out


def hypothesis_values(x: np.ndarray, fmt: str, hyp: QuantHypothesis) -> np.ndarray | None:
    """The dequantized values (n_blocks, block) a hypothesis writes for ``x`` on the
    emulator's block grid (None: it cannot run on x or writes another grid)."""
    try:
        codes, sbytes = _hyp_bytes(x, hyp, BLOCKS[fmt])
    except (ValueError, RuntimeError):
        return None
    return None if codes is None else written_values(codes, sbytes, fmt)


def separate_tied(
    tied: list[QuantScore], fmt: str, probes: list[np.ndarray],
    kernel_values: Callable[[np.ndarray], np.ndarray | None], wanted: int = 2,
) -> tuple[list[QuantScore], int]:
    """Hypotheses that explain a case equally, re-tested where they disagree: on each probe
    input that makes them write different values, the kernel is run (``kernel_values``: its
    dequantized values on the emulator's grid, None if it failed) and those that do not
    reproduce it are dropped, until one remains after ``wanted`` such inputs or the probes
    run out. Returns (the remaining ones in their order, the inputs that separated them);
    NaN inputs are not compared (their codes are a convention)."""
    left, used = list(tied), 0
    for x in probes:
        if len(left) < 2 and used >= wanted:
            break
        vals = [hypothesis_values(x, fmt, s.hypothesis) for s in left]
        if any(v is None for v in vals):
            continue
        care = ~np.isnan(np.asarray(x, np.float32).reshape(vals[0].shape)) \
            if np.asarray(x).size == vals[0].size else np.ones(vals[0].shape, bool)
        if all((_same(v, vals[0]) | ~care).all() for v in vals[1:]) and len(left) > 1:
            continue
        got = kernel_values(x)
        if got is None or got.shape != vals[0].shape:
            continue
        keep = [s for s, v in zip(left, vals, strict=True) if (_same(v, got) | ~care).all()]
        if not keep:  # no hypothesis survives: keep the tie as it was (reported as such)
            break
        left, used = keep, used + 1
    return left, used


def shape_hypotheses(x: np.ndarray, fmt: str, act_scale_count: int, exp_scale_count: int
                     ) -> list[str]:
    """A differing number of scales: the block size that gives the kernel's count."""
    cols = x.shape[-1]
    rows = max(1, int(np.prod(x.shape[:-1])))
    per_row = act_scale_count / rows
    if per_row and float(per_row).is_integer() and per_row > 0:
        blk = cols / per_row
        if blk.is_integer():
            return [f"scales computed over {int(blk)}-element blocks instead of {BLOCKS[fmt]}"
                    f" [block:{int(blk)}: {act_scale_count} scales for {exp_scale_count}"
                    " blocks]"]
    return []


def quantizer_cause_lines(scores: list[QuantScore], top: int = 3,
                          confirmed: tuple[list[QuantScore], int] | None = None) -> list[str]:
    """The named cause (a hypothesis reproducing every byte) or an honest 'none';
    ``confirmed``: ``separate_tied``'s result for the exact ones (the survivors lead)."""
    exact = [s for s in scores if s.exact]
    if scores and not exact and scores[0].codes_differing == 0 and not scores[0].scales_differing:
        return ["no element value differs: the bits differ only where the value is the same"
                " (a convention such as -0 or the codes of a zero-scale block, not a defect)"]
    if exact:
        used = 0
        if confirmed is not None:
            left, used = confirmed
            exact = left + [s for s in exact if s not in left]
            n_left = len(left)
        else:
            n_left = len(exact)
        head = exact[0].describe()
        if used:
            others = len(exact) - n_left
            head += (f"; confirmed on {used} more input(s) where it and the {others} other"
                     " explanation(s) of this input disagree") if others else ""
        lines = [head]
        if n_left > 1:
            where = "on this input and the re-test inputs" if used else "on this input"
            lines.append(f"equally explained {where} by: " + "; ".join(
                s.hypothesis.text for s in exact[1:min(n_left, 4)]))
        return lines
    lines = [f"no known hypothesis explains it ({len(scores)} tried)"]
    lines += [f"  closest: {s.describe()}" for s in scores[:top] if s.net > 0]
    return lines
