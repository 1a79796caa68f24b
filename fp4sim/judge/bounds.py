"""The FP4 tolerance rule's inputs for attention: the accumulation floors (the float32
rounding-error bound of each formula) and the P-flip allowances (code flips of P that a
correct float32 kernel may make), from the float64 reference run."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fp4sim.judge.inputs import AttentionCase
from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys
from fp4sim.reference.p_quant import quantize_p_tiles
from fp4sim.reference.softmax import scores, softmax_backward, softmax_forward

# One E2M1 code flip of P changes P~ by at most one step (2, between 4 and 6) times the
# block scale, which is at most amax/6 rounded up to E4M3 (relative step 2^-3): P <= 1, so
# |dP~| <= 2 * (1/6) * (1 + 2^-3) = 0.375 (docs/numerics.md E2M1 and E4M3).
P_FLIP_STEP = 2.0 * (1.0 / 6.0) * (1.0 + 2.0**-3)


# Operand rounding unit of a kernel working on inputs of each dtype: bf16 / fp16 MMA
# operands (8 / 11 significant bits), and TF32 (11 bits) for float32, which Triton's tl.dot
# uses by default on tensor cores (IEEE 754 precisions; NVIDIA TF32 format).
OPERAND_UNIT: dict[str, float] = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-11}


def accumulation_floors(case: AttentionCase, fwd64: Any, do_np: np.ndarray) -> dict[str, Any]:
    """Componentwise bounds on float32 rounding error of the attention formulas (float64
    tensors shaped like O, dQ, dK, dV), used as ``floor_abs`` of the FP4 rule.

    Higham, Accuracy and Stability of Numerical Algorithms (2002), eq. 3.13: a float32 matrix
    product in any summation order satisfies |fl(AB) - AB| <= gamma_n |A||B|,
    gamma_n = n u / (1 - n u), u = 2^-24. With P the normalized probabilities (float64),
    E_S = gamma_d tau |Q^||K^|^T + u |S| (error of S and of exp's argument) and
    P~ <= 2 P (E2M1 rounds a value up by at most a factor 2, docs/numerics.md; P~ itself is
    exact unless a code flips at a tie, which the row allowance covers):

    * O:  gamma_Lk (2P)|V^| + |O| (gamma_Lk + rowmax E_S + u T)   (T key tiles; l's error)
    * dS = P (dP - D):  err <= P (gamma_d (|dO||V^|^T + rowsum|dO o O_hp|) + |dP - D| (E_S + u))
    * dQ: tau (gamma_Lk |dS| + err dS)|K^|;  dK: tau (gamma_Lq' |dS| + err dS)^T |Q^|;
      dV: gamma_Lq' (2P)^T |dO|   (Lq' = Lq * group, summed over the query heads of a group)

    A kernel may round matmul operands to its operand precision u_op (``OPERAND_UNIT`` of
    the input dtype): Q^, K^, V^, P~ and dO are exact there (an E2M1 code times an E4M3 scale
    has at most 6 significant bits), but dS, P and the saved O_hp are not, so the dQ, dK, dV
    products use gamma_n + 2 u_op and D carries u_op rowsum|dO o O_hp|.
    """
    u = 2.0**-24
    u_op = OPERAND_UNIT[case.spec.dtype]

    def gamma(n: int) -> float:
        return n * u / (1.0 - n * u)

    def product(n: int) -> float:
        return gamma(n) + 2 * u_op

    spec = case.spec
    group = spec.heads // spec.kv_heads
    q_hat = fwd64.q_hat.double()
    k_hat = fwd64.k_hat.double().repeat_interleave(group, dim=1)
    v_hat = fwd64.v_hat.double().repeat_interleave(group, dim=1)
    tau = float(fwd64.sm_scale)
    lq, lk, d = spec.lq, spec.lk, spec.head_dim
    s = tau * q_hat @ k_hat.transpose(-1, -2)
    visible = torch.ones(lq, lk, dtype=torch.bool)
    if case.causal:  # bottom-right aligned (DESIGN.md): query i sees key j iff j <= i + Lk - Lq
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    lse = fwd64.lse.double().unsqueeze(-1)
    finite = torch.isfinite(lse)
    p = torch.where(
        visible & finite,
        torch.exp(torch.where(visible, s, 0.0) - torch.where(finite, lse, 0.0)),
        0.0,
    )
    e_s = gamma(d) * tau * (q_hat.abs() @ k_hat.abs().transpose(-1, -2)) + u * s.abs()
    e_s = torch.where(visible, e_s, 0.0)
    tiles = -(-lk // 64)
    o = fwd64.o.double()
    floor_o = gamma(lk) * (2 * p) @ v_hat.abs() + o.abs() * (
        gamma(lk) + e_s.amax(dim=-1, keepdim=True) + u * tiles
    )
    out = {"O": floor_o}
    do = torch.from_numpy(do_np).double()
    o_hp = fwd64.o_hp.double()
    dp = do @ v_hat.transpose(-1, -2)
    d_row = (do * o_hp).sum(dim=-1, keepdim=True)
    d_abs = (do.abs() * o_hp.abs()).sum(dim=-1, keepdim=True)
    ds_abs = (p * (dp - d_row)).abs()
    ds_err = p * (
        gamma(d) * (do.abs() @ v_hat.abs().transpose(-1, -2) + d_abs)
        + u_op * d_abs
        + (dp - d_row).abs() * (e_s + u)
    )
    lq_group = lq * group

    def reduce_group(x: Any) -> Any:
        b, h, n, dd = x.shape
        return x.reshape(b, h // group, group, n, dd).sum(dim=2)

    out["dQ"] = tau * (product(lk) * ds_abs + ds_err) @ k_hat.abs()
    out["dK"] = reduce_group(
        tau * (product(lq_group) * ds_abs + ds_err).transpose(-1, -2) @ q_hat.abs()
    ) * (1 + gamma(group))
    out["dV"] = reduce_group(product(lq_group) * (2 * p).transpose(-1, -2) @ do.abs())
    return {name: t.numpy() for name, t in out.items()}


# Relative error of a float32 exp in a kernel (a few ulps; PTX ex2.approx.f32 has a maximum
# relative error of about 2^-22, PTX ISA "ex2") on top of the error of its argument.
EXP_REL_ERROR = 2.0**-21


def p_flip_allowances(
    case: AttentionCase, recipe: Any, fwd64: Any, do_np: np.ndarray | None
) -> dict[str, Any]:
    """Elementwise allowances (float64 arrays shaped like O and dV) for FP4 code flips of P
    that a correct float32 kernel may make, and only where one is plausible.

    A kernel's P differs from the float64 reference's by a relative delta of at most
    ``E_S + EXP_REL_ERROR`` (row max of the score error bound E_S of
    ``accumulation_floors``; the backward's P = exp(S - LSE) adds the LSE error
    rowmax E_S + gamma_Lk). A code (or block scale) can flip only if it changes when P moves
    by that much: the reference P of each row is re-quantized at exp(+delta) and exp(-delta)
    times itself; the elements whose P~ changes are the plausible flips, and |dP~| their
    size. The allowance is what those flips can do to the output (FlashAttention's
    O = P~ V / l, dV = P~^T dO; docs/attention-math.md):

    * O: (|dP~_fwd| rescaled to the final max) |V^| / l;
    * dV: |dP~_bwd|^T |dO| (summed over a GQA group).

    Away from ties every allowance is exactly 0, so a defect cannot hide in it; recipes whose
    P is not quantized get no allowance.
    """
    out: dict[str, Any] = {}
    if recipe.p is None:
        return out
    u = 2.0**-24
    spec = case.spec
    h, hkv, lq, lk, d = spec.heads, spec.kv_heads, spec.lq, spec.lk, spec.head_dim
    group = h // hkv
    tau = float(fwd64.sm_scale)
    bn = recipe.block_n
    lk_pad = -(-lk // bn) * bn
    vis = visible_mask(lq, lk, lk_pad, case.causal)
    q_hat = fwd64.q_hat.double()
    k_pad = pad_keys(fwd64.k_hat.double(), h, lk_pad)
    v_pad = pad_keys(fwd64.v_hat.double(), h, lk_pad)
    s = scores(q_hat, k_pad, tau, vis)
    e_s = (d * u / (1 - d * u)) * tau * (q_hat.abs() @ k_pad.abs().transpose(-1, -2))
    e_s = e_s + u * torch.where(vis, s, 0.0).abs()
    e_s = torch.where(vis, e_s, 0.0).amax(dim=-1, keepdim=True)  # (B, H, Lq, 1)
    delta = e_s + EXP_REL_ERROR
    sm = softmax_forward(s, recipe, "tiled")
    t = lk_pad // bn
    s_t = s.reshape(*s.shape[:-1], t, bn)
    m_t = torch.where(torch.isfinite(sm.m_tiles), sm.m_tiles, 0.0).unsqueeze(-1)
    p_t = torch.exp(s_t - m_t)
    nominal = quantize_p_tiles(p_t, recipe.p, recipe.p_policy, recipe.block_m).values
    flip = torch.zeros_like(nominal)
    for sign in (1.0, -1.0):
        moved = quantize_p_tiles(p_t * torch.exp(sign * delta).unsqueeze(-1), recipe.p,
                                 recipe.p_policy, recipe.block_m).values
        flip = torch.maximum(flip, (moved - nominal).abs())
    rescale = torch.where(
        torch.isfinite(sm.m_tiles),
        torch.exp(sm.m_tiles - torch.where(torch.isfinite(sm.m), sm.m, 0.0).unsqueeze(-1)),
        0.0,
    ).unsqueeze(-1)
    flip_o = (flip * rescale).reshape(s.shape)
    l = sm.l.unsqueeze(-1)
    out["O"] = torch.where(l > 0, (flip_o @ v_pad.abs()) / torch.where(l > 0, l, 1.0), 0.0)
    if do_np is not None:
        lse_err = e_s + lk * u / (1 - lk * u)
        delta_b = (delta + lse_err).expand_as(s)
        nominal_b = softmax_backward(s, fwd64.lse, fwd64.m, fwd64.l, recipe).p_tilde
        flip_b = torch.zeros_like(nominal_b)
        for sign in (1.0, -1.0):
            moved = softmax_backward(s + sign * delta_b, fwd64.lse, fwd64.m, fwd64.l,
                                     recipe).p_tilde
            flip_b = torch.maximum(flip_b, (moved - nominal_b).abs())
        do = torch.from_numpy(np.asarray(do_np, dtype=np.float64))
        dv = flip_b.transpose(-1, -2) @ do.abs()
        b = dv.shape[0]
        dv = dv.reshape(b, hkv, group, lk_pad, d).sum(dim=2)[..., :lk, :]
        out["dV"] = dv
    return {name: a.numpy() for name, a in out.items()}
