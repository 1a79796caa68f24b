"""Device functions shared by the Attn-QAT training attention kernels (``@triton.jit``).

Used by ``kernels/attn_qat_forward.py`` and ``kernels/attn_qat_backward.py``; the numerics
they implement are described in ``kernels/training_attention.py`` (module docstring).

- ``_dot(a, b, UPCAST)``: float32-accumulated product (interpreter workaround for bf16).
- ``_cast(x, dtype, FIX_BF16)``: float32 -> dtype, round to nearest even.
- ``_exp(x, FAST)``: ``e^x`` as ``ex2(x * log2 e)``; FAST (GPU) uses ``ex2.approx.ftz.f32``.
- ``_visible(...)``: key-range and causal mask of a tile.
- ``_fake_quantize_probs(p, INTERPRET)``: NVFP4 fake quantization of probabilities.
- ``_load_tile(ptr, rows, n_rows, HEAD_DIM, QUANT)``: a (rows, d) tile, optionally quantized.
- ``_load_packed_tile(codes, scales, rows, n_rows, HEAD_DIM, dtype, FAST)``: a (rows, d) tile
  of Q^/K^/V^ decoded from packed NVFP4 (``kernels/attn_qat_packing.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fp4sim.formats import NVFP4
from fp4sim.kernels.fp4_jit import (
    e2m1_decode,
    e4m3_decode,
    nvfp4_fake_quantize_probs,
    nvfp4_fake_quantize_rows,
    unpack_fp4_rows,
)

# NVFP4 block length (docs/numerics.md, NVFP4: 16-element blocks), from fp4sim.formats; the
# @triton.jit code reads it as a constexpr (compiled exactly as the literal 16).
NVFP4_BLOCK = NVFP4.block_size
_NVFP4_BLOCK_CX = tl.constexpr(NVFP4_BLOCK)
_LOG2E = tl.constexpr(1.4426950408889634)  # rounds to the float32 tl.exp multiplies by


@triton.jit
def _fake_quantize_probs(p, INTERPRET: tl.constexpr):
    """NVFP4 fake quantization (blocks of 16 along the last axis, no tensor scale) of a tile of
    probabilities ``p >= 0`` (finite), bit-identical to ``fp4_jit.nvfp4_fake_quantize_rows``:
    ``fp4_jit.nvfp4_fake_quantize_probs`` (hardware E4M3 cast and fma-corrected divisions on the
    GPU, the exact integer path under the interpreter). A block whose scale rounds to 0 flushes.
    """
    return nvfp4_fake_quantize_probs(p, _NVFP4_BLOCK_CX, not INTERPRET)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation (bf16/fp16 operands: products exact in float32).

    UPCAST (set under TRITON_INTERPRET=1 only): Triton 3.6's interpreter computes bfloat16
    ``tl.dot`` wrongly (it multiplies the raw 16-bit patterns), so operands go to float32
    first; that is exact for bf16/fp16 values, so the math is unchanged.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even.

    FIX_BF16 (set under TRITON_INTERPRET=1 only): Triton 3.6's interpreter truncates on
    float32 -> bfloat16 casts, so the value is first rounded to the nearest bf16 with ties to
    even on the float32 bits (add 0x7FFF + lsb, clear the low 16 bits); the cast is then exact.
    On the GPU the cast is cvt.rn.bf16.f32 (PTX ISA), already RNE.
    """
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _exp(x, FAST: tl.constexpr):
    """e^x for float32 x (x <= 0 or -inf in the kernels).

    Both paths compute ``2^(RN(x * log2 e))``, as ``tl.exp`` lowers on NVIDIA GPUs. FAST (GPU)
    issues ``ex2.approx.ftz.f32`` (PTX ISA: max relative error 2^-22, subnormal results flush
    to +0): one MUFU instead of the four-instruction range fix-up of the non-ftz form. A result
    below 2^-126 only ever feeds a float32 sum that already holds a 1 (the row maximum), an
    FP4 code (which rounds it to 0 under any nonzero E4M3 block scale), or a bf16/fp16 product
    below every accumulator's ulp, so flushing it leaves every output unchanged.
    """
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * _LOG2E], dtype=tl.float32,
            is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr):
    """Mask of valid (query, key) pairs: key in range and, if causal, j <= i + Lk - Lq."""
    mask = offs_n[None, :] < Lk
    if CAUSAL:
        # Bottom-right aligned causal mask (FlashAttention >= 2.1; docs/DESIGN.md).
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq) + CAUSAL_SHIFT)
    return mask


@triton.jit
def _load_tile(ptr, offs_rows, n_rows, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile (rows past n_rows read as 0); fake-quantize if QUANT."""
    cols = tl.arange(0, HEAD_DIM)
    offs = offs_rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :]
    x = tl.load(ptr + offs, mask=offs_rows[:, None] < n_rows, other=0.0)
    if QUANT:
        # Q^, K^, V^: NVFP4 along d (docs/attention-math.md forward 1-2); exact in bf16/fp16.
        x = nvfp4_fake_quantize_rows(x.to(tl.float32), _NVFP4_BLOCK_CX).to(ptr.dtype.element_ty)
    return x


# bf16 E2M1 decode of 4 packed bytes (8 codes) per asm instance: the low nibbles (elements 2i)
# go to $0, $1 and the high nibbles to $2, $3, two bf16 per register, as bits
# sign << 15 | (e1 e0 m) << 6 (the magnitude on the exponent's two low bits and the top
# mantissa bit: 2^(e - 127) (1 + m/2), or the subnormal m 2^-127 for e = 0, i.e. the E2M1
# value times 2^-126, OCP MX v1.0 5.3.3), then times 2^K_EXP (exact, subnormal inputs are
# supported by mul.bf16x2). prmt places nibble bytes 0, 1 (or 2, 3) in the two halves;
# lop3 0xE4 = (u & c) | (w & ~c) takes the magnitude from t << 6 and the sign from t << 12 in
# one instruction. K_EXP 63 (bf16 0x5F00): values E2M1 * 2^-63, later times scale * 2^63;
# K_EXP 126 (bf16 0x7E80): the E2M1 values themselves (``kernels.decode``, MXFP4).
_E2M1_BF16_ASM_TEMPLATE = """
{
.reg .b32 xe, xo, t, u, w, k;
mov.b32 k, K_BITS;
and.b32 xe, $4, 0x0F0F0F0F;
shr.b32 xo, $4, 4;
and.b32 xo, xo, 0x0F0F0F0F;
prmt.b32 t, xe, 0, 0x4140;
shl.b32 u, t, 6;
shl.b32 w, t, 12;
lop3.b32 t, u, w, 0x71C071C0, 0xE4;
mul.rn.bf16x2 $0, t, k;
prmt.b32 t, xe, 0, 0x4342;
shl.b32 u, t, 6;
shl.b32 w, t, 12;
lop3.b32 t, u, w, 0x71C071C0, 0xE4;
mul.rn.bf16x2 $1, t, k;
prmt.b32 t, xo, 0, 0x4140;
shl.b32 u, t, 6;
shl.b32 w, t, 12;
lop3.b32 t, u, w, 0x71C071C0, 0xE4;
mul.rn.bf16x2 $2, t, k;
prmt.b32 t, xo, 0, 0x4342;
shl.b32 u, t, 6;
shl.b32 w, t, 12;
lop3.b32 t, u, w, 0x71C071C0, 0xE4;
mul.rn.bf16x2 $3, t, k;
}
"""


def _e2m1_bf16_asm(k_exp: int) -> str:
    """``_E2M1_BF16_ASM_TEMPLATE`` with the multiplier 2^k_exp (bf16 bits, twice per word)."""
    half = (127 + k_exp) << 7
    return _E2M1_BF16_ASM_TEMPLATE.replace("K_BITS", f"0x{half:04X}{half:04X}")


_E2M1_BF16_ASM = tl.constexpr(_e2m1_bf16_asm(63))
E2M1_BF16_EXACT_ASM = tl.constexpr(_e2m1_bf16_asm(126))


@triton.jit
def _e2m1_pairs_fast(packed, dtype: tl.constexpr):
    """E2M1 values of the low and high nibbles of each byte, in ``dtype`` (bf16 or fp16),
    times 2^-63 (bf16) or exactly (fp16).

    bf16: ``_E2M1_BF16_ASM``. fp16: the magnitude bits e1 e0 m land on the two lowest exponent
    bits and the top mantissa bit (2^(e - 15) (1 + m/2), or the subnormal m 2^-15 for e = 0:
    the E2M1 value times 2^-14), the sign on bit 15; then one exact multiply by 2^14.
    """
    if dtype == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(
            _E2M1_BF16_ASM, "=r,=r,=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16),
            is_pure=True, pack=4)
    else:
        b = packed.to(tl.uint16)
        lo = (((b & 7) << 9) | ((b & 8) << 12)).to(tl.float16, bitcast=True) * 16384.0
        hi = ((((b >> 4) & 7) << 9) | ((b & 0x80) << 8)).to(tl.float16, bitcast=True) * 16384.0
    return lo.to(dtype), hi.to(dtype)


@triton.jit
def _load_packed_tile(codes_ptr, scale_ptr, offs_rows, n_rows, HEAD_DIM: tl.constexpr,
                      dtype: tl.constexpr, FAST: tl.constexpr):
    """Decode a (rows, HEAD_DIM) tile of NVFP4 data saved by ``kernels/attn_qat_packing.py``:
    ``codes_ptr`` (rows, HEAD_DIM / 2) uint8 (element 2i in the low nibble), ``scale_ptr``
    (rows, HEAD_DIM / 16) E4M3 bytes. Rows past n_rows read as 0. The value code * scale has at
    most 6 significant bits and lies in [2^-10, 2688], so it is exact in bf16 and fp16.

    FAST (GPU): the E2M1 values come from bit moves (``_e2m1_pairs_fast``, times a power of
    two) and reach code * scale by multiplies in ``dtype``, each exact (every product is a
    value of at most 6 significant bits inside the format's range, subnormal inputs included).
    Otherwise (the interpreter has no inline PTX) ``fp4_jit.e2m1_decode`` and ``e4m3_decode``
    in float32.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    NB: tl.constexpr = HEAD_DIM // _NVFP4_BLOCK_CX
    rows_ok = offs_rows[:, None] < n_rows
    r64 = offs_rows.to(tl.int64)[:, None]
    packed = tl.load(codes_ptr + r64 * HALF + tl.arange(0, HALF)[None, :], mask=rows_ok, other=0)
    sbytes = tl.load(scale_ptr + r64 * NB + tl.arange(0, NB)[None, :], mask=rows_ok, other=0)
    R: tl.constexpr = offs_rows.shape[0]
    if FAST:
        # E4M3 bytes -> float through the hardware cvt (exact; scale bytes are never NaN)
        scale = sbytes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        lo, hi = _e2m1_pairs_fast(packed, dtype)
        vals = tl.reshape(tl.join(lo, hi), (R, NB, _NVFP4_BLOCK_CX))
        if dtype == tl.bfloat16:
            # values are E2M1 * 2^-63: times scale * 2^63 (<= 2^72, in range; exact)
            s = (scale * 9.223372036854775808e18).to(dtype)
        else:
            s = scale.to(dtype)
        up = vals
        out = up * s[:, :, None]
        return tl.reshape(out.to(dtype), (R, HEAD_DIM))
    else:
        codes = unpack_fp4_rows(packed)
        scale = e4m3_decode(sbytes)
        vals = tl.reshape(e2m1_decode(codes), (R, NB, _NVFP4_BLOCK_CX)) * scale[:, :, None]
        return tl.reshape(vals, (R, HEAD_DIM)).to(dtype)


__all__ = [
    "NVFP4_BLOCK",
    "_cast",
    "_dot",
    "_exp",
    "_fake_quantize_probs",
    "_load_packed_tile",
    "_load_tile",
    "_visible",
]
