"""FP4 diagnostics of the first attention layer on the model's actual activations.

At a few checkpoint steps the training loop captures the first layer's q, k, v, its
output and the gradient dO that reaches that output (the first ``rows`` sequences of the
batch). The reference then replays that attention with the simulation's FP4 recipe:

- the reference's own forward diagnostics (P mass kept in the forward and backward,
  flush counts, ...) as scalars, whatever names the reference gives them;
- ``d_from_fp4_output_error``: ``||rowsum(dO*O) - rowsum(dO*O_hp)|| / ||rowsum(dO*O_hp)||``,
  the relative error of FlashAttention's D = rowsum(dO*O) when O is the FP4 output instead
  of the high-precision O_hp that matches P (not the row sums of a variant's dS: those are
  ``reference.ds_rowsum_stats`` and the report's ``ds_rowsum``);
- ``output_rel_error``: ``||O - O_exact|| / ||O_exact||`` against fp64 attention;
- per FP4 backward variant, the relative L2 error of (dQ, dK, dV) together and the
  cosine similarity of dQ, against the exact gradient of the unquantized attention.

The diagnostics use the FP4 recipe for every run, the bf16 run included (for it they say
what FP4 would do to its activations); they never feed back into training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fp4sim import reference

COMPARED_BACKWARDS: tuple[str, ...] = ("attn_qat", "p_only", "o_only", "drop_in")


class FirstLayerCapture:
    """An attention observer that keeps (detached copies of) q, k, v, o and dO."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.q: Tensor | None = None
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.o: Tensor | None = None
        self.do: Tensor | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> None:
        rows = self.rows
        self.q, self.k, self.v, self.o = (t[:rows].detach().clone() for t in (q, k, v, o))
        if o.requires_grad:
            o.register_hook(self._keep_gradient)

    def _keep_gradient(self, grad: Tensor) -> None:
        self.do = grad[: self.rows].detach().clone()

    @property
    def complete(self) -> bool:
        return all(t is not None for t in (self.q, self.k, self.v, self.do))


def scalar_entries(values: dict[str, Any] | None, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of a (nested) diagnostics dict, keys joined with '.'."""
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalar_entries(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            out[name] = float(value.item())
        elif hasattr(value, "item") and getattr(value, "size", 0) == 1:  # NumPy scalar
            out[name] = float(value.item())
    return out


def relative_l2(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    denominator = torch.linalg.vector_norm(expected).item()
    difference = torch.linalg.vector_norm(actual.double() - expected).item()
    return difference / denominator if denominator > 0 else difference


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).item()
    return (a @ b).item() / denominator if denominator > 0 else float("nan")


def d_from_fp4_output_error(do: Tensor, o: Tensor, o_hp: Tensor) -> float:
    """Relative L2 error of D = rowsum(dO*O) from the FP4 output O against D from O_hp."""
    d_low = (do.double() * o.double()).sum(-1)
    d_high = (do.double() * o_hp.double()).sum(-1)
    return relative_l2(d_low, d_high)


def exact_attention_gradients(q: Tensor, k: Tensor, v: Tensor, do: Tensor,
                              sm_scale: float) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    with torch.enable_grad():
        o = reference.attention_exact(*leaves, causal=True, sm_scale=sm_scale)
        grads = torch.autograd.grad(o, leaves, grad_outputs=do.to(o.dtype))
    return o.detach(), (grads[0], grads[1], grads[2])


def first_layer_diagnostics(capture: FirstLayerCapture, recipe: Any,
                            sm_scale: float) -> dict[str, float]:
    """All diagnostics (see the module doc) of one captured step, as a flat dict."""
    if not capture.complete:
        raise RuntimeError("the first layer's q, k, v and dO were not captured on this step")
    q, k, v, do = (t.float() for t in (capture.q, capture.k, capture.v, capture.do))
    with torch.no_grad():
        forward = reference.fp4_attention_forward(q, k, v, recipe, causal=True,
                                                  sm_scale=sm_scale, diagnostics=True)
    result = scalar_entries(forward.diagnostics)
    o_exact, exact_grads = exact_attention_gradients(q, k, v, do, sm_scale)
    result["output_rel_error"] = relative_l2(forward.o, o_exact)
    result["d_from_fp4_output_error"] = d_from_fp4_output_error(do, forward.o, forward.o_hp)
    exact_flat = torch.cat([g.flatten() for g in exact_grads])
    for backward in COMPARED_BACKWARDS:
        with torch.no_grad():
            grads = reference.attention_backward(backward, forward, q, k, v, do, recipe,
                                                 causal=True, sm_scale=sm_scale)
        flat = torch.cat([g.double().flatten() for g in grads])
        result[f"grad_rel_error.{backward}"] = relative_l2(flat, exact_flat)
        result[f"dq_cosine.{backward}"] = cosine(grads[0], exact_grads[0])
    return result


def checkpoint_steps(total_steps: int, count: int) -> list[int]:
    """``count`` steps spread evenly from the first to the last (0-based, distinct)."""
    if count <= 0:
        return []
    if count == 1 or total_steps == 1:
        return [0] if count == 1 else sorted({0, total_steps - 1})
    return sorted({round(i * (total_steps - 1) / (count - 1)) for i in range(count)})
