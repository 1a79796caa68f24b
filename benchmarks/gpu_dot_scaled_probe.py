"""GPU probe (not a test): which ``tl.dot_scaled`` e2m1 x e2m1 shapes compute correctly here.

    PYTHONPATH=. python benchmarks/gpu_dot_scaled_probe.py

1. A standalone kernel ``C = dot_scaled(A (M, K/2) uint8, sa (M, K/32), B^T (K/2, N), sb (N,
   K/32))`` with B loaded as (N, K/2) and transposed (the attention kernel's layout), for M, N,
   K in {64, 128}, against a float64 decode of the same codes and E8M0 scales.
2. ``fp4_inference_attention`` MXFP4 with each (QK^T, PV) dot_scaled choice against the
   in-register decode path, d in {64, 128}.
Prints the relative L2 error of each; a correct product is exact up to float32 accumulation
(about 1e-6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4sim.formats import E2M1_MAGNITUDES as _E2M1
from fp4sim.kernels.inference import fp4_inference_attention, pack_for_inference


@triton.jit
def _probe_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr
):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * (K // 2) + tl.arange(0, K // 2)[None, :])
    sa = tl.load(sa_ptr + rm[:, None] * (K // 32) + tl.arange(0, K // 32)[None, :])
    b = tl.load(b_ptr + rn[:, None] * (K // 2) + tl.arange(0, K // 2)[None, :])
    sb = tl.load(sb_ptr + rn[:, None] * (K // 32) + tl.arange(0, K // 32)[None, :])
    c = tl.dot_scaled(a, sa, "e2m1", tl.trans(b), sb, "e2m1")
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)


def _decode(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    mags = torch.tensor(_E2M1, dtype=torch.float64, device=packed.device)
    table = torch.cat([mags, -mags])
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
    vals = table[codes.long()]
    s = torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=1)
    return vals * s


def main() -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    print("standalone dot_scaled (M, N, K): rel err")
    for m in (64, 128):
        for n in (64, 128):
            for k in (64, 128):
                a = torch.randint(
                    0, 256, (m, k // 2), device="cuda", dtype=torch.uint8, generator=g
                )
                b = torch.randint(
                    0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=g
                )
                sa = torch.randint(
                    120, 134, (m, k // 32), device="cuda", dtype=torch.uint8, generator=g
                )
                sb = torch.randint(
                    120, 134, (n, k // 32), device="cuda", dtype=torch.uint8, generator=g
                )
                c = torch.empty(m, n, device="cuda")
                _probe_kernel[(1,)](a, sa, b, sb, c, m, n, k)
                ref = _decode(a, sa) @ _decode(b, sb).T
                err = float((c.double() - ref).norm() / ref.norm())
                print(f"  ({m:3d}, {n:3d}, {k:3d}): {err:.3e}")
    print("fp4_inference_attention mxfp4, (dot_scaled QK, PV) vs decode path: rel err")
    for d in (64, 128):
        q, k, v = (torch.randn(1, 2, 256, d, device="cuda", generator=g) for _ in range(3))
        packed = pack_for_inference(q, k, v, "mxfp4")
        base = fp4_inference_attention(*packed, fmt="mxfp4", mx_dot_scaled=False).float()
        for flags in ((True, False), (False, True), (True, True)):
            o = fp4_inference_attention(*packed, fmt="mxfp4", mx_dot_scaled=flags).float()
            err = float((o - base).norm() / base.norm())
            print(f"  d={d} {flags}: {err:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
