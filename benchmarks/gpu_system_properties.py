"""The kernel system properties (issue 20) on the project's Triton kernel
``fp4sim.kernels.attn_qat``: every property, CUDA-graph replay included, per recipe.

Usage (a CUDA machine): ``PYTHONPATH=. python benchmarks/gpu_system_properties.py [OUT.json]``.
Prints one verdict line per property and recipe; writes the verdicts as JSON when given a path.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from fp4sim import kernels
from fp4sim.harness import KernelSpec
from fp4sim.testing.system import format_verdicts, run_system_properties

# what attn_qat documents (kernels/training_attention.py): bf16/fp16 inputs, d in {64, 128},
# GQA, causal with Lq != Lk (bottom-right), any length, autograd
SPEC = KernelSpec(dtypes=("bfloat16", "float16"), head_dims=(64, 128))


def _kernel(recipe: str):  # noqa: ANN202
    def attn(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
        return kernels.attn_qat(q, k, v, causal=causal, sm_scale=sm_scale, recipe=recipe)

    return attn


def main(argv: list[str]) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipes = ("attn-qat", "attn-qat-consistent")
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "recipes": {}}
    failed = False
    for recipe in recipes:
        start = time.perf_counter()
        verdicts = run_system_properties(_kernel(recipe), SPEC, recipe=recipe, device=device,
                                         seed=0)
        took = time.perf_counter() - start
        print(format_verdicts(verdicts, title=f"attn_qat {recipe} on {report['device']}"
                              f" ({took:.1f} s)"), flush=True)
        report["recipes"][recipe] = {"seconds": took, "verdicts": [v.to_json() for v in verdicts]}
        failed |= any(v.status == "fail" for v in verdicts)
    if len(argv) > 1:
        with open(argv[1], "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
