"""Streamed report cases computed in parts over kv heads, so that ranks can share one case.

A streamed scenario (``ReportConfig.streamed``: the production shapes, or any scenario over
``--stream-above``) with Hkv kv heads is computed as Hkv parts; part j holds kv head j and
its G = H / Hkv query heads (query head h reads kv head h // G). Two kinds of part:

* the scenario's exact part: the float64 exact attention and its gradient
  (``reference.streaming.streaming_exact``), once per scenario;
* a recipe's part: the streamed FP4 forward with its raw diagnostics and every backward
  variant (``streaming_forward_part``, ``streaming_backward``), once per scenario × recipe.

Attention never mixes heads, and the operands' 'amax' tensor scales are frozen at the whole
tensors' values (``streaming.frozen_tensor_scales``), so part j equals heads j of the whole.
A part's shapes do not depend on the process that computes it, so concatenating the parts
along heads (``merge_exact``, ``merge_recipe``) gives the same tensors in one process or in
many; the report's metrics are computed from the merged tensors by one process. The
single-process report takes the same path, which is what makes the sharded report equal to
it in every number.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fp4sim import reference
from fp4sim.reference import streaming
from fp4sim.reference.operands import quantize_operands
from fp4sim.reports.scenarios import Scenario

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(q, k, v, dO) of a whole scenario, float32, on the report's device."""

GPU_ROWS = 2048
GPU_SLICE = 1 << 26
"""On a GPU, query rows per block and elements per (B, H, rows, keys) slice (256 MiB in
float32): the streaming module's defaults suit a CPU's caches, and on a GPU they would make
thousands of small launches per pass (benchmarks/gpu_production_scale.py, H200: 54 s for
ste_tiled with 512-row blocks over 12 heads, its autograd loop launching per key tile)."""

GPU_EXACT_KEYS = 8192


@dataclass(frozen=True)
class HeadTask:
    """One part: kv head ``kv_head`` of ``scenario``; ``recipe`` None for the exact part."""

    scenario: Scenario
    recipe: str | None
    kv_head: int

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.scenario.name, self.recipe, self.kv_head)

    @property
    def cost(self) -> float:
        """Relative cost for load balancing (``reports.runner.Unit.cost`` per kv head; the
        exact part is a forward and one backward, a recipe part a forward, its diagnostic
        pass and seven backward variants)."""
        s = self.scenario.spec
        per_head = float(s.batch * (s.heads // s.kv_heads) * s.lq * s.lk * (s.head_dim + 32))
        return per_head * (0.25 if self.recipe is None else 1.0)


@dataclass
class HeadResult:
    """What one part computed (tensors on the CPU, so it can be gathered across processes)."""

    key: tuple[str, str | None, int]
    payload: dict[str, Any]
    seconds: float


def tasks(scenario: Scenario, recipes: Sequence[str]) -> list[HeadTask]:
    """Every part of a streamed scenario: the exact parts, then each recipe's, by kv head."""
    heads = range(scenario.spec.kv_heads)
    return [HeadTask(scenario, None, j) for j in heads] + [
        HeadTask(scenario, r, j) for r in recipes for j in heads
    ]


def part_inputs(inputs: Inputs, kv_heads: int, j: int) -> Inputs:
    """kv head j and its query heads, as contiguous copies (the same memory layout wherever
    the part is computed)."""
    q, k, v, do = inputs
    group = q.shape[1] // kv_heads
    qs = slice(j * group, (j + 1) * group)
    return (q[:, qs].contiguous(), k[:, j : j + 1].contiguous(), v[:, j : j + 1].contiguous(),
            do[:, qs].contiguous())


def _cpu(x: Any) -> Any:
    """Tensors (in dataclasses, dicts) moved to the CPU."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def run_task(task: HeadTask, inputs: Inputs, variants: Sequence[str], causal: bool,
             sm_scale: float) -> HeadResult:
    """Compute one part from the whole scenario's inputs."""
    start = time.perf_counter()
    q, k, v, do = part_inputs(inputs, task.scenario.spec.kv_heads, task.kv_head)
    on_gpu = q.device.type == "cuda"
    if task.recipe is None:
        ex = streaming.streaming_exact(q, k, v, do, causal=causal, sm_scale=sm_scale,
                                       **({"keys": GPU_EXACT_KEYS} if on_gpu else {}))
        assert ex.grads is not None and ex.d is not None
        payload: dict[str, Any] = _cpu({
            "o": ex.o, "lse": ex.lse, "d": ex.d, "dq": ex.grads.dq, "dk": ex.grads.dk,
            "dv": ex.grads.dv, "ds_rowsum": ex.grads.ds_rowsum,
        })
        return HeadResult(task.key, payload, time.perf_counter() - start)
    recipe = reference.get_recipe(task.recipe)
    frozen = _frozen(recipe, inputs)
    blocking = gpu_blocking(recipe, q, k) if on_gpu else None
    part = streaming.streaming_forward_part(
        q, k, v, frozen, causal=causal, sm_scale=sm_scale, mode="tiled",
        accum_dtype=torch.float32, diagnostics=True, blocking=blocking,
    )
    grads: dict[str, streaming.StreamingGrads] = {}
    errors: dict[str, str] = {}
    try:  # every variant in one streamed walk over (row block, key chunk) slices
        grads = streaming.streaming_backward(
            list(variants), part.result, q, k, v, do, frozen, causal=causal, sm_scale=sm_scale,
            blocking=blocking,
        )
    except Exception:  # noqa: BLE001 - recorded in the report
        errors = {variant: traceback.format_exc() for variant in variants}
    fwd = part.result
    fwd_cpu = replace(fwd, **{f: _cpu(getattr(fwd, f)) for f in
                              ("o", "o_hp", "lse", "m", "l", "q_hat", "k_hat", "v_hat")})
    diag = part.diagnostics
    if diag is not None:
        diag.hist = _cpu(diag.hist)
        diag.kept_fwd, diag.kept_bwd = _cpu(diag.kept_fwd), _cpu(diag.kept_bwd)
    payload = {
        "forward": streaming.ForwardPart(fwd_cpu, diag),
        "grads": {n: streaming.StreamingGrads(*(_cpu(t) for t in (g.dq, g.dk, g.dv, g.ds_rowsum)))
                  for n, g in grads.items()},
        "errors": errors,
    }
    return HeadResult(task.key, payload, time.perf_counter() - start)


def gpu_blocking(recipe: reference.Recipe, q: torch.Tensor, k: torch.Tensor
                 ) -> streaming.Blocking:
    """Blocks of up to ``GPU_ROWS`` rows and ``GPU_SLICE`` elements (whole tiles)."""
    bm, bn = recipe.block_m, recipe.block_n
    lq, lk = q.shape[2], k.shape[2]
    rows = min(GPU_ROWS // bm * bm, -(-lq // bm) * bm)
    keys = max(bn, GPU_SLICE // (q.shape[0] * q.shape[1] * rows) // bn * bn)
    return streaming.Blocking(rows, min(keys, -(-lk // bn) * bn))


def _frozen(recipe: reference.Recipe, inputs: Inputs) -> reference.Recipe:
    """The recipe with 'amax' operand tensor scales frozen at the whole tensors' values
    (unchanged, with no work, when it has none)."""
    specs = (recipe.q, recipe.k, recipe.v)
    if not any(s is not None and s.tensor_scale == "amax" for s in specs):
        return recipe
    q, k, v, _ = inputs
    return streaming.frozen_tensor_scales(recipe, quantize_operands(q, k, v, recipe,
                                                                      torch.float32))


def _parts(results: dict[tuple[str, str | None, int], HeadResult], scenario: Scenario,
           recipe: str | None) -> list[dict[str, Any]]:
    """The payloads of every kv head, in head order."""
    return [results[(scenario.name, recipe, j)].payload for j in range(scenario.spec.kv_heads)]


def merge_exact(results: dict[tuple[str, str | None, int], HeadResult],
                scenario: Scenario, device: str) -> streaming.ExactResult:
    """The whole scenario's exact result from its parts (concatenated along heads)."""
    parts = _parts(results, scenario, None)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([p[name] for p in parts], dim=1).to(device)

    grads = streaming.StreamingGrads(cat("dq"), cat("dk"), cat("dv"), cat("ds_rowsum"))
    return streaming.ExactResult(cat("o"), cat("lse"), cat("d"), grads)


def merge_recipe(
    results: dict[tuple[str, str | None, int], HeadResult], scenario: Scenario, recipe: str,
    inputs: Inputs, variants: Sequence[str],
) -> tuple[Any, dict[str, streaming.StreamingGrads], dict[str, str]]:
    """(forward result with its diagnostics, gradients per variant, errors per variant) of
    one recipe on the whole scenario, from its parts."""
    parts = _parts(results, scenario, recipe)
    device = inputs[0].device
    rec = reference.get_recipe(recipe)
    q, k, v, _ = inputs
    fwd_parts = []
    for p in parts:
        fp = p["forward"]
        res = replace(fp.result, **{f: getattr(fp.result, f).to(device) for f in
                                    ("o", "o_hp", "lse", "m", "l", "q_hat", "k_hat", "v_hat")})
        fwd_parts.append(streaming.ForwardPart(res, fp.diagnostics))
    # the whole operands' code histograms; the parts' tensor scales were the whole's
    ops = quantize_operands(q, k, v, _frozen(rec, inputs), torch.float32)
    fwd = replace(streaming.merge_forward_parts(fwd_parts, ops), recipe=rec)
    errors: dict[str, str] = {}
    for p in parts:
        for variant, tb in p["errors"].items():
            errors.setdefault(variant, tb)
    grads: dict[str, streaming.StreamingGrads] = {}
    for variant in variants:
        if variant in errors:
            continue
        merged = streaming.merge_grads([p["grads"][variant] for p in parts])
        grads[variant] = streaming.StreamingGrads(
            *(t.to(device) for t in (merged.dq, merged.dk, merged.dv, merged.ds_rowsum)))
    return fwd, grads, errors
