"""The quantization settings: their names and defaults, allowed values and the formats each
applies to, declared once.

``FormatSettings`` declares the rule choices that depend on the block format;
``QuantizeSettings`` (``fp4sim.quantize``'s settings) adds the per-call ones (rounding,
padding), and the reference's ``QuantSpec`` adds the format name: neither repeats a name, a
default or an allowed value. ``RULES`` says what values each setting takes and to which
formats it applies; a setting applies to a block format by its scale format: the NVFP4 rules
(E4M3 scale) or the MX rules (E8M0 scale), docs/numerics.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fp4sim.block_scale import MX_SCALE_RULES, SCALE_AMAX_OPS
from fp4sim.e2m1 import NAN_POLICIES, ROUNDINGS
from fp4sim.formats import E4M3FN, E8M0, BlockFormat, get_block_format

SCALE_OPS = ("reciprocal", "divide")
ZERO_SCALE_CODES = ("zeros", "reciprocal")
KINDS = ("choice", "bool", "tensor_scale")


@dataclass(frozen=True)
class Rule:
    """What one setting takes: ``kind`` 'choice' (one of ``allowed``), 'bool', or
    'tensor_scale' (None, 'amax' or a finite float32 > 0); ``scales`` names the scale formats
    (``ElementFormat.name``) of the block formats it applies to."""

    kind: str
    scales: tuple[str, ...]
    allowed: tuple[str, ...] = ()


_BOTH = (E4M3FN.name, E8M0.name)
_NVFP4_RULES = (E4M3FN.name,)  # docs/numerics.md: the E4M3-scale (NVFP4) rules
_MX_RULES = (E8M0.name,)  # OCP MX v1.0 section 6.3: the E8M0-scale rules

RULES: dict[str, Rule] = {
    "rounding": Rule("choice", _BOTH, ROUNDINGS),
    "nan": Rule("choice", _BOTH, NAN_POLICIES),
    "scale_rule": Rule("choice", _MX_RULES, MX_SCALE_RULES),
    "tensor_scale": Rule("tensor_scale", _NVFP4_RULES),
    "scale_op": Rule("choice", _NVFP4_RULES, SCALE_OPS),
    "scale_amax_op": Rule("choice", _NVFP4_RULES, SCALE_AMAX_OPS),
    "scale_lower_clamp": Rule("bool", _NVFP4_RULES),
    "zero_scale_codes": Rule("choice", _NVFP4_RULES, ZERO_SCALE_CODES),
    "pad": Rule("bool", _BOTH),
}


def check_value(name: str, value: object) -> None:
    """Raise ValueError (TypeError for a non-bool flag) unless ``value`` is allowed."""
    rule = RULES[name]
    if rule.kind == "choice":
        if value not in rule.allowed:
            raise ValueError(f"{name} must be one of {rule.allowed}, got {value!r}")
    elif rule.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    elif value is not None and value != "amax":
        if isinstance(value, (str, bool, np.bool_)) or not np.isscalar(value):
            raise ValueError(f"{name} must be None, 'amax' or a positive float, got {value!r}")
        with np.errstate(over="ignore"):
            value32 = np.float32(value)
        if not (np.isfinite(value32) and value32 > 0):
            raise ValueError(f"{name} must be finite and > 0 in float32, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FormatSettings:
    """The rule choices that depend on the block format (docs/numerics.md); keyword-only.
    Values are checked against ``RULES`` on construction."""

    nan: str = "ptx"
    scale_rule: str = "rceil"
    tensor_scale: str | float | None = None
    scale_op: str = "reciprocal"
    scale_amax_op: str = "divide"
    scale_lower_clamp: bool = False
    zero_scale_codes: str = "zeros"

    def __post_init__(self) -> None:
        for name, value in self.setting_values().items():
            check_value(name, value)

    def setting_values(self) -> dict[str, object]:
        """Every setting of this object by name (fields that are not settings left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in RULES}


@dataclass(frozen=True)
class QuantizeSettings(FormatSettings):
    """The rule choices of one quantization (the keyword names are the API contract):
    ``rounding`` and ``pad`` plus the FormatSettings."""

    rounding: str = "rne"
    pad: bool = False

    def check_format(self, fmt: BlockFormat) -> None:
        """Reject settings that do not apply to ``fmt`` (rather than ignoring them)."""
        if fmt.scale not in (E4M3FN, E8M0):
            raise ValueError(f"unsupported scale format {fmt.scale.name} in {fmt.name}")
        check_applicable(fmt, self.setting_values())


DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(QuantizeSettings)}
if set(DEFAULTS) != set(RULES):  # a declared setting without a rule, or a rule without one
    raise AssertionError(f"settings {sorted(DEFAULTS)} and rules {sorted(RULES)} differ")


def applies(name: str, fmt: str | BlockFormat) -> bool:
    """Whether setting ``name`` applies to block format ``fmt``."""
    block_format = get_block_format(fmt)
    if name == "tensor_scale" and not block_format.supports_tensor_scale:
        return False
    return block_format.scale.name in RULES[name].scales


def settings_of(fmt: str | BlockFormat) -> tuple[str, ...]:
    """Names of the settings that apply to ``fmt``, in declaration order."""
    return tuple(name for name in DEFAULTS if applies(name, fmt))


def defaults_of(fmt: str | BlockFormat) -> dict[str, object]:
    """The default value of every setting that applies to ``fmt``."""
    return {name: DEFAULTS[name] for name in settings_of(fmt)}


def check_applicable(fmt: str | BlockFormat, values: Mapping[str, object]) -> None:
    """Reject settings in ``values`` that differ from their default but do not apply to
    ``fmt`` (rather than ignoring them)."""
    block_format = get_block_format(fmt)
    changed = [name for name, value in values.items()
               if not applies(name, block_format) and value != DEFAULTS[name]]
    if changed:
        reasons = "; ".join(_scope(name, block_format) for name in changed)
        raise ValueError(f"setting(s) {changed} do not apply to {block_format.name}: {reasons}")


def _scope(name: str, fmt: BlockFormat) -> str:
    if name == "tensor_scale":
        return f"{fmt.name} has no tensor scale"
    names = {E4M3FN.name: "E4M3-scaled formats (NVFP4)", E8M0.name: "E8M0-scaled formats (MXFP4)"}
    return f"{name} applies to {' and '.join(names[s] for s in RULES[name].scales)} only"
