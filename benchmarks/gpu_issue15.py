"""Issue 15's tables in one run: training, decode and prefill against SDPA, then the verdicts.

Run on a CUDA machine from the repository root:

    PYTHONPATH=. python benchmarks/gpu_issue15.py --out DIR [--train-args "..."]
        [--decode-args "..."]

1. ``gpu_attn_qat_bench.py --out DIR --methods ...`` (SDPA, the bf16 / attn-qat /
   attn-qat-consistent recipes through ``kernels.attn_qat``, attn-qat with Q^, K^, V^ saved
   unpacked, and FastVideo's public kernel when its package is on PYTHONPATH: forward and
   forward+backward, peak memory);
2. ``gpu_decode_bench.py --prefill --out DIR`` (the decode table and the prefill shapes);
3. ``perf_targets.py`` on the two JSON files it wrote.

Extra arguments for each benchmark go in ``--train-args`` / ``--decode-args`` (one string,
split like a shell line; a ``--methods`` there replaces ``TRAIN_METHODS``). Exit status: 2
when a benchmark failed (exit status not 0, or no JSON file), otherwise the verdicts' (0 every
target met, 1 some missed or not measured).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_attn_qat_bench  # noqa: E402
import gpu_decode_bench  # noqa: E402
import perf_targets  # noqa: E402

# Issue 15's table: its four columns (SDPA, attn-qat, attn-qat-consistent, FastVideo's public
# kernel), the bf16-recipe row it asks for beside them, and the unpacked operands for memory.
TRAIN_METHODS = "sdpa,bf16,attn-qat,attn-qat-consistent,attn-qat/unpacked,fastvideo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder")
    parser.add_argument("--train-args", default="", help="more gpu_attn_qat_bench.py arguments")
    parser.add_argument("--decode-args", default="", help="more gpu_decode_bench.py arguments")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train_json = os.path.join(args.out, "attn_qat_bench.json")
    decode_json = os.path.join(args.out, "decode_bench.json")
    failed = []
    steps = (
        ("gpu_attn_qat_bench", gpu_attn_qat_bench.main,
         ["--out", args.out, "--methods", TRAIN_METHODS, *shlex.split(args.train_args)],
         train_json),
        ("gpu_decode_bench", gpu_decode_bench.main,
         ["--out", args.out, "--prefill", *shlex.split(args.decode_args)], decode_json),
    )
    for name, run, step_argv, written in steps:
        print(f"== {name} {shlex.join(step_argv)}", flush=True)
        rc = run(step_argv)
        if rc != 0 or not os.path.exists(written):
            failed.append(f"{name} (exit {rc}{'' if os.path.exists(written) else ', no JSON'})")
    print("== perf_targets", flush=True)
    verdict = perf_targets.main(["--train", train_json, "--decode", decode_json])
    if failed:
        print(f"gpu_issue15: failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
