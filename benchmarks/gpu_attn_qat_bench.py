"""GPU benchmark of the fused Attn-QAT training attention (``kernels.attn_qat``) vs SDPA.

Not a test. Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_attn_qat_bench.py [--check] [--tune] [--out DIR]
    PYTHONPATH=. python benchmarks/gpu_attn_qat_bench.py --smoke        # correctness smoke

(memory checking of every kernel: ``benchmarks/gpu_sanitize.py``).

Times (``triton.testing.do_bench``, median, ms) of forward, backward and forward+backward, and
TFLOPS with FLOPs = 4 B H Lq Lk d (forward) and 2.5x that (backward), non-causal, bf16, for
``torch.nn.functional.scaled_dot_product_attention`` and the kernel under the recipes ``bf16``,
``attn-qat``, ``attn-qat-consistent``, at (B, H, L, d) = (2, 16, 4096, 128), (2, 16, 4096, 64),
(1, 3, 31200, 128), all in one process. Peak memory is the peak allocation above the inputs
during one forward+backward. Writes a JSON file and a Markdown table to ``--out`` (default
``$OUT`` or ``.``).

Methods: ``sdpa``; ``fastvideo`` (FastVideo's public Attn-QAT training kernel through
``fp4sim.adapters.fastvideo_attn_qat_train``, the anchor of issue 15's table; skipped with a
note unless its package ``fastvideo_kernel`` is on PYTHONPATH, README "Checking a public
kernel"); a recipe name (the current kernels with their defaults); ``old:<recipe>``
(the kernels of a saved earlier version, ``--old PATH``, default
``.dev_old/training_attention_old.py``, for before/after numbers in the same process);
``<recipe>/<switch>`` with a switch of ``training_attention._OPTIONS`` flipped
(``unpacked``, ``tma``, ``notma``, ``ws``, ``slowexp``).

``--check``: bit-for-bit comparisons on the GPU before timing: the current kernels with the
non-ftz exp against the old kernels (same numerics), the ftz exp against the old kernels
(count of differing elements), packed against unpacked Q^/K^/V^, TMA and warp-specialized
loops against plain loads; plus the reference smoke. ``--tune``: times each kernel alone over
a few launch configurations per head dim and recipe class, and uses the fastest in the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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
# --dry-run (CPU, TRITON_INTERPRET=1): every code path on tiny shapes, one call per "timing".
DRY_SHAPES = [(1, 2, 48, 128), (1, 2, 48, 64), (1, 1, 80, 128)]
DEVICE = "cuda"
# --precompile N: N worker processes (``--worker i/N``) first run every job of this script
# (check runs, tuning candidates, table rows) once on small shapes with the same kernel
# specializations, job j in worker j % N, so that Triton's on-disk cache holds the compiled
# kernels before the timed process starts (compiles run in parallel on the host's cores).
_WORKER: list = []  # [index, count] in a worker process
_JOB = [0]
CHECK_CASES = [5]  # --check-cases: how many of the --check shapes to run
_ONCE = []  # --once: every "timing" is a single untimed call (for a profiler)


def _mine() -> bool:
    """Count a job; in a worker, True if it is this worker's."""
    _JOB[0] += 1
    return not _WORKER or (_JOB[0] - 1) % _WORKER[1] == _WORKER[0]
METHODS = ["sdpa", "old:bf16", "old:attn-qat", "old:attn-qat-consistent", "bf16", "attn-qat",
           "attn-qat-consistent", "attn-qat/unpacked", "bf16/notma", "attn-qat/notma",
           "attn-qat-consistent/notma", "fastvideo"]
# The anchor kernel's package (imported by fp4sim.adapters.fastvideo_attn_qat_train)
FASTVIDEO_PACKAGE = "fastvideo_kernel"
SWITCHES = {"unpacked": ("packed", False), "tma": ("tma", True), "notma": ("tma", False),
            "ws": ("warp_spec", True), "slowexp": ("fast_exp", False)}
_OLD = {}
# Tuned launch configurations: {(head_dim, quant_p): {"fwd"|"dkdv"|"dq": _Config}}.
_TUNED: dict[tuple[int, bool], dict] = {}


def _old_module(path: str):
    if "mod" not in _OLD:
        spec = importlib.util.spec_from_file_location("fp4sim.kernels._old_training_attention",
                                                      path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _OLD["mod"] = mod
    return _OLD["mod"]


def _bench(fn, warmup, rep, grad_to_none=None):
    if DEVICE == "cuda" and not _WORKER and not _ONCE:
        return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                        return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _inputs(b, h, length, d, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (b, h, length, d)
    q, k, v, do = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    return [t.requires_grad_(True) for t in (q, k, v)], do


class _Switch:
    """Context: flip ``_OPTIONS`` switches and set the tuned configs for a recipe."""

    def __init__(self, method: str, head_dim: int):
        self.recipe, _, switch = method.partition("/")
        self.flips = dict([SWITCHES[switch]]) if switch else {}
        self.head_dim = head_dim

    def __enter__(self):
        self.saved = dict(attn_mod._OPTIONS)
        attn_mod._OPTIONS.update(self.flips)
        attn_mod._CONFIG_OVERRIDE.clear()
        attn_mod._CONFIG_OVERRIDE.update(_TUNED.get((self.head_dim, self.recipe != "bf16"), {}))
        return self

    def __exit__(self, *exc):
        attn_mod._OPTIONS.clear()
        attn_mod._OPTIONS.update(self.saved)
        attn_mod._CONFIG_OVERRIDE.clear()


def _fn(method, old_path):
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method == "fastvideo":
        from fp4sim.adapters import fastvideo_attn_qat_train as fastvideo  # lazy: optional

        return lambda q, k, v: fastvideo.attention(q, k, v, False, 1.0 / math.sqrt(q.shape[-1]))
    if method.startswith("old:"):
        mod = _old_module(old_path)
        recipe = method[4:]
        return lambda q, k, v: mod.attn_qat(q, k, v, recipe=recipe)
    recipe = method.partition("/")[0]
    return lambda q, k, v: attn_mod.attn_qat(q, k, v, recipe=recipe)


def _time(method, shape, old_path, reps=(25, 100)):
    (q, k, v), do = _inputs(*shape)
    f = _fn(method, old_path)
    warm, rep = reps
    with _Switch(method if not method.startswith(("sdpa", "old:", "fastvideo")) else "x",
                 shape[-1]):
        t_fwd = _bench(lambda: f(q, k, v), warm, rep)
        graph = [f(q, k, v)]
        t_bwd = _bench(lambda: graph[0].backward(do, retain_graph=True), warm, rep,
                       grad_to_none=[q, k, v])
        graph.clear()
        t_all = _bench(lambda: f(q, k, v).backward(do), warm, rep, grad_to_none=[q, k, v])
        for t in (q, k, v):
            t.grad = None
        peak = 0
        if DEVICE == "cuda" and not _WORKER:
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


# Launch configurations tried by --tune (BLOCK_M, BLOCK_N, warps, stages); the FP4 recipes'
# forward BLOCK_N is the recipe's 64.
TUNE_CANDIDATES = {
    True: {  # with the P quantizer
        "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 4), (128, 64, 8, 4),
                (128, 64, 4, 3)],
        "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2),
                 (64, 128, 4, 3)],
        "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3),
               (128, 64, 4, 3)],
    },
    False: {
        "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 64, 4, 3), (128, 128, 8, 4), (64, 128, 4, 3)],
        "dkdv": [(64, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                 (128, 64, 8, 2)],
        "dq": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3)],
    },
}


def _tune(shape, quant_p):
    """Time each kernel's candidates alone (forward: the whole forward; dK/dV, dQ: the whole
    backward with the other kernel at its default); return the fastest per kernel."""
    Cfg = attn_mod._Config
    recipe = "attn-qat" if quant_p else "bf16"
    (q, k, v), do = _inputs(*shape)
    q, k, v = (t.detach() for t in (q, k, v))
    if quant_p:
        q, k, v = (attn_mod._fake_quantize(t) for t in (q, k, v))
    tau = 1.0 / math.sqrt(shape[-1])
    best, log = {}, []
    for name, cands in TUNE_CANDIDATES[quant_p].items():
        results = []
        for cand in cands:
            if not _mine():
                continue
            cfg = Cfg(*cand)
            attn_mod._CONFIG_OVERRIDE.clear()
            attn_mod._CONFIG_OVERRIDE[name] = cfg
            try:
                fwd = attn_mod._forward_impl(q, k, v, False, tau, recipe, False, False, False)
                if name == "fwd":
                    def run():
                        attn_mod._forward_impl(q, k, v, False, tau, recipe, False, False, False)
                else:
                    def run(fwd=fwd):
                        attn_mod._backward_impl(do, q, k, v, fwd.o, fwd.o_hp, fwd.lse, fwd.m,
                                                fwd.l, False, tau, recipe, False)
                t = _bench(run, 10, 40)
            except Exception as exc:  # out of resources etc.
                t = float("inf")
                print(f"  {name} {cfg}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            results.append((t, cfg))
            log.append({"kernel": name, "shape": list(shape), "recipe": recipe,
                        "config": cfg.__dict__, "ms": t})
            print(f"  tune {shape} {recipe} {name} {cand}: {t:.3f} ms", flush=True)
        if results:
            best[name] = min(results, key=lambda r: r[0])[1]
    attn_mod._CONFIG_OVERRIDE.clear()
    return best, log


# Implementations compared bit for bit with the old kernels by --check ("slowexp": same numerics
# as the old kernels, must be equal where tau is a power of two; the others report the elements
# that differ; the GPU tests check that the switches are bit-neutral among themselves).
CHECK_VARIANTS = {"slowexp": {"fast_exp": False}, "default": {}, "unpacked": {"packed": False},
                  "tma": {"tma": True}, "notma": {"tma": False}}


class _Options:
    def __init__(self, flips):
        self.flips = flips

    def __enter__(self):
        self.saved = dict(attn_mod._OPTIONS)
        attn_mod._OPTIONS.update(self.flips)

    def __exit__(self, *exc):
        attn_mod._OPTIONS.clear()
        attn_mod._OPTIONS.update(self.saved)


def _bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _check(old_path):
    """Bit-for-bit comparisons between implementations on the GPU; returns True if all the
    comparisons that must be exact are."""
    old = _old_module(old_path)
    torch.manual_seed(0)
    ok = True
    cases = [(1, 4, 2, 777, 1000, 128, True), (2, 2, 2, 300, 129, 64, False),
             (1, 2, 1, 256, 256, 64, False), (1, 2, 2, 1000, 700, 128, True),
             (1, 2, 2, 4096, 4096, 128, False)]
    if DEVICE != "cuda":
        cases = [(1, 2, 1, 37, 45, 64, True), (1, 2, 2, 40, 33, 128, False)]
    cases = cases[:CHECK_CASES[0]]
    for recipe in ("bf16", "attn-qat", "attn-qat-consistent"):
        for (b, h, hkv, lq, lk, d, causal) in cases:
            q = torch.randn(b, h, lq, d, device=DEVICE, dtype=torch.bfloat16)
            k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16)
            v = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16)
            do = torch.randn_like(q)

            def run(fn, q=q, k=k, v=v, do=do, causal=causal, recipe=recipe):
                qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
                o = fn(qg, kg, vg, causal=causal, recipe=recipe)
                o.backward(do)
                return [o.detach(), qg.grad, kg.grad, vg.grad]

            if _WORKER:  # compile only: each variant is a job
                for flips in CHECK_VARIANTS.values():
                    if _mine():
                        with _Options(flips):
                            run(attn_mod.attn_qat)
                if _mine():
                    run(old.attn_qat)
                continue
            ref = run(old.attn_qat)
            line = []
            for name, flips in CHECK_VARIANTS.items():
                saved = dict(attn_mod._OPTIONS)
                attn_mod._OPTIONS.update(flips)
                try:
                    got = run(attn_mod.attn_qat)
                    same = [_bits_equal(x, y) for x, y in zip(got, ref, strict=True)]
                    ndiff = sum(int((x != y).sum()) for x, y in zip(got, ref, strict=True))
                    maxd = max(float((x.float() - y.float()).abs().max())
                               for x, y in zip(got, ref, strict=True))
                    # slowexp has the old kernels' numerics except that the new forward
                    # contracts S*tau - m into one fma in unmasked tiles (comment in
                    # kernels/attn_qat_forward.py): bit-equal only where S*tau is exact,
                    # i.e. tau = 1/sqrt(d) is a power of two.
                    must = name == "slowexp" and math.log2(d) % 2 == 0
                    if must and not all(same):
                        ok = False
                    line.append(f"{name}: {'EQUAL' if all(same) else 'DIFF'} "
                                f"({ndiff} el, max {maxd:.2e})")
                except Exception as exc:
                    line.append(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
                    if name in ("slowexp", "default", "unpacked"):
                        ok = False
                finally:
                    attn_mod._OPTIONS.clear()
                    attn_mod._OPTIONS.update(saved)
            print(f"check {recipe} {(b, h, hkv, lq, lk, d, causal)} vs old: " + "; ".join(line),
                  flush=True)
    if _WORKER:
        return True
    # packed decode == materialized fake quantization, bit for bit (fast and portable paths)
    from fp4sim.kernels.attn_qat_packing import decode, fake_quantize  # lazy: --check only
    for dt in (torch.bfloat16, torch.float16):
        x = (torch.randn(3, 5, 333, 128, device=DEVICE) * torch.logspace(
            -4, 4, 128, device=DEVICE)).to(dt)
        xh, codes, scales = fake_quantize(x, pack=True)
        for fast in (True, False):
            y = decode(codes, scales, dt, fast=fast)
            eq = _bits_equal(y, xh)
            ok &= eq
            print(f"check decode {dt} fast={fast}: {'EQUAL' if eq else 'DIFF'}", flush=True)
    return ok


def _smoke():
    """Quick GPU correctness: each recipe against the float64 reference (relative L2)."""
    from fp4sim import reference  # lazy: --check only (the reference layer is large)
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
            worst = max(worst, *(errs[n] for n in ("o", "dq", "dk", "dv")))
            print(f"smoke {recipe} {(b, h, hkv, lq, lk, d, causal)}: "
                  + " ".join(f"{n} {e:.2e}" for n, e in errs.items()), flush=True)
    print(f"smoke worst relative L2 error {worst:.3e}")
    return worst < 2e-2


def _precompile(n: int, argv: list[str], out: str) -> None:
    import subprocess  # lazy: --precompile only

    os.makedirs(out, exist_ok=True)
    procs = []
    for i in range(n):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", f"{i}/{n}"]
        log = open(os.path.join(out, f"precompile_{i}.log"), "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
    parser.add_argument("--tune", action="store_true", help="tune launch configs first")
    parser.add_argument("--check", action="store_true", help="bit comparisons first")
    parser.add_argument("--smoke", action="store_true", help="correctness smoke only")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shapes", default="all", help="'all' or indices, e.g. 0,1")
    parser.add_argument("--old", default=".dev_old/training_attention_old.py")
    parser.add_argument("--budget", type=float, default=1e9,
                        help="seconds since the start (precompile, --check and --tune "
                             "included); skip the remaining table rows after this")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU under TRITON_INTERPRET=1: tiny shapes, untimed")
    parser.add_argument("--precompile", type=int, default=0, help="parallel compile workers")
    parser.add_argument("--check-cases", type=int, default=5)
    parser.add_argument("--once", action="store_true",
                        help="one untimed forward+backward per row (for ncu)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE, SHAPES
    if args.dry_run:
        DEVICE, SHAPES = "cpu", DRY_SHAPES
    CHECK_CASES[0] = args.check_cases
    if args.once:
        _ONCE.append(True)
    if args.worker:
        _WORKER.extend(int(x) for x in args.worker.split("/"))
        # same kernel specializations as the real shapes (d, recipe, n_rows % 16 == 0)
        SHAPES = [(1, 2, 256, d) for (_b, _h, _l, d) in SHAPES]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    start = time.time()
    if args.smoke:
        return 0 if _smoke() else 1
    if args.precompile and not args.worker:
        _precompile(args.precompile, argv if argv is not None else sys.argv[1:], args.out)
        print(f"precompile done ({time.time() - start:.0f} s)", flush=True)
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = args.methods.split(",")
    if not os.path.exists(args.old):
        methods = [m for m in methods if not m.startswith("old:")]
        print(f"no old kernel at {args.old}: old:* methods skipped", flush=True)
    if "fastvideo" in methods and importlib.util.find_spec(FASTVIDEO_PACKAGE) is None:
        methods.remove("fastvideo")
        print(f"no {FASTVIDEO_PACKAGE} package on PYTHONPATH: fastvideo skipped", flush=True)
    check_ok = None
    if args.check:
        check_ok = _check(args.old) and (DEVICE != "cuda" or bool(_WORKER) or _smoke())
        print(f"CHECK {'PASSED' if check_ok else 'FAILED'} ({time.time() - start:.0f} s)",
              flush=True)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    tune_log = []
    if args.tune:
        for shape in shapes[:2]:  # d = 128 and d = 64
            for quant_p in (False, True):
                best, log = _tune(shape, quant_p)
                tune_log += log
                if not _WORKER:  # a worker's subset is no ranking
                    _TUNED[(shape[-1], quant_p)] = best
                print(f"best for d={shape[-1]} quant_p={quant_p}: {best} "
                      f"({time.time() - start:.0f} s)", flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    if _WORKER:
        shapes = list(dict.fromkeys(shapes))  # the long shape compiles as the d = 128 one
    for shape in shapes:
        for method in methods:
            if not _mine():
                continue
            if time.time() - start > args.budget:
                print(f"budget reached: {shape} {method} skipped", flush=True)
                continue
            t0 = time.time()
            try:
                r = _time(method, shape, args.old)
            except Exception as exc:
                print(f"{shape} {method}: FAILED {type(exc).__name__}: {str(exc)[:200]}",
                      flush=True)
                continue
            rows.append(r)
            print(f"{shape} {method}: fwd {r['fwd_ms']:.3f} bwd {r['bwd_ms']:.3f} fwd+bwd "
                  f"{r['fwd_bwd_ms']:.3f} ms, peak {r['peak_mib']:.0f} MiB "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if _WORKER:
            continue
        table = _markdown(rows, card, date)
        with open(os.path.join(args.out, "attn_qat_bench.json"), "w") as fh:
            json.dump({"card": card, "date": date, "rows": rows, "tune": tune_log,
                       "tuned": {f"d{d}_qp{int(qp)}": {k: c.__dict__ for k, c in b.items()}
                                 for (d, qp), b in _TUNED.items()},
                       "check_ok": check_ok, "options": attn_mod._OPTIONS,
                       "triton": triton.__version__, "torch": torch.__version__}, fh, indent=1)
        with open(os.path.join(args.out, "attn_qat_bench.md"), "w") as fh:
            fh.write(table + "\n")
    if _WORKER:
        print(f"worker {_WORKER} done: {_JOB[0]} jobs counted ({time.time() - start:.0f} s)")
        return 0
    print(_markdown(rows, card, date))
    print(f"total {time.time() - start:.0f} s")
    return 0 if check_ok in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
