"""What an external attention kernel declares it supports (``KernelSpec``).

A kernel callable may carry an ``fp4sim_spec`` attribute (a ``KernelSpec`` or a dict of its
fields); command-line flags override it. The suite draws only inputs the spec supports and
lists the rest in the verdict (``KernelSpec.untested``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DTYPES", "LAYOUTS", "KernelSpec", "UsageError", "merge_spec"]

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
LAYOUTS: tuple[str, ...] = ("bhld", "blhd")


class UsageError(Exception):
    """Bad command-line use: unimportable kernel, not callable, wrong signature, bad option
    (exit 2)."""


@dataclass(frozen=True)
class KernelSpec:
    """Capabilities of an attention kernel ``fn(q, k, v, causal, sm_scale) -> o``."""

    gqa: bool = True
    causal: bool = True
    causal_unequal: bool = True
    head_dims: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] = DTYPES
    length_multiple: int = 1
    min_length: int = 1
    layout: str = "bhld"
    backward: bool = True
    modifies_inputs: bool = False
    claims: str | None = None

    def __post_init__(self) -> None:
        # normalise lists (from a dict or JSON) to tuples, then validate once, here
        if self.head_dims is not None:
            object.__setattr__(self, "head_dims", tuple(int(h) for h in self.head_dims))
            if not self.head_dims or any(h < 1 for h in self.head_dims):
                raise UsageError(f"head dims must be positive integers, got {self.head_dims}")
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise UsageError(f"kernel dtypes must be among {', '.join(DTYPES)}, got {bad or '[]'}")
        if int(self.length_multiple) < 1 or int(self.min_length) < 1:
            raise UsageError(
                f"length multiple and min length must be >= 1, got {self.length_multiple},"
                f" {self.min_length}"
            )
        if self.layout not in LAYOUTS:
            raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def supports(
        self, *, heads: int, kv_heads: int, lq: int, lk: int, head_dim: int, dtype: str,
        causal: bool,
    ) -> bool:
        """Whether an input of this shape, dtype and mask is within the declared support."""
        if heads != kv_heads and not self.gqa:
            return False
        if causal and (not self.causal or (lq != lk and not self.causal_unequal)):
            return False
        if self.head_dims is not None and head_dim not in self.head_dims:
            return False
        if dtype not in self.dtypes:
            return False
        m = self.length_multiple
        return lq % m == 0 and lk % m == 0 and min(lq, lk) >= self.min_length

    def untested(self) -> list[str]:
        """Human lines: what a suite restricted to this spec cannot test."""
        out = []
        if not self.gqa:
            out.append("GQA (kernel declares no GQA support)")
        if not self.causal:
            out.append("causal masking (kernel declares no causal support)")
        elif not self.causal_unequal:
            out.append("causal with Lq != Lk (kernel declares equal lengths only)")
        if self.head_dims is not None:
            out.append(f"head dims other than {', '.join(map(str, self.head_dims))}")
        missing = [d for d in DTYPES if d not in self.dtypes]
        if missing:
            out.append(f"{', '.join(missing)} inputs (kernel takes {', '.join(self.dtypes)})")
        if self.length_multiple > 1:
            out.append(f"lengths that are not a multiple of {self.length_multiple}")
        if self.min_length > 1:
            out.append(f"lengths below {self.min_length}")
        if not self.backward:
            out.append("the backward pass (kernel declares forward only)")
        return out

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(KernelSpec)}


def merge_spec(declared: Any, overrides: Mapping[str, Any] | None, where: str) -> KernelSpec:
    """``declared`` (a KernelSpec, a dict of its fields or None) with ``overrides`` applied;
    ``where`` names the source in error messages."""
    fields: dict[str, Any] = {}
    if isinstance(declared, KernelSpec):
        fields = dataclasses.asdict(declared)
    elif isinstance(declared, Mapping):
        unknown = sorted(set(declared) - _FIELDS)
        if unknown:
            raise UsageError(
                f"{where}.fp4sim_spec has unknown field(s) {unknown}; known: {sorted(_FIELDS)}"
            )
        fields = dict(declared)
    elif declared is not None:
        raise UsageError(
            f"{where}.fp4sim_spec must be a fp4sim.harness.KernelSpec or a dict, got"
            f" {type(declared).__name__}"
        )
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise UsageError(f"unknown kernel capability {name!r}; known: {sorted(_FIELDS)}")
        if value is not None:
            fields[name] = value
    try:
        return KernelSpec(**fields)
    except TypeError as err:
        raise UsageError(f"{where}.fp4sim_spec: {err}") from err
