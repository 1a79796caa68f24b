"""GPU benchmark (not a test): split-KV FP4 decode attention vs torch SDPA bf16 decode.

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_decode_bench.py [--out DIR] [--budget-s 170]
    PYTHONPATH=. python benchmarks/gpu_decode_bench.py --sanitize   # one small run per kernel
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_decode_bench.py --smoke   # CPU

1. Copy ceiling: a 1 GiB device-to-device copy, bandwidth = (read + write bytes) / time.
2. Correctness (GPU): ``kernels.decode.fp4_decode_attention`` on a few shapes (NVFP4, MXFP4,
   causal and not, GQA, ragged Lk, several split counts, every decode mode) against the
   float64 reference of the split schedule (``property_tests/decode_schedule.py``, derived
   elementwise bound with P-code-flip rows allowed); outputs poisoned with NaN first.
3. Decode table: B in {1, 8}, (Hq, Hkv) in {(8, 1), (32, 8)}, Lq in {1, 16}, Lk in {8192,
   32768, 131072}, d = 128, non-causal (bottom-right causal masks at most 15 of >= 8192 keys
   here; one causal row is timed for the llm-L131072-decode scenario). Baseline: the faster of
   SDPA with ``enable_gqa=True`` and SDPA on the folded layout (Q viewed as (B, Hkv, G Lq, d),
   the same function when not causal). Timing: CUDA-graph replays of R calls, each on its own
   input set (R sets together exceed 4x the L2, so no call reads a cached set); ms = replay
   time / R (median of replays). Bytes: each input read once, O written once (FP4: codes +
   scale bytes; bf16: 2 bytes an element), plus for FP4 the split partials written and read.
   Per format: the fastest correct configuration of a sweep (split counts, merges, tiles an
   iteration, ...) and, as ``default``, the call a user makes (key-tiled V, every other knob
   at the kernel's default), which ``perf_targets.py`` judges.
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
import triton
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "property_tests"))

from decode_schedule import check_output, decode_schedule_reference  # noqa: E402

from fp4sim.kernels import decode as decode_mod  # noqa: E402
from fp4sim.kernels.decode import (  # noqa: E402
    _sm_count,
    default_num_splits,
    fp4_decode_attention,
    split_bounds,
    tile_v,
)
from fp4sim.kernels.inference import (  # noqa: E402
    fp4_inference_attention,
    pack_for_inference,
)

D = 128
L2_BYTES = 50 * 2**20


def _log(msg: str) -> None:
    print(msg, flush=True)


def copy_bandwidth(nbytes: int = 2**30) -> dict:
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = sorted(times)[len(times) // 2]
    del x, y
    torch.cuda.empty_cache()
    return {"bytes": 2 * nbytes, "ms": ms, "gbps": 2 * nbytes / ms * 1e-6}


def _graph_time(calls, replays: int = 15) -> float:
    """Median ms per call over CUDA-graph replays of all ``calls`` (each a no-arg callable)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up: compile, autotune, allocator
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(calls))
    del g
    return sorted(times)[len(times) // 2]


def _poisoned_run(packed, fmt, causal, **kw) -> torch.Tensor:
    b, h, lq, d2 = packed[0].shape
    out = torch.full((b, h, lq, 2 * d2), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp4_decode_attention(*packed, fmt=fmt, causal=causal, out=out, **kw)
    torch.cuda.synchronize()
    return out


CHECK_CASES = (  # (B, H, Hkv, Lq, Lk, causal, splits)
    (1, 8, 1, 16, 1000, True, 3),
    (2, 8, 2, 1, 2065, False, 5),
    (1, 32, 8, 16, 700, True, 1),
    (1, 8, 1, 1, 5000, False, 60),  # 40 splits of 2 tiles: blocked merge steps of 32, one padded
)


def correctness(device: str, modes: list[str], cases=CHECK_CASES) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(123)
    for bsz, h, hkv, lq, lk, causal, splits in cases:
        q = torch.randn(bsz, h, lq, D, generator=g)
        k = torch.randn(bsz, hkv, lk, D, generator=g) * 1.5
        v = torch.randn(bsz, hkv, lk, D, generator=g)
        for fmt in ("nvfp4", "mxfp4"):
            ref = decode_schedule_reference(q, k, v, fmt, causal, splits)
            packed = pack_for_inference(q.to(device), k.to(device), v.to(device), fmt)
            tiled = (*packed[:4], *tile_v(packed[4], packed[5]))
            # every decode mode; V tiled; the blocked merge; two key tiles an iteration
            # (kernels/decode.py docstring)
            runs = ([(m, False, "serial", 1) for m in modes] + [(modes[0], True, "serial", 1)]
                    + [(modes[0], True, "blocked", 1), (modes[0], True, "blocked", 2)])
            for mode, use_tiled, merge, unroll in runs:
                t0 = time.time()
                inputs = tiled if use_tiled else packed
                try:
                    if device == "cuda":
                        o = _poisoned_run(inputs, fmt, causal, num_splits=splits, decode=mode,
                                          merge=merge, unroll=unroll)
                    else:
                        o = fp4_decode_attention(
                            *inputs, fmt=fmt, causal=causal, num_splits=splits, decode=mode,
                            merge=merge, unroll=unroll,
                        )
                except Exception as exc:  # a mode that fails to compile is reported
                    rep = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
                else:
                    rep = check_output(o.float().cpu(), ref)
                rep.update(
                    case=[bsz, h, hkv, lq, lk, causal, splits], fmt=fmt, decode=mode,
                    v_tiled=use_tiled, merge=merge, unroll=unroll, s=round(time.time() - t0, 2),
                )
                _log(f"  check {rep}")
                out.append(rep)
    return out


TABLE = (  # (B, Hq, Hkv, Lq, Lk), the llm-L131072-decode shape first, then by importance
    (1, 8, 1, 16, 131072),
    (1, 8, 1, 1, 131072),
    (8, 32, 8, 1, 131072),
    (8, 32, 8, 16, 131072),
    (1, 8, 1, 1, 32768),
    (8, 32, 8, 16, 32768),
    (1, 8, 1, 1, 8192),
    (8, 32, 8, 1, 8192),
    (1, 8, 1, 16, 8192),
    (1, 32, 8, 1, 131072),
    (8, 8, 1, 1, 131072),
    (8, 32, 8, 1, 32768),
    (1, 8, 1, 16, 32768),
    (8, 32, 8, 16, 8192),
)


def _fp4_bytes(bsz, hq, hkv, lq, lk, fmt, splits) -> tuple[int, int]:
    blk = 16 if fmt == "nvfp4" else 32
    kv = 2 * bsz * hkv * lk * (D // 2 + D // blk)
    qo = bsz * hq * lq * (D // 2 + D // blk) + bsz * hq * lq * D * 2
    ws = 0 if splits == 1 else 2 * bsz * hq * lq * splits * (D + 2) * 4
    return kv + qo, ws


def bench_case(bsz, hq, hkv, lq, lk, modes, split_sweep, copy_gbps, causal=False) -> dict:
    g = hq // hkv
    fp4_set = _fp4_bytes(bsz, hq, hkv, lq, lk, "nvfp4", 1)[0]
    n_sets = max(1, min(48, math.ceil(4 * L2_BYTES / fp4_set)))
    gen = torch.Generator(device="cuda").manual_seed(lk + bsz)
    nb = n_sets * bsz
    q = torch.randn(nb, hq, lq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(nb, hkv, lk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(nb, hkv, lk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    sets = [slice(i * bsz, (i + 1) * bsz) for i in range(n_sets)]
    row = {"shape": [bsz, hq, hkv, lq, lk, D], "causal": causal, "sets": n_sets}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bf16_bytes = 2 * bsz * hkv * lk * D * 2 + 2 * bsz * hq * lq * D * 2
    ref_o = None
    if not causal:
        t_gqa = _graph_time([lambda s=s: sdpa(q[s], k[s], v[s], enable_gqa=True) for s in sets])

        def folded(s):
            return sdpa(q[s].reshape(bsz, hkv, g * lq, D), k[s], v[s])

        t_fold = _graph_time([lambda s=s: folded(s) for s in sets])
        row.update(sdpa_gqa_ms=t_gqa, sdpa_folded_ms=t_fold)
        t_sdpa = min(t_gqa, t_fold)
        ref_o = sdpa(q[sets[0]], k[sets[0]], v[sets[0]], enable_gqa=True).float()
    else:
        try:
            mask = causal_lower_right(lq, lk)
            t_sdpa = _graph_time(
                [lambda s=s: sdpa(q[s], k[s], v[s], attn_mask=mask, enable_gqa=True) for s in sets]
            )
        except Exception as exc:  # not every backend takes the lower-right bias with GQA
            _log(f"  SDPA causal_lower_right: {type(exc).__name__}: {exc}"[:200])
            t_sdpa = float("nan")
    row["sdpa_ms"] = t_sdpa
    row["sdpa_gbps"] = bf16_bytes / t_sdpa * 1e-6
    row["sdpa_pct_copy"] = 100 * row["sdpa_gbps"] / copy_gbps
    rows_per_prog = min(128, max(16, 1 << max(0, (g * lq - 1).bit_length())))
    rb = math.ceil(g * lq / rows_per_prog)
    rule = default_num_splits(bsz * hkv, rb, rows_per_prog, lk, _sm_count(torch.device("cuda")))
    for fmt in ("nvfp4", "mxfp4"):
        packed = pack_for_inference(q, k, v, fmt)
        psets = [tuple(t[s] for t in packed) for s in sets]
        vt = tile_v(packed[4], packed[5])  # the decode layout: each key tile's V^T contiguous
        tsets = [(*p[:4], vt[0][s], vt[1][s]) for p, s in zip(psets, sets, strict=True)]
        best = None
        tried = []
        # Requested counts that give the same actual splits (split_bounds) are tried once.
        split_opts = sorted(
            {len(split_bounds(lk, max(1, int(rule * f)))[1]) for f in (1.0, *split_sweep)}
        )
        # (decode, splits, warps, stages, V tiled, merge, unroll); None: the kernel's default
        configs = [(mode, sp, None, None, True, "serial", 1) for mode in modes for sp in split_opts]
        rule_sp = len(split_bounds(lk, rule)[1])
        configs.append((modes[0], rule_sp, None, None, False, "serial", 1))  # the untiled V^T
        if split_sweep and rows_per_prog == 16:  # small programs: also 2 and 8 warps
            configs += [(modes[0], rule_sp, w, None, True, "serial", 1) for w in (2, 8)]
        if split_sweep and rows_per_prog == 128:  # one program per SM: pipeline depth
            configs += [(modes[0], rule_sp, None, st, True, "serial", 1) for st in (2, 4)]
        # the blocked merge at every split count that merges, and two key tiles an iteration
        # (kernels/decode.py docstring)
        configs += [(modes[0], sp, None, None, True, "blocked", 1) for sp in split_opts if sp > 1]
        configs += [(modes[0], sp, None, None, True, "blocked" if sp > 1 else "serial", 2)
                    for sp in split_opts]
        for mode, sp, warps, stages, tiled, merge, unroll in configs:
            inputs = tsets if tiled else psets
            try:
                o = fp4_decode_attention(
                    *inputs[0], fmt=fmt, causal=causal, num_splits=sp, decode=mode,
                    num_warps=warps, num_stages=stages, merge=merge, unroll=unroll,
                ).float()
                ok = bool(torch.isfinite(o).all())
                err = (
                    float((o - ref_o).norm() / ref_o.norm()) if ref_o is not None else 0.0
                )
                ok = ok and err < 0.5
                t = _graph_time(
                    [
                        lambda p=p, sp=sp, mode=mode, fmt=fmt, w=warps, st=stages, mg=merge,
                        u=unroll: (
                            fp4_decode_attention(
                                *p, fmt=fmt, causal=causal, num_splits=sp, decode=mode,
                                num_warps=w, num_stages=st, merge=mg, unroll=u,
                            )
                        )
                        for p in inputs
                    ]
                )
            except Exception as exc:
                _log(f"  {fmt} {mode} splits={sp} merge={merge} unroll={unroll}: "
                     f"{type(exc).__name__}: {exc}"[:300])
                continue
            tried.append({"decode": mode, "splits": sp, "warps": warps, "stages": stages,
                          "v_tiled": tiled, "merge": merge, "unroll": unroll, "ms": t,
                          "err_vs_sdpa": err, "ok": ok})
            if ok and (best is None or t < best["ms"]):
                best = tried[-1]
        if best is not None:
            useful, ws = _fp4_bytes(bsz, hq, hkv, lq, lk, fmt, best["splits"])
            best = dict(best)
            best["gbps"] = useful / best["ms"] * 1e-6
            best["gbps_with_partials"] = (useful + ws) / best["ms"] * 1e-6
            best["pct_copy"] = 100 * best["gbps"] / copy_gbps
            best["speedup_vs_sdpa"] = t_sdpa / best["ms"]
            best["rule_splits"] = rule
            try:
                best["default"] = _time_default(tsets, fmt, causal, ref_o, t_sdpa, rule, lk)
            except Exception as exc:  # keep the sweep's results
                _log(f"  {fmt} defaults: {type(exc).__name__}: {exc}"[:300])
        row[fmt] = best
        row[f"{fmt}_tried"] = tried
        del packed, psets, vt, tsets
    return row


def _time_default(tsets, fmt, causal, ref_o, t_sdpa, rule, lk) -> dict:
    """The call a user makes (README): key-tiled V, every knob at the kernel's default."""
    o = fp4_decode_attention(*tsets[0], fmt=fmt, causal=causal).float()
    err = float((o - ref_o).norm() / ref_o.norm()) if ref_o is not None else 0.0
    ok = bool(torch.isfinite(o).all()) and err < 0.5
    t = _graph_time([lambda p=p: fp4_decode_attention(*p, fmt=fmt, causal=causal)
                     for p in tsets])
    return {"ms": t, "speedup_vs_sdpa": t_sdpa / t, "splits": len(split_bounds(lk, rule)[1]),
            "err_vs_sdpa": err, "ok": ok}


PREFILL_SHAPES = ((2, 16, 4096, 128), (2, 16, 4096, 64), (1, 3, 31200, 128))
# Launch configurations (BLOCK_M, warps, stages) of kernel='dense' tried per shape; the first is
# the training forward's own.
DENSE_CONFIGS = ((64, 4, 3), (128, 8, 3), (128, 8, 2), (64, 4, 4))


def prefill(budget_end: float, decode: str = "asm") -> list[dict]:
    """Issue 15's prefill shapes (non-causal, Lq = Lk): SDPA bf16 forward against
    ``fp4_inference_attention`` as a user calls it (``inference``: the default kernel) and each
    of its kernels ('tiles'; the decode kernel with one split; 'dense' at each launch
    configuration of DENSE_CONFIGS, plus its operand decode alone), each fmt; do_bench medians.
    Every timed output's relative L2 distance to SDPA's is kept beside its time."""
    from fp4sim.kernels.inference import check_packed_inputs
    from fp4sim.kernels.prefill import decode_operands, dense_prefill

    rows = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for b, h, seq, d in PREFILL_SHAPES:
        if time.time() > budget_end:
            _log(f"budget reached; prefill {b}x{h}x{seq}x{d} skipped")
            continue
        g = torch.Generator(device="cuda").manual_seed(seq + d)
        q, k, v = (
            torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(3)
        )
        ref = sdpa(q, k, v).float()
        row = {"shape": [b, h, seq, d]}
        row["sdpa_ms"] = triton.testing.do_bench(
            lambda q=q, k=k, v=v: sdpa(q, k, v), return_mode="median"
        )
        for fmt in ("nvfp4", "mxfp4"):
            packed = pack_for_inference(q, k, v, fmt)
            shp = check_packed_inputs(*packed, fmt)
            tau = 1.0 / math.sqrt(d)
            runs = [
                ("inference", lambda p=packed, f=fmt: fp4_inference_attention(*p, fmt=f)),
                ("tiles", lambda p=packed, f=fmt: fp4_inference_attention(*p, fmt=f,
                                                                          kernel="tiles")),
                ("decode1", lambda p=packed, f=fmt: fp4_decode_attention(
                    *p, fmt=f, num_splits=1, decode=decode)),
            ]
            runs += [(f"dense_{m}_{w}_{st}", lambda p=packed, s=shp, c=(m, w, st), t=tau:
                      dense_prefill(p, s, False, t, c)) for m, w, st in DENSE_CONFIGS]
            for name, fn in runs:
                try:
                    o = fn().float()
                    err = float((o - ref).norm() / ref.norm())
                    ms = triton.testing.do_bench(fn, return_mode="median")
                except Exception as exc:
                    _log(f"  prefill {fmt} {name}: {type(exc).__name__}: {exc}"[:300])
                    continue
                row[f"{fmt}_{name}_ms"] = ms
                row[f"{fmt}_{name}_x_sdpa"] = ms / row["sdpa_ms"]
                row[f"{fmt}_{name}_err_vs_sdpa"] = err
            row[f"{fmt}_dense_decode_only_ms"] = triton.testing.do_bench(
                lambda p=packed, s=shp: decode_operands(*p, s), return_mode="median")
        _log(f"  prefill {json.dumps(row)}")
        rows.append(row)
    return rows


def compile_probe(out_dir: str) -> list[dict]:
    """Offline sm_90 compile of the split kernel (no GPU needed): registers, spills and the SASS
    instruction count of the key loop per warp (``unroll`` tiles an iteration), by variant, with
    the loop's top opcodes.

    Triton's bundled ptxas / nvdisasm; the key loop is the longest backward branch in the
    SASS. Per key and multiprocessor the loop costs ``instr * warps / (64 unroll) / 4`` issue cycles
    (4 warp instructions a cycle at most), to hold against the memory time of a key's bytes.
    """
    import collections
    import re
    import subprocess
    from pathlib import Path

    from triton.backends.compiler import GPUTarget

    from fp4sim.kernels import decode as dec

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    kern = dec._decode_split_kernel
    rows = []
    os.makedirs(out_dir, exist_ok=True)
    variants = [  # (block_m, is_mx, decode, opk, warps, causal, v_tiled, unroll, halves)
        (16, False, 1, 2, 4, False, True, 1, True), (16, False, 1, 2, 4, False, True, 1, False),
        (16, False, 1, 2, 4, False, True, 2, True), (16, False, 1, 2, 4, False, False, 1, True),
        (16, False, 1, 2, 2, False, True, 1, True), (16, False, 2, 2, 4, False, True, 1, True),
        (16, False, 0, 1, 4, False, True, 1, False), (16, True, 1, 1, 4, False, True, 1, True),
        (16, True, 1, 1, 4, False, True, 1, False), (16, True, 1, 1, 4, False, True, 2, True),
        (64, False, 1, 2, 4, False, True, 1, True), (64, False, 1, 2, 4, False, True, 1, False),
        (64, True, 1, 1, 4, False, True, 1, True), (64, True, 1, 1, 4, False, True, 1, False),
        (128, False, 1, 2, 8, True, True, 1, True), (128, False, 1, 2, 8, True, True, 1, False),
        (128, False, 1, 2, 8, True, True, 2, True), (128, True, 1, 1, 8, True, True, 1, True),
        (128, True, 1, 1, 8, True, True, 1, False),
    ]
    for bm, mx, decode, opk, warps, causal, v_tiled, unroll, halves in variants:
        const = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=64, BLOCK=32 if mx else 16, IS_MX=mx,
                     CAUSAL=causal, DECODE=decode, OPK=opk, UPCAST=False, STATIC_TILES=0,
                     DIRECT=False, V_TILED=v_tiled, UNROLL=unroll, HALVES=halves)
        types = {}
        for n in kern.arg_names:
            if n in const:
                types[n] = "constexpr"
            elif n == "qk_scale":
                types[n] = "fp32"
            elif n.startswith("ws_"):
                types[n] = "*fp32"
            elif n.endswith("_ptr"):
                types[n] = "*bf16" if n == "o_ptr" else "*u8"
            else:
                types[n] = "i32"
        attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]]
                 for n, t in types.items() if t.startswith("*") or n == "LKP"}
        src = triton.compiler.ASTSource(kern, types, const, attrs)
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=3))
        tag = (f"bm{bm}_{'mx' if mx else 'nv'}_dec{decode}_w{warps}{'_causal' if causal else ''}"
               f"{'_vtiled' if v_tiled else ''}_unroll{unroll}{'_halves' if halves else ''}")
        base = Path(out_dir) / tag
        base.with_suffix(".ptx").write_text(c.asm["ptx"])
        log = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name=sm_90a",
                              str(base.with_suffix(".ptx")), "-o", str(base.with_suffix(".cubin"))],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([str(tools / "nvdisasm"), "-gi", str(base.with_suffix(".cubin"))],
                              capture_output=True, text=True).stdout
        instrs, labels = [], {}
        for line in sass.splitlines():
            m = re.match(r"^(\.L_x_\d+):", line.strip())
            if m:
                labels[m.group(1)] = len(instrs)
                continue
            m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?);", line)
            if m:
                instrs.append(m.group(1))
        loops = []
        for i, t in enumerate(instrs):
            m = re.search(r"BRA.*`\((\.L_x_\d+)\)", t)
            if m and labels.get(m.group(1), i + 1) <= i:
                loops.append(instrs[labels[m.group(1)]:i + 1])
        body = max(loops, key=len) if loops else []
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        row = {"variant": tag, "regs": int(regs.group(1)) if regs else None,
               "spill_bytes": int(spill.group(1)) if spill else None, "loop_instr": len(body),
               "issue_cycles_per_key_per_sm": len(body) * warps / (64 * unroll) / 4,
               "top_ops": ops.most_common(10)}
        _log(f"  {json.dumps(row)}")
        rows.append(row)
    # the merge kernels (d = 128, 4 warps; the blocked one at (rows, splits) of the table):
    # registers and spills only
    merges = [("merge_serial", dec._merge_kernel, dict(BLOCK_R=16))]
    for n_rows, n_splits in ((2, 400), (8, 342), (16, 64), (16, 3)):
        br, bs, bsm, bd = dec.merge_blocks(n_rows, D, n_splits)
        merges.append((f"merge_blocked_r{br}_s{bs}_sm{bsm}_d{bd}", dec._merge_blocked_kernel,
                       dict(BLOCK_R=br, BLOCK_S=bs, BLOCK_SM=bsm, BLOCK_D=bd)))
    for tag, kern, const in merges:
        const = dict(HEAD_DIM=D, UPCAST=False, STATIC_SPLITS=0, **const)
        types = {n: "constexpr" if n in const else "*fp32" if n.startswith("ws_")
                 else "*bf16" if n == "o_ptr" else "i32" for n in kern.arg_names}
        attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]]
                 for n, t in types.items() if t.startswith("*")}
        c = triton.compile(triton.compiler.ASTSource(kern, types, const, attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4, num_stages=3))
        base = Path(out_dir) / tag
        base.with_suffix(".ptx").write_text(c.asm["ptx"])
        log = subprocess.run([str(tools / "ptxas"), "-v", "--gpu-name=sm_90a",
                              str(base.with_suffix(".ptx")), "-o", str(base.with_suffix(".cubin"))],
                             capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        row = {"variant": tag, "regs": int(regs.group(1)) if regs else None,
               "spill_bytes": int(spill.group(1)) if spill else None}
        _log(f"  {json.dumps(row)}")
        rows.append(row)
    return rows


def sanitize() -> int:
    """One run of each kernel variant on small shapes, outputs poisoned (compute-sanitizer)."""
    # Every mode shares the loads and stores; 'asm' (with V untiled and tiled; products split
    # and joined) and 'exact' cover the operand paths, on a multi-split and a one-split (direct
    # store) case; both merge kernels run on the multi-split case.
    reps = correctness("cuda", ["asm", "exact"], cases=CHECK_CASES[:1] + CHECK_CASES[2:3])
    for halves in (False, True):  # the products split and joined, whatever use_halves picks
        decode_mod._OPTIONS["halves"] = halves
        reps += correctness("cuda", ["asm"], cases=CHECK_CASES[:1] + CHECK_CASES[2:3])
    decode_mod._OPTIONS["halves"] = None
    bad = sum(not r["ok"] for r in reps)
    print(f"sanitize runs done, {bad} failing checks", flush=True)
    return 1 if bad else 0


def _write(res: dict, out_dir: str, copy_gbps: float) -> str:
    """Write decode_bench.json and decode_bench.md (after every case: a timeout keeps them)."""
    with open(os.path.join(out_dir, "decode_bench.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    lines = [
        f"# FP4 decode vs SDPA bf16 ({res['device']}, {res['date_utc']}, torch {res['torch']}, "
        f"triton {res['triton']})",
        "",
        f"Copy ceiling: {copy_gbps:.0f} GB/s (1 GiB device-to-device, read + write).",
        "",
        "| B, Hq/Hkv, Lq, Lk | causal | SDPA ms (GB/s, % copy) | NVFP4 best ms (x faster, GB/s,"
        " % copy, splits, decode) | NVFP4 defaults ms (x faster) | MXFP4 best ms (x faster, GB/s,"
        " % copy, splits, decode) | MXFP4 defaults ms (x faster) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["cases"]:
        b, hq, hkv, lq, lk, _ = row["shape"]
        cells = [f"{b}, {hq}/{hkv}, {lq}, {lk}", str(row["causal"])]
        cells.append(f"{row['sdpa_ms']:.4f} ({row['sdpa_gbps']:.0f}, {row['sdpa_pct_copy']:.0f}%)")
        for fmt in ("nvfp4", "mxfp4"):
            r = row.get(fmt)
            cells.append(
                "n/a"
                if r is None
                else f"{r['ms']:.4f} ({r['speedup_vs_sdpa']:.2f}x, {r['gbps']:.0f}, "
                f"{r['pct_copy']:.0f}%, {r['splits']}, {r['decode']}"
                f"{'' if r.get('warps') is None else ', ' + str(r['warps']) + ' warps'}"
                f"{'' if r.get('stages') is None else ', ' + str(r['stages']) + ' stages'}"
                f"{', V tiled' if r.get('v_tiled') else ', V^T untiled'})"
            )
            dflt = (r or {}).get("default")
            cells.append("n/a" if not dflt
                         else f"{dflt['ms']:.4f} ({dflt['speedup_vs_sdpa']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    if res.get("prefill"):
        kinds = ("inference", "tiles", "decode1", "dense (best launch)")
        lines += ["", "| prefill (B, H, L, d) | SDPA ms | " + " | ".join(
            f"{f} {n} ms (x SDPA)" for f in ("nvfp4", "mxfp4") for n in kinds
        ) + " |", "|---" * (2 + 2 * len(kinds)) + "|"]
        for r in res["prefill"]:
            cells = [str(tuple(r["shape"])), f"{r['sdpa_ms']:.3f}"]
            for f in ("nvfp4", "mxfp4"):
                dense = sorted(n[len(f) + 1:-3] for n in r if n.startswith(f"{f}_dense_")
                               and n.endswith("_ms") and "decode_only" not in n)
                best = min(dense, key=lambda n: r[f"{f}_{n}_ms"], default=None)
                for n in ("inference", "tiles", "decode1", best):
                    ms = None if n is None else r.get(f"{f}_{n}_ms")
                    cells.append("n/a" if ms is None else f"{ms:.3f} ({r[f'{f}_{n}_x_sdpa']:.2f}x"
                                 + (f", {n[6:]}" if n.startswith("dense_") else "") + ")")
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "decode_bench.md"), "w") as fh:
        fh.write(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter: tiny checks")
    parser.add_argument("--sanitize", action="store_true", help="one run per kernel variant")
    parser.add_argument("--compile-probe", action="store_true", help="offline sm_90 resources")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop the table here")
    parser.add_argument("--modes", default="asm,ops", help="decode modes to time")
    parser.add_argument("--check-modes", default="asm,ops,exact", help="decode modes to check")
    parser.add_argument("--split-sweep", default="0.25,0.5,2", help="factors around the rule")
    parser.add_argument("--mode-jobs", type=int, default=2, help="jobs that time every mode")
    parser.add_argument("--cases", default="", help="indices into TABLE (default all)")
    parser.add_argument("--prefill", action="store_true", help="also the prefill shapes")
    parser.add_argument("--no-halves", action="store_true",
                        help="never split the products (decode.use_halves; before/after)")
    parser.add_argument("--prefill-only", action="store_true",
                        help="the prefill shapes only (no decode checks or table)")
    args = parser.parse_args(argv)
    t_start = time.time()
    if args.no_halves:
        decode_mod._OPTIONS["halves"] = False
    if args.compile_probe:
        compile_probe(os.path.join(args.out, "decode_compile_probe"))
        return 0
    if args.smoke:
        reps = correctness("cpu", ["exact"], cases=((1, 4, 2, 3, 200, True, 2),))
        return 0 if all(r["ok"] for r in reps) else 1
    if not torch.cuda.is_available():
        print("needs a CUDA device (or --smoke under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.sanitize:
        return sanitize()
    os.makedirs(args.out, exist_ok=True)
    res = {
        "device": torch.cuda.get_device_name(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "decode_options": dict(decode_mod._OPTIONS),
        "sm_count": _sm_count(torch.device("cuda")),
    }
    res["copy"] = copy_bandwidth()
    copy_gbps = res["copy"]["gbps"]
    _log(f"device {res['device']}; copy ceiling {copy_gbps:.0f} GB/s (read + write)")
    if args.prefill_only:
        res["cases"], res["checks"] = [], []
        res["prefill"] = prefill(t_start + args.budget_s, args.modes.split(",")[0])
        print(_write(res, args.out, copy_gbps), flush=True)
        return 0 if res["prefill"] else 1
    check_modes = [m for m in args.check_modes.split(",") if m]
    # Every check case in the first mode; the other modes on the first case only (compiles).
    checks = correctness("cuda", check_modes[:1])
    if len(check_modes) > 1:
        checks += correctness("cuda", check_modes[1:], cases=CHECK_CASES[:1])
    res["checks"] = checks
    _log(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} ok ({time.time() - t_start:.0f} s)")
    modes = [m for m in args.modes.split(",") if m]
    passed = [m for m in check_modes if all(r["ok"] for r in checks if r["decode"] == m)]
    modes = [m for m in modes if m in passed] or passed[:1] or ["exact"]
    sweep = [float(x) for x in args.split_sweep.split(",") if x]
    cases = [TABLE[int(i)] for i in args.cases.split(",")] if args.cases else list(TABLE)
    res["cases"] = []
    jobs = [(c, False) for c in cases]
    if TABLE[0] in cases:
        jobs.insert(cases.index(TABLE[0]) + 1, (TABLE[0], True))  # llm-L131072-decode: causal
    for j, (shape, causal) in enumerate(jobs):
        if time.time() - t_start > args.budget_s:
            _log(f"budget reached; skipped {shape} causal={causal}")
            continue
        t0 = time.time()
        try:
            row = bench_case(*shape, modes, sweep, copy_gbps, causal=causal)
        except Exception as exc:  # one failing case must not lose the others
            _log(f"  case {shape} causal={causal} failed: {type(exc).__name__}: {exc}"[:400])
            continue
        finally:
            torch.cuda.empty_cache()
        if j + 1 == args.mode_jobs and row.get("nvfp4"):
            modes = [row["nvfp4"]["decode"]]  # the fastest correct mode for the rest
        res["cases"].append(row)
        _log(f"  {json.dumps({k: v for k, v in row.items() if not k.endswith('_tried')})}"
             f" ({time.time() - t0:.1f} s)")
        _write(res, args.out, copy_gbps)
        if time.time() - t_start > args.budget_s * 0.6:
            sweep = []  # keep only the rule's split count from here on
    res["prefill"] = prefill(t_start + args.budget_s + 40, modes[0]) if args.prefill else []
    text = _write(res, args.out, copy_gbps)
    print(text, flush=True)
    print(f"total {time.time() - t_start:.0f} s", flush=True)
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
