"""GPU benchmark of the fused Attn-QAT training attention (``kernels.attn_qat``) vs SDPA.

Not a test. Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_attn_qat_bench.py [--sweep] [--out DIR]
    PYTHONPATH=. python benchmarks/gpu_attn_qat_bench.py --smoke        # correctness smoke

(memory checking of every kernel: ``benchmarks/gpu_sanitize.py``).

Times (``triton.testing.do_bench``, median, ms) of forward, backward and forward+backward, and
TFLOPS with FLOPs = 4 B H Lq Lk d (forward) and 2.5x that (backward), non-causal, bf16, for
``torch.nn.functional.scaled_dot_product_attention`` and the kernel under the recipes ``bf16``,
``attn-qat``, ``attn-qat-consistent`` (and ``attn-qat`` with in-register Q/K/V quantization),
at (B, H, L, d) = (2, 16, 4096, 128), (2, 16, 4096, 64), (1, 3, 31200, 128). Peak memory is
the peak allocation above the inputs during one forward+backward. Writes a JSON file and a
Markdown table to ``--out`` (default ``$OUT`` or ``.``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import fp4sim.kernels.training_attention as attn_mod

SHAPES = [(2, 16, 4096, 128), (2, 16, 4096, 64), (1, 3, 31200, 128)]
METHODS = ["sdpa", "bf16", "attn-qat", "attn-qat-consistent", "attn-qat/in-register"]


def _inputs(b, h, length, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (b, h, length, d)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    return [t.requires_grad_(True) for t in (q, k, v)], do


def _fn(method):
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method == "attn-qat/in-register":
        return lambda q, k, v: attn_mod.attn_qat(q, k, v, recipe="attn-qat", prequantize=False)
    return lambda q, k, v: attn_mod.attn_qat(q, k, v, recipe=method)


def _time(method, shape, reps=(25, 100)):
    (q, k, v), do = _inputs(*shape)
    f = _fn(method)
    warm, rep = reps
    t_fwd = do_bench(lambda: f(q, k, v), warmup=warm, rep=rep, return_mode="median")
    graph = [f(q, k, v)]
    t_bwd = do_bench(lambda: graph[0].backward(do, retain_graph=True), warmup=warm, rep=rep,
                     grad_to_none=[q, k, v], return_mode="median")
    graph.clear()
    t_all = do_bench(lambda: f(q, k, v).backward(do), warmup=warm, rep=rep,
                     grad_to_none=[q, k, v], return_mode="median")
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    f(q, k, v).backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    b, h, length, d = shape
    flops_fwd = 4.0 * b * h * length * length * d
    return {
        "method": method, "shape": list(shape),
        "fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_bwd_ms": t_all,
        "fwd_tflops": flops_fwd / t_fwd * 1e-9, "bwd_tflops": 2.5 * flops_fwd / t_bwd * 1e-9,
        "fwd_bwd_tflops": 3.5 * flops_fwd / t_all * 1e-9,
        "peak_mib": peak / 2**20,
    }


def _sweep(shape):
    """Time a few launch configurations of each kernel (attn-qat recipe); returns the best."""
    Cfg = attn_mod._Config
    fwd_cands = [Cfg(64, 64, 4, 3), Cfg(64, 64, 4, 2), Cfg(128, 64, 8, 2), Cfg(128, 64, 8, 3)]
    dkdv_cands = [Cfg(64, 64, 4, 2), Cfg(64, 64, 8, 2), Cfg(64, 64, 4, 3), Cfg(64, 128, 8, 2)]
    dq_cands = [Cfg(128, 64, 8, 2), Cfg(64, 64, 4, 2), Cfg(128, 64, 8, 3)]
    (q, k, v), do = _inputs(*shape)
    qh, kh, vh = (attn_mod._fake_quantize(t.detach()) for t in (q, k, v))
    tau = 1.0 / math.sqrt(shape[-1])
    best = {}
    log = []
    for name, cands in (("fwd", fwd_cands), ("dkdv", dkdv_cands), ("dq", dq_cands)):
        results = []
        for cfg in cands:
            attn_mod._CONFIG_OVERRIDE.clear()
            attn_mod._CONFIG_OVERRIDE[name] = cfg
            try:
                if name == "fwd":
                    def run(qh=qh, kh=kh, vh=vh):
                        attn_mod._forward_impl(qh, kh, vh, False, tau, "attn-qat", False,
                                               False, False)
                else:
                    fwd = attn_mod._forward_impl(qh, kh, vh, False, tau, "attn-qat", False,
                                                 False, False)

                    def run(fwd=fwd):
                        attn_mod._backward_impl(do, qh, kh, vh, fwd.o, fwd.o_hp, fwd.lse, fwd.m,
                                                fwd.l, False, tau, "attn-qat", False)
                t = do_bench(run, warmup=10, rep=50, return_mode="median")
            except Exception as exc:  # out of resources etc.
                t = float("inf")
                print(f"  {name} {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")
            results.append((t, cfg))
            log.append({"kernel": name, "shape": list(shape), "config": cfg.__dict__, "ms": t})
            print(f"  sweep {shape} {name} {cfg}: {t:.3f} ms (fwd = whole forward; "
                  f"dkdv/dq = whole backward)", flush=True)
        best[name] = min(results, key=lambda r: r[0])[1]
    attn_mod._CONFIG_OVERRIDE.clear()
    return best, log


def _smoke():
    """Quick GPU correctness: each recipe against the float64 reference (relative L2)."""
    from fp4sim import reference
    torch.manual_seed(0)
    worst = 0.0
    for recipe in ("bf16", "attn-qat", "attn-qat-consistent"):
        for (b, h, hkv, lq, lk, d, causal) in [(1, 4, 2, 777, 1000, 128, True),
                                                (2, 2, 2, 300, 129, 64, False)]:
            q = torch.randn(b, h, lq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
            do = torch.randn_like(q)
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            o = attn_mod.attn_qat(qg, kg, vg, causal=causal, recipe=recipe)
            o.backward(do)
            variant = {"bf16": "exact", "attn-qat": "attn_qat",
                       "attn-qat-consistent": "ste_autograd"}[recipe]
            args = [t.double().cpu() for t in (q, k, v)]
            ref = reference.fp4_attention_forward(*args, recipe, causal=causal,
                                                  accum_dtype=torch.float64)
            grads = reference.attention_backward(variant, ref, *args, do.double().cpu(), recipe,
                                                 causal=causal)
            errs = {}
            for name, x, r in zip(("o", "dq", "dk", "dv"), (o, qg.grad, kg.grad, vg.grad),
                                  (ref.o,) + tuple(grads), strict=True):
                errs[name] = ((x.double().cpu() - r).norm() / r.norm()).item()
            fres = attn_mod.attn_qat_forward(q, k, v, causal=causal, recipe=recipe,
                                             prequantize=True)
            for name, x, r in (("o_hp", fres.o_hp, ref.o_hp), ("lse", fres.lse, ref.lse),
                               ("m", fres.m, ref.m), ("l", fres.l, ref.l)):
                fin = torch.isfinite(r)
                xd, rd = x.double().cpu()[fin], r[fin]
                errs[name] = ((xd - rd).norm() / rd.norm()).item()
            if recipe == "attn-qat":
                alt = reference.attention_backward("o_only", ref, *args, do.double().cpu(), recipe,
                                                   causal=causal)
                errs["dq_vs_o_only"] = ((qg.grad.double().cpu() - alt[0]).norm()
                                        / alt[0].norm()).item()
            worst = max(worst, *(errs[n] for n in ("o", "dq", "dk", "dv")))
            print(f"smoke {recipe} {(b, h, hkv, lq, lk, d, causal)}: "
                  + " ".join(f"{n} {e:.2e}" for n, e in errs.items()), flush=True)
    print(f"smoke worst relative L2 error {worst:.3e}")
    return worst < 2e-2


def _markdown(rows, card, date):
    sdpa = {tuple(r["shape"]): r for r in rows if r["method"] == "sdpa"}
    lines = [f"Card: {card}; date: {date}; bf16, non-causal; do_bench median.", "",
             "| (B, H, L, d) | method | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOPS | bwd TFLOPS "
             "| fwd+bwd TFLOPS | fwd / SDPA | fwd+bwd / SDPA | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = sdpa.get(tuple(r["shape"]))
        rf = r["fwd_ms"] / s["fwd_ms"] if s else float("nan")
        ra = r["fwd_bwd_ms"] / s["fwd_bwd_ms"] if s else float("nan")
        lines.append(
            f"| {tuple(r['shape'])} | {r['method']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['fwd_tflops']:.1f} | {r['bwd_tflops']:.1f} | "
            f"{r['fwd_bwd_tflops']:.1f} | {rf:.2f}x | {ra:.2f}x | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sweep", action="store_true", help="tune launch configs first")
    parser.add_argument("--smoke", action="store_true", help="correctness smoke only")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shapes", default="all", help="'all' or indices, e.g. 0,1")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    if args.smoke:
        return 0 if _smoke() else 1
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    sweep_log = []
    chosen = {}
    if args.sweep:
        for shape in shapes[:2]:  # d = 128 and d = 64
            best, log = _sweep(shape)
            sweep_log += log
            chosen[shape[-1]] = best
            print(f"best for d={shape[-1]}: {best}", flush=True)
    rows = []
    for shape in shapes:
        if shape[-1] in chosen:
            attn_mod._CONFIG_OVERRIDE.update(chosen[shape[-1]])
        for method in args.methods.split(","):
            t0 = time.time()
            r = _time(method, shape)
            rows.append(r)
            print(f"{shape} {method}: fwd {r['fwd_ms']:.3f} bwd {r['bwd_ms']:.3f} fwd+bwd "
                  f"{r['fwd_bwd_ms']:.3f} ms, peak {r['peak_mib']:.0f} MiB "
                  f"({time.time() - t0:.0f} s)", flush=True)
        attn_mod._CONFIG_OVERRIDE.clear()
    table = _markdown(rows, card, date)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attn_qat_bench.json"), "w") as fh:
        json.dump({"card": card, "date": date, "rows": rows, "sweep": sweep_log,
                   "chosen": {str(d): {k: c.__dict__ for k, c in b.items()}
                              for d, b in chosen.items()},
                   "triton": triton.__version__, "torch": torch.__version__}, fh, indent=1)
    with open(os.path.join(args.out, "attn_qat_bench.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
