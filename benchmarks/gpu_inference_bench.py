"""GPU benchmark (not a test): FP4 inference attention forward vs torch SDPA bf16 forward.

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_inference_bench.py [--out results.json] [--quick]

Times ``kernels.fp4_inference_attention`` (NVFP4 and MXFP4, inputs packed once beforehand by
``pack_for_inference``, whose cost is reported separately) against
``torch.nn.functional.scaled_dot_product_attention`` on bfloat16 inputs, non-causal, at
(B, H, L, d) = (2, 16, 4096, 128), (2, 16, 4096, 64), (1, 3, 31200, 128). Timing:
``triton.testing.do_bench`` median (CUDA events, warm-up excluded); TFLOPS = 4 B H Lq Lk d / t.
A small launch-configuration sweep (block_m, num_warps, num_stages) picks the fastest per case;
every configuration's output is checked against SDPA (relative L2 error must look like FP4
quantization error, about 0.05 to 0.3, never NaN) so a fast-but-wrong configuration cannot win.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import triton

from fp4sim.kernels.inference import fp4_inference_attention, pack_for_inference

SHAPES = ((2, 16, 4096, 128), (2, 16, 4096, 64), (1, 3, 31200, 128))
CONFIGS = (  # (block_m, num_warps, num_stages); each one costs a compile per head dim
    (128, 8, 2),
    (64, 4, 3),
)


def _bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--quick", action="store_true", help="first configuration only")
    parser.add_argument("--shapes", default="0,1,2", help="indices into SHAPES (default all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name()
    results = {
        "device": dev,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cases": [],
    }
    configs = CONFIGS[:1] if args.quick else CONFIGS
    for b, h, seq, d in (SHAPES[int(i)] for i in args.shapes.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(3)
        )
        flops = 4.0 * b * h * seq * seq * d
        o_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t_sdpa = _bench(
            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        )
        row = {"shape": [b, h, seq, d], "sdpa_ms": t_sdpa, "sdpa_tflops": flops / t_sdpa * 1e-9}
        for fmt in ("nvfp4", "mxfp4"):
            packed = pack_for_inference(q, k, v, fmt)
            t_pack = _bench(lambda q=q, k=k, v=v, fmt=fmt: pack_for_inference(q, k, v, fmt))
            best = None
            for bm, nw, ns in configs:

                def run(packed=packed, fmt=fmt, bm=bm, nw=nw, ns=ns):
                    return fp4_inference_attention(
                        *packed, fmt=fmt, block_m=bm, num_warps=nw, num_stages=ns
                    )

                try:
                    o = run()
                    torch.cuda.synchronize()
                except Exception as exc:  # a configuration that does not compile is skipped
                    print(f"  {fmt} {bm}/{nw}/{ns}: {type(exc).__name__}: {exc}"[:300])
                    continue
                err = _rel(o, o_sdpa)
                ok = bool(torch.isfinite(o.float()).all()) and 0.0 < err < 0.5
                t = _bench(run) if ok else float("nan")
                print(
                    f"  {b}x{h}x{seq}x{d} {fmt} block_m={bm} warps={nw} stages={ns}: "
                    f"{t:.3f} ms, rel err vs SDPA {err:.4f}{'' if ok else ' REJECTED'}"
                )
                if ok and (best is None or t < best["ms"]):
                    best = {
                        "ms": t,
                        "block_m": bm,
                        "num_warps": nw,
                        "num_stages": ns,
                        "rel_err_vs_sdpa": err,
                    }
            if best is not None:
                best["tflops"] = flops / best["ms"] * 1e-9
                best["ratio_to_sdpa"] = best["ms"] / t_sdpa
                # Ablation (what limits the kernel): the same launch without P quantization.
                cfg = {
                    "block_m": best["block_m"],
                    "num_warps": best["num_warps"],
                    "num_stages": best["num_stages"],
                }
                best["ms_without_p_quant"] = _bench(
                    lambda packed=packed, fmt=fmt, cfg=cfg: fp4_inference_attention(
                        *packed, fmt=fmt, _quantize_p=False, **cfg
                    )
                )
            row[fmt] = best
            row[f"{fmt}_pack_ms"] = t_pack
        results["cases"].append(row)
    print(
        f"\ndevice: {dev}  torch {torch.__version__}  triton {triton.__version__}  "
        f"{results['date_utc']}"
    )
    print(
        f"{'shape':>20} | {'SDPA ms':>8} {'TFLOPS':>7} | {'NVFP4 ms':>8} {'TFLOPS':>7} "
        f"{'x SDPA':>6} | {'MXFP4 ms':>8} {'TFLOPS':>7} {'x SDPA':>6} | pack ms nv/mx"
    )
    for row in results["cases"]:
        cells = [
            f"{'x'.join(map(str, row['shape'])):>20}",
            f"{row['sdpa_ms']:8.3f} {row['sdpa_tflops']:7.1f}",
        ]
        for fmt in ("nvfp4", "mxfp4"):
            r = row[fmt]
            cells.append(
                "      n/a"
                if r is None
                else f"{r['ms']:8.3f} {r['tflops']:7.1f} {r['ratio_to_sdpa']:6.2f}"
            )
        cells.append(f"{row['nvfp4_pack_ms']:.3f}/{row['mxfp4_pack_ms']:.3f}")
        cells.append(
            "no-P-quant ms nv/mx "
            + "/".join(
                "n/a" if row[f] is None else f"{row[f]['ms_without_p_quant']:.3f}"
                for f in ("nvfp4", "mxfp4")
            )
        )
        print(" | ".join(cells))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
