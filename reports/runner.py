"""Computes every case of the report: scenario × recipe × implementation (numbers only).

This is the first room of ``fp4sim report`` and the only one that runs attention: it
returns the cases (plain dicts, ``reports.schema``) and the external kernels' error samples;
``reports.analysis`` ranks and judges them, ``reports.document`` / ``reports.markdown``
render them. Nothing here reads a ranking, a finding or a threshold.

The unit of work is one scenario × recipe (:class:`Unit`): its inputs (q, k, v, dO) are
regenerated from the seed (:func:`reports.scenarios.scenario_inputs`), the float64 exact
attention and its autograd gradient are the "exact" references, the reference
implementation runs the tiled FP4 forward and every backward variant through
``reference.backward_parts`` (gradients and dS together), including the two STE ground
truths ``ste_autograd`` (the default) and ``ste_tiled`` (docs/attention-math.md, "Two
placements of the STE"). Kernels (Triton's ``kernels.attn_qat`` on CUDA, or an external
``MODULE:ATTR`` run in a ``fp4sim.harness.KernelWorker``) are compared against the same
references and against the recipe's own reference forward and backward. Units are
independent, so ``reports.distributed`` can spread them over ranks and merge the results
into the same report as a single process.

A crash inside a case is caught, its traceback stored in the case (``status: "error"``)
and the run goes on.
"""

from __future__ import annotations

import math
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fp4sim import kernels, reference
from fp4sim.judge.attention import AttentionCheckConfig, evaluate_attention_case
from fp4sim.judge.inputs import AttentionCase, round_to_dtype
from fp4sim.kernels import RECIPES as KERNEL_RECIPES
from fp4sim.publish.console import progress_line
from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.quant_torch import quantize_torch_full
from fp4sim.reports import head_parts, metrics, streaming_metrics
from fp4sim.reports.scenarios import Scenario, scenario_inputs
from fp4sim.reports.schema import problem_line

GROUND_TRUTHS: tuple[str, ...] = ("ste_autograd", "ste_tiled")
"""The two STE ground truths (docs/attention-math.md, "Two placements of the STE"); the
first is the default that rankings are sorted by."""

GROUND_TRUTH = GROUND_TRUTHS[0]

REFS: dict[str, str] = {"ste_autograd": "vs_ste", "ste_tiled": "vs_ste_tiled"}
"""Ground truth -> the key of a gradient comparison against it (``vs_ste`` kept for the
default, so ``grad_rel_l2_vs_ste`` and older report.json readers keep their meaning)."""

VARIANTS: tuple[str, ...] = (
    "exact", "drop_in", "p_only", "o_only", "attn_qat", "ste_autograd", "ste_tiled"
)
"""Backward variants of ``reference.backward_parts`` in display order."""

VARIANT_LABELS: dict[str, str] = {
    "exact": "bf16 (exact grad, unquantized)",
    "drop_in": "drop-in QAT",
    "p_only": "principle 2 only (hp P, D from O_hp)",
    "o_only": "principle 1 only (FQ P, D from O)",
    "attn_qat": "Attn-QAT",
    "ste_autograd": "STE on the normalized P (ground truth, default)",
    "ste_tiled": "STE on each tile's P (ground truth, literal autograd)",
    "kernel": "kernel autograd",
}

TRITON_RECIPES: tuple[str, ...] = KERNEL_RECIPES  # the one home: fp4sim.kernels.RECIPES

STREAM_ABOVE = 1 << 24
"""A scenario with more score entries than this (B * H * Lq * Lk; 16.8 M: 128 MiB of one
float64 score matrix, and the dense reference keeps several) runs the streaming reference
(``reference.streaming``: row blocks x key chunks, memory linear in L) and the streaming
metrics (``reports.streaming_metrics``); both equal the dense ones to rounding."""
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
    """The project's fused Triton kernel (``kernels.attn_qat``), for CUDA devices (Triton, the
    [kernels] extra, is imported by the package only when the kernel is first called)."""

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
    progress_line(message)  # ranks share stderr: one write per line


def resolved_sm_scale(scenario: Scenario) -> float:
    return default_sm_scale(scenario.spec.head_dim, scenario.sm_scale)


def rowsum_summary(rowsum_ds: torch.Tensor, d_exact: torch.Tensor) -> dict[str, float]:
    """The row sums of a variant's dS (zero when its D matches the P it uses,
    docs/attention-math.md "The D identity"): max |rowsum(dS)|, their RMS, and that RMS
    relative to the RMS of D = rowsum(dO * O_exact) (the scale the residual competes with)."""
    r = to_numpy(rowsum_ds)
    d_rms = metrics.rms(to_numpy(d_exact))
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
    streamed: bool = False


def score_elements(scenario: Scenario) -> int:
    s = scenario.spec
    return s.batch * s.heads * s.lq * s.lk


def scenario_tensors_on(scenario: Scenario, seed: int, device: str) -> head_parts.Inputs:
    """(q, k, v, dO) of a scenario on ``device``, float32."""
    q, k, v, do = (torch.from_numpy(a).to(device) for a in scenario_inputs(scenario, seed))
    return q, k, v, do


def streamed_tensors(inputs: head_parts.Inputs, ex: Any) -> ScenarioTensors:
    """ScenarioTensors of a streamed scenario from its merged exact result."""
    assert ex.grads is not None and ex.d is not None
    grads = (ex.grads.dq, ex.grads.dk, ex.grads.dv)
    return ScenarioTensors(*inputs, ex.o, grads, ex.d, streamed=True)


def prepare_scenario(
    scenario: Scenario, seed: int, device: str, streamed: bool = False
) -> ScenarioTensors:
    """Inputs on ``device`` (float32) and the float64 exact output and gradients (streamed:
    by ``reference.streaming.streaming_exact`` on each kv head, ``reports.head_parts``)."""
    inputs = scenario_tensors_on(scenario, seed, device)
    q, k, v, do = inputs
    if streamed:
        sm_scale = resolved_sm_scale(scenario)
        results = {t.key: head_parts.run_task(t, inputs, (), scenario.causal, sm_scale)
                   for t in head_parts.tasks(scenario, ())}
        return streamed_tensors(inputs, head_parts.merge_exact(results, scenario, device))
    q64, k64, v64 = (t.to(torch.float64).requires_grad_(True) for t in (q, k, v))
    o64 = reference.attention_exact(
        q64, k64, v64, causal=scenario.causal, sm_scale=resolved_sm_scale(scenario)
    )
    dq, dk, dv = torch.autograd.grad(o64, (q64, k64, v64), do.to(torch.float64))
    d_exact = (do.to(torch.float64) * o64.detach()).sum(-1)
    return ScenarioTensors(q, k, v, do, o64.detach(), (dq, dk, dv), d_exact)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else to_numpy(x)


def _compare(
    a: torch.Tensor | np.ndarray, r: torch.Tensor | np.ndarray, streamed: bool = False
) -> dict[str, Any]:
    if streamed:  # chunk by chunk: no float64 copy of the whole tensor
        return streaming_metrics.compare_streaming(a, r)
    return metrics.compare(_as_numpy(a), _as_numpy(r))


def _grad_block(
    grads: Sequence[torch.Tensor | np.ndarray],
    refs: dict[str, Sequence[torch.Tensor]],
    streamed: bool = False,
) -> dict[str, Any]:
    block: dict[str, Any] = {}
    for i, name in enumerate(GRAD_NAMES):
        block[name] = {
            ref_name: _compare(grads[i], ref[i], streamed) for ref_name, ref in refs.items()
        }
    return block


def _truth_refs(
    grads: dict[str, tuple[torch.Tensor, ...]], skip: str | None = None
) -> dict[str, Sequence[torch.Tensor]]:
    """The ground truths that ran, as comparison references (a truth is not compared with
    itself; each is compared with the other)."""
    return {REFS[t]: grads[t] for t in GROUND_TRUTHS if t in grads and t != skip}


StreamedReference = tuple[Any, dict[str, Any], dict[str, str]]
"""(forward result, gradients per variant, errors per variant) of a streamed reference case,
merged from its head parts (``reports.head_parts.merge_recipe``)."""


def streamed_reference(
    scenario: Scenario, recipe_name: str, tensors: ScenarioTensors, variants: Sequence[str]
) -> StreamedReference:
    """A recipe's streamed reference on one scenario, its kv heads computed in turn."""
    ordered = ordered_variants(variants)
    inputs = (tensors.q, tensors.k, tensors.v, tensors.do)
    sm_scale = resolved_sm_scale(scenario)
    results = {t.key: head_parts.run_task(t, inputs, ordered, scenario.causal, sm_scale)
               for t in head_parts.tasks(scenario, (recipe_name,)) if t.recipe is not None}
    return head_parts.merge_recipe(results, scenario, recipe_name, inputs, ordered)


def ordered_variants(variants: Sequence[str]) -> list[str]:
    """The ground truths first (a kernel's case compares with them), then the rest."""
    return [*[g for g in GROUND_TRUTHS if g in variants],
            *[v for v in variants if v not in GROUND_TRUTHS]]


def reference_case(
    scenario: Scenario,
    recipe_name: str,
    tensors: ScenarioTensors,
    variants: Sequence[str],
    streamed: StreamedReference | None = None,
) -> tuple[dict[str, Any], Any, dict[str, tuple[torch.Tensor, ...]]]:
    """The reference implementation of one recipe on one scenario (``streamed``: its merged
    head parts when they were computed elsewhere, e.g. by other ranks).

    Returns the case dict, the ForwardResult and the gradients per variant (for kernels)."""
    recipe = reference.get_recipe(recipe_name)
    sm_scale = resolved_sm_scale(scenario)
    t = tensors
    grads: dict[str, tuple[torch.Tensor, ...]] = {}
    ds_rowsum: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if t.streamed:
        if streamed is None:
            streamed = streamed_reference(scenario, recipe_name, t, variants)
        fwd, streamed_grads, errors = streamed
        for variant, g in streamed_grads.items():
            grads[variant] = (g.dq, g.dk, g.dv)
            if not bool(torch.isnan(g.ds_rowsum).all()):  # ste_tiled streams no dS
                ds_rowsum[variant] = rowsum_summary(g.ds_rowsum, t.d_exact)
    else:
        fwd = reference.fp4_attention_forward(
            t.q, t.k, t.v, recipe, causal=scenario.causal, sm_scale=sm_scale, mode="tiled",
            accum_dtype=torch.float32, diagnostics=True,
        )
    for variant in [] if t.streamed else ordered_variants(variants):
        try:
            parts = reference.backward_parts(
                variant, fwd, t.q, t.k, t.v, t.do, recipe, causal=scenario.causal,
                sm_scale=sm_scale,
            )
        except Exception:  # noqa: BLE001 - recorded in the report
            errors[variant] = traceback.format_exc()
            continue
        grads[variant] = (parts.dq.detach(), parts.dk.detach(), parts.dv.detach())
        ds_rowsum[variant] = rowsum_summary(parts.ds.detach().double().sum(dim=-1), t.d_exact)
    forward = {
        "o_vs_exact": _compare(fwd.o, t.o_exact, t.streamed),
        "o_hp_vs_exact": _compare(fwd.o_hp, t.o_exact, t.streamed),
        "o_vs_recipe_reference": None,
    }
    gradients: dict[str, Any] = {}
    for variant in variants:
        if variant in errors:
            gradients[variant] = {"error": errors[variant]}
            continue
        refs: dict[str, Sequence[torch.Tensor]] = {
            "vs_exact": t.grads_exact, **_truth_refs(grads, skip=variant)
        }
        gradients[variant] = {"error": None, **_grad_block(grads[variant], refs, t.streamed)}
    case = {
        "forward": forward,
        "gradients": gradients,
        "ds_rowsum": {v: ds_rowsum[v] for v in variants if v in ds_rowsum},
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
    """The Triton kernel against exact, both STE ground truths and the recipe's reference."""
    t = tensors
    sm_scale = resolved_sm_scale(scenario)
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (t.q, t.k, t.v))
    assert implementation.function is not None
    o = implementation.function(q, k, v, scenario.causal, sm_scale, recipe_name)
    if not isinstance(o, torch.Tensor) or o.shape != t.o_exact.shape:
        raise TypeError(
            f"kernel returned {type(o).__name__} of shape {getattr(o, 'shape', None)}; "
            f"expected a tensor of shape {tuple(t.o_exact.shape)}"
        )
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), t.do.to(o.dtype))
    refs: dict[str, Sequence[torch.Tensor]] = {"vs_exact": t.grads_exact, **_truth_refs(ref_grads)}
    if recipe_backward in ref_grads:
        refs["vs_recipe_variant"] = ref_grads[recipe_backward]
    return {
        "forward": {
            "o_vs_exact": _compare(o, t.o_exact, t.streamed),
            "o_hp_vs_exact": None,
            "o_vs_recipe_reference": _compare(o, ref_fwd.o, t.streamed),
        },
        "gradients": {"kernel": {"error": None, **_grad_block((dq, dk, dv), refs, t.streamed)}},
        "ds_rowsum": {},
        "diagnostics": None,
        "recipe_backward": recipe_backward,
    }


# ---------------------------------------------------------------------------------------
# external kernels: one call per case in the worker, judged by the FP4 tolerance rule of
# `fp4sim check attention` (fp4sim.judge.attention, shared with the check; no Hypothesis)
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
    metrics against exact, both STE ground truths and the recipe's reference, and the error
    samples of the statistical verdict. A time-out, a crash or an exception is the case's error."""
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
    refs: dict[str, Sequence[torch.Tensor]] = {"vs_exact": t.grads_exact, **_truth_refs(ref_grads)}
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
        "ds_rowsum": {},
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



# ---------------------------------------------------------------------------------------
# units of work: one scenario x recipe
# ---------------------------------------------------------------------------------------


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
    stream_above: int = STREAM_ABOVE
    """Scenarios with more score entries run the streaming reference (0: every scenario)."""

    def streamed(self, scenario: Scenario) -> bool:
        """Production scenarios always stream; others above ``stream_above`` entries."""
        return "production" in scenario.tags or score_elements(scenario) > self.stream_above


@dataclass(frozen=True)
class Unit:
    """One scenario × recipe: the reference case and every kernel case of that recipe
    (a kernel is compared with the recipe's reference, so they run together)."""

    index: int
    scenario: Scenario
    recipe: str

    @property
    def cost(self) -> float:
        """Relative cost for load balancing: the score matrices of every head."""
        s = self.scenario.spec
        return float(s.batch * s.heads * s.lq * s.lk * (s.head_dim + 32))


def units(config: ReportConfig) -> list[Unit]:
    """Every unit in the report's order (scenario-major, then recipe)."""
    return [
        Unit(i * len(config.recipes) + j, scenario, recipe)
        for i, scenario in enumerate(config.scenarios)
        for j, recipe in enumerate(config.recipes)
    ]


@dataclass
class UnitResult:
    """What one unit computed: its cases (one per implementation, in config order), the
    external kernels' error samples, and its wall time. Plain data, so it can be gathered
    across processes."""

    index: int
    scenario: str
    cases: list[dict[str, Any]]
    samples: ErrorSamples
    seconds: float


@dataclass
class Computed:
    """Every case of the report in order, the merged error samples, and the timing."""

    cases: list[dict[str, Any]]
    samples: ErrorSamples
    scenario_seconds: dict[str, float]
    compute_seconds: float
    ranks: int = 1
    rank_seconds: list[float] = field(default_factory=list)
    gather_seconds: float = 0.0


def _unit_seed(seed: int, unit: Unit) -> int:
    # torch's global generator is seeded per unit, so that a unit's numbers do not depend on
    # which units ran before it in the same process (sharding must not change a number)
    return (seed * 1_000_003 + zlib.crc32(f"{unit.scenario.name}/{unit.recipe}".encode())) % (
        2**63
    )


def _base_case(scenario: Scenario, recipe: str, impl: Implementation) -> dict[str, Any]:
    return {
        "scenario": scenario.name,
        "recipe": recipe,
        "implementation": impl.name,
        "implementation_kind": impl.kind,
        "status": "ok",
        "error": None,
        "seconds": 0.0,
    }


def run_unit(
    unit: Unit,
    config: ReportConfig,
    tensors: ScenarioTensors | None,
    *,
    progress: Callable[[str], None] = log,
    label: str = "",
    streamed: StreamedReference | None = None,
) -> UnitResult:
    """Every case of one scenario × recipe; ``tensors`` None means the scenario's inputs
    failed (logged once; each case records the failure); ``streamed`` the reference's head
    parts merged, when other ranks computed them."""
    start = time.perf_counter()
    scenario, recipe = unit.scenario, unit.recipe
    torch.manual_seed(_unit_seed(config.seed, unit))
    samples: ErrorSamples = {}
    cases: list[dict[str, Any]] = []
    ref_fwd, ref_grads, recipe_backward = None, {}, "attn_qat"
    for impl in config.implementations:
        case = _base_case(scenario, recipe, impl)
        t0 = time.perf_counter()
        try:
            if tensors is None:
                raise RuntimeError(f"the inputs of scenario {scenario.name} failed")
            if impl.kind == "reference":
                body, ref_fwd, ref_grads = reference_case(
                    scenario, recipe, tensors, config.variants, streamed
                )
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
            elif impl.kind == "external" and tensors.streamed:
                body = {
                    "status": "skipped",
                    "error": "a streamed (production-size) scenario: the FP4 tolerance rule of "
                    "`fp4sim check` needs the dense reference; check the kernel at this shape "
                    "with `fp4sim check attention --inputs`",
                }
            elif ref_fwd is None:
                raise RuntimeError(
                    "the reference case of this recipe failed; nothing to compare to"
                )
            elif impl.kind == "external":
                body = external_case(
                    scenario, recipe, impl, tensors, ref_fwd, ref_grads, recipe_backward,
                    seed=config.seed, device=config.device, samples=samples,
                )
            else:
                body = kernel_case(
                    scenario, recipe, impl, tensors, ref_fwd, ref_grads, recipe_backward
                )
            case.update(body)
        except Exception:  # noqa: BLE001 - recorded in the report
            case["status"] = "error"
            case["error"] = traceback.format_exc()
        case["seconds"] = round(time.perf_counter() - t0, 3)
        status = case["status"]  # "ok" means the case ran; the rule's verdict is separate
        rule = case.get("rule")
        if rule is not None and status == "ok":
            status = ("ran, agrees with the recipe" if rule["agrees"]
                      else "ran, DISAGREES with the recipe")
        progress(f"{label} {scenario.name} x {recipe} x {impl.name}: {status} "
                 f"({case['seconds']:.1f} s)")
        if case["status"] == "error":
            progress("    " + problem_line(case["error"]))
        cases.append(case)
    return UnitResult(
        unit.index, scenario.name, cases, samples, round(time.perf_counter() - start, 3)
    )


def run_units(
    config: ReportConfig,
    selected: Sequence[Unit],
    progress: Callable[[str], None] = log,
    tag: str = "",
) -> list[UnitResult]:
    """Compute ``selected`` units in order, preparing each scenario's inputs and exact
    references once for consecutive units of the same scenario."""
    threads = torch.get_num_threads()
    # The tensors are small: one thread is as fast on an idle CPU and many times faster on
    # a loaded one (OpenMP workers spin-waiting for preempted peers).
    if config.device == "cpu":
        torch.set_num_threads(1)
    results: list[UnitResult] = []
    cached: tuple[str, ScenarioTensors | None, float] | None = None
    try:
        for n, unit in enumerate(selected, start=1):
            prep_seconds = 0.0
            if cached is None or cached[0] != unit.scenario.name:
                t0 = time.perf_counter()
                try:
                    tensors: ScenarioTensors | None = prepare_scenario(
                        unit.scenario, config.seed, config.device, config.streamed(unit.scenario)
                    )
                except Exception:  # noqa: BLE001 - every case of the scenario records it
                    tensors = None
                    progress(f"  scenario {unit.scenario.name}: inputs failed\n"
                             f"{traceback.format_exc()}")
                prep_seconds = time.perf_counter() - t0
                cached = (unit.scenario.name, tensors, prep_seconds)
            label = f"{tag}[{n}/{len(selected)}]"
            result = run_unit(unit, config, cached[1], progress=progress, label=label)
            result.seconds = round(result.seconds + prep_seconds, 3)
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    return results


def merge(
    config: ReportConfig, results: Sequence[UnitResult], compute_seconds: float
) -> Computed:
    """The report's cases in order (scenario, recipe, implementation) from unit results
    computed in any order or process; samples concatenated in the same order."""
    by_index = {r.index: r for r in results}
    expected = units(config)
    missing = [u.index for u in expected if u.index not in by_index]
    if missing:
        raise RuntimeError(f"units {missing} were not computed")
    cases: list[dict[str, Any]] = []
    samples: ErrorSamples = {}
    scenario_seconds: dict[str, float] = {}
    for unit in expected:
        r = by_index[unit.index]
        cases += r.cases
        scenario_seconds[r.scenario] = round(scenario_seconds.get(r.scenario, 0.0) + r.seconds, 3)
        for key, pair in r.samples.items():
            entry = samples.setdefault(key, {"kernel": {}, "reference": {}})
            for side in ("kernel", "reference"):
                for tensor, values in pair[side].items():
                    entry[side].setdefault(tensor, []).extend(values)
    return Computed(cases, samples, scenario_seconds, round(compute_seconds, 3))


def compute(config: ReportConfig, progress: Callable[[str], None] = log) -> Computed:
    """Every case of the report in one process."""
    start = time.perf_counter()
    results = run_units(config, units(config), progress)
    computed = merge(config, results, time.perf_counter() - start)
    computed.rank_seconds = [computed.compute_seconds]
    return computed


def diagnoser(config: ReportConfig) -> Callable[[str, str, str], list[str]]:
    """The ``diagnose`` callback of ``reports.analysis.analyse``: runs a kernel's worst
    disagreeing case once more under `fp4sim check`'s diagnosis."""
    impls = {i.name: i for i in config.implementations}
    scenarios = {s.name: s for s in config.scenarios}

    def diagnose(name: str, scenario: str, recipe: str) -> list[str]:
        return diagnose_external(
            impls[name], scenarios[scenario], recipe, config.seed, config.device
        )

    return diagnose
