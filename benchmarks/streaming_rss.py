"""Peak RSS and wall time of the streaming reference at one shape (or the dense one).

    python benchmarks/streaming_rss.py --length 16384            # streaming, L = 16384
    python benchmarks/streaming_rss.py --length 4096 --dense     # the dense reference

Runs what ``fp4sim report`` runs for one streamed case: the forward (with diagnostics), the
backward variants in one walk (``--variants``; default the report's six besides ste_tiled),
ste_tiled, and the exact float64 attention with its gradient, at B = H = 1, d = 64, attn-qat
recipe; prints one JSON line: seconds per component and the process's peak RSS
(ru_maxrss). Run each configuration in its own process: the peak RSS is the process's
high-water mark. One torch thread by default, as the report uses on the CPU (on a shared,
loaded CPU two OpenMP threads were 10-300x slower per operation: workers spin-wait for a
preempted peer).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from fp4sim import reference
from fp4sim.reference import streaming

WALK = ("ste_autograd", "exact", "drop_in", "p_only", "o_only", "attn_qat")
"""The report's backward variants besides ste_tiled (computed in one walk)."""


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dense", action="store_true", help="the dense reference instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="*", default=list(WALK),
                        help="backward variants of the one streamed walk")
    parser.add_argument("--no-ste-tiled", action="store_true", help="skip ste_tiled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, args.length, args.head_dim)
    q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
    recipe = reference.get_recipe("attn-qat")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.dense:
        fwd = reference.fp4_attention_forward(q, k, v, recipe, diagnostics=True)
    else:
        fwd = streaming.streaming_forward(q, k, v, recipe, diagnostics=True)
    times["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.dense:
        for variant in args.variants:
            reference.attention_backward(variant, fwd, q, k, v, do, recipe)
    else:
        streaming.streaming_backward(args.variants, fwd, q, k, v, do, recipe)
    times["backward_walk"] = time.perf_counter() - t0
    if not args.no_ste_tiled:
        t0 = time.perf_counter()
        if args.dense:
            reference.attention_backward("ste_tiled", fwd, q, k, v, do, recipe)
        else:
            streaming.streaming_backward(["ste_tiled"], fwd, q, k, v, do, recipe)
        times["backward_ste_tiled"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.dense:
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        o = reference.attention_exact(*leaves)
        torch.autograd.grad(o, leaves, do.double())
    else:
        streaming.streaming_exact(q, k, v, do)
    times["exact_float64"] = time.perf_counter() - t0
    print(json.dumps({
        "variants": args.variants,
        "path": "dense" if args.dense else "streaming",
        "length": args.length,
        "head_dim": args.head_dim,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(t, 2) for k, t in times.items()},
        "total_seconds": round(sum(times.values()), 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
