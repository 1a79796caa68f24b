"""Every Triton kernel of ``kernels/`` once on small ragged shapes, for compute-sanitizer.

Run on a CUDA machine (README, developer section)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH=. compute-sanitizer --tool memcheck \
        --error-exitcode 3 python benchmarks/gpu_sanitize.py

Without PyTorch's caching allocator every tensor is its own ``cudaMalloc``, so a read or write
past a tensor's end (a missing mask on a ragged tile) lands outside any allocation and memcheck
reports it; with the allocator such an access can fall inside a pooled block and go unseen.
Lengths are chosen so that no tile divides them (7, 37, 33, 67, 91, 130 against tiles of 16 to
128). The script also checks each result against a cheap invariant (finite, outputs written), so
a run that "passes" memcheck with garbage results is not mistaken for a clean one.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fp4sim.kernels.inference as inference
import fp4sim.kernels.quantize as quantize
import fp4sim.kernels.training_attention as training

# (H, Hkv, Lq, Lk, d, causal): GQA, Lq != Lk both ways, d 64 and 128, lengths off every tile.
ATTENTION_SHAPES = [
    (2, 1, 37, 91, 64, True),
    (2, 2, 130, 67, 128, False),
    (4, 2, 70, 33, 64, True),
    (1, 1, 7, 130, 128, True),
]
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1) smoke-tests the script itself
QUANTIZE_SHAPES = [(3, 5, 16), (7, 33, 64), (1, 130, 128), (2, 3, 96)]


def _finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t.float()).all():
            raise AssertionError(f"{name}: non-finite output")


# Implementation switches of the training kernels (training._OPTIONS) run under memcheck: the
# default (packed Q^/K^/V^, tiles through tensor descriptors) and the non-default paths (plain
# loads, with packed and with materialized Q^/K^/V^).
TRAINING_OPTION_SETS = [{}, {"tma": False, "packed": False}, {"tma": False, "packed": True}]


def sanitize_training(dtype: torch.dtype, option_sets: list[int] | None = None) -> int:
    runs = 0
    # the switches do not depend on the dtype: the non-default sets run in bf16 only
    indices = range(len(TRAINING_OPTION_SETS)) if dtype == torch.bfloat16 else [0]
    for i in indices:
        if option_sets is not None and i not in option_sets:
            continue
        options = TRAINING_OPTION_SETS[i]
        saved = dict(training._OPTIONS)
        training._OPTIONS.update(options)
        start = time.time()
        try:
            n = _training_runs(dtype, options)
        finally:
            training._OPTIONS.clear()
            training._OPTIONS.update(saved)
        runs += n
        # progress, so that a run stopped by a time limit shows which parts were checked
        print(f"  training {dtype} option set {i} {options or 'default'}: {n} runs "
              f"({time.time() - start:.1f} s)", flush=True)
    return runs


def _training_runs(dtype: torch.dtype, options: dict) -> int:
    runs = 0
    for recipe in training.RECIPES:
        for h, hkv, lq, lk, d, causal in ATTENTION_SHAPES:
            q = torch.randn(1, h, lq, d, device=DEVICE, dtype=dtype, requires_grad=True)
            k = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
            v = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=dtype, requires_grad=True)
            for prequantize in (True, False):
                q.grad = k.grad = v.grad = None
                o = training.attn_qat(q, k, v, causal=causal, recipe=recipe,
                                      prequantize=prequantize)
                o.backward(torch.randn_like(o))
                _finite(f"attn_qat {recipe} {options}", o, q.grad, k.grad, v.grad)
                runs += 1
            if not options:  # the forward-only debug path does not depend on the switches
                fwd = training.attn_qat_forward(q, k, v, causal=causal, recipe=recipe,
                                                store_p=True)
                _finite(f"attn_qat_forward {recipe}", fwd.o, fwd.o_hp)
                runs += 1
    return runs


def sanitize_quantize() -> int:
    runs = 0
    for shape in QUANTIZE_SHAPES:
        x = torch.randn(shape, device=DEVICE, dtype=torch.float32) * 10
        for fmt in ("nvfp4", "mxfp4"):
            if shape[-1] % quantize.BLOCK_SIZES[fmt]:
                continue
            packed, scales, _ = quantize.quantize_fp4(x, fmt)
            assert packed.shape[-1] == shape[-1] // 2
            runs += 1
        packed, scales, tscale = quantize.quantize_fp4(x, "nvfp4", tensor_scale="amax")
        runs += 1
    return runs


def sanitize_inference() -> int:
    runs = 0
    for fmt in ("nvfp4", "mxfp4"):
        for h, hkv, lq, lk, d, causal in ATTENTION_SHAPES:
            q = torch.randn(1, h, lq, d, device=DEVICE, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, lk, d, device=DEVICE, dtype=torch.bfloat16)
            packed = inference.pack_for_inference(q, k, v, fmt)
            out = inference.fp4_inference_attention(*packed, fmt=fmt, causal=causal,
                                                    kernel="tiles")
            out2, codes = inference.fp4_inference_attention(*packed, fmt=fmt, causal=causal,
                                                            return_p_codes=True)
            _finite(f"inference {fmt}", out)
            if not torch.equal(out, out2):
                raise AssertionError(f"inference {fmt}: return_p_codes changed the output")
            runs += 2
            for kernel in inference.KERNELS:  # the other kernels (and the default) as well
                if kernel != "tiles":
                    _finite(f"inference {fmt} {kernel}", inference.fp4_inference_attention(
                        *packed, fmt=fmt, causal=causal, kernel=kernel))
                    runs += 1
            if fmt == "mxfp4":
                for ds in (True, False):
                    inference.fp4_inference_attention(*packed, fmt=fmt, causal=causal,
                                                      mx_dot_scaled=ds)
                    runs += 1
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("training", "quantize", "inference"), default=None)
    parser.add_argument("--device", default="cuda", help="cpu needs TRITON_INTERPRET=1 (smoke)")
    parser.add_argument("--option-sets", default=None,
                        help="training: indices into TRAINING_OPTION_SETS, e.g. 0 or 1,2 (split "
                             "a memcheck run that does not fit one time limit)")
    args = parser.parse_args(argv)
    option_sets = None
    if args.option_sets is not None:
        try:
            option_sets = [int(x) for x in args.option_sets.split(",")]
        except ValueError:
            parser.error(f"--option-sets takes comma-separated integers, got {args.option_sets!r}")
        bad = [i for i in option_sets if not 0 <= i < len(TRAINING_OPTION_SETS)]
        if bad:
            parser.error(f"--option-sets: {bad} out of range 0..{len(TRAINING_OPTION_SETS) - 1}")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    parts = {
        "quantize": sanitize_quantize,
        "inference": sanitize_inference,
        "training": lambda: (sanitize_training(torch.float16, option_sets)
                             + sanitize_training(torch.bfloat16, option_sets)),
    }
    for name, fn in parts.items():
        if args.only and name != args.only:
            continue
        start = time.time()
        runs = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: {runs} kernel runs finished in {time.time() - start:.1f} s", flush=True)
    print("sanitize run finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
