"""The outcome of one system property: a status, a cause line and the numbers behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATUSES", "Verdict", "format_verdicts"]

# ok: the property holds; fail: it is broken (cause names how); untested: the kernel's
# declared support or the device excludes it; info: a finding that is reported, not failed
# (e.g. atomics-order nondeterminism of the backward).
STATUSES: tuple[str, ...] = ("ok", "fail", "untested", "info")


@dataclass
class Verdict:
    """One property's verdict. ``numbers`` holds what decided it (errors, bounds, counts)."""

    name: str
    status: str
    cause: str
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        """Everything but ``fail`` (untested and info do not fail a check)."""
        return self.status != "fail"

    def line(self) -> str:
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items())
        return (
            f"{self.name:<18} {self.status.upper():<8} {self.cause}"
            + (f" [{nums}]" if nums else "")
            + f" ({self.seconds:.2f} s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "cause": self.cause,
            "numbers": {k: _jsonable(v) for k, v in self.numbers.items()},
            "seconds": self.seconds,
        }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)


def format_verdicts(verdicts: list[Verdict], *, title: str = "system properties") -> str:
    """One line per property, then a summary line with the time they took."""
    total = sum(v.seconds for v in verdicts)
    failed = [v.name for v in verdicts if v.status == "fail"]
    lines = [f"{title}:"] + [f"  {v.line()}" for v in verdicts]
    summary = f"{len(verdicts) - len(failed)}/{len(verdicts)} hold"
    if failed:
        summary += f"; FAILED: {', '.join(failed)}"
    lines.append(f"  {summary} ({total:.1f} s)")
    return "\n".join(lines)
