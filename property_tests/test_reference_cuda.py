"""reference on CUDA: quantizers bit-identical to CPU, attention agrees, training works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_inputs import heavy_tailed_floats

import fp4sim
from fp4sim import reference
from fp4sim.reference.quant_torch import quantize_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # torch's autograd worker thread of a CUDA device warns once that it had to make the
    # primary context current before its first cuBLAS call (seen on an H200, torch 2.11, in an
    # xdist worker); it then runs normally, so the warning says nothing about fp4sim.
    pytest.mark.filterwarnings(
        "ignore:Attempting to run cuBLAS, but there was no current CUDA context:UserWarning"),
]


@pytest.mark.parametrize(
    ("fmt", "settings"),
    [("nvfp4", {}), ("nvfp4", {"tensor_scale": "amax"}), ("nvfp4", {"scale_op": "divide"}),
     ("mxfp4", {}), ("mxfp4", {"scale_rule": "floor"})],
)
def test_cuda_quantizers_match_cpu_bit_for_bit(fmt, settings):
    # heavy tails with E2M1 ties and 6 x E4M3 ties (where amax/6 and amax*(1/6) differ)
    x_np = heavy_tailed_floats(np.random.default_rng(0), 512 * 1024).reshape(512, 1024)
    x_np[0, :7] = [np.nan, np.inf, -np.inf, -0.0, 1e-45, 0.25, 5.0]
    x = torch.from_numpy(x_np)
    cpu = quantize_torch(x, fmt, -1, **settings)
    gpu = quantize_torch(x.cuda(), fmt, -1, **settings)
    for a, b in zip(cpu[:2], gpu[:2], strict=True):
        assert torch.equal(a, b.cpu())
    want = fp4sim.quantize(x_np, fmt, axis=-1, **settings)
    assert np.array_equal(gpu[0].cpu().numpy(), want.codes)
    assert np.array_equal(gpu[1].cpu().numpy(), want.scale_bits)


@pytest.mark.parametrize("name", reference.RECIPE_NAMES)
def test_cuda_attention_matches_cpu(name):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=g, dtype=torch.float64) for _ in range(3))
    k = k[:, :2]
    v = v[:, :2]
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    kw = dict(causal=True, accum_dtype=torch.float64, diagnostics=True)
    fc = reference.fp4_attention_forward(q, k, v, name, **kw)
    fg = reference.fp4_attention_forward(q.cuda(), k.cuda(), v.cuda(), name, **kw)
    for name_hat in ("q_hat", "k_hat", "v_hat"):
        assert torch.equal(getattr(fg, name_hat).cpu(), getattr(fc, name_hat)), name_hat
    flipped_rows = torch.zeros(fc.o.shape[:-1], dtype=torch.bool)
    if fc.p_codes is not None:
        # float64 scores and exp may differ in the last bit between CUDA and CPU: a P element
        # sitting on a quantization tie may flip; more than a handful of flips is a bug
        flips = fc.p_codes != fg.p_codes.cpu()
        assert int(flips.sum()) <= 4
        flipped_rows = flips.any(-1)
    ok = ~flipped_rows
    assert torch.allclose(fg.o.cpu()[ok], fc.o[ok], rtol=0, atol=1e-9)
    for variant in reference.BACKWARD_VARIANTS:
        gc = reference.attention_backward(variant, fc, q, k, v, do, name, causal=True)
        gg = reference.attention_backward(variant, fg, q.cuda(), k.cuda(), v.cuda(), do.cuda(),
                                          name, causal=True)
        for a, b in zip(gc, gg, strict=True):
            assert torch.isfinite(b).all(), variant
            if not flipped_rows.any():  # with a flipped P code the gradients legitimately move
                assert torch.allclose(b.cpu(), a, rtol=1e-7, atol=1e-7), variant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_training_step(dtype):
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    o = reference.fp4_attention(q, k, v, causal=True, recipe="attn-qat")
    assert o.device.type == "cuda" and o.dtype == dtype
    o.float().pow(2).sum().backward()
    assert all(torch.isfinite(t.grad.float()).all() for t in (q, k, v))
