"""Witnesses that every blind mutant really differs from its faithful kernel (CPU, ~10 s).

Run: ``python -m property_tests.blind_mutants.selfcheck`` from the repository root. Prints one
line per mutant: the witness and the measured difference; exits 1 if a mutant shows none.
Attention mutants are compared with ``faithful_attn_qat`` on three generic inputs plus one
crafted input (a Q block with amax 0.17578125 holding 0.03662109375, where x / s and x * (1/s)
round differently); quantizer mutants with ``fp4sim.quantize`` on crafted inputs; system mutants
by a test of their one property.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from property_tests.blind_mutants import attention as A
from property_tests.blind_mutants import quantizers as Q
from property_tests.blind_mutants import system as S


def _run(fn, q, k, v, causal, sm, do):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = fn(*leaves, causal, sm)
    grads = torch.autograd.grad(o, leaves, do.clone())
    return [o.detach(), *grads]


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    out = []
    for b, h, hkv, lq, lk, d, causal, sm in (
        (2, 4, 2, 50, 150, 64, True, None),
        (1, 2, 1, 90, 37, 64, True, 0.0625),
        (1, 2, 2, 20, 70, 128, False, 0.3),
    ):
        q = torch.randn(b, h, lq, d, generator=g)
        k = torch.randn(b, hkv, lk, d, generator=g) + 0.5
        v = torch.randn(b, hkv, lk, d, generator=g)
        k[..., -3, :] += 2.0 * q[:, :: h // hkv].mean(2)  # a late key raises the running max
        out.append((q, k, v, causal, sm, torch.randn(b, h, lq, d, generator=g)))
    q = torch.randn(1, 1, 4, 64, generator=g)
    q[..., 16] = 0.17578125  # block 1 of each row: amax 0.17578125, scale 0.029296875
    q[..., 17:32] = 0.03662109375
    k, v = torch.randn(1, 1, 8, 64, generator=g), torch.randn(1, 1, 8, 64, generator=g)
    out.append((q, k, v, False, None, torch.randn(1, 1, 4, 64, generator=g)))
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if a.shape == b.shape else float("inf")


def check_attention() -> list[tuple[str, str, bool]]:
    cases = _attention_inputs()
    refs = [_run(A.faithful_attn_qat, *c) for c in cases]
    rows = []
    for cls in A.MUTANT_CLASSES:
        fn = A.MUTANTS[cls.__name__]
        diffs = []
        for c, r in zip(cases, refs, strict=True):
            diffs.append(max(_rel(a, b) for a, b in zip(_run(fn, *c), r, strict=True)))
        best = int(np.argmax(diffs))
        rows.append((f"mut_{cls.__name__}", f"input {best}: max rel diff {diffs[best]:.2e}",
                     diffs[best] > 0))
    return rows


def _quant_witnesses() -> dict[str, np.ndarray]:
    def row(*vals, n=16):
        x = np.zeros((1, n), np.float32)
        x[0, : len(vals)] = vals
        return x

    return {
        "q_nvfp4_nan_to_zero": row(1.0, np.nan),
        "q_nvfp4_flushed_block_codes": np.full((1, 16), 1e-4, np.float32),
        "q_nvfp4_negative_zero_lost": row(6.0, -0.1),
        "q_nvfp4_ties_away": row(6.0, 0.25),
        "q_nvfp4_bf16_double_rounding": row(6.0, np.float32(1.25) + np.float32(2**-18)),
        "q_nvfp4_nibble_swap": row(6.0, 1.0),
        "q_nvfp4_scale_round_up": row(6.2),
        "q_nvfp4_scale_not_saturated": row(5000.0),
        "q_nvfp4_scale_times_reciprocal": row(np.float32(0.1113281175494194), 0.015),
        "q_nvfp4_data_divide": row(0.17578125, 0.03662109375),
        "q_nvfp4_scale_bf16": row(np.float32(6.381)),
        "q_mxfp4_floor_scale": row(7.0, n=32),
        "q_mxfp4_nan_ignored_in_amax": row(1.0, np.nan, n=32),
        "q_mxfp4_block16": row(1.0, n=32),
    }


def check_quantizers() -> list[tuple[str, str, bool]]:
    import fp4sim

    rows = []
    for name, x in _quant_witnesses().items():
        fmt = Q.MUTANT_FORMATS[name]
        ref = fp4sim.quantize(x, fmt)
        packed, scales, _ = getattr(Q, name)(torch.from_numpy(x))
        packed, scales = np.asarray(packed), np.asarray(scales)
        same = (packed.shape == ref.packed.shape and scales.shape == ref.scale_bits.shape
                and np.array_equal(packed, ref.packed) and np.array_equal(scales, ref.scale_bits))
        rows.append((name, f"x[0,:2]={x[0, :2].tolist()}", not same))
    return rows


def _qkv(b=2, h=4, hkv=2, lq=24, lk=40, d=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(dtype)
                 for s in ((b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))


def _fwd(fn, q, k, v, causal=False, sm=None):
    return fn(q.clone(), k.clone(), v.clone(), causal, sm).detach()


def check_system() -> list[tuple[str, str, bool]]:
    F = A.faithful_attn_qat
    FB = A.faithful_bf16
    rows = []

    def add(name, what, broken, fresh_ok):
        rows.append((name, f"{what}; faithful on a fresh input: {fresh_ok}", broken and fresh_ok))

    q, k, v = _qkv()
    # independence: batch 0 huge, batch 1 normal
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[0] *= 30.0
    k2[0] *= 30.0
    o = _fwd(S.sys_BatchSharedMax, q2, k2, v2)
    add("sys_BatchSharedMax", "batch 1 output vs alone",
        _rel(o[1:], _fwd(FB, q2[1:], k2[1:], v2[1:])) > 1e-3,
        _rel(_fwd(S.sys_BatchSharedMax, q, k, v), _fwd(FB, q, k, v)) < 1e-5)
    q3 = q.clone()
    q3[0] *= 1e5
    o = _fwd(S.sys_QBatchPowerOfTwoPrescale, q3, k, v)
    add("sys_QBatchPowerOfTwoPrescale", "batch 1 output vs alone",
        _rel(o[1:], _fwd(F, q3[1:], k[1:], v[1:])) > 1e-3,
        _rel(_fwd(S.sys_QBatchPowerOfTwoPrescale, q, k, v), _fwd(F, q, k, v)) == 0)
    add("sys_GqaRepeatTiles", "H=4, Hkv=2 vs faithful",
        _rel(_fwd(S.sys_GqaRepeatTiles, q, k, v), _fwd(F, q, k, v)) > 1e-3,
        _rel(_fwd(S.sys_GqaRepeatTiles, *_qkv(hkv=4)), _fwd(F, *_qkv(hkv=4))) == 0)
    qd, kd, vd = _qkv(lq=1, lk=100)
    add("sys_CausalTileSkipTopLeft", "causal decode Lq=1, Lk=100",
        _rel(_fwd(S.sys_CausalTileSkipTopLeft, qd, kd, vd, True), _fwd(F, qd, kd, vd, True)) > 1e-3,
        _rel(_fwd(S.sys_CausalTileSkipTopLeft, *_qkv(lq=80, lk=80), True),
             _fwd(F, *_qkv(lq=80, lk=80), True)) == 0)
    qd, kd, vd = _qkv(lq=1, lk=17)
    add("sys_DecodeSplitKvNan", "Lq=1, Lk=17 gives NaN",
        bool(torch.isnan(_fwd(S.sys_DecodeSplitKvNan, qd, kd, vd)).any()),
        _rel(_fwd(S.sys_DecodeSplitKvNan, *_qkv(lq=1, lk=64)), _fwd(FB, *_qkv(lq=1, lk=64))) < 1e-5)
    qs, ks, vs = _qkv(lk=5)
    add("sys_ShortKeysPaddedUnmasked", "Lk=5 vs faithful",
        _rel(_fwd(S.sys_ShortKeysPaddedUnmasked, qs, ks, vs), _fwd(F, qs, ks, vs)) > 1e-3,
        _rel(_fwd(S.sys_ShortKeysPaddedUnmasked, q, k, v), _fwd(F, q, k, v)) == 0)
    qm, km, vm = _qkv(lq=40, lk=24)
    o = _fwd(S.sys_MaskedRowsNan, qm, km, vm, True)
    add("sys_MaskedRowsNan", "causal Lq=40 > Lk=24: NaN rows (reference: zeros)",
        bool(torch.isnan(o).any()) and not bool(torch.isnan(_fwd(F, qm, km, vm, True)).any()),
        _rel(_fwd(S.sys_MaskedRowsNan, q, k, v, True), _fwd(F, q, k, v, True)) == 0)
    qa, ka, va = _qkv(seed=1)
    fresh = _rel(_fwd(S.sys_CacheByShape, q, k, v), _fwd(F, q, k, v)) == 0
    add("sys_CacheByShape", "second call, same shapes, new values",
        _rel(_fwd(S.sys_CacheByShape, qa, ka, va), _fwd(F, qa, ka, va)) > 1e-3, fresh)
    qg, kg, vg = (t.clone() for t in (q, k, v))
    first = S.sys_GraphCapturedInputs(qg, kg, vg, False, None).detach()
    fresh = _rel(first, _fwd(F, q, k, v)) == 0
    for buf, new in zip((qg, kg, vg), (qa, ka, va), strict=True):
        buf.copy_(new)  # graph replay pattern: new values into the same buffers
    add("sys_GraphCapturedInputs", "replay after writing new values into the same buffers",
        _rel(S.sys_GraphCapturedInputs(qg, kg, vg, False, None).detach(), _fwd(F, qa, ka, va))
        > 1e-3, fresh)
    qi = q.clone().requires_grad_(True)
    o = S.sys_QuantizesQInPlace(qi, k, v, False, None)
    add("sys_QuantizesQInPlace", "q modified", not torch.equal(qi.detach(), q),
        _rel(o.detach(), _fwd(F, q, k, v)) == 0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = S.sys_DqWrittenIntoDo(*leaves, False, None)
    do = torch.ones_like(o)
    dq = torch.autograd.grad(o, leaves, do)[0]
    ref_dq = _run(F, q, k, v, False, None, torch.ones_like(o))[1]
    add("sys_DqWrittenIntoDo", "dO modified", not torch.equal(do, torch.ones_like(o)),
        _rel(dq, ref_dq) == 0)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # a transposed BLHD view
    add("sys_assumes_contiguous", "K as a transposed (B, L, H, d) view",
        _rel(_fwd(S.sys_assumes_contiguous, q, kt, v), _fwd(F, q, k, v)) > 1e-3,
        _rel(_fwd(S.sys_assumes_contiguous, q, k, v), _fwd(F, q, k, v)) == 0)
    qb, kb, vb = _qkv(dtype=torch.bfloat16)
    add("sys_OutputFloat32", "bf16 inputs: output dtype",
        _fwd(S.sys_OutputFloat32, qb, kb, vb).dtype != torch.bfloat16,
        _rel(_fwd(S.sys_OutputFloat32, q, k, v), _fwd(F, q, k, v)) == 0)
    qd, kd, vd = _qkv(lq=1)
    add("sys_decode_drops_query_axis", "Lq=1 output shape",
        _fwd(S.sys_decode_drops_query_axis, qd, kd, vd).shape != qd.shape,
        _rel(_fwd(S.sys_decode_drops_query_axis, q, k, v), _fwd(F, q, k, v)) == 0)
    outs = [_fwd(S.sys_RandomOrderRowSum, q, k, v) for _ in range(6)]
    add("sys_RandomOrderRowSum", "6 identical calls not all bitwise equal",
        any(not torch.equal(outs[0], o) for o in outs[1:]),
        _rel(outs[0], _fwd(F, q, k, v)) < 1e-5)
    kinf = k.clone()
    kinf[0, 0, 3, 5] = float("inf")
    o = _fwd(S.sys_KTensorPowerOfTwoRange, q, kinf, v)
    ref = _fwd(F, q, kinf, v)
    add("sys_KTensorPowerOfTwoRange", "one Inf in K batch 0: NaN in batch 1",
        bool(torch.isnan(o[1]).any()) and bool(torch.isfinite(ref).all()),
        _rel(_fwd(S.sys_KTensorPowerOfTwoRange, q, k, v), _fwd(F, q, k, v)) == 0)
    return rows


def main() -> int:
    bad = 0
    for title, rows in (("attention", check_attention()), ("quantizer", check_quantizers()),
                        ("system", check_system())):
        print(f"== {title}")
        for name, what, ok in rows:
            bad += not ok
            print(f"{'ok ' if ok else 'NO '} {name:36s} {what}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
