"""Fused Attn-QAT training attention (``kernels.attn_qat``) against the PyTorch reference.

What is checked (issue 4, part 2; ``docs/attention-math.md``):

(a) P codes per key tile against the reference's tiled mode: equal except where the exact
    (float64) pre-quantization value lies within a derived window ``delta`` of a rounding
    boundary (E2M1 tie of an element, or E4M3 rounding boundary of its block's ``amax / 6``);
    flips are counted and reported. The kernel's P~ must also equal fp4sim's quantizer applied
    to the kernel's own P, bit for bit.
(b) Error rule (FlashAttention's test rule adapted to FP4), per output X in o, dq, dk, dv:

        ||X_kernel - X_exact||_F <= C * ||X_kp - X_exact||_F + flip_allowance(X) + floor(X)

    with ``C = 2`` (forward) / ``3`` (backward); ``X_exact`` = the reference in float64 under
    the same recipe; ``X_kp`` = the reference run in the kernel's precision: float32 math on the
    same bf16/fp16 inputs, with the operands of every matrix product rounded to the input dtype
    where the kernel rounds them (P of O_hp, P~/l of the consistent dV, dS) and outputs stored in
    the input dtype. ``flip_allowance`` bounds what tie flips (a) can change: each ambiguous P
    entry changes P~ by at most 2 s (s = its block scale, since |FQ(p) - p| <= s for E2M1 with
    an E4M3 scale rounded to nearest), so ||dO||-weighted sums of 2 s over the ambiguous entries
    bound the O and dV differences. ``floor = 1e-5 * ||X_exact||_F + 1e-6`` (a tiny absolute
    floor for outputs that are ~0).
(c) ``attn-qat-consistent``: gradients against the reference's STE ground truth
    (``ste_autograd``) under the same rule.
(d) Mutations (D from the quantized O, S recomputed from unquantized Q/K, off-by-one causal mask)
    must break (b).

Shapes are tiny under TRITON_INTERPRET=1 (CI) and larger on CUDA (marker ``gpu`` tests).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings

import fp4sim.kernels.training_attention as attn_mod
from fp4sim.kernels.fp4_jit import nvfp4_fake_quantize_rows
from fp4sim.kernels.training_attention import _fake_quantize_probs
from fp4sim.reference import attention_backward, fp4_attention_forward, get_recipe
from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys
from fp4sim.reference.quant_torch import e2m1_encode_torch, e4m3_decode_torch, e4m3_encode_torch
from fp4sim.reference.softmax import padded_length, scores, softmax_backward, softmax_forward
from fp4sim.testing.generators import AttentionInputSpec, generate_attention_inputs
from fp4sim.testing.strategies import attention_inputs

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                       reason="needs CUDA or TRITON_INTERPRET=1 (Triton kernels)"),
]

RECIPES = ("bf16", "attn-qat", "attn-qat-consistent")
# Backward variant of the reference each recipe is checked against: (c) for the consistent one.
GROUND_TRUTH = {"bf16": "exact", "attn-qat": "attn_qat", "attn-qat-consistent": "ste_autograd"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0
UNIT_ROUNDOFF_F32 = 2.0**-24

if HAS_CUDA:
    SHAPES = dict(head_dims=(64, 128), max_batch=2, max_kv_heads=2, max_group=2, max_len=300)
    EXAMPLES = 10
else:
    SHAPES = dict(head_dims=(64,), max_batch=1, max_kv_heads=1, max_group=2, max_len=48)
    EXAMPLES = 8
HEAVY = ("gaussian", "student_t", "key_bias", "outlier_channels")

_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _to_torch(case_or_arrays, dtype: torch.dtype):
    q, k, v = case_or_arrays
    return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE).to(dtype) for x in (q, k, v))


def _fixed_inputs(spec: AttentionInputSpec, seed: int = 0, dtype=torch.bfloat16):
    return _to_torch(generate_attention_inputs(np.random.default_rng(seed), spec), dtype)


def _e4m3_value(x: torch.Tensor) -> torch.Tensor:
    return e4m3_decode_torch(e4m3_encode_torch(x.to(torch.float32)))


def _delta_window(q_hat, k_hat, s, m_rows, tau, d):
    """Relative bound on |P_kernel - P_ref32| / P for P = exp(S - m), per element (float64).

    S: both sides sum d exact bf16 products in float32 in different orders, each off by at
    most gamma_d * tau * (|Q^||K^|^T) (Higham, gamma_d = d u / (1 - d u)) plus the rounding of
    the tau multiply (u |S|); both, so x2. The subtracted max is off by at most the row's largest
    S error. x = S - m: one rounding (u |x|) per side. exp: ex2.approx.f32(x log2 e) on the GPU
    (PTX ISA: 2^-22 max relative error, plus |x| u from rounding x log2 e) vs torch.exp (<= 2 ulp).
    """
    u = UNIT_ROUNDOFF_F32
    gamma = d * u / (1 - d * u)
    a = tau * (q_hat.abs() @ k_hat.abs().transpose(-1, -2))
    s_abs = torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s))
    err_s = 2 * (gamma * a[..., : s.shape[-1]] + u * s_abs)
    err_m = err_s.amax(dim=-1, keepdim=True)
    x = torch.where(torch.isfinite(s), (s - m_rows).abs(), torch.zeros_like(s))
    return err_s + err_m + 3 * u * x + 2.0**-22 + 4 * u


def _ambiguous(p: torch.Tensor, delta: torch.Tensor, block: int = 16):
    """(element mask, block scale) where the E2M1 code or the E4M3 scale of the NVFP4 block
    quantization of P (blocks along the last axis) is not constant over [p(1-delta), p(1+delta)].
    """
    shp = p.shape
    pb = p.reshape(*shp[:-1], shp[-1] // block, block).to(torch.float64)
    db = delta.reshape(pb.shape).to(torch.float64)
    amax = pb.amax(dim=-1)
    dmax = db.amax(dim=-1)
    s_lo = _e4m3_value((amax * (1 - dmax) / 6).to(torch.float32))
    s_hi = _e4m3_value((amax * (1 + dmax) / 6).to(torch.float32))
    scale = _e4m3_value((amax / 6).to(torch.float32)).to(torch.float64)
    block_amb = s_lo != s_hi
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    c_lo = e2m1_encode_torch((pb * (1 - db) / safe).to(torch.float32))
    c_hi = e2m1_encode_torch((pb * (1 + db) / safe).to(torch.float32))
    elem = (c_lo != c_hi) & (scale.unsqueeze(-1) > 0)
    amb = elem | (block_amb.unsqueeze(-1) & (pb > 0))
    scale_hi = s_hi.to(torch.float64).unsqueeze(-1).expand_as(pb)
    return amb.reshape(shp), scale_hi.reshape(shp)


class _Exact:
    """float64 reference quantities under one recipe (exact up to float64 rounding)."""

    def __init__(self, q, k, v, do, recipe, causal, tau):
        self.recipe = get_recipe(recipe)
        q64, k64, v64, do64 = (t.detach().cpu().to(torch.float64) for t in (q, k, v, do))
        self.fwd = fp4_attention_forward(q64, k64, v64, recipe, causal=causal, sm_scale=tau,
                                         mode="tiled", accum_dtype=torch.float64)
        self.grads = attention_backward(GROUND_TRUTH[recipe], self.fwd, q64, k64, v64, do64,
                                        recipe, causal=causal, sm_scale=tau)
        b, h, lq, d = q.shape
        lk = k.shape[2]
        self.lk_pad = padded_length(lk, self.recipe.block_n)
        self.vis = visible_mask(lq, lk, self.lk_pad, causal)
        self.k_pad = pad_keys(self.fwd.k_hat, h, self.lk_pad)
        self.v_pad = pad_keys(self.fwd.v_hat, h, self.lk_pad)
        self.s = scores(self.fwd.q_hat, self.k_pad, tau, self.vis)
        self.sm = softmax_forward(self.s, self.recipe, "tiled")
        self.do = do64
        self.tau, self.d = tau, d

    def forward_tiles(self):
        """(P per tile against the tile's max, that max per element, rescale to the final max)."""
        bn = self.recipe.block_n
        st_ = self.s.reshape(*self.s.shape[:-1], -1, bn)
        mt = torch.where(torch.isfinite(self.sm.m_tiles), self.sm.m_tiles,
                         torch.zeros_like(self.sm.m_tiles)).unsqueeze(-1)
        p = torch.exp(st_ - mt).reshape(self.s.shape)
        m_el = mt.expand_as(st_).reshape(self.s.shape)
        mf = torch.where(torch.isfinite(self.sm.m), self.sm.m, torch.zeros_like(self.sm.m))
        resc = torch.exp(m_el - mf.unsqueeze(-1))
        return p, m_el, resc

    def flip_windows(self):
        """(forward ambiguity, forward 2s*rescale, backward ambiguity, backward 2s) per entry."""
        if self.recipe.p is None:
            z = torch.zeros_like(self.s, dtype=torch.bool)
            return z, torch.zeros_like(self.s), z, torch.zeros_like(self.s)
        p_f, m_el, resc = self.forward_tiles()
        delta_f = _delta_window(self.fwd.q_hat, self.k_pad, self.s, m_el, self.tau, self.d)
        amb_f, s_f = _ambiguous(p_f, delta_f)
        sb = softmax_backward(self.s, self.fwd.lse, self.fwd.m, self.fwd.l, self.recipe)
        if self.recipe.p_policy == "consistent":
            amb_b, s_b = amb_f, s_f / self.fwd.l.clamp_min(1e-300).unsqueeze(-1)
        else:
            lse = torch.where(torch.isfinite(self.fwd.lse), self.fwd.lse,
                              torch.zeros_like(self.fwd.lse)).unsqueeze(-1)
            delta_b = _delta_window(self.fwd.q_hat, self.k_pad, self.s, lse, self.tau, self.d)
            amb_b, s_b = _ambiguous(sb.p, delta_b)
        return amb_f, 2 * s_f * resc, amb_b, 2 * s_b


def _reduce_group(x: torch.Tensor, hkv: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.reshape(b, hkv, h // hkv, n, d).sum(dim=2)


def _kernel_precision(ex: _Exact, q, k, v, do, causal, tau):
    """The reference in the kernel's precision: float32 math on the same inputs, the kernel's
    bf16/fp16 rounding points applied (kernels/training_attention.py docstring), outputs in its
    dtype."""
    dt = q.dtype
    recipe = ex.recipe
    q32, k32, v32, do32 = (t.detach().cpu().float() for t in (q, k, v, do))
    fwd = fp4_attention_forward(q32, k32, v32, recipe, causal=causal, sm_scale=tau,
                                mode="tiled", accum_dtype=torch.float32)
    h = q.shape[1]
    hkv = k.shape[1]
    lk = k.shape[2]

    def rnd(x):
        return x.to(dt).to(torch.float32)

    k_pad = pad_keys(fwd.k_hat, h, ex.lk_pad)
    v_pad = pad_keys(fwd.v_hat, h, ex.lk_pad)
    s = scores(fwd.q_hat, k_pad, tau, ex.vis)
    sm = softmax_forward(s, recipe, "tiled")
    bn = recipe.block_n
    st_ = s.reshape(*s.shape[:-1], -1, bn)
    mt = torch.where(torch.isfinite(sm.m_tiles), sm.m_tiles, torch.zeros_like(sm.m_tiles))
    p_t = torch.exp(st_ - mt.unsqueeze(-1))
    mf = torch.where(torch.isfinite(sm.m), sm.m, torch.zeros_like(sm.m))
    resc = torch.exp(mt - mf.unsqueeze(-1)).unsqueeze(-1)
    inv_l = torch.where(sm.l > 0, 1 / sm.l.clamp_min(1e-38), 0.0).unsqueeze(-1)
    # the kernel feeds P to the P V^ product in the input dtype (O_hp; O too for bf16)
    o_hp = rnd(((rnd(p_t) * resc).reshape(s.shape) @ v_pad) * inv_l)
    o = rnd(fwd.o) if recipe.p is not None else o_hp
    sb = softmax_backward(s, fwd.lse, fwd.m, fwd.l, recipe)
    # dV = P~^T dO: P~ exact in bf16 except the consistent P~/l and the unquantized P
    p_dv = sb.p_tilde if recipe.p_policy == "block" else rnd(sb.p_tilde)
    d_row = (do32 * o_hp).sum(-1, keepdim=True)
    dp = do32 @ v_pad.transpose(-1, -2)
    ds = rnd(sb.p * (dp - d_row))
    dq = rnd(tau * (ds @ k_pad))
    dk = rnd(_reduce_group(tau * (ds.transpose(-1, -2) @ fwd.q_hat), hkv)[..., :lk, :])
    dv = rnd(_reduce_group(p_dv.transpose(-1, -2) @ do32, hkv)[..., :lk, :])
    return o, dq, dk, dv


def _flip_allowances(ex: _Exact, do):
    """Frobenius bounds of what the ambiguous P entries can change in O and dV."""
    amb_f, step_f, amb_b, step_b = ex.flip_windows()
    v_norm = ex.v_pad.norm(dim=-1)  # (B, H, Lkp)
    inv_l = torch.where(ex.fwd.l > 0, 1 / ex.fwd.l.clamp_min(1e-300), 0.0)
    o_rows = ((amb_f * step_f) * v_norm.unsqueeze(-2)).sum(-1) * inv_l
    do_norm = ex.do.norm(dim=-1)  # (B, H, Lq)
    dv_keys = ((amb_b * step_b) * do_norm.unsqueeze(-1)).sum(-2)  # (B, H, Lkp)
    return o_rows.norm().item(), dv_keys.norm().item(), int(amb_f.sum()), int(amb_b.sum())


def _rule_violations(kernel_out, ex: _Exact, kp_out, allow_o: float, allow_dv: float):
    """Names (with numbers) of the outputs that break rule (b)."""
    exact = (ex.fwd.o,) + tuple(ex.grads)
    names = ("o", "dq", "dk", "dv")
    allow = {"o": allow_o, "dv": allow_dv}
    bad = []
    for name, xk, xkp, xe in zip(names, kernel_out, kp_out, exact, strict=True):
        xk = xk.detach().cpu().to(torch.float64)
        assert torch.isfinite(xk).all(), f"{name}: non-finite kernel output"
        err = (xk - xe).norm().item()
        base = (xkp.to(torch.float64) - xe).norm().item()
        factor = FORWARD_FACTOR if name == "o" else BACKWARD_FACTOR
        bound = factor * base + allow.get(name, 0.0) + 1e-5 * xe.norm().item() + 1e-6
        if not err <= bound:
            bad.append(f"{name}: err {err:.3e} > bound {bound:.3e} (kernel-precision ref err "
                       f"{base:.3e}, flip allowance {allow.get(name, 0.0):.3e})")
    return bad


def _run_and_check(q, k, v, recipe, causal, sm_scale=None, seed=0):
    tau = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    o = attn_mod.attn_qat(qg, kg, vg, causal=causal, sm_scale=sm_scale, recipe=recipe)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device)
    o.backward(do)
    ex = _Exact(q, k, v, do, recipe, causal, tau)
    kp = _kernel_precision(ex, q, k, v, do, causal, tau)
    allow_o, allow_dv, _, _ = _flip_allowances(ex, do)
    return _rule_violations((o, qg.grad, kg.grad, vg.grad), ex, kp, allow_o, allow_dv)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _small(dtype=torch.bfloat16, lq=16, lk=16, d=64, h=2, hkv=1):
    spec = AttentionInputSpec(heads=h, kv_heads=hkv, lq=lq, lk=lk, head_dim=d)
    return _fixed_inputs(spec, dtype=dtype)


def test_rejects_bad_inputs():
    q, k, v = _small()
    with pytest.raises(ValueError, match="recipe"):
        attn_mod.attn_qat(q, k, v, recipe="fp8")
    with pytest.raises(TypeError, match="dtype"):
        attn_mod.attn_qat(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head dim"):
        attn_mod.attn_qat(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="multiple"):
        attn_mod.attn_qat(q[:, :1].expand(1, 3, 16, 64), k.expand(1, 2, 16, 64).contiguous(),
                          v.expand(1, 2, 16, 64).contiguous())
    with pytest.raises(ValueError, match="same shape"):
        attn_mod.attn_qat(q, k, v[:, :, :8])


def test_cpu_tensors_need_interpreter(monkeypatch):
    q, k, v = (t.cpu() for t in _small())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attn_mod.attn_qat(q, k, v)


def test_non_contiguous_inputs_are_copied():
    q, k, v = _small(lq=32, lk=32)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    assert not qt.is_contiguous()
    a = attn_mod.attn_qat_forward(q, k, v, recipe="attn-qat")
    b = attn_mod.attn_qat_forward(qt, k, v, recipe="attn-qat")
    assert torch.equal(a.o, b.o) and torch.equal(a.lse, b.lse)


# ---------------------------------------------------------------------------------------------
# bit-exact operand quantization
# ---------------------------------------------------------------------------------------------


def test_qkv_fake_quantization_bit_exact():
    """Q^, K^, V^ of the kernels (materialized and in-register) equal the reference's."""
    spec = AttentionInputSpec(heads=2, kv_heads=1, lq=24, lk=40, head_dim=64,
                              distribution="student_t", df=2.0)
    q, k, v = _fixed_inputs(spec, seed=3)
    ref = fp4_attention_forward(q.cpu(), k.cpu(), v.cpu(), "attn-qat", accum_dtype=torch.float32)
    for x, xr in ((q, ref.q_hat), (k, ref.k_hat), (v, ref.v_hat)):
        got = attn_mod._fake_quantize(x).cpu().to(torch.float32)
        assert torch.equal(got, xr), "materialized fake quantization differs from the reference"
    # in-register quantization (prequantize=False) gives bit-identical forward results
    a = attn_mod.attn_qat_forward(q, k, v, recipe="attn-qat", prequantize=False)
    b = attn_mod.attn_qat_forward(q, k, v, recipe="attn-qat", prequantize=True)
    for x, y in ((a.o, b.o), (a.o_hp, b.o_hp), (a.lse, b.lse)):
        assert torch.equal(x, y)


def test_packed_operands_decode_bit_exact():
    """Q^/K^/V^ saved packed (NVFP4 codes + E4M3 scale bytes) decode to exactly the
    materialized fake quantization, for both dtypes, both decode paths (the bit-move path
    runs on the GPU only) and values from 2^-12 to 2^12 (subnormal E4M3 scales, saturation)."""
    from fp4sim.kernels.attn_qat_packing import decode, fake_quantize

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 37, 64, generator=gen) * torch.logspace(-12, 12, 64, base=2.0)
    x[0, 0, 0, :16] = 0.0  # an all-zero block (scale 0)
    for dt in (torch.bfloat16, torch.float16):
        xd = x.to(dt).to(DEVICE)
        x_hat, codes, scales = fake_quantize(xd, pack=True)
        assert torch.equal(x_hat.cpu(), attn_mod._fake_quantize(xd).cpu())
        for fast in (True, False):
            y = decode(codes, scales, dt, fast=fast)
            assert torch.equal(y.view(torch.int16), x_hat.view(torch.int16)), (dt, fast)


@pytest.mark.parametrize("recipe", ["attn-qat", "attn-qat-consistent"])
def test_implementation_switches_bit_identical(monkeypatch, recipe):
    """Packed vs materialized saved operands, and (GPU) tensor-descriptor vs plain loads, give
    the same outputs and gradients bit for bit (GQA, causal, lengths off every tile)."""
    spec = AttentionInputSpec(heads=2, kv_heads=1, lq=37, lk=45, head_dim=64,
                              distribution="student_t", df=3.0)
    q, k, v = _fixed_inputs(spec, seed=9)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype).to(DEVICE)

    def run(**options):
        for name, value in options.items():
            monkeypatch.setitem(attn_mod._OPTIONS, name, value)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = attn_mod.attn_qat(qg, kg, vg, causal=True, recipe=recipe)
        o.backward(do)
        return [o.detach(), qg.grad, kg.grad, vg.grad]

    base = run(packed=False, tma=False)
    for options in ({"packed": True, "tma": False}, {"packed": True, "tma": True},
                    {"packed": False, "tma": True}):
        got = run(**options)
        for name, x, y in zip(("o", "dq", "dk", "dv"), got, base, strict=True):
            assert torch.equal(x, y), f"{name} differs with {options}"


@triton.jit
def _both_quantizers(X, A, B, COLS: tl.constexpr, INTERPRET: tl.constexpr):
    r = tl.arange(0, 16)
    c = tl.arange(0, COLS)
    offs = r[:, None] * COLS + c[None, :]
    x = tl.load(X + offs)
    tl.store(A + offs, _fake_quantize_probs(x, INTERPRET))
    tl.store(B + offs, nvfp4_fake_quantize_rows(x, 16))


def test_probability_quantizer_matches_fp4_jit():
    """The P-specialized quantizer equals fp4_jit.nvfp4_fake_quantize_rows bit for bit on
    values in [0, 1] with E2M1 ties, near-ties (+-1 ulp), E4M3 scale ties and flushed blocks."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    for amax in (1.0, 0.75, 0.3, 0.02, 0.006, 0.0058, 0.003, 1.0625 * 6 * 2.0**-7):
        s = float(_e4m3_value(torch.tensor(amax / 6)))
        base = (ties * s).clamp(max=amax)
        up = torch.nextafter(base, torch.full_like(base, 2.0))
        dn = torch.nextafter(base, torch.zeros_like(base))
        rnd = torch.rand(16, generator=gen) * amax
        row = torch.cat([torch.tensor([amax]), base[:7], up[:4], dn[:4], rnd])[:64]
        rows.append(torch.cat([row, torch.zeros(64 - row.numel())]))
    x = torch.stack(rows + [torch.rand(64, generator=gen) ** 4 for _ in range(8)])
    x = x.to(torch.float32).to(DEVICE).contiguous()
    a, b = torch.empty_like(x), torch.empty_like(x)
    _both_quantizers[(1,)](x, a, b, COLS=64, INTERPRET=not HAS_CUDA)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# (a) P codes per tile
# ---------------------------------------------------------------------------------------------


def _p_code_check(q, k, v, recipe, causal):
    tau = 1.0 / math.sqrt(q.shape[-1])
    res = attn_mod.attn_qat_forward(q, k, v, causal=causal, recipe=recipe, store_p=True)
    lk = k.shape[2]
    p_k = res.diagnostics["p"].cpu()
    pq_k = res.diagnostics["p_tilde"].cpu()
    # The kernel's P~ is exactly fp4sim's NVFP4 quantization of the kernel's own P.
    from fp4sim.reference.quant_torch import fake_quantize_torch

    assert torch.equal(pq_k, fake_quantize_torch(p_k, "nvfp4", axis=-1)), "in-register P~ wrong"
    do = torch.zeros_like(q)
    ex = _Exact(q, k, v, do, recipe, causal, tau)
    ref32 = fp4_attention_forward(q.cpu(), k.cpu(), v.cpu(), recipe, causal=causal,
                                  accum_dtype=torch.float32, diagnostics=True)
    from fp4sim.reference.quant_torch import quantize_torch

    codes_k = quantize_torch(p_k, "nvfp4", axis=-1)[0][..., :lk]
    codes_r = ref32.p_codes
    amb, _ = _ambiguous(*_fwd_p_and_delta(ex))
    amb = amb[..., :lk]
    vis = ex.vis[..., :lk].expand_as(codes_r)
    flips = (codes_k != codes_r) & vis
    unexplained = flips & ~amb
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} P codes differ away from any rounding tie "
        f"(first at {unexplained.nonzero()[0].tolist()})")
    return int(flips.sum()), int(amb.sum()), int(vis.sum())


def _fwd_p_and_delta(ex: _Exact):
    if ex.recipe.p_policy == "consistent":
        mf = torch.where(torch.isfinite(ex.fwd.m), ex.fwd.m, torch.zeros_like(ex.fwd.m))
        p = torch.where(ex.vis, torch.exp(ex.s - mf.unsqueeze(-1)), 0.0)
        m_el = mf.unsqueeze(-1).expand_as(ex.s)
    else:
        p, m_el, _ = ex.forward_tiles()
    return p, _delta_window(ex.fwd.q_hat, ex.k_pad, ex.s, m_el, ex.tau, ex.d)


@pytest.mark.parametrize("recipe", ["attn-qat", "attn-qat-consistent"])
@_settings
@given(case=attention_inputs(causal=None, distributions=HEAVY, dtypes=("bfloat16", "float16"),
                             min_len=1, **SHAPES))
def test_p_codes_match_reference_tiles(recipe, case):
    q, k, v = _to_torch((case.q, case.k, case.v), TORCH_DTYPES[case.spec.dtype])
    flips, ambiguous, visible = _p_code_check(q, k, v, recipe, case.causal)
    print(f"P-code flips {flips} (ambiguous {ambiguous}) of {visible} visible entries")


# ---------------------------------------------------------------------------------------------
# (b), (c) error rule for outputs and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@_settings
@given(case=attention_inputs(causal=None, distributions=HEAVY, dtypes=("bfloat16", "float16"),
                             min_len=1, **SHAPES))
def test_outputs_and_gradients_error_rule(recipe, case):
    q, k, v = _to_torch((case.q, case.k, case.v), TORCH_DTYPES[case.spec.dtype])
    bad = _run_and_check(q, k, v, recipe, case.causal, case.sm_scale, seed=case.seed)
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("recipe", RECIPES)
def test_causal_rows_without_keys_and_gqa(recipe):
    """Lq > Lk causal: the first Lq - Lk rows see no key -> output 0, gradients 0."""
    spec = AttentionInputSpec(heads=2, kv_heads=1, lq=40, lk=24, head_dim=64,
                              distribution="key_bias", key_bias=3.0)
    q, k, v = _fixed_inputs(spec, seed=5)
    res = attn_mod.attn_qat_forward(q, k, v, causal=True, recipe=recipe)
    assert torch.all(res.o[:, :, :16] == 0) and torch.all(torch.isneginf(res.lse[:, :, :16]))
    bad = _run_and_check(q, k, v, recipe, causal=True, seed=5)
    assert not bad, "; ".join(bad)


def test_consistent_recipe_forward_mass_diagnostics():
    """p_mass_kept of the kernel equals the reference's forward P mass kept."""
    spec = AttentionInputSpec(heads=2, kv_heads=2, lq=32, lk=45, head_dim=64)
    q, k, v = _fixed_inputs(spec, seed=7)
    for recipe in ("attn-qat", "attn-qat-consistent"):
        res = attn_mod.attn_qat_forward(q, k, v, recipe=recipe, diagnostics=True)
        ref = fp4_attention_forward(q.cpu(), k.cpu(), v.cpu(), recipe, accum_dtype=torch.float64,
                                    diagnostics=True)
        # float32 row sums vs float64: relative 1e-5 is ~100 ulp of a 45-term sum
        assert abs(res.diagnostics["p_mass_kept_mean"]
                   - ref.diagnostics["p_mass_kept_fwd"]) < 1e-5
        assert abs(res.diagnostics["p_mass_kept_row_min"]
                   - ref.diagnostics["p_mass_kept_fwd_row_min"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# (d) the tests can fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutation", "value", "recipe", "causal"),
    [("d_from_o", 1, "attn-qat", False),
     ("s_from_unquantized", 1, "attn-qat", False),
     ("causal_shift", 1, "bf16", True)],
)
def test_mutations_break_the_rule(monkeypatch, mutation, value, recipe, causal):
    spec = AttentionInputSpec(heads=2, kv_heads=1, lq=48, lk=48, head_dim=64,
                              distribution="key_bias", key_bias=3.0)
    q, k, v = _fixed_inputs(spec, seed=11)
    assert not _run_and_check(q, k, v, recipe, causal, seed=11), "unmutated kernel must pass"
    monkeypatch.setitem(attn_mod._DEBUG_MUTATIONS, mutation, value)
    bad = _run_and_check(q, k, v, recipe, causal, seed=11)
    assert bad, f"mutation {mutation} was not detected"


# ---------------------------------------------------------------------------------------------
# GPU only: larger shapes, d = 128, long rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("lq", "lk", "d", "causal"),
                         [(1000, 1000, 128, True), (513, 1100, 64, False), (700, 333, 128, True)])
def test_gpu_large_shapes(recipe, lq, lk, d, causal):
    spec = AttentionInputSpec(batch=1, heads=4, kv_heads=2, lq=lq, lk=lk, head_dim=d,
                              distribution="student_t", df=3.0)
    q, k, v = _fixed_inputs(spec, seed=lq + lk)
    bad = _run_and_check(q, k, v, recipe, causal, seed=1)
    assert not bad, "; ".join(bad)
    _p_code_check(q, k, v, recipe if recipe != "bf16" else "attn-qat", causal)
