"""Attention fixtures: a faithful tiled Attn-QAT kernel (and bf16) plus single-defect mutants.

Contract: ``fn(q, k, v, causal, sm_scale) -> o``; q (B, H, Lq, d), k, v (B, Hkv, Lk, d), Hkv
divides H (query head h reads kv head h // (H / Hkv)), causal mask bottom-right aligned (query
i sees key j iff j <= i + Lk - Lq), ``sm_scale=None`` means 1/sqrt(d). Pure PyTorch on the CPU,
float32 arithmetic, output and gradients in the input dtypes.

The faithful kernel follows the paper's recipe (attention-math.md, arXiv 2603.00040): Q^, K^, V^
NVFP4 along d; key tiles of 64 with a running max; P~ = FQ(exp(S - m_running)) in blocks of 16
keys; l from the high-precision P; acc from P~ V^, acc_hp from P V^. The backward recomputes S
from Q^, K^, P = exp(S - LSE), P~ = FQ(P), dV = P~^T dO, D = rowsum(dO * O_hp).

Every mutant is a subclass overriding one step; its docstring names the defect (the answer key
is ``catalog.py``).
"""

from __future__ import annotations

import math

import torch

from property_tests.blind_mutants import fp4ops

NEG_INF = float("-inf")


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class AttnQat:
    """The faithful kernel; the methods are the steps a mutant may get wrong."""

    block_n = 64  # key tile width (the recipe's P tile)
    quantized = True

    # ---- operands -------------------------------------------------------------------------
    def fq_q(self, q: torch.Tensor) -> torch.Tensor:
        return fp4ops.nvfp4_fake(q, -1) if self.quantized else q

    def fq_k(self, k: torch.Tensor) -> torch.Tensor:
        return fp4ops.nvfp4_fake(k, -1) if self.quantized else k

    def fq_v(self, v: torch.Tensor) -> torch.Tensor:
        return fp4ops.nvfp4_fake(v, -1) if self.quantized else v

    def fq_p_fwd(self, p: torch.Tensor) -> torch.Tensor:
        return fp4ops.quantize_p(p) if self.quantized else p

    def fq_p_bwd(self, p: torch.Tensor) -> torch.Tensor:
        return fp4ops.quantize_p(p) if self.quantized else p

    def kv_map(self, h: int, hkv: int, device) -> torch.Tensor:
        return torch.arange(h, device=device) // (h // hkv)

    def bwd_kv_map(self, h: int, hkv: int, device) -> torch.Tensor:
        return self.kv_map(h, hkv, device)

    def softmax_scale(self, d: int, sm_scale: float | None) -> float:
        return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)

    # ---- masks and tiles ------------------------------------------------------------------
    def visible(self, lq: int, lk: int, k0: int, k1: int, causal: bool, device) -> torch.Tensor:
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        i = torch.arange(lq, device=device).unsqueeze(1)
        vis = (j < lk).expand(lq, k1 - k0)
        if causal:
            vis = vis & (j <= i + (lk - lq))
        return vis

    def bwd_visible(self, lq, lk, k0, k1, causal, device) -> torch.Tensor:
        return self.visible(lq, lk, k0, k1, causal, device)

    def key_tiles(self, lk: int) -> list[tuple[int, int]]:
        return [(k0, min(k0 + self.block_n, lk)) for k0 in range(0, lk, self.block_n)]

    def bwd_key_tiles(self, lk: int) -> list[tuple[int, int]]:
        return self.key_tiles(lk)

    def fwd_tiles(self, lq: int, lk: int, causal: bool) -> list[tuple[int, int]]:
        return self.key_tiles(lk)

    def bwd_tiles(self, lq: int, lk: int, causal: bool) -> list[tuple[int, int]]:
        return self.bwd_key_tiles(lk)

    def row_max(self, s: torch.Tensor) -> torch.Tensor:
        return s.amax(dim=-1)

    def output_dtype(self, q: torch.Tensor) -> torch.dtype:
        return q.dtype

    def scores(self, qh: torch.Tensor, kt: torch.Tensor, tau: float) -> torch.Tensor:
        return tau * (qh @ kt.transpose(-1, -2))

    def bwd_scores(self, sv: dict, kt: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        return self.scores(sv["qh"], kt, sv["tau"])

    # ---- forward --------------------------------------------------------------------------
    def tile_p(self, s: torch.Tensor, m_new: torch.Tensor, sv: dict) -> torch.Tensor:
        return torch.exp(s - _finite_or_zero(m_new).unsqueeze(-1))

    def rescale(self, m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
        return torch.exp(m_old - _finite_or_zero(m_new))

    def update_l(self, l, alpha, p, pt):
        return l * alpha + p.sum(dim=-1)

    def update_acc(self, acc, alpha, pt, vt):
        return acc * alpha.unsqueeze(-1) + pt @ vt

    def update_acc_hp(self, acc_hp, alpha, p, vt):
        return acc_hp * alpha.unsqueeze(-1) + p @ vt

    def finalize(self, acc, acc_hp, m, l):
        empty = (l == 0).unsqueeze(-1)
        l_safe = torch.where(empty, torch.ones_like(l.unsqueeze(-1)), l.unsqueeze(-1))
        o = torch.where(empty, 0.0, acc / l_safe)
        o_hp = torch.where(empty, 0.0, acc_hp / l_safe)
        lse = torch.where(l == 0, NEG_INF, m + torch.log(l_safe.squeeze(-1)))
        return o, o_hp, lse

    def fwd_operands(self, sv: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """K^, V^ expanded to the query heads, as the forward's tile loop reads them."""
        return sv["ke"], sv["ve"]

    def prepass(self, sv: dict) -> None:
        """Hook before the tile loop (a two-pass mutant fills sv here)."""

    def forward(self, q, k, v, causal: bool, sm_scale: float | None):
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        tau = self.softmax_scale(d, sm_scale)
        qh, kh, vh = self.fq_q(q.float()), self.fq_k(k.float()), self.fq_v(v.float())
        idx = self.kv_map(h, hkv, q.device)
        ke, ve = kh[:, idx], vh[:, idx]
        sv = {"q": q.float(), "k": k.float(), "v": v.float(), "qh": qh, "kh": kh, "vh": vh,
              "ke": ke, "ve": ve, "tau": tau, "causal": causal, "hkv": hkv}
        self.prepass(sv)
        ke, ve = self.fwd_operands(sv)
        m = torch.full((b, h, lq), NEG_INF, device=q.device)
        l = torch.zeros((b, h, lq), device=q.device)
        acc = torch.zeros((b, h, lq, d), device=q.device)
        acc_hp = torch.zeros_like(acc)
        for k0, k1 in self.fwd_tiles(lq, lk, causal):
            s = self.scores(qh, ke[..., k0:k1, :], tau)
            s = s.masked_fill(~self.visible(lq, lk, k0, k1, causal, q.device), NEG_INF)
            m_new = torch.maximum(m, self.row_max(s))
            p = self.tile_p(s, m_new, sv)
            alpha = self.rescale(m, m_new)
            pt = self.fq_p_fwd(p)
            vt = ve[..., k0:k1, :]
            l = self.update_l(l, alpha, p, pt)
            acc = self.update_acc(acc, alpha, pt, vt)
            acc_hp = self.update_acc_hp(acc_hp, alpha, p, vt)
            m = m_new
        o, o_hp, lse = self.finalize(acc, acc_hp, m, l)
        sv.update(o=o, o_hp=o_hp, lse=lse, m=m, l=l)
        return o, sv

    # ---- backward -------------------------------------------------------------------------
    def d_row(self, do: torch.Tensor, sv: dict) -> torch.Tensor:
        return (do * sv["o_hp"]).sum(dim=-1)

    def bwd_p(self, s: torch.Tensor, sv: dict) -> torch.Tensor:
        lse = sv["lse"]
        p = torch.exp(s - _finite_or_zero(lse).unsqueeze(-1))
        return torch.where(torch.isfinite(lse).unsqueeze(-1), p, 0.0)

    def dv_tile(self, p, pt, do):
        return pt.transpose(-1, -2) @ do

    def dp_tile(self, do, vt_hat, sv, k0, k1):
        return do @ vt_hat.transpose(-1, -2)

    def ds_tile(self, p, pt, dp, d_row):
        return p * (dp - d_row.unsqueeze(-1))

    def dq_tile(self, ds, kt_hat, sv, k0, k1):
        return sv["tau"] * (ds @ kt_hat)

    def dk_tile(self, ds, sv):
        return sv["tau"] * (ds.transpose(-1, -2) @ sv["qh"])

    def reduce_kv(self, dx: torch.Tensor, idx: torch.Tensor, hkv: int) -> torch.Tensor:
        b, _, length, d = dx.shape
        out = torch.zeros((b, hkv, length, d), dtype=dx.dtype, device=dx.device)
        return out.index_add_(1, idx, dx)

    def backward(self, sv: dict, do: torch.Tensor):
        do = do.float()
        qh = sv["qh"]
        b, h, lq, d = qh.shape
        hkv, lk = sv["hkv"], sv["kh"].shape[2]
        idx = self.bwd_kv_map(h, hkv, qh.device)
        ke, ve = sv["kh"][:, idx], sv["vh"][:, idx]
        d_row = self.d_row(do, sv)
        dq = torch.zeros_like(qh)
        dk = torch.zeros((b, h, lk, d), device=qh.device)
        dv = torch.zeros_like(dk)
        for k0, k1 in self.bwd_tiles(lq, lk, sv["causal"]):
            kt, vt = ke[..., k0:k1, :], ve[..., k0:k1, :]
            s = self.bwd_scores(sv, kt, k0, k1)
            vis = self.bwd_visible(lq, lk, k0, k1, sv["causal"], qh.device)
            s = s.masked_fill(~vis, NEG_INF)
            p = self.bwd_p(s, sv)
            pt = self.fq_p_bwd(p)
            dv[..., k0:k1, :] = self.dv_tile(p, pt, do)
            dp = self.dp_tile(do, vt, sv, k0, k1)
            ds = self.ds_tile(p, pt, dp, d_row)
            dq = dq + self.dq_tile(ds, kt, sv, k0, k1)
            dk[..., k0:k1, :] = self.dk_tile(ds, sv)
        return dq, self.reduce_kv(dk, idx, hkv), self.reduce_kv(dv, idx, hkv)


class _Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, impl):
        with torch.no_grad():
            o, sv = impl.forward(q.detach(), k.detach(), v.detach(), causal, sm_scale)
        ctx.sv, ctx.impl = sv, impl
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return o.to(impl.output_dtype(q))

    @staticmethod
    def backward(ctx, do):
        with torch.no_grad():
            dq, dk, dv = ctx.impl.backward(ctx.sv, do)
        tq, tk, tv = ctx.dtypes
        return dq.to(tq), dk.to(tk), dv.to(tv), None, None, None


def make_kernel(impl_cls: type[AttnQat]):
    """The ``fn(q, k, v, causal, sm_scale) -> o`` kernel of an implementation class."""
    impl = impl_cls()

    def kernel(q, k, v, causal=False, sm_scale=None):
        return _Fn.apply(q, k, v, causal, sm_scale, impl)

    kernel.__name__ = impl_cls.__name__
    kernel.__doc__ = impl_cls.__doc__
    return kernel


class Bf16(AttnQat):
    """Faithful unquantized attention (the ``bf16`` recipe: exact gradient, D from O)."""

    quantized = False


faithful_attn_qat = make_kernel(AttnQat)
faithful_bf16 = make_kernel(Bf16)


# =========================================================================================
# Mutants: one defect each (catalog.py is the answer key).
# =========================================================================================

LOG2E = 1.4426950408889634


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


# ---- granularity / axis ---------------------------------------------------------------------
class VBlockedAlongKeys(AttnQat):
    """V^ is quantized in 16-element blocks along the key axis (the layout an FP4 P.V MMA
    wants) instead of along the head dimension d."""

    def fq_v(self, v):
        return fp4ops.nvfp4_fake(v, -2)


class KBlock32(AttnQat):
    """K^ uses 32-element blocks along d (one E4M3 scale per 32 values) instead of 16."""

    def fq_k(self, k):
        return fp4ops.nvfp4_fake(k, -1, block=32)


class PBwdBlockedAlongQueries(AttnQat):
    """The backward quantizes the transposed tile P^T for the dV product along its last axis,
    so P~'s 16-element blocks run along queries instead of along keys."""

    def fq_p_bwd(self, p):
        return fp4ops.nvfp4_fake(p, -2)


class PFwdBlock32(AttnQat):
    """The forward's P~ uses 32-key blocks (one E4M3 scale per 32 keys) instead of 16."""

    def fq_p_fwd(self, p):
        return fp4ops.quantize_p(p, block=32)


# ---- scale arithmetic -----------------------------------------------------------------------
class PScaleRoundUp(AttnQat):
    """P's E4M3 block scale amax/6 is rounded up (toward +inf) instead of to nearest, in the
    forward and backward P quantizer."""

    def fq_p_fwd(self, p):
        return fp4ops.quantize_p(p, direction="up")

    def fq_p_bwd(self, p):
        return fp4ops.quantize_p(p, direction="up")


class KScaleTruncated(AttnQat):
    """K's E4M3 block scale amax/6 is truncated (rounded toward zero) instead of rounded to
    nearest."""

    def fq_k(self, k):
        return fp4ops.nvfp4_fake(k, -1, direction="down")


class PScaleLowerClamp(AttnQat):
    """P's block scale is clamped below at the E4M3 minimum normal 2^-6 before encoding (so
    small-P blocks never flush), in the forward and backward P quantizer."""

    def fq_p_fwd(self, p):
        return fp4ops.quantize_p(p, lower_clamp=2.0**-6)

    def fq_p_bwd(self, p):
        return fp4ops.quantize_p(p, lower_clamp=2.0**-6)


class VTensorScale(AttnQat):
    """V is quantized with an extra FP32 per-tensor scale amax(V)/(448*6) (two-level NVFP4)
    although the recipe has no tensor scale for V."""

    def fq_v(self, v):
        return fp4ops.nvfp4_fake(v, -1, tensor_scale=True)


class QDataDivide(AttnQat):
    """Q's elements are divided by the decoded block scale (x / s) instead of multiplied by
    its float32 reciprocal (x * (1/s)) before E2M1 rounding."""

    def fq_q(self, q):
        return fp4ops.nvfp4_fake(q, -1, data_op="divide")


# ---- which operand is quantized at each product ---------------------------------------------
class VUnquantizedFwd(AttnQat):
    """The forward multiplies P~ (and P) by the unquantized V instead of V^; the backward's
    dP still uses V^."""

    def fwd_operands(self, sv):
        return sv["ke"], sv["v"][:, self.kv_map(sv["ke"].shape[1], sv["hkv"], sv["v"].device)]


class BwdScoresFromRawQK(AttnQat):
    """The backward recomputes S = tau Q K^T (and so P, P~) from the unquantized Q and K
    instead of Q^, K^."""

    def bwd_scores(self, sv, kt, k0, k1):
        h = sv["q"].shape[1]
        k_raw = sv["k"][:, self.bwd_kv_map(h, sv["hkv"], kt.device)][..., k0:k1, :]
        return self.scores(sv["q"], k_raw, sv["tau"])


class BwdDpRawV(AttnQat):
    """The backward computes dP = dO V^T with the unquantized V instead of V^."""

    def dp_tile(self, do, vt_hat, sv, k0, k1):
        h = do.shape[1]
        v_raw = sv["v"][:, self.bwd_kv_map(h, sv["hkv"], do.device)][..., k0:k1, :]
        return do @ v_raw.transpose(-1, -2)


class BwdDqRawK(AttnQat):
    """dQ = tau dS K uses the unquantized K instead of K^ (dK still uses Q^)."""

    def dq_tile(self, ds, kt_hat, sv, k0, k1):
        h = ds.shape[1]
        k_raw = sv["k"][:, self.bwd_kv_map(h, sv["hkv"], ds.device)][..., k0:k1, :]
        return sv["tau"] * (ds @ k_raw)


class PUnquantizedFwd(AttnQat):
    """The forward's P is not FP4-quantized before the P.V product (O = P V^ / l); the backward
    still uses P~ for dV."""

    def fq_p_fwd(self, p):
        return p


# ---- where P is normalized, which P feeds l, O, O_hp, dV ------------------------------------
class LFromQuantizedP(AttnQat):
    """The row sum l accumulates the quantized P~ instead of the high-precision P."""

    def update_l(self, l, alpha, p, pt):
        return l * alpha + pt.sum(dim=-1)


class DFromFp4O(AttnQat):
    """D = rowsum(dO * O) uses the FP4 output O instead of the high-precision O_hp."""

    def d_row(self, do, sv):
        return (do * sv["o"]).sum(dim=-1)


class DvFromHighPrecisionP(AttnQat):
    """dV = P^T dO uses the high-precision P instead of the quantized P~."""

    def dv_tile(self, p, pt, do):
        return p.transpose(-1, -2) @ do


class DsFromQuantizedP(AttnQat):
    """dS = P~ * (dP - D) multiplies by the quantized P~ instead of the high-precision P."""

    def ds_tile(self, p, pt, dp, d_row):
        return pt * (dp - d_row.unsqueeze(-1))


class BwdPQuantizedBeforeNormalizing(AttnQat):
    """The backward's P~ for dV is FQ(exp(S - m)) / l (quantized before normalizing, against
    the saved final row max) instead of FQ(exp(S - LSE))."""

    def bwd_p(self, s, sv):
        m, l = sv["m"], sv["l"]
        self._e = torch.exp(s - _finite_or_zero(m).unsqueeze(-1))
        self._l = torch.where(l == 0, torch.ones_like(l), l).unsqueeze(-1)
        return super().bwd_p(s, sv)

    def fq_p_bwd(self, p):
        return fp4ops.quantize_p(self._e) / self._l


# ---- mask alignment and masking in the backward ---------------------------------------------
class CausalTopLeft(AttnQat):
    """The causal mask is aligned top-left (key j visible iff j <= i) instead of bottom-right
    (j <= i + Lk - Lq), in the forward and the backward."""

    def visible(self, lq, lk, k0, k1, causal, device):
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        i = torch.arange(lq, device=device).unsqueeze(1)
        vis = (j < lk).expand(lq, k1 - k0)
        return vis & (j <= i) if causal else vis


class BwdNoCausalMask(AttnQat):
    """The backward forgets the causal mask when recomputing S and P (the forward masks)."""

    def bwd_visible(self, lq, lk, k0, k1, causal, device):
        return self.visible(lq, lk, k0, k1, False, device)


class CausalExcludesDiagonal(AttnQat):
    """The causal mask uses j < i + Lk - Lq (strict), hiding each query's own diagonal key,
    in the forward and the backward."""

    def visible(self, lq, lk, k0, k1, causal, device):
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        i = torch.arange(lq, device=device).unsqueeze(1)
        vis = (j < lk).expand(lq, k1 - k0)
        return vis & (j < i + (lk - lq)) if causal else vis


# ---- head mapping for GQA ---------------------------------------------------------------------
class GqaModulo(AttnQat):
    """Query head h reads KV head h % Hkv instead of h // (H / Hkv) (forward and backward)."""

    def kv_map(self, h, hkv, device):
        return torch.arange(h, device=device) % hkv


class GqaMeanReduce(AttnQat):
    """dK and dV of a KV head average the group's query-head contributions instead of summing
    them."""

    def reduce_kv(self, dx, idx, hkv):
        return super().reduce_kv(dx, idx, hkv) / (dx.shape[1] // hkv)


class GqaBwdModulo(AttnQat):
    """Only the backward maps query head h to KV head h % Hkv (the forward uses
    h // (H / Hkv) correctly)."""

    def bwd_kv_map(self, h, hkv, device):
        return torch.arange(h, device=device) % hkv


# ---- missing or doubled factors -------------------------------------------------------------
class DqMissingSmScale(AttnQat):
    """dQ = dS K^ misses the softmax scale factor tau."""

    def dq_tile(self, ds, kt_hat, sv, k0, k1):
        return ds @ kt_hat


class DkDoubleSmScale(AttnQat):
    """dK = tau^2 dS^T Q^: the softmax scale is applied twice to dK."""

    def dk_tile(self, ds, sv):
        return sv["tau"] * super().dk_tile(ds, sv)


class IgnoresSmScale(AttnQat):
    """The kernel ignores the sm_scale argument and always uses 1/sqrt(d)."""

    def softmax_scale(self, d, sm_scale):
        return 1.0 / math.sqrt(d)


class LseBase2(AttnQat):
    """The saved LSE is in base 2 (m*log2(e) + log2(l)), but the backward's P = exp(S - LSE)
    reads it as a natural log (missing the ln 2 conversion)."""

    def finalize(self, acc, acc_hp, m, l):
        o, o_hp, lse = super().finalize(acc, acc_hp, m, l)
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        lse2 = torch.where(l == 0, NEG_INF, m * LOG2E + torch.log2(l_safe))
        return o, o_hp, lse2


# ---- accumulator rescaling and the running max ---------------------------------------------
class AccNotRescaled(AttnQat):
    """The P~ V^ accumulator is not rescaled by exp(m_old - m_new) when the running max grows
    (l and acc_hp are)."""

    def update_acc(self, acc, alpha, pt, vt):
        return acc + pt @ vt


class AccHpNotRescaled(AttnQat):
    """The high-precision accumulator acc_hp (for O_hp) is not rescaled by exp(m_old - m_new)
    when the running max grows."""

    def update_acc_hp(self, acc_hp, alpha, p, vt):
        return acc_hp + p @ vt


class PAgainstFinalMax(AttnQat):
    """The forward quantizes P = exp(S - m_final) against the final row max (a first pass over
    all keys) instead of the running max of the tiles seen so far."""

    def prepass(self, sv):
        q, k = sv["qh"], sv["ke"]
        lq, lk = q.shape[2], k.shape[2]
        s = self.scores(q, k, sv["tau"])
        s = s.masked_fill(~self.visible(lq, lk, 0, lk, sv["causal"], q.device), NEG_INF)
        sv["m_final"] = s.amax(dim=-1)

    def tile_p(self, s, m_new, sv):
        return torch.exp(s - _finite_or_zero(sv["m_final"]).unsqueeze(-1))

    def rescale(self, m_old, m_new):
        return torch.ones_like(m_new)


# ---- partial and padded tail blocks ---------------------------------------------------------
class TailKeysUnmasked(AttnQat):
    """The forward pads K, V with zero keys up to a multiple of the 64-key tile and does not
    mask them, so padded keys (score 0) add exp(0 - m) to l."""

    def fwd_operands(self, sv):
        pad = (-sv["ke"].shape[2]) % self.block_n
        return tuple(torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (sv["ke"], sv["ve"]))

    def key_tiles(self, lk):
        lk_pad = -(-lk // self.block_n) * self.block_n
        return [(k0, k0 + self.block_n) for k0 in range(0, lk_pad, self.block_n)]

    def bwd_key_tiles(self, lk):
        return AttnQat.key_tiles(self, lk)

    def visible(self, lq, lk, k0, k1, causal, device):
        j = torch.arange(k0, k1, device=device).unsqueeze(0)
        i = torch.arange(lq, device=device).unsqueeze(1)
        vis = torch.ones((lq, k1 - k0), dtype=torch.bool, device=device)
        return vis & (j <= i + (lk - lq)) if causal else vis

    def bwd_visible(self, lq, lk, k0, k1, causal, device):
        return AttnQat.visible(self, lq, lk, k0, k1, causal, device)


def _quantize_full_blocks_only(p: torch.Tensor) -> torch.Tensor:
    n = p.shape[-1]
    full = n - n % 16
    if full == n:
        return fp4ops.quantize_p(p)
    head = fp4ops.quantize_p(p[..., :full]) if full else p[..., :0]
    return torch.cat([head, p[..., full:]], dim=-1)


class TailPBlockUnquantized(AttnQat):
    """When Lk is not a multiple of 16, the last partial 16-key block of P is left
    unquantized (high-precision P) in the forward and backward P~."""

    def fq_p_fwd(self, p):
        return _quantize_full_blocks_only(p)

    def fq_p_bwd(self, p):
        return _quantize_full_blocks_only(p)


class BwdDropsTailTile(AttnQat):
    """The backward loops over Lk // 64 key tiles, skipping the last partial tile: its dK, dV
    stay zero and it adds nothing to dQ."""

    def bwd_key_tiles(self, lk):
        n = lk // self.block_n
        return [(t * self.block_n, (t + 1) * self.block_n) for t in range(n)]


# ---- intermediate rounding to bf16 / fp16 ---------------------------------------------------
class PBf16BeforeQuant(AttnQat):
    """P is rounded to bfloat16 before FP4 quantization (double rounding) in the forward and
    backward P quantizer."""

    def fq_p_fwd(self, p):
        return fp4ops.quantize_p(_bf16(p))

    def fq_p_bwd(self, p):
        return fp4ops.quantize_p(_bf16(p))


class ScoresFp16(AttnQat):
    """The scores S = tau Q^ K^^T are stored in float16 (forward and backward recompute)."""

    def scores(self, qh, kt, tau):
        return _fp16(super().scores(qh, kt, tau))


class OhpSavedBf16(AttnQat):
    """O_hp is saved in bfloat16 for the backward, so D = rowsum(dO * O_hp) uses a rounded
    O_hp."""

    def d_row(self, do, sv):
        return (do * _bf16(sv["o_hp"])).sum(dim=-1)


class AccBf16(AttnQat):
    """The P~ V^ output accumulator is kept in bfloat16 between key tiles."""

    def update_acc(self, acc, alpha, pt, vt):
        return _bf16(super().update_acc(acc, alpha, pt, vt))


MUTANT_CLASSES: tuple[type[AttnQat], ...] = (
    VBlockedAlongKeys, KBlock32, PBwdBlockedAlongQueries, PFwdBlock32,
    PScaleRoundUp, KScaleTruncated, PScaleLowerClamp, VTensorScale, QDataDivide,
    VUnquantizedFwd, BwdScoresFromRawQK, BwdDpRawV, BwdDqRawK, PUnquantizedFwd,
    LFromQuantizedP, DFromFp4O, DvFromHighPrecisionP, DsFromQuantizedP,
    BwdPQuantizedBeforeNormalizing,
    CausalTopLeft, BwdNoCausalMask, CausalExcludesDiagonal,
    GqaModulo, GqaMeanReduce, GqaBwdModulo,
    DqMissingSmScale, DkDoubleSmScale, IgnoresSmScale, LseBase2,
    AccNotRescaled, AccHpNotRescaled, PAgainstFinalMax,
    TailKeysUnmasked, TailPBlockUnquantized, BwdDropsTailTile,
    PBf16BeforeQuant, ScoresFp16, OhpSavedBf16, AccBf16,
)


# module attributes mut_<ClassName> for every mutant class (the catalog's targets)
MUTANTS: dict[str, object] = {}
for _cls in MUTANT_CLASSES:
    MUTANTS[_cls.__name__] = globals()["mut_" + _cls.__name__] = make_kernel(_cls)

CHECK_NAMES: tuple[str, ...] = tuple("mut_" + c.__name__ for c in MUTANT_CLASSES)
_CAUSAL_ONLY = {CausalTopLeft, BwdNoCausalMask, CausalExcludesDiagonal}
# (attr, recipe, causal) for a quick `fp4sim check attention` run per mutant: the mask mutants
# need causal mode; every other mutant is checked without it
CHECK_PLAN: tuple[tuple[str, str, bool], ...] = tuple(
    ("mut_" + c.__name__, "attn-qat", c in _CAUSAL_ONLY) for c in MUTANT_CLASSES
)
