"""With nothing quantized every backward variant is the exact attention gradient."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from reference_inputs import assert_within, attn_cases, make_inputs, rounding_bound

from fp4sim import reference
from fp4sim.reference.exact import default_sm_scale

VARIANTS = reference.BACKWARD_VARIANTS
GRADCHECK_SHAPES = [
    # (B, H, Hkv, Lq, Lk, d, causal): GQA, Lq != Lk both ways, ragged, rows without keys
    (1, 2, 1, 3, 5, 4, False),
    (1, 2, 2, 5, 3, 4, True),  # Lq > Lk causal: the first two rows see no key
    (2, 1, 1, 4, 4, 4, True),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=str)
def test_gradcheck_every_variant_unquantized(variant, shape):
    b, h, hkv, lq, lk, d, causal = shape
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, seeds must not
    gen = torch.Generator().manual_seed(zlib.crc32(repr((variant, shape)).encode()))
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64, requires_grad=True)
    recipe = reference.get_recipe("bf16")

    sm_scale = 0.7 if b == 2 else None  # one shape with a non-default softmax scale

    def f(q_, k_, v_):
        return reference.fp4_attention(q_, k_, v_, causal=causal, sm_scale=sm_scale,
                                       recipe=recipe, backward=variant)

    assert torch.autograd.gradcheck(f, (q, k, v))


@given(case=attn_cases())
def test_every_variant_equals_autograd_of_exact_attention(case):
    q, k, v = make_inputs(case)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed), dtype=q.dtype)
    tau = default_sm_scale(case.d, None)
    qe, ke, ve = (t.clone().requires_grad_(True) for t in (q, k, v))
    o_exact = reference.attention_exact(qe, ke, ve, causal=case.causal)
    want = torch.autograd.grad(o_exact, (qe, ke, ve), do)
    bound = rounding_bound(q, k, v, do, tau)
    for mode in ("tiled", "dense"):
        fwd = reference.fp4_attention_forward(
            q, k, v, "bf16", causal=case.causal, mode=mode, accum_dtype=torch.float64
        )
        assert_within(fwd.o, o_exact.detach(), bound["o"], f"{mode} o")
        assert_within(fwd.o_hp, fwd.o, 0.0, "o_hp == o when P is not quantized")
        for variant in VARIANTS:
            got = reference.attention_backward(variant, fwd, q, k, v, do, "bf16", case.causal)
            for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
                assert g.shape == w.shape
                assert_within(g, w, bound[name], f"{variant} {mode} {name}")
