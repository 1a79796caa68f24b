"""Computes every number of the report: scenario × recipe × implementation.

For one scenario the inputs (q, k, v, dO) are regenerated from the seed
(:func:`reports.scenarios.scenario_inputs`); the float64 exact attention and its autograd
gradient are the "exact" references. For each recipe the reference implementation runs
the tiled FP4 forward (``reference.fp4_attention_forward``) and every backward variant
(``reference.attention_backward``); ``ste_autograd`` is the STE ground truth. Kernels
(Triton's ``kernels.attn_qat`` on CUDA, or an external ``MODULE:ATTR`` with signature
``(q, k, v, causal, sm_scale) -> o`` supporting autograd) are compared against the same
exact and STE references and against the recipe's own reference forward and backward.

Every case returns a plain dict (see ``reports.schema``); a crash inside a case is
caught, its traceback stored in the case (``status: "error"``) and the run goes on.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fp4sim.reports import error_statistics, metrics, schema, summary, verdicts
from fp4sim.reports.scenarios import Scenario, scenario_inputs, scenario_seed
from fp4sim.testing.generators import round_to_dtype

VARIANTS: tuple[str, ...] = ("exact", "drop_in", "p_only", "o_only", "attn_qat", "ste_autograd")
"""Backward variants of ``reference.attention_backward`` in display order."""

GROUND_TRUTH = "ste_autograd"

VARIANT_LABELS: dict[str, str] = {
    "exact": "bf16 (exact grad, unquantized)",
    "drop_in": "drop-in QAT",
    "p_only": "principle 2 only (hp P, D from O_hp)",
    "o_only": "principle 1 only (FQ P, D from O)",
    "attn_qat": "Attn-QAT",
    "ste_autograd": "STE autograd (ground truth)",
    "kernel": "kernel autograd",
}

TRITON_RECIPES: tuple[str, ...] = ("attn-qat", "attn-qat-consistent", "bf16")
GRAD_NAMES: tuple[str, ...] = ("dq", "dk", "dv")


@dataclass(frozen=True)
class Implementation:
    """One implementation under test. ``kind``: reference, triton or external.

    An external kernel runs in ``worker`` (a ``fp4sim.harness.KernelWorker``: a child
    process, so a hang or a crash is that case's failure) on inputs cast to ``dtype``."""

    name: str
    kind: str
    function: Callable[..., Any] | None = None
    target: str | None = None
    dtype: str | None = None
    worker: Any = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> Any:
        return None if self.worker is None else self.worker.spec

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "external":
            spec = self.spec
            out |= {
                "target": self.target,
                "dtype": self.dtype,
                "claims": None if spec is None else spec.claims,
                "spec": None if spec is None else spec.to_json(),
                "untested": [] if spec is None else spec.untested(),
            }
        return out


REFERENCE = Implementation("reference", "reference")

# Preference when no --kernel-dtype is given: the scenarios' dtype first (their inputs are
# bfloat16-exact, so a bf16 kernel sees exactly the reference's inputs).
DTYPE_PREFERENCE: tuple[str, ...] = ("bfloat16", "float16", "float32")


def external_implementations(worker: Any, dtypes: Sequence[str] | None) -> list[Implementation]:
    """One Implementation per dtype the kernel runs at: ``dtypes`` (from --kernel-dtype,
    already merged into the worker's spec) or, by default, its preferred declared dtype."""
    declared = tuple(worker.spec.dtypes)
    chosen = list(dtypes) if dtypes else [next(d for d in DTYPE_PREFERENCE if d in declared)]
    base = f"kernel:{worker.target}"
    return [
        Implementation(
            base if len(chosen) == 1 else f"{base}:{dtype}",
            "external",
            target=worker.target,
            dtype=dtype,
            worker=worker,
        )
        for dtype in chosen
    ]


def triton_implementation() -> Implementation:
    """The project's fused Triton kernel (``kernels.attn_qat``), for CUDA devices."""
    from fp4sim import kernels
    def call(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        sm_scale: float | None,
        recipe: str,
    ) -> torch.Tensor:
        # the kernel takes bf16/fp16; the scenario inputs are bf16-exact, so the cast is exact
        bf16 = torch.bfloat16
        return kernels.attn_qat(
            q.to(bf16), k.to(bf16), v.to(bf16), causal=causal, sm_scale=sm_scale, recipe=recipe
        )

    return Implementation("triton", "triton", call)


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat kv heads (B, Hkv, L, d) -> (B, H, L, d) for grouped-query attention."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def causal_mask(lq: int, lk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """True where query i may see key j: j <= i + lk - lq (bottom-right aligned)."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq)


def resolved_sm_scale(scenario: Scenario) -> float:
    return (
        scenario.sm_scale
        if scenario.sm_scale is not None
        else 1.0 / math.sqrt(scenario.spec.head_dim)
    )


def reduce_kv_grad(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum per-query-head gradients back onto their kv heads (inverse of :func:`expand_kv`)."""
    b, h, length, d = grad.shape
    if h == kv_heads:
        return grad
    return grad.reshape(b, kv_heads, h // kv_heads, length, d).sum(dim=2)


# ---------------------------------------------------------------------------------------
# D identity: rowsum(dS) per backward variant, from the formulas of docs/attention-math.md
# ---------------------------------------------------------------------------------------

# variant -> (S from quantized Q^,K^?, dP from V^?, D from O_hp?)
D_IDENTITY_INPUTS: dict[str, tuple[bool, bool, bool]] = {
    "drop_in": (False, False, False),
    "p_only": (True, True, True),
    "o_only": (True, True, False),
    "attn_qat": (True, True, True),
}


def rowsum_ds(
    variant: str,
    fwd: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    sm_scale: float,
) -> torch.Tensor:
    """rowsum(dS) = rowsum(P o (dP - D)) in float64 for a variant of ``D_IDENTITY_INPUTS``
    (or ``exact``): P = exp(S - LSE) with S and LSE as the variant recomputes them, dP = dO V^T
    (V^ for the QAT variants), D = rowsum(dO o O) or rowsum(dO o O_hp)."""
    f64 = torch.float64
    heads = q.shape[1]
    if variant == "exact":
        qs, ks, vs = q.to(f64), expand_kv(k.to(f64), heads), expand_kv(v.to(f64), heads)
        s = sm_scale * qs @ ks.transpose(-1, -2)
        if causal:
            s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), -math.inf)
        p = torch.softmax(s, dim=-1)
        o = p @ vs
        d_row = (do.to(f64) * o).sum(-1, keepdim=True)
    else:
        quant_s, quant_v, d_from_hp = D_IDENTITY_INPUTS[variant]
        qs = (fwd.q_hat if quant_s else q).to(f64)
        ks = expand_kv((fwd.k_hat if quant_s else k).to(f64), heads)
        vs = expand_kv((fwd.v_hat if quant_v else v).to(f64), heads)
        s = sm_scale * qs @ ks.transpose(-1, -2)
        if causal:
            s = s.masked_fill(~causal_mask(s.shape[-2], s.shape[-1], s.device), -math.inf)
        lse = fwd.lse.to(f64).unsqueeze(-1)
        # rows that see no key (lse = -inf) have P = 0
        p = torch.where(torch.isfinite(lse), torch.exp(s - lse.clamp_min(-1e300)), 0.0)
        o_used = fwd.o_hp if d_from_hp else fwd.o
        d_row = (do.to(f64) * o_used.to(f64)).sum(-1, keepdim=True)
    dp = do.to(f64) @ vs.transpose(-1, -2)
    ds = p * (dp - d_row)
    return ds.sum(-1)


def d_identity_summary(residual: torch.Tensor, d_scale: torch.Tensor) -> dict[str, float]:
    """max |rowsum(dS)|, its RMS, and the RMS relative to the RMS of D = rowsum(dO o O_exact)."""
    r = to_numpy(residual)
    d_rms = metrics.rms(to_numpy(d_scale))
    r_rms = metrics.rms(r)
    return {
        "max_abs": float(np.max(np.abs(r))) if r.size else 0.0,
        "rms": r_rms,
        "relative_to_d": r_rms / d_rms if d_rms > 0 else (0.0 if r_rms == 0 else math.inf),
    }


# ---------------------------------------------------------------------------------------
# FP4 diagnostics of Q, K, V (recomputed with the recipe's quantizers) and P (forward)
# ---------------------------------------------------------------------------------------


def quantizer_stats(x: torch.Tensor, spec: Any, axis: int, pad: bool = False) -> dict[str, Any]:
    """Code utilization, scale-byte histogram, saturation and flush counts of one tensor
    quantized with a recipe's ``QuantSpec`` along ``axis``."""
    from fp4sim.reference.quant_torch import quantize_torch_full

    settings = spec.settings()
    if pad:
        settings["pad"] = True
    qt = quantize_torch_full(x, spec.fmt, axis=axis, **settings)
    codes = qt.codes.to("cpu", torch.int64).reshape(-1)
    scale_bits = qt.scale_bits.to("cpu", torch.int64).reshape(-1)
    x_cpu = x.detach().to("cpu", torch.float32)
    zeroed = (codes & 7 == 0) & (x_cpu.reshape(-1) != 0)
    abs_x = x_cpu.abs().reshape(-1).double()
    total_mass = float(abs_x.sum())
    return {
        "format": spec.fmt,
        "axis": axis,
        "elements": int(codes.numel()),
        "blocks": int(scale_bits.numel()),
        "code_counts": [int(c) for c in torch.bincount(codes, minlength=16)[:16]],
        "scale_byte_counts": [int(c) for c in torch.bincount(scale_bits, minlength=256)[:256]],
        "saturated_elements": int(qt.saturated.sum()),
        "flushed_blocks": int(qt.flushed.sum()),
        "zeroed_nonzero_elements": int(zeroed.sum()),
        "zeroed_mass_fraction": float(abs_x[zeroed].sum()) / total_mass if total_mass > 0 else 0.0,
        "tensor_scale": None if qt.tensor_scale is None else float(qt.tensor_scale),
    }


def _scalar_items(diag: dict[str, Any] | None) -> dict[str, Any]:
    """The numeric scalars (and short numeric lists) of the reference's diagnostics dict."""
    out: dict[str, Any] = {}
    for key, value in (diag or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.numel() == 1:
                out[key] = float(value)
            elif value.numel() <= 256 and value.dim() == 1:
                out[key] = [float(x) for x in value]
        elif isinstance(value, bool | int | float | str) or value is None:
            out[key] = value
        elif (
            isinstance(value, list | tuple)
            and len(value) <= 256
            and all(isinstance(x, int | float) for x in value)
        ):
            out[key] = list(value)
        elif isinstance(value, dict):
            nested = _scalar_items(value)
            if nested:
                out[key] = nested
    return out


P_DIAGNOSTIC_KEYS: dict[str, tuple[str, ...]] = {
    # report name -> name in the reference's diagnostics dict (reference/diagnostics.py)
    "mass_kept_forward": ("p_mass_kept_fwd",),
    "mass_kept_backward": ("p_mass_kept_bwd",),
    "mass_kept_forward_row_min": ("p_mass_kept_fwd_row_min",),
    "code_mismatch_rate": ("p_code_mismatch_rate",),
    "nonzero_blocks_forward": ("p_fwd_nonzero_blocks",),
    "flushed_blocks_forward": ("p_fwd_flushed_blocks",),
    "flushed_block_fraction_forward": ("p_fwd_flushed_block_fraction",),
    "saturated_forward": ("p_fwd_saturated",),
    "nonzero_blocks_backward": ("p_bwd_nonzero_blocks",),
    "flushed_blocks_backward": ("p_bwd_flushed_blocks",),
    "flushed_block_fraction_backward": ("p_bwd_flushed_block_fraction",),
    "saturated_backward": ("p_bwd_saturated",),
}


def p_diagnostics(fwd: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """P statistics: code counts of the forward's P codes and the P mass / mismatch numbers
    the reference reports (None where it reports none)."""
    out: dict[str, Any] = {}
    for name, candidates in P_DIAGNOSTIC_KEYS.items():
        out[name] = next((raw[c] for c in candidates if c in raw), None)
    codes = getattr(fwd, "p_codes", None)
    if isinstance(raw.get("p_code_histogram"), list):  # visible entries only
        out["code_counts"] = [int(c) for c in raw["p_code_histogram"]]
    elif codes is not None:
        flat = codes.detach().to("cpu", torch.int64).reshape(-1)
        out["code_counts"] = [int(c) for c in torch.bincount(flat & 15, minlength=16)[:16]]
    else:
        out["code_counts"] = None
    return out


def diagnostics_for(
    fwd: Any, recipe: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, Any]:
    raw = _scalar_items(getattr(fwd, "diagnostics", None))
    tensors: dict[str, Any] = {}
    for name, x, spec, axis in (
        ("q", q, recipe.q, -1),
        ("k", k, recipe.k, -1),
        ("v", v, recipe.v, -1 if recipe.v_axis == "head_dim" else -2),
    ):
        tensors[name] = (
            None
            if spec is None
            else quantizer_stats(
                x, spec, axis, pad=(name == "v" and axis == -2 and recipe.v_pad_keys)
            )
        )
    return {"tensors": tensors, "p": p_diagnostics(fwd, raw), "reference_diagnostics": raw}


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------


@dataclass
class ScenarioTensors:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    o_exact: torch.Tensor
    grads_exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    d_exact: torch.Tensor


def prepare_scenario(scenario: Scenario, seed: int, device: str) -> ScenarioTensors:
    """Inputs on ``device`` (float32) and the float64 exact output and gradients."""
    from fp4sim import reference
    q, k, v, do = (torch.from_numpy(a).to(device) for a in scenario_inputs(scenario, seed))
    q64, k64, v64 = (t.to(torch.float64).requires_grad_(True) for t in (q, k, v))
    o64 = reference.attention_exact(
        q64, k64, v64, causal=scenario.causal, sm_scale=resolved_sm_scale(scenario)
    )
    dq, dk, dv = torch.autograd.grad(o64, (q64, k64, v64), do.to(torch.float64))
    d_exact = (do.to(torch.float64) * o64.detach()).sum(-1)
    return ScenarioTensors(q, k, v, do, o64.detach(), (dq, dk, dv), d_exact)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else to_numpy(x)


def _compare(a: torch.Tensor | np.ndarray, r: torch.Tensor | np.ndarray) -> dict[str, Any]:
    return metrics.compare(_as_numpy(a), _as_numpy(r))


def _grad_block(
    grads: Sequence[torch.Tensor | np.ndarray], refs: dict[str, Sequence[torch.Tensor]]
) -> dict[str, Any]:
    block: dict[str, Any] = {}
    for i, name in enumerate(GRAD_NAMES):
        block[name] = {ref_name: _compare(grads[i], ref[i]) for ref_name, ref in refs.items()}
    return block


def reference_case(
    scenario: Scenario, recipe_name: str, tensors: ScenarioTensors, variants: Sequence[str]
) -> tuple[dict[str, Any], Any, dict[str, tuple[torch.Tensor, ...]]]:
    """The reference implementation of one recipe on one scenario.

    Returns the case dict, the ForwardResult and the gradients per variant (for kernels)."""
    from fp4sim import reference
    recipe = reference.get_recipe(recipe_name)
    sm_scale = resolved_sm_scale(scenario)
    t = tensors
    fwd = reference.fp4_attention_forward(
        t.q,
        t.k,
        t.v,
        recipe,
        causal=scenario.causal,
        sm_scale=sm_scale,
        mode="tiled",
        accum_dtype=torch.float32,
        diagnostics=True,
    )
    forward = {
        "o_vs_exact": _compare(fwd.o, t.o_exact),
        "o_hp_vs_exact": _compare(fwd.o_hp, t.o_exact),
        "o_vs_recipe_reference": None,
    }
    grads: dict[str, tuple[torch.Tensor, ...]] = {}
    errors: dict[str, str] = {}
    ordered = [GROUND_TRUTH, *[v for v in variants if v != GROUND_TRUTH]]
    for variant in ordered:
        try:
            grads[variant] = tuple(
                g.detach()
                for g in reference.attention_backward(
                    variant,
                    fwd,
                    t.q,
                    t.k,
                    t.v,
                    t.do,
                    recipe,
                    causal=scenario.causal,
                    sm_scale=sm_scale,
                )
            )
        except Exception:  # noqa: BLE001 - recorded in the report
            errors[variant] = traceback.format_exc()
    gradients: dict[str, Any] = {}
    ste = grads.get(GROUND_TRUTH)
    for variant in variants:
        if variant in errors:
            gradients[variant] = {"error": errors[variant]}
            continue
        refs: dict[str, Sequence[torch.Tensor]] = {"vs_exact": t.grads_exact}
        if ste is not None:
            refs["vs_ste"] = ste
        gradients[variant] = {"error": None, **_grad_block(grads[variant], refs)}
    d_identity: dict[str, Any] = {}
    for variant in variants:
        if variant in D_IDENTITY_INPUTS or variant == "exact":
            residual = rowsum_ds(variant, fwd, t.q, t.k, t.v, t.do, scenario.causal, sm_scale)
            d_identity[variant] = d_identity_summary(residual, t.d_exact)
    case = {
        "forward": forward,
        "gradients": gradients,
        "d_identity": d_identity,
        "diagnostics": diagnostics_for(fwd, recipe, t.q, t.k, t.v),
        "recipe_backward": recipe.backward,
    }
    if errors:
        case["status"] = "error"
        case["error"] = "\n".join(f"[{v}]\n{tb}" for v, tb in errors.items())
    return case, fwd, grads


def kernel_case(
    scenario: Scenario,
    recipe_name: str,
    implementation: Implementation,
    tensors: ScenarioTensors,
    ref_fwd: Any,
    ref_grads: dict[str, tuple[torch.Tensor, ...]],
    recipe_backward: str,
) -> dict[str, Any]:
    """A kernel (triton or external) against exact, STE and the recipe's own reference."""
    t = tensors
    sm_scale = resolved_sm_scale(scenario)
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (t.q, t.k, t.v))
    assert implementation.function is not None
    if implementation.kind == "triton":
        o = implementation.function(q, k, v, scenario.causal, sm_scale, recipe_name)
    else:
        o = implementation.function(q, k, v, scenario.causal, sm_scale)
    if not isinstance(o, torch.Tensor) or o.shape != t.o_exact.shape:
        raise TypeError(
            f"kernel returned {type(o).__name__} of shape {getattr(o, 'shape', None)}; "
            f"expected a tensor of shape {tuple(t.o_exact.shape)}"
        )
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), t.do.to(o.dtype))
    refs: dict[str, Sequence[torch.Tensor]] = {"vs_exact": t.grads_exact}
    if GROUND_TRUTH in ref_grads:
        refs["vs_ste"] = ref_grads[GROUND_TRUTH]
    if recipe_backward in ref_grads:
        refs["vs_recipe_variant"] = ref_grads[recipe_backward]
    return {
        "forward": {
            "o_vs_exact": _compare(o, t.o_exact),
            "o_hp_vs_exact": None,
            "o_vs_recipe_reference": _compare(o, ref_fwd.o),
        },
        "gradients": {"kernel": {"error": None, **_grad_block((dq, dk, dv), refs)}},
        "d_identity": {},
        "diagnostics": None,
        "recipe_backward": recipe_backward,
    }



# ---------------------------------------------------------------------------------------
# external kernels: one call per case in the worker, judged by the FP4 tolerance rule of
# `fp4sim check attention` (fp4sim.testing.check_attention, imported where used: it pulls
# in Hypothesis, which a report without --kernel does not need)
# ---------------------------------------------------------------------------------------


class _RecordingKernel:
    """The worker as ``evaluate_attention_case`` sees it, keeping the call's result, so the
    kernel runs once per case for both the tolerance rule and the report's metrics."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.spec = worker.spec
        self.last: Any = None

    def attention(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self.worker.attention(*args, **kwargs)
        return self.last


def unsupported_reason(spec: Any, scenario: Scenario, dtype: str) -> str | None:
    """Why a scenario is outside what the kernel declares it supports (None if inside)."""
    s = scenario.spec
    if spec.supports(
        heads=s.heads,
        kv_heads=s.kv_heads,
        lq=s.lq,
        lk=s.lk,
        head_dim=s.head_dim,
        dtype=dtype,
        causal=scenario.causal,
    ):
        return None
    reasons = []
    if s.heads != s.kv_heads and not spec.gqa:
        reasons.append("grouped-query inputs (no GQA support declared)")
    if scenario.causal and not spec.causal:
        reasons.append("a causal mask (no causal support declared)")
    elif scenario.causal and s.lq != s.lk and not spec.causal_unequal:
        reasons.append("causal with Lq != Lk (equal lengths only declared)")
    if spec.head_dims is not None and s.head_dim not in spec.head_dims:
        reasons.append(f"head dim {s.head_dim} (declared {', '.join(map(str, spec.head_dims))})")
    m = spec.length_multiple
    if s.lq % m or s.lk % m:
        reasons.append(f"Lq {s.lq}, Lk {s.lk} not multiples of {m}")
    if min(s.lq, s.lk) < spec.min_length:
        reasons.append(f"lengths below {spec.min_length}")
    return "outside the kernel's declared support: " + ("; ".join(reasons) or "unsupported")


def judge_external(
    impl: Implementation,
    scenario: Scenario,
    recipe: str,
    arrays: Sequence[np.ndarray],
    seed: int,
    device: str,
    diagnose: bool,
) -> tuple[Any, Any]:
    """Run the kernel on (q, k, v, dO) cast to its dtype and apply the tolerance rule
    (``evaluate_attention_case`` of `fp4sim check`); (AttentionOutcome, KernelCallResult)."""
    from fp4sim.testing.check_attention import AttentionCheckConfig, evaluate_attention_case
    from fp4sim.testing.strategies import AttentionCase

    assert impl.dtype is not None and impl.target is not None
    q, k, v, do = (round_to_dtype(np.asarray(a, np.float32), impl.dtype) for a in arrays)
    case = AttentionCase(
        scenario.spec.replace(dtype=impl.dtype),
        seed,
        scenario.causal,
        resolved_sm_scale(scenario),
        q,
        k,
        v,
        do=do,
        source=scenario.source,
    )
    config = AttentionCheckConfig(
        kernel=impl.target,
        recipe=recipe,
        device=device,
        dtypes=(impl.dtype,),
        backward=bool(impl.spec.backward),
        timeout=impl.worker.timeout,
    )
    recorder = _RecordingKernel(impl.worker)
    outcome = evaluate_attention_case(recorder, case, config, diagnose=diagnose)
    return outcome, recorder.last


def rule_block(outcome: Any, dtype: str) -> dict[str, Any]:
    """The FP4 tolerance rule's result per tensor (O, dQ, dK, dV) of one kernel case."""
    tensors = []
    for r in outcome.reports:
        if r.bound > 0:
            ratio = r.worst_error / r.bound
        else:
            ratio = 0.0 if r.worst_error == 0 else math.inf
        tensors.append(
            {
                "name": r.name,
                "ok": bool(r.ok),
                "max_error": r.max_error,
                "worst_error": r.worst_error,
                "bound": r.bound,
                "ratio": ratio,
                "worst_index": list(r.worst_index),
                "rows_over": r.n_rows_over,
                "rows": r.n_rows,
                "relative_l2": r.relative_l2,
                "nonfinite": r.nonfinite,
                "text": r.describe(),
            }
        )
    worst = max(tensors, key=lambda t: t["ratio"]) if tensors else None
    return {
        "agrees": bool(outcome.ok),
        "dtype": dtype,
        "nonfinite": sum(t["nonfinite"] for t in tensors),
        "tensors": tensors,
        "worst_tensor": None if worst is None else worst["name"],
        "worst_ratio": None if worst is None else worst["ratio"],
    }


ErrorSamples = dict[tuple[str, str], dict[str, dict[str, list[float]]]]
"""(implementation, recipe) -> {"kernel" | "reference": {tensor: per-row relative errors}}."""


def external_case(
    scenario: Scenario,
    recipe_name: str,
    implementation: Implementation,
    tensors: ScenarioTensors,
    ref_fwd: Any,
    ref_grads: dict[str, tuple[torch.Tensor, ...]],
    recipe_backward: str,
    *,
    seed: int,
    device: str,
    samples: ErrorSamples,
) -> dict[str, Any]:
    """An external kernel in its worker: the tolerance rule against the recipe, the
    metrics against exact, STE and the recipe's reference, and the error samples of the
    statistical verdict. A time-out, a crash or an exception is the case's error."""
    t = tensors
    arrays = [to_numpy(x).astype(np.float32) for x in (t.q, t.k, t.v, t.do)]
    outcome, result = judge_external(
        implementation, scenario, recipe_name, arrays, seed, device, diagnose=False
    )
    if outcome.error is not None:
        text = outcome.error
        if result is not None and result.traceback:
            text += "\n" + result.traceback
        failure = None if result is None else result.failure
        return {"status": "error", "error": text, "failure": failure}
    out = result.outputs
    backward = bool(implementation.spec.backward)
    refs: dict[str, Sequence[torch.Tensor]] = {"vs_exact": t.grads_exact}
    if GROUND_TRUTH in ref_grads:
        refs["vs_ste"] = ref_grads[GROUND_TRUTH]
    if recipe_backward in ref_grads:
        refs["vs_recipe_variant"] = ref_grads[recipe_backward]
    grads = tuple(out[n] for n in ("dQ", "dK", "dV")) if backward else ()
    gradients = (
        {"kernel": {"error": None, **_grad_block(grads, refs)}}
        if backward
        else {"kernel": {"error": "not run: the kernel declares no backward (forward only)"}}
    )
    # error samples: the kernel, and the recipe's reference rounded to the kernel's dtype
    dtype = getattr(torch, implementation.dtype or "float32")
    entry = samples.setdefault((implementation.name, recipe_name), {"kernel": {}, "reference": {}})
    pairs: list[tuple[str, np.ndarray, torch.Tensor, torch.Tensor]] = [
        ("O", out["O"], t.o_exact, ref_fwd.o)
    ]
    if backward and recipe_backward in ref_grads:
        pairs += list(
            zip(("dQ", "dK", "dV"), grads, t.grads_exact, ref_grads[recipe_backward], strict=True)
        )
    for name, kernel_out, exact, ref in pairs:
        exact_np = to_numpy(exact)
        ref_np = to_numpy(ref.detach().to("cpu").to(dtype))
        entry["kernel"].setdefault(name, []).extend(
            metrics.row_relative_error(kernel_out, exact_np).tolist()
        )
        entry["reference"].setdefault(name, []).extend(
            metrics.row_relative_error(ref_np, exact_np).tolist()
        )
    return {
        "forward": {
            "o_vs_exact": _compare(out["O"], t.o_exact),
            "o_hp_vs_exact": None,
            "o_vs_recipe_reference": _compare(out["O"], ref_fwd.o),
        },
        "gradients": gradients,
        "d_identity": {},
        "diagnostics": None,
        "recipe_backward": recipe_backward,
        "rule": rule_block(outcome, implementation.dtype or ""),
    }


def diagnose_external(
    implementation: Implementation, scenario: Scenario, recipe: str, seed: int, device: str
) -> list[str]:
    """Likely causes of a disagreement (`fp4sim check`'s diagnosis: reference emulations of
    known bugs), for one case; runs the kernel once more."""
    outcome, _ = judge_external(
        implementation, scenario, recipe, scenario_inputs(scenario, seed), seed, device, True
    )
    if outcome.error is not None:
        return [outcome.error]
    return list(outcome.causes)


def run_scenario(
    scenario: Scenario,
    recipes: Sequence[str],
    implementations: Sequence[Implementation],
    *,
    seed: int,
    device: str,
    variants: Sequence[str] = VARIANTS,
    progress: Callable[[str], None] = log,
    counter: list[int] | None = None,
    total: int | None = None,
    samples: ErrorSamples | None = None,
) -> list[dict[str, Any]]:
    """Every case of one scenario (one dict per recipe × implementation); external kernels'
    error samples are added to ``samples``."""
    cases: list[dict[str, Any]] = []
    counter = counter if counter is not None else [0]
    samples = samples if samples is not None else {}

    def base(recipe: str, impl: Implementation) -> dict[str, Any]:
        return {
            "scenario": scenario.name,
            "recipe": recipe,
            "implementation": impl.name,
            "implementation_kind": impl.kind,
            "status": "ok",
            "error": None,
            "seconds": 0.0,
        }

    try:
        tensors = prepare_scenario(scenario, seed, device)
    except Exception:  # noqa: BLE001
        tb = traceback.format_exc()
        for recipe in recipes:
            for impl in implementations:
                counter[0] += 1
                cases.append({**base(recipe, impl), "status": "error", "error": tb})
        progress(f"  scenario {scenario.name}: inputs failed\n{tb}")
        return cases

    for recipe in recipes:
        ref_fwd, ref_grads, recipe_backward = None, {}, "attn_qat"
        for impl in implementations:
            counter[0] += 1
            label = f"[{counter[0]}/{total or '?'}] {scenario.name} x {recipe} x {impl.name}"
            case = base(recipe, impl)
            start = time.perf_counter()
            try:
                if impl.kind == "reference":
                    body, ref_fwd, ref_grads = reference_case(scenario, recipe, tensors, variants)
                    recipe_backward = body["recipe_backward"]
                elif impl.kind == "triton" and recipe not in TRITON_RECIPES:
                    body = {
                        "status": "skipped",
                        "error": f"kernels.attn_qat supports recipes {', '.join(TRITON_RECIPES)}",
                    }
                elif impl.kind == "external" and (
                    reason := unsupported_reason(impl.spec, scenario, impl.dtype or "")
                ):
                    body = {"status": "skipped", "error": reason}
                else:
                    if ref_fwd is None:
                        raise RuntimeError(
                            "the reference case of this recipe failed; nothing to compare to"
                        )
                    if impl.kind == "external":
                        body = external_case(
                            scenario,
                            recipe,
                            impl,
                            tensors,
                            ref_fwd,
                            ref_grads,
                            recipe_backward,
                            seed=seed,
                            device=device,
                            samples=samples,
                        )
                    else:
                        body = kernel_case(
                            scenario, recipe, impl, tensors, ref_fwd, ref_grads, recipe_backward
                        )
                case.update(body)
            except Exception:  # noqa: BLE001 - recorded in the report
                case["status"] = "error"
                case["error"] = traceback.format_exc()
            case["seconds"] = round(time.perf_counter() - start, 3)
            status = case["status"]
            rule = case.get("rule")
            if rule is not None:
                status += " (agrees)" if rule["agrees"] else " (disagrees)"
            progress(f"{label}: {status} ({case['seconds']:.1f} s)")
            if case["status"] == "error":
                progress("    " + summary.problem_line(case["error"]))
            cases.append(case)
    return cases


def case_seed_info(scenario: Scenario, seed: int) -> dict[str, Any]:
    return {"seed": seed, "generator_entropy": scenario_seed(seed, scenario.name)}


# ---------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------


def collect_versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    import matplotlib

    def dist_version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "matplotlib": matplotlib.__version__,
        "fp4sim": dist_version("fp4sim"),
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class ReportConfig:
    scenarios: tuple[Scenario, ...]
    recipes: tuple[str, ...]
    implementations: tuple[Implementation, ...]
    seed: int = 0
    device: str = "cpu"
    preset: str = "quick"
    variants: tuple[str, ...] = VARIANTS
    thresholds: tuple[Any, ...] = ()


def judge_kernels(
    config: ReportConfig,
    cases: Sequence[dict[str, Any]],
    samples: ErrorSamples,
    progress: Callable[[str], None] = log,
) -> list[dict[str, Any]]:
    """The verdict of every external kernel: tolerance-rule tally, a diagnosis of its worst
    disagreeing case, and the statistical comparison of its errors with the recipe's."""
    externals = {i.name: i for i in config.implementations if i.kind == "external"}
    scenarios = {s.name: s for s in config.scenarios}
    out = verdicts.kernel_verdicts(
        cases, [i.to_json() for i in externals.values()], config.recipes
    )
    for verdict in out:
        impl = externals[verdict["implementation"]]
        worst = verdict["worst"]
        if not verdict["agrees"] and worst is not None and worst["status"] == "ok":
            progress(f"fp4sim report: diagnosing {impl.name} on {worst['scenario']}")
            verdict["causes"] = diagnose_external(
                impl, scenarios[worst["scenario"]], verdict["recipe"], config.seed, config.device
            )
        pair = samples.get((impl.name, verdict["recipe"]))
        if pair is not None:
            verdict["statistics"] = error_statistics.distribution_verdict(
                pair["kernel"], pair["reference"]
            )
        verdicts.finish(verdict)
    return out


def run_report(config: ReportConfig, progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Run every case and assemble the report dict (``reports.schema`` layout)."""

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    # The tensors are small: one thread is as fast on an idle CPU and many times faster on
    # a loaded one (OpenMP workers spin-waiting for preempted peers).
    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(1)
    try:
        return _run_report(config, progress, start)
    finally:
        torch.set_num_threads(threads)


def _run_report(
    config: ReportConfig, progress: Callable[[str], None], start: float
) -> dict[str, Any]:
    from datetime import datetime, timezone

    total = len(config.scenarios) * len(config.recipes) * len(config.implementations)
    counter = [0]
    cases: list[dict[str, Any]] = []
    samples: ErrorSamples = {}
    scenario_seconds: dict[str, float] = {}
    for scenario in config.scenarios:
        t0 = time.perf_counter()
        cases += run_scenario(
            scenario,
            config.recipes,
            config.implementations,
            seed=config.seed,
            device=config.device,
            variants=config.variants,
            progress=progress,
            counter=counter,
            total=total,
            samples=samples,
        )
        scenario_seconds[scenario.name] = round(time.perf_counter() - t0, 3)
    kernel_verdicts = judge_kernels(config, cases, samples, progress)
    scenarios = {
        s.name: {**s.to_json(), "seed": case_seed_info(s, config.seed)} for s in config.scenarios
    }
    thresholds = [summary.evaluate_threshold(t, cases) for t in config.thresholds]
    errors = [
        {
            "scenario": c["scenario"],
            "recipe": c["recipe"],
            "implementation": c["implementation"],
            "error": c["error"],
        }
        for c in cases
        if c["status"] == "error"
    ]
    failed = (
        errors
        or any(not t["passed"] for t in thresholds)
        or any(not v["passed"] for v in kernel_verdicts)
    )
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "tool": "fp4sim report",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "exit_code": 1 if failed else 0,
        "versions": collect_versions(),
        "settings": {
            "seed": config.seed,
            "device": config.device,
            "preset": config.preset,
            "recipes": list(config.recipes),
            "scenarios": [s.name for s in config.scenarios],
            "implementations": [i.name for i in config.implementations],
            "kernels": [i.to_json() for i in config.implementations if i.kind == "external"],
            "variants": list(config.variants),
            "ground_truth": GROUND_TRUTH,
            "fail_on": [t.text for t in config.thresholds],
            "element_guard_eps": metrics.ELEMENT_GUARD_EPS,
            "log10_edges": list(metrics.LOG10_EDGES),
            "quantiles": list(metrics.QUANTILES),
            "sm_scale": "1/sqrt(head_dim) unless the scenario sets one",
            "do_distribution": "N(0, 1), drawn after q, k, v from the scenario generator",
            "forward_mode": "tiled",
            "accum_dtype": "float32",
            "torch_threads": torch.get_num_threads(),
        },
        "scenarios": scenarios,
        "cases": cases,
        "summary": {
            "ranking": summary.ranking(cases),
            "findings": summary.findings(cases, scenarios),
        },
        "verdicts": kernel_verdicts,
        "statistics_assumptions": list(error_statistics.ASSUMPTIONS),
        "thresholds": thresholds,
        "errors": errors,
        "timing": {
            "compute_seconds": round(time.perf_counter() - start, 3),
            "scenario_seconds": scenario_seconds,
        },
    }
