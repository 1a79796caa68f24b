"""Conventions a quantizer may follow that change bits but not values.

Three places where two correct quantizers can write different bits for the same values:

* codes in a block whose scale is zero: every code dequantizes to 0, so a kernel may
  write 0 or whatever ``x * (1/0)`` encodes to (``--zero-scale-codes zeros|reciprocal``);
* the sign of zero: E2M1 code 0x8 (-0) and 0x0 (+0) both decode to 0 (OCP MX v1.0
  section 5.3.3 lists both encodings);
* codes of NaN inputs: E2M1 has no NaN, so the code is a convention (PTX ``cvt`` writes
  +6; ml_dtypes writes a signed zero) (``--nan ptx|ml_dtypes``).

``reconcile`` first looks for the emulator setting under which the kernel's bits agree
exactly ("agrees with `--zero-scale-codes reciprocal`"); failing that, it replaces the
kernel's bits by the emulator's wherever the dequantized values are equal (or the input is
NaN), so that the comparison that follows fails only where values differ.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fp4sim

__all__ = ["CONVENTION_OPTIONS", "Reconciled", "reconcile"]

# setting -> (values, formats it applies to)
CONVENTION_OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "zero_scale_codes": (("zeros", "reciprocal"), ("nvfp4",)),
    "nan": (("ptx", "ml_dtypes"), ("nvfp4", "mxfp4")),
}
_DEFAULTS = {"zero_scale_codes": "zeros", "nan": "ptx"}


def _flag(name: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} {value}"


@dataclass
class Reconciled:
    """The outcome of ``reconcile``.

    ``settings``: the emulator settings to compare with from here on; ``changed``: the
    convention settings in it that differ from the ones asked for; ``exact``: the bits then
    agree exactly; ``packed`` and ``scale_bits``: the kernel's output with value-neutral
    differences replaced by the emulator's bits; ``neutral``: what was replaced.
    """

    settings: dict[str, Any]
    changed: dict[str, Any]
    exact: bool
    packed: np.ndarray | None = None
    scale_bits: np.ndarray | None = None
    neutral: list[str] = field(default_factory=list)
    remaining: int = 0

    @property
    def agrees(self) -> bool:
        """No difference in values (bits equal up to value-neutral conventions)."""
        return self.exact or self.remaining == 0

    def note(self) -> str:
        """One line for the verdict."""
        parts = []
        if self.changed:
            flags = " ".join(f"`{_flag(k, v)}`" for k, v in self.changed.items())
            parts.append(f"agrees with {flags}" if self.exact and not self.neutral
                         else f"closest with {flags}")
        if self.neutral:
            parts.append("differs only in bits with no effect on values: "
                         + ", ".join(self.neutral))
        return "; ".join(parts) if parts else "bits agree"


def _unpack(packed: np.ndarray) -> np.ndarray:
    """Element 2i in the low nibble, 2i+1 in the high nibble (docs/numerics.md, Packing)."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _pack(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _values(codes: np.ndarray, scale_bits: np.ndarray, ts: Any, fmt: str, block: int) -> np.ndarray:
    decode = fp4sim.e4m3_decode if fmt == "nvfp4" else fp4sim.e8m0_decode
    scales = np.asarray(decode(scale_bits), dtype=np.float64)
    scales = np.repeat(scales, block, axis=-1)[..., : codes.shape[-1]]
    factor = 1.0 if ts is None else float(np.asarray(ts, dtype=np.float64).reshape(-1)[0])
    with np.errstate(all="ignore"):
        return np.asarray(fp4sim.e2m1_decode(codes), dtype=np.float64) * scales * factor


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _bits_equal(expected: Any, packed: np.ndarray, scale_bits: np.ndarray, ts: Any) -> bool:
    if not np.array_equal(np.asarray(expected.packed, np.uint8), packed):
        return False
    if not np.array_equal(np.asarray(expected.scale_bits, np.uint8).reshape(-1),
                          scale_bits.reshape(-1)):
        return False
    ets = expected.tensor_scale
    if (ets is None) != (ts is None):
        return False
    if ets is None:
        return True
    a = np.asarray(ets, np.float32).reshape(-1)[:1].view(np.uint32)
    b = np.asarray(ts, np.float32).reshape(-1)[:1].view(np.uint32)
    return bool(np.array_equal(a, b))


def _candidates(fmt: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The asked settings first, then every other combination of convention settings."""
    names = [n for n, (_, fmts) in CONVENTION_OPTIONS.items() if fmt in fmts]
    out = [dict(settings)]
    for values in itertools.product(*(CONVENTION_OPTIONS[n][0] for n in names)):
        alt = {**settings, **dict(zip(names, values, strict=True))}
        if all(alt.get(n, _DEFAULTS[n]) == settings.get(n, _DEFAULTS[n]) for n in names):
            continue
        out.append(alt)
    return out


def reconcile(
    x: np.ndarray, fmt: str, settings: dict[str, Any], packed: Any, scale_bits: Any,
    tensor_scale: Any,
) -> Reconciled | None:
    """Explain a bit difference by conventions (see the module docstring); None when the
    kernel's output does not have the emulator's shapes (nothing to reconcile)."""
    x = np.asarray(x, dtype=np.float32)
    packed = np.asarray(packed)
    scale_bits = np.asarray(scale_bits)
    if packed.dtype.itemsize != 1 or scale_bits.dtype.itemsize != 1:
        return None
    packed, scale_bits = packed.view(np.uint8), scale_bits.view(np.uint8)
    best: Reconciled | None = None
    for alt in _candidates(fmt, settings):
        expected = fp4sim.quantize(x, fmt, axis=-1, **alt)
        exp_scale = np.asarray(expected.scale_bits, np.uint8)
        if packed.shape != np.asarray(expected.packed).shape or scale_bits.size != exp_scale.size:
            return None
        sb = scale_bits.reshape(exp_scale.shape)
        changed = {k: v for k, v in alt.items() if settings.get(k, _DEFAULTS.get(k)) != v}
        if _bits_equal(expected, packed, sb, tensor_scale):
            return Reconciled(alt, changed, exact=True)
        block = x.shape[-1] // exp_scale.shape[-1]
        exp_codes = np.asarray(expected.codes, np.uint8)
        act_codes = _unpack(packed)[..., : exp_codes.shape[-1]]
        ev = _values(exp_codes, exp_scale, expected.tensor_scale, fmt, block)
        av = _values(act_codes, sb, tensor_scale, fmt, block)
        equal_value = _same(ev, av) | np.isnan(x)
        code_diff = act_codes != exp_codes
        nb = exp_scale.shape[-1]
        block_neutral = equal_value.reshape(*equal_value.shape[:-1], nb, block).all(axis=-1)
        fixed_scale = np.where(block_neutral, exp_scale, sb)
        # A code is replaced only where its block keeps a scale byte equal to the emulator's:
        # in a block whose scale still differs, the kernel's codes must stay paired with the
        # kernel's scale, or the diagnosis would see differences the kernel never made.
        same_scale = np.repeat(fixed_scale == exp_scale, block, axis=-1)[..., : x.shape[-1]]
        neutral = equal_value & same_scale
        fixed_codes = np.where(neutral, exp_codes, act_codes)
        lines = []
        zero_scale = np.repeat(exp_scale == 0, block, axis=-1)
        counts = {
            "code(s) in zero-scale blocks": code_diff & neutral & zero_scale,
            "code(s) of NaN inputs": code_diff & np.isnan(x) & ~zero_scale,
            "-0 vs +0 code(s)": code_diff & neutral & ~zero_scale & ~np.isnan(x)
            & ((act_codes & 7) == 0) & ((exp_codes & 7) == 0),
        }
        for label, mask in counts.items():
            if mask.any():
                lines.append(f"{int(mask.sum())} {label}")
        other = int((code_diff & neutral).sum()) - sum(int(m.sum()) for m in counts.values())
        if other > 0:
            lines.append(f"{other} other code(s) of equal value")
        scale_neutral = int(((sb != exp_scale) & block_neutral).sum())
        if scale_neutral:
            lines.append(f"{scale_neutral} scale byte(s) of blocks whose values agree")
        remaining = int((code_diff & ~neutral).sum()) + int(((sb != exp_scale)
                                                             & ~block_neutral).sum())
        ts_differs = not _bits_equal(expected, _pack(fixed_codes), fixed_scale, tensor_scale) \
            and remaining == 0
        candidate = Reconciled(alt, changed, exact=False, packed=_pack(fixed_codes),
                               scale_bits=fixed_scale, neutral=lines,
                               remaining=remaining + int(ts_differs))
        if best is None or candidate.remaining < best.remaining:
            best = candidate
    return best
