"""System-level mutants: kernels numerically faithful to a recipe (``attn-qat`` unless the class
says ``bf16``) on fresh, contiguous, independent inputs, each breaking ONE program property
(batch independence, GQA mapping, edge lengths, state between calls, input immutability,
strides, output contract, determinism, special values). The answer key is ``catalog.py``.

Each mutant is a subclass of the faithful ``attention.AttnQat`` / ``attention.Bf16`` (or a thin
wrapper around its kernel) changing one step. CPU only.
"""

from __future__ import annotations

import math
import os

import torch

from property_tests.blind_mutants import fp4ops
from property_tests.blind_mutants.attention import NEG_INF, AttnQat, Bf16, make_kernel


# ---- independence ----------------------------------------------------------------------------
class BatchSharedMax(Bf16):
    """bf16: the softmax row max is also reduced over the batch, so exp(S - m) of one batch
    element underflows to 0 when another element has far larger scores."""

    def row_max(self, s):
        return s.amax(dim=-1).amax(dim=0, keepdim=True).expand(s.shape[:-1])


class QBatchPowerOfTwoPrescale(AttnQat):
    """Q is multiplied by one power of two 2^floor(log2(2688 / amax)) from the amax of the whole Q
    tensor (all batches and heads) before NVFP4 and divided after (to use the E4M3 range); when
    one batch element is ~10^4 times larger than another, the smaller element's block scales
    fall into the E4M3 subnormal range or flush, so its output depends on the other element."""

    def fq_q(self, q):
        amax = q.abs().amax()
        if amax == 0 or not torch.isfinite(amax):
            return super().fq_q(q)
        t = 2.0 ** math.floor(math.log2(2688.0 / float(amax)))
        return fp4ops.nvfp4_fake(q * t, -1) / t


# ---- head mapping under GQA only -------------------------------------------------------------
class GqaRepeatTiles(AttnQat):
    """K, V are expanded to the query heads with repeat (tiling: head h reads KV head h % Hkv)
    instead of repeat_interleave (h // (H / Hkv)); identical unless 1 < Hkv < H."""

    def kv_map(self, h, hkv, device):
        return torch.arange(h, device=device) % hkv


# ---- edge lengths ------------------------------------------------------------------------------
class CausalTileSkipTopLeft(AttnQat):
    """In causal mode, whole 64-key tiles starting after the last query index (k0 > Lq - 1) are
    skipped (top-left reasoning), though the element mask is bottom-right: with Lk > Lq visible
    keys in those tiles are dropped (e.g. decode, Lq = 1)."""

    def _tiles(self, lq, lk, causal):
        tiles = self.key_tiles(lk)
        return [t for t in tiles if t[0] <= lq - 1] if causal else tiles

    def fwd_tiles(self, lq, lk, causal):
        return self._tiles(lq, lk, causal)

    def bwd_tiles(self, lq, lk, causal):
        return self._tiles(lq, lk, causal)


class DecodeSplitKvNan(Bf16):
    """bf16: the Lq = 1 decode path splits keys into 8 chunks of ceil(Lk / 8); an empty chunk
    (e.g. Lk = 17: chunks of 3) has l = 0 and its partial output 0/0 = NaN poisons the combine."""

    splits = 8

    def forward(self, q, k, v, causal, sm_scale):
        o, sv = super().forward(q, k, v, causal, sm_scale)
        lq, lk = q.shape[2], k.shape[2]
        if lq != 1:
            return o, sv
        chunk = -(-lk // self.splits)
        qh, ke, ve, tau = sv["qh"], sv["ke"], sv["ve"], sv["tau"]
        ms, ws, os_ = [], [], []
        for i in range(self.splits):
            k0, k1 = min(i * chunk, lk), min((i + 1) * chunk, lk)
            s = self.scores(qh, ke[..., k0:k1, :], tau)  # (B, H, 1, k1 - k0)
            m_i = s.amax(dim=-1) if k1 > k0 else torch.full(s.shape[:-1], NEG_INF)
            p = torch.exp(s - m_i.unsqueeze(-1))
            l_i = p.sum(dim=-1)
            ms.append(m_i)
            ws.append(l_i)
            os_.append((p @ ve[..., k0:k1, :]) / l_i.unsqueeze(-1))
        m = torch.stack(ms).amax(dim=0)
        w = [torch.exp(m_i - m) * l_i for m_i, l_i in zip(ms, ws, strict=True)]
        total = sum(w)
        num = sum(w_i.unsqueeze(-1) * o_i for w_i, o_i in zip(w, os_, strict=True))
        o = num / total.unsqueeze(-1)
        sv.update(o=o, o_hp=o, lse=m + torch.log(total))
        return o, sv


class ShortKeysPaddedUnmasked(AttnQat):
    """For Lk < 16 the kernel pads K, V with zero keys up to 16 and builds the mask from the
    padded length, so the padding keys (score 0) take part in the softmax."""

    min_keys = 16

    def forward(self, q, k, v, causal, sm_scale):
        lk = k.shape[2]
        self._lk = lk
        if lk < self.min_keys:
            pad = (0, 0, 0, self.min_keys - lk)
            k = torch.nn.functional.pad(k, pad)
            v = torch.nn.functional.pad(v, pad)
        return super().forward(q, k, v, causal, sm_scale)

    def backward(self, sv, do):
        dq, dk, dv = super().backward(sv, do)
        return dq, dk[..., : self._lk, :], dv[..., : self._lk, :]


class MaskedRowsNan(AttnQat):
    """Rows with no visible key (causal, Lq > Lk) compute O = acc / l = 0/0 = NaN and LSE from
    log 0 without a guard, where the recipe gives O = 0; the NaN also reaches dQ, dK."""

    def finalize(self, acc, acc_hp, m, l):
        return acc / l.unsqueeze(-1), acc_hp / l.unsqueeze(-1), m + torch.log(l)


# ---- state between calls -------------------------------------------------------------------
class CacheByShape(AttnQat):
    """Forward results are cached by (shapes, dtype, causal, sm_scale): a second call with the same
    shapes but new values returns the first call's output (and gradients)."""

    def __init__(self):
        self.cache: dict = {}

    def forward(self, q, k, v, causal, sm_scale):
        key = (tuple(q.shape), tuple(k.shape), q.dtype, bool(causal), sm_scale)
        if key not in self.cache:
            self.cache[key] = super().forward(q, k, v, causal, sm_scale)
        return self.cache[key]


class GraphCapturedInputs(AttnQat):
    """Like a CUDA graph captured on the first call: the float32 copies of q, k, v made at capture
    are reused on every later call with the same buffers, so new values written into those
    buffers (the graph-replay pattern) are ignored."""

    def __init__(self):
        self.graphs: dict = {}

    def forward(self, q, k, v, causal, sm_scale):
        key = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v))
        key = (*key, bool(causal), sm_scale)
        if key not in self.graphs:
            # the captured buffers: float32 copies, plus the originals kept alive (as static
            # graph inputs are), so another tensor cannot take their addresses
            self.graphs[key] = (q, k, v, q.float().clone(), k.float().clone(), v.float().clone())
        _, _, _, q32, k32, v32 = self.graphs[key]
        return super().forward(q32, k32, v32, causal, sm_scale)


# ---- inputs untouched ----------------------------------------------------------------------
class QuantizesQInPlace(AttnQat):
    """The forward writes the fake-quantized Q^ back into the caller's q buffer (in-place
    quantization to save memory); outputs and gradients are unaffected."""

    def forward(self, q, k, v, causal, sm_scale):
        o, sv = super().forward(q, k, v, causal, sm_scale)
        q.copy_(sv["qh"].to(q.dtype))
        return o, sv


class DqWrittenIntoDo(AttnQat):
    """The backward reuses the incoming dO buffer for dQ (same shape): the caller's dO is
    overwritten with dQ."""

    def backward(self, sv, do):
        dq, dk, dv = super().backward(sv, do)
        do.copy_(dq.to(do.dtype))
        return do, dk, dv


# ---- layouts ----------------------------------------------------------------------------------
def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


_faithful = make_kernel(AttnQat)


def assumes_contiguous(q, k, v, causal=False, sm_scale=None):
    """Reads q, k, v through their storage with contiguous (B, H, L, d) strides, ignoring the
    tensors' real strides: a non-contiguous input (e.g. a transposed BLHD view) is misread."""
    q, k, v = (t.as_strided(t.shape, _contiguous_strides(t.shape)) for t in (q, k, v))
    return _faithful(q, k, v, causal, sm_scale)


# ---- output contract --------------------------------------------------------------------------
class OutputFloat32(AttnQat):
    """The output is returned in float32 (the accumulator dtype) instead of the input dtype."""

    def output_dtype(self, q):
        return torch.float32


def decode_drops_query_axis(q, k, v, causal=False, sm_scale=None):
    """For Lq = 1 (decode) the output is returned as (B, H, d), without the query axis."""
    o = _faithful(q, k, v, causal, sm_scale)
    return o.squeeze(2) if q.shape[2] == 1 else o


# ---- repeatability ----------------------------------------------------------------------------
_RNG = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class RandomOrderRowSum(AttnQat):
    """The softmax row sum l of each tile is accumulated over its 16-key chunks in a random order
    (as with atomic split-K adds), so the forward is not bitwise repeatable."""

    def update_l(self, l, alpha, p, pt):
        parts = [p[..., c : c + 16].sum(dim=-1) for c in range(0, p.shape[-1], 16)]
        total = torch.zeros_like(l)
        for i in torch.randperm(len(parts), generator=_RNG).tolist():
            total = total + parts[i]
        return l * alpha + total


# ---- special values ---------------------------------------------------------------------------
class KTensorPowerOfTwoRange(AttnQat):
    """K is multiplied by one power of two 2^floor(log2(2688 / amax)) from the amax of the whole K
    tensor before NVFP4 and divided after; an Inf anywhere in K makes the factor 0, so every
    output row of every batch becomes NaN (the recipe saturates the Inf element)."""

    def fq_k(self, k):
        amax = k.abs().amax()
        if amax == 0:
            return super().fq_k(k)
        e = torch.floor(torch.log2(torch.tensor(2688.0) / amax))
        t = torch.pow(torch.tensor(2.0), e)
        return fp4ops.nvfp4_fake(k * t, -1) / t


SYSTEM_CLASSES: tuple[type[AttnQat], ...] = (
    BatchSharedMax, QBatchPowerOfTwoPrescale, GqaRepeatTiles, CausalTileSkipTopLeft,
    DecodeSplitKvNan, ShortKeysPaddedUnmasked, MaskedRowsNan, CacheByShape, GraphCapturedInputs,
    QuantizesQInPlace, DqWrittenIntoDo, OutputFloat32, RandomOrderRowSum, KTensorPowerOfTwoRange,
)

sys_assumes_contiguous = assumes_contiguous
sys_decode_drops_query_axis = decode_drops_query_axis
SYSTEM: dict[str, object] = {"sys_assumes_contiguous": assumes_contiguous,
                             "sys_decode_drops_query_axis": decode_drops_query_axis}
for _cls in SYSTEM_CLASSES:
    SYSTEM["sys_" + _cls.__name__] = globals()["sys_" + _cls.__name__] = make_kernel(_cls)
