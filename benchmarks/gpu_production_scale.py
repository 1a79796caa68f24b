"""Wall time and peak GPU memory of a production-scale report case (issue 16), per component.

    PYTHONPATH=. python benchmarks/gpu_production_scale.py --out $OUT            # CUDA
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_production_scale.py --smoke --out /tmp/x

Runs, on one scenario's inputs (``reports.scenarios``, the report's seed):

* ``triton``: the fused training kernel ``fp4sim.kernels.attn_qat`` (recipe attn-qat),
  forward + backward; the first call (with Triton's compilation) and a second one;
* ``exact``: the float64 exact attention and its gradient (``streaming.streaming_exact``);
* ``forward``: the streaming FP4 forward with diagnostics (as ``fp4sim report`` calls it);
* ``backward:<variant>``: each backward variant the report uses, one streamed walk each
  (the STE ground truths ``ste_autograd`` and ``ste_tiled`` among them);
* ``backward:all``: optionally (``--one-walk``), every variant but ste_tiled in the one walk
  the report makes.

Each component is timed with the device synchronized before and after, with the peak
memory statistics reset before it (``torch.cuda.max_memory_allocated``). The kernel's O and
gradients are compared with the streaming reference's (relative L2), as a check that both
ran on the same problem. Components are skipped once ``--deadline`` seconds have passed, and
the JSON is rewritten after every component, so a killed run keeps what it finished.
``--smoke`` replaces the shapes by tiny ones (for a CPU check under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fp4sim import kernels, reference
from fp4sim.reference import streaming
from fp4sim.reports.runner import VARIANTS, resolved_sm_scale
from fp4sim.reports.scenarios import Scenario, get_scenario, scenario_inputs

DEFAULT_SCENARIOS = ("video-dit-L32760", "llm-L131072-decode")
VARIANT_ORDER = ("attn_qat", "ste_autograd", "ste_tiled", "exact", "drop_in", "p_only", "o_only")
"""The report's variants (``reports.runner.VARIANTS``), the kernel's and the ground truths
first, so that a run cut by --deadline keeps them."""
SMOKE_SHAPES = {
    # tiny stand-ins of the same kind (heads, grouped-query, causality kept)
    "video-dit-L32760": dict(lq=192, lk=192, head_dim=64, heads=2, kv_heads=2),
    "llm-L131072-decode": dict(lq=16, lk=512, head_dim=64, heads=4, kv_heads=1),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _rel_l2(a: torch.Tensor, r: torch.Tensor) -> float:
    a64, r64 = a.double(), r.double()
    den = float(torch.linalg.vector_norm(r64))
    num = float(torch.linalg.vector_norm(a64 - r64))
    return num / den if den else (0.0 if num == 0 else math.inf)


def _flops(s: Any, causal: bool) -> dict[str, float]:
    """Matrix-product FLOPs of one pass over the scores: 2 B H Lq Lk d per product
    (causal: the visible fraction, bottom-right aligned)."""
    visible = s.lq * s.lk
    if causal:
        visible = sum(max(0, min(s.lk, i + 1 + s.lk - s.lq)) for i in range(s.lq))
    one = 2.0 * s.batch * s.heads * visible * s.head_dim
    return {"one_product": one,
            "exact_fwd_bwd": 7 * one,  # QK^T, PV; S again, dP, dQ, dK, dV
            "forward_with_diagnostics": 4 * one,  # QK^T, PV (O, O_hp); QK^T again
            "one_backward_variant": 5 * one}


class Recorder:
    """Component results, rewritten to ``out/gpu_production_scale.json`` after each."""

    def __init__(self, out: str, meta: dict[str, Any]) -> None:
        self.out = out
        self.meta = meta
        self.rows: list[dict[str, Any]] = []
        os.makedirs(out, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self) -> None:
        with open(os.path.join(self.out, "gpu_production_scale.json"), "w") as f:
            json.dump({"meta": self.meta, "components": self.rows}, f, indent=1)
        with open(os.path.join(self.out, "gpu_production_scale.md"), "w") as f:
            f.write(self.markdown())

    def markdown(self) -> str:
        lines = [f"# Production-scale report components ({self.meta.get('device')})", "",
                 "| scenario | component | wall s | peak GPU GiB | note |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['scenario']} | {r['component']} | {r.get('seconds', '-')} | "
                         f"{r.get('peak_gib', '-')} | {r.get('note', '')} |")
        return "\n".join(lines) + "\n"


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - t0, _peak_gib(device)


def _smoke_scenario(scenario: Scenario) -> Scenario:
    spec = dataclasses.replace(scenario.spec, **SMOKE_SHAPES[scenario.name])
    return dataclasses.replace(scenario, spec=spec)


def run_scenario(name: str, args: argparse.Namespace, rec: Recorder, start: float) -> None:
    device = torch.device(args.device)
    scenario = get_scenario(name)
    if args.smoke:
        scenario = _smoke_scenario(scenario)
    s, causal = scenario.spec, scenario.causal
    tau = resolved_sm_scale(scenario)
    recipe = reference.get_recipe("attn-qat")
    t0 = time.perf_counter()
    q, k, v, do = (torch.from_numpy(a).to(device) for a in scenario_inputs(scenario, args.seed))
    rec.add({"scenario": name, "component": "inputs", "seconds": round(time.perf_counter() - t0, 2),
             "shape": [s.batch, s.heads, s.kv_heads, s.lq, s.lk, s.head_dim], "causal": causal,
             "flops": _flops(s, causal)})
    blocking = streaming.choose_blocking(recipe, s.batch * s.heads, s.lq, s.lk, args.budget)
    if args.rows:
        blocking = streaming.Blocking(args.rows, blocking.keys)
    rec.meta.setdefault("blocking", {})[name] = dataclasses.asdict(blocking)

    def late(component: str) -> bool:
        if time.perf_counter() - start <= args.deadline:
            return False
        rec.add({"scenario": name, "component": component, "note": "skipped: past --deadline"})
        return True

    kernel_out: dict[str, torch.Tensor] = {}
    if "triton" in args.components and not late("triton"):
        leaves = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
        do16 = do.to(torch.bfloat16)

        def kernel() -> tuple[torch.Tensor, ...]:
            o = kernels.attn_qat(*leaves, causal=causal, sm_scale=tau, recipe="attn-qat")
            grads = torch.autograd.grad(o, leaves, do16)
            return (o.detach(), *grads)

        for call in ("first call (compiles)", "second call"):
            res, sec, peak = _timed(device, kernel)
            rec.add({"scenario": name, "component": "triton attn_qat fwd+bwd", "seconds":
                     round(sec, 3), "peak_gib": peak, "note": call})
        kernel_out = dict(zip(("o", "dq", "dk", "dv"), res, strict=True))
        del leaves, res

    if "exact" in args.components and not late("exact"):
        ex, sec, peak = _timed(device, lambda: streaming.streaming_exact(
            q, k, v, do, causal=causal, sm_scale=tau, keys=args.exact_keys, rows=blocking.rows))
        rec.add({"scenario": name, "component": "exact float64 fwd+grad", "seconds": round(sec, 3),
                 "peak_gib": peak})
        del ex

    fwd = None
    if "forward" in args.components and not late("forward"):
        fwd, sec, peak = _timed(device, lambda: streaming.streaming_forward(
            q, k, v, recipe, causal=causal, sm_scale=tau, mode="tiled",
            accum_dtype=torch.float32, diagnostics=True, blocking=blocking))
        row = {"scenario": name, "component": "forward (diagnostics)", "seconds": round(sec, 3),
               "peak_gib": peak, "blocking": dataclasses.asdict(blocking)}
        if kernel_out:
            row["kernel_o_rel_l2_vs_reference"] = _rel_l2(kernel_out["o"], fwd.o)
        rec.add(row)
    if fwd is None:
        return

    variants = [v_ for v_ in args.variants if v_ in VARIANTS]
    for variant in variants:
        if late(f"backward:{variant}"):
            continue
        blk = blocking
        if variant == "ste_tiled" and args.ste_rows:
            blk = streaming.Blocking(args.ste_rows, blocking.keys)
        g, sec, peak = _timed(device, lambda variant=variant, blk=blk: streaming.streaming_backward(
            [variant], fwd, q, k, v, do, recipe, causal=causal, sm_scale=tau,
            blocking=blk)[variant])
        row = {"scenario": name, "component": f"backward:{variant}", "seconds": round(sec, 3),
               "peak_gib": peak}
        if kernel_out and variant == "attn_qat":
            for n, ref in (("dq", g.dq), ("dk", g.dk), ("dv", g.dv)):
                row[f"kernel_{n}_rel_l2_vs_reference"] = _rel_l2(kernel_out[n], ref)
        if variant == "ste_tiled":
            row["rows"] = blk.rows
        rec.add(row)
        del g
    if args.one_walk and not late("backward:all"):
        walk = [v_ for v_ in variants if v_ != "ste_tiled"]
        _, sec, peak = _timed(device, lambda: streaming.streaming_backward(
            walk, fwd, q, k, v, do, recipe, causal=causal, sm_scale=tau, blocking=blocking))
        rec.add({"scenario": name, "component": "backward:all (one walk, no ste_tiled)",
                 "seconds": round(sec, 3), "peak_gib": peak})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS))
    parser.add_argument("--components", nargs="+", default=["triton", "exact", "forward"],
                        help="of triton, exact, forward (backward variants: --variants)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANT_ORDER),
                        help="backward variants to time (need the forward)")
    parser.add_argument("--one-walk", action="store_true",
                        help="also time every variant but ste_tiled in one walk (the report's)")
    parser.add_argument("--budget", type=int, default=1 << 26,
                        help="elements of one (B*H, rows, keys) slice of the streaming reference")
    parser.add_argument("--rows", type=int, default=0, help="query rows per block (0: chosen)")
    parser.add_argument("--ste-rows", type=int, default=512,
                        help="query rows per ste_tiled block (its autograd loop is per key tile: "
                        "more rows, fewer launches, O(rows x Lk) memory)")
    parser.add_argument("--exact-keys", type=int, default=8192, help="keys per exact chunk")
    parser.add_argument("--deadline", type=float, default=200.0,
                        help="skip components that would start after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    if args.smoke:
        args.budget = min(args.budget, 1 << 14)
        args.ste_rows = min(args.ste_rows, 64)
        args.exact_keys = min(args.exact_keys, 128)
    start = time.perf_counter()
    device = torch.device(args.device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
    }
    rec = Recorder(args.out, meta)
    for name in args.scenarios:
        try:
            run_scenario(name, args, rec, start)
        except Exception as exc:  # noqa: BLE001 - recorded, the next scenario still runs
            rec.add({"scenario": name, "component": "error", "note": repr(exc)[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.meta["total_seconds"] = round(time.perf_counter() - start, 2)
    rec.write()
    print(rec.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
