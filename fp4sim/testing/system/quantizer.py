"""System properties of a quantizer ``fn(x) -> (packed uint8, scale bytes, tensor scale or
None)`` along the last axis: repeatability, input untouched, stale state, layouts. Outputs
are compared as raw bytes (bit-exact), inputs as raw bytes too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fp4sim.formats import BLOCK_SIZES as BLOCKS  # along the last axis: NVFP4 16, MXFP4 32
from fp4sim.judge.inputs import round_to_dtype
from fp4sim.testing.system.context import clear_rejection, kernel_error
from fp4sim.testing.system.verdict import Verdict


@dataclass
class QuantizerContext:
    kernel: Callable[..., Any]
    fmt: str
    device: str
    seed: int
    input_type: str = "torch"  # 'torch' or 'numpy', as ``check quantizer`` probed it
    dtype: str = "float32"

    def draw(self, salt: int, rows: int = 8) -> np.ndarray:
        rng = np.random.default_rng([self.seed, salt])
        x = rng.standard_t(3, size=(rows, 4 * BLOCKS.get(self.fmt, 32))).astype(np.float32)
        return round_to_dtype(x, self.dtype)

    def wrap(self, a: np.ndarray) -> Any:
        if self.input_type == "numpy":
            return np.array(a, dtype=np.float32)

        return torch.from_numpy(np.array(a)).to(self.device, getattr(torch, self.dtype))

    def call(self, x: Any) -> tuple[bytes, ...]:
        """The kernel's three outputs as raw bytes (None as b'none')."""
        out = self.kernel(x)
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise TypeError("a quantizer must return (packed, scale bytes, tensor scale or None)")
        return tuple(_raw(t) for t in out)


def _raw(t: Any) -> bytes:
    if t is None:
        return b"none"
    if type(t).__module__.startswith("torch"):
        t = t.detach().cpu().contiguous()
        return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes()) + str(
            tuple(t.shape)).encode()
    a = np.ascontiguousarray(np.asarray(t))
    return a.tobytes() + str(a.shape).encode()


def _input_bytes(x: Any) -> bytes:
    return _raw(x)


def q_repeatability(ctx: QuantizerContext) -> Verdict:
    x = ctx.draw(1)
    a, b = ctx.call(ctx.wrap(x)), ctx.call(ctx.wrap(x))
    if a != b:
        which = [n for n, p, r in zip(("packed", "scales", "tensor scale"), a, b, strict=True)
                 if p != r]
        return Verdict("repeatability", "fail", "not repeatable: two calls on the same input"
                       f" give different {', '.join(which)}")
    return Verdict("repeatability", "ok", "bytes identical over 2 calls")


def q_inputs_untouched(ctx: QuantizerContext) -> Verdict:
    x = ctx.wrap(ctx.draw(2))
    before = _input_bytes(x)
    ctx.call(x)
    if _input_bytes(x) != before:
        return Verdict("inputs untouched", "fail", "modified its input x in place")
    return Verdict("inputs untouched", "ok", "x bit-identical after the call")


def q_stale_state(ctx: QuantizerContext) -> Verdict:
    name = "stale state"
    xa, xb = ctx.draw(3, rows=6), ctx.draw(4, rows=6)  # a shape no other property uses
    live = ctx.wrap(xa)
    first = ctx.call(live)
    if ctx.input_type == "numpy":
        live[...] = xb
    else:
        live.copy_(ctx.wrap(xb))
    again = ctx.call(live)
    if again == first:
        return Verdict(name, "fail", "stale: output unchanged after new values (written into"
                       " the same input)")
    fresh = ctx.call(ctx.wrap(xb))
    if fresh != again:
        return Verdict(name, "fail", "stale: output after new values written in place differs"
                       " from a call on a fresh input with the same values")
    return Verdict(name, "ok", "new values (in place and fresh) give new, consistent outputs")


def _layouts(x: np.ndarray, ctx: QuantizerContext) -> dict[str, Any]:
    """Non-contiguous inputs holding x's values."""
    out: dict[str, Any] = {}
    t = ctx.wrap(x)
    if ctx.input_type == "numpy":
        out["transposed view"] = np.ascontiguousarray(x.T).T
        big = np.zeros((x.shape[0], 2 * x.shape[1]), np.float32)
        big[:, ::2] = x
        out["strided slice"] = big[:, ::2]
        flat = np.zeros(x.size + 3, np.float32)
        flat[3:] = x.reshape(-1)
        out["storage offset"] = flat[3:].reshape(x.shape)
        return out

    out["transposed view"] = t.t().contiguous().t()
    big = torch.zeros((t.shape[0], 2 * t.shape[1]), dtype=t.dtype, device=t.device)
    big[:, ::2] = t
    out["strided slice"] = big[:, ::2]
    rows = torch.zeros((2 * t.shape[0], t.shape[1]), dtype=t.dtype, device=t.device)
    rows[::2] = t
    out["every other row"] = rows[::2]
    flat = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
    flat[3:] = t.reshape(-1)
    out["storage offset"] = flat[3:].view(t.shape)
    return out


def q_layouts(ctx: QuantizerContext) -> Verdict:
    name = "layouts"
    x = ctx.draw(5)
    dense = ctx.call(ctx.wrap(x))
    notes = []
    for what, view in _layouts(x, ctx).items():
        try:
            got = ctx.call(view)
        except Exception as err:
            if clear_rejection(err):
                notes.append(f"{what} rejected ({kernel_error(err)[:80]})")
                continue
            return Verdict(name, "fail", f"{what} input crashes without a clear error:"
                           f" {kernel_error(err)}")
        if got != dense:
            return Verdict(name, "fail", f"non-contiguous x ({what}) read with wrong strides")
    return Verdict(name, "ok", "; ".join(notes) or "non-contiguous inputs give the same bytes")


QUANTIZER_PROPERTIES: dict[str, Callable[[QuantizerContext], Verdict]] = {
    "repeatability": q_repeatability,
    "inputs untouched": q_inputs_untouched,
    "stale state": q_stale_state,
    "layouts": q_layouts,
}
