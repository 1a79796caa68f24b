"""In-register FP4 numerics as ``@triton.jit`` device functions (E2M1, E4M3, E8M0, NVFP4, MXFP4).

Every function here is exact: it reproduces fp4sim's default settings bit for bit
(``docs/DESIGN.md``, 'Defaults'; ``docs/numerics.md``). Rounding is decided with integer
operations on the float32 bit pattern or with exact comparisons, never with approximate
division (Triton's ``/`` on float32 lowers to the approximate ``div.full.f32``; every division
below is ``tl.math.div_rn``, IEEE round-to-nearest-even).

Functions (all ``@triton.jit``; shapes are any block shape unless stated):

- ``e2m1_rne_codes(x) -> uint8``: float32 -> E2M1 codes 0..15 (bit 3 = sign), RNE with ties to
  even decided on the exact float32 value, saturating (|x| > 6 and +-Inf give +-6), NaN -> code 7
  (+6, PTX ``cvt.rn.satfinite.e2m1x2.f32``), -0 and negatives that round to 0 -> code 8.
- ``e2m1_decode(codes) -> float32``: codes (any integer type, low 4 bits used) -> value.
- ``e4m3_decode(bits) -> float32``, ``e8m0_decode(bits) -> float32``: scale bytes -> value.
- ``unpack_fp4_rows(packed [R, C/2]) -> codes [R, C]``, ``pack_fp4_rows(codes) -> packed``
  (element 2i in the low nibble).
- ``dequantize_rows(codes [R, C], scale [R, C // BLOCK], BLOCK) -> float32 [R, C]``.
- ``e4m3_rne_sat(x) -> float32``: the float32 value of E4M3FN(x) (RNE, saturate at +-448,
  subnormals down to 2^-9, |x| <= 2^-10 -> 0 by RNE), NaN -> NaN.
- ``e4m3_bits(x) -> uint8``: the E4M3FN byte of the same rounding (NaN -> 0x7F, sign in bit 7).
- ``e8m0_rceil_bits(amax) -> uint8``: MX scale byte by the ``rceil`` rule: ceil(log2 q) + 127
  for the float32 quotient q = amax / 6 (``div_rn``), clamped to [0, 254] (as fp4sim's
  ``mx_scale_bits``); +Inf counts as the largest finite float32; NaN -> 0xFF.
- ``e8m0_rceil_exponent(amax) -> int32``: the same e (meaningless for the 0xFF case).
- ``nvfp4_quantize_rows(x, BLOCK: tl.constexpr) -> (codes uint8 [R, C], scale_bits uint8
  [R, C // BLOCK], scale float32 [R, C // BLOCK])``: NVFP4 (no tensor scale) of a 2-D float32
  tile with blocks of ``BLOCK`` (16) along the columns.
- ``nvfp4_fake_quantize_rows(x, BLOCK: tl.constexpr) -> float32 [R, C]``: dequantized values
  ``e2m1_decode(codes) * scale`` of the above.
- ``nvfp4_quantize_rows_tensor_scale(x, tensor_scale, BLOCK)``: the same with a float32 tensor
  scale (a scalar); returns (codes, scale_bits, block scale as float32).
- ``mxfp4_quantize_rows(x, BLOCK: tl.constexpr) -> (codes uint8 [R, C], scale_bits uint8
  [R, C // BLOCK], scale float32 [R, C // BLOCK])``: MXFP4 with the ``rceil`` rule (BLOCK = 32).
- ``mxfp4_fake_quantize_rows(x, BLOCK: tl.constexpr) -> float32 [R, C]``.
- ``mxfp4_quantize_nonneg_rows(x, BLOCK) -> (codes, scale_bits, scale, values)``: the same
  results for finite x >= 0 (attention probabilities) with cheaper element rounding
  (``e2m1_rne_nonneg_values(y)``: one exactly rounded add; ``e2m1_nonneg_value_to_code(q)``).
- ``nvfp4_fake_quantize_probs(x, BLOCK, HW_CVT)``: the NVFP4 P quantizer of the attention
  kernels (finite x >= 0): with ``HW_CVT`` (GPU) the block scale comes from ``div6_rn_fma``,
  ``e4m3_rne_sat_cvt`` (hardware E4M3 cast) and ``rcp_rn_e4m3``, each exact on its domain
  (exhaustive CUDA tests); without it (interpreter) the exact integer path.

Exact op order of the NVFP4 block quantizer (fp4sim defaults: ``scale_amax_op="divide"``,
``scale_op="reciprocal"``, ``scale_lower_clamp=False``, ``zero_scale_codes="zeros"``):

1. ``amax = max |x|`` over the block (float32, exact);
2. ``s = e4m3_rne_sat(div_rn(amax, 6.0))`` (float32 division, then RNE to E4M3 with saturation);
3. ``r = div_rn(1.0, s)`` (float32 reciprocal of the decoded scale);
4. ``codes = e2m1_rne_codes(x * r)`` (one float32 multiply, RNE); a block with ``s == 0`` gets
   codes 0 (+0) for every element;
5. dequantized value ``e2m1_decode(codes) * s``.

With a tensor scale ``t`` (fp4sim ``tensor_scale``): ``s = e4m3_rne_sat(div_rn(div_rn(amax, 6),
t))``, ``r = div_rn(1.0, s * t)`` (the product rounded to float32 first), codes of ``x * r``
(codes 0 where ``s * t == 0``); the value is ``decode * (s * t)``.

MXFP4 (OCP MX v1.0 section 6.3, NVIDIA ``rceil``): ``byte = e8m0_rceil_bits(amax)``,
``codes = e2m1_rne_codes(x * 2^-e)`` (an exact power-of-two multiply), value ``decode * 2^e``.

NaN/Inf policy inside a block (fp4sim defaults, ``fp4sim/quantize.py`` docstring): a block
holding a NaN has amax NaN, hence a NaN scale (E4M3 0x7F / E8M0 0xFF) and every code 7 (x * NaN
is NaN, NaN -> +6). An Inf element counts as the largest finite float32 for the amax (NVFP4
scale 448 = 0x7E; MXFP4 byte 253) and encodes as +-6. An MXFP4 block with amax 0 gets byte 0
and codes 0 (also for -0 elements). A tiny nonzero NVFP4 total scale whose reciprocal
overflows gives x * Inf semantics (+-6 codes, and 0 * Inf = NaN -> code 7), as fp4sim.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from fp4sim.formats import E2M1, E2M1_TIES, E4M3FN

# Format limits from fp4sim.formats, as constexprs (@triton.jit code reads Python globals only
# as constexprs; each compiles exactly as the float literal it replaces).
E2M1_MAX = tl.constexpr(E2M1.max_value)  # 6.0, the largest E2M1 magnitude
E4M3_MAX = tl.constexpr(E4M3FN.max_value)  # 448.0, the largest finite E4M3FN value
# The E2M1 rounding ties (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5), one constexpr each for the JIT.
E2M1_TIE0, E2M1_TIE1, E2M1_TIE2, E2M1_TIE3, E2M1_TIE4, E2M1_TIE5, E2M1_TIE6 = (
    tl.constexpr(t) for t in E2M1_TIES)


@triton.jit
def e2m1_rne_codes(x):
    """float32 -> E2M1 code (uint8), RNE on the exact value, satfinite, NaN -> 7."""
    a = tl.abs(x)
    # RNE (OCP MX v1.0 5.3.3): the code counts the ties below |x|; tie i sits between codes i
    # and i + 1 and goes to the even one, so an even-indexed tie counts only when exceeded.
    mag = (a > E2M1_TIE0).to(tl.int32)
    mag += (a >= E2M1_TIE1).to(tl.int32)
    mag += (a > E2M1_TIE2).to(tl.int32)
    mag += (a >= E2M1_TIE3).to(tl.int32)
    mag += (a > E2M1_TIE4).to(tl.int32)
    mag += (a >= E2M1_TIE5).to(tl.int32)
    mag += (a > E2M1_TIE6).to(tl.int32)  # > 6 and Inf saturate to 6 (PTX .satfinite)
    sign = (x.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)  # -0 keeps its sign (code 8)
    code = mag | (sign << 3)
    code = tl.where(x != x, 7, code)  # NaN -> +6 (PTX cvt.rn.satfinite.e2m1x2.f32)
    return code.to(tl.uint8)


@triton.jit
def e2m1_decode(codes):
    """E2M1 code (low 4 bits) -> float32, built from bits (exact)."""
    c = codes.to(tl.uint32) & 15
    e = (c >> 1) & 3
    mant = c & 1
    # E2M1: bias 1, one subnormal 0.5 (OCP MX v1.0 5.3.3): e == 0 -> mant * 0.5.
    bits = tl.where(e == 0, mant * 0x3F000000, ((e + 126) << 23) | (mant << 22))
    bits = bits | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_decode(bits):
    """E4M3FN byte -> float32 (exact; S.1111.111 -> NaN)."""
    b = bits.to(tl.uint32) & 0xFF
    e = (b >> 3) & 15
    m = b & 7
    # E4M3FN: bias 7; e == 0 is subnormal m * 2^-9 (docs/numerics.md, 'Scale formats').
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    val = (val.to(tl.uint32, bitcast=True) | ((b >> 7) << 31)).to(tl.float32, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), val)


@triton.jit
def e8m0_decode(bits):
    """E8M0 byte -> float32 2^(b - 127) (byte 0 is the float32 subnormal 2^-127; 0xFF -> NaN)."""
    return tl.where(bits.to(tl.uint32) == 255, float("nan"), _pow2_from_byte(bits))


@triton.jit
def unpack_fp4_rows(packed):
    """uint8 (R, C/2) -> codes uint8 (R, C): element 2i from the low nibble (docs/numerics.md)."""
    R: tl.constexpr = packed.shape[0]
    C2: tl.constexpr = packed.shape[1]
    lo = packed & 15
    hi = packed >> 4
    return tl.reshape(tl.join(lo, hi), (R, 2 * C2))


@triton.jit
def pack_fp4_rows(codes):
    """codes uint8 (R, C) -> uint8 (R, C/2): element 2i in the low nibble (docs/numerics.md)."""
    R: tl.constexpr = codes.shape[0]
    C: tl.constexpr = codes.shape[1]
    lo, hi = tl.split(tl.reshape(codes, (R, C // 2, 2)))
    return lo | (hi << 4)


@triton.jit
def dequantize_rows(codes, scale, BLOCK: tl.constexpr):
    """E2M1 codes (R, C) times per-block float32 scales (R, C // BLOCK) -> float32 (R, C)."""
    R: tl.constexpr = codes.shape[0]
    C: tl.constexpr = codes.shape[1]
    vals = tl.reshape(e2m1_decode(codes), (R, C // BLOCK, BLOCK)) * scale[:, :, None]
    return tl.reshape(vals, (R, C))


@triton.jit
def _e4m3_round(x):
    """Shared E4M3FN RNE-saturating rounding: (r, ee, sign) with |value| = r * 2^(ee - 3)."""
    # Saturate first: 448 is the largest finite E4M3FN value (docs/numerics.md, 'Scale formats').
    # NaN lanes (overridden by the callers) round as 0 so that nothing overflows: PTX min.f32
    # already returns 448 for them, the interpreter's np.minimum a NaN.
    a = tl.where(x != x, 0.0, tl.minimum(tl.abs(x), E4M3_MAX))
    bits = a.to(tl.uint32, bitcast=True)
    exp_unb = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    ee = tl.maximum(exp_unb, -6)  # E4M3 min normal exponent -6; below it step 2^-9
    shift = tl.minimum(20 + (ee - exp_unb), 25).to(tl.uint32)  # 23 - 3 mantissa bits dropped
    m = (bits & 0x7FFFFF) | 0x800000
    q = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))  # round half to even
    r = (q + up.to(tl.uint32)).to(tl.int32)  # 0..16; 16 means the next binade
    sign = x.to(tl.uint32, bitcast=True) >> 31
    return r, ee, sign


@triton.jit
def e4m3_rne_sat(x):
    """float32 -> float32 value of E4M3FN(x): RNE, saturating at 448, NaN -> NaN."""
    r, ee, sign = _e4m3_round(x)
    pow2 = ((ee - 3 + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    val = r.to(tl.float32) * pow2  # exact: r < 2^5
    val = (val.to(tl.uint32, bitcast=True) | (sign << 31)).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, val)


@triton.jit
def e4m3_bits(x):
    """float32 -> E4M3FN byte (RNE, saturating at 0x7E = 448, NaN -> 0x7F)."""
    r, ee, sign = _e4m3_round(x)
    # Normal: ((ee + 7) << 3) | (r - 8); r == 16 carries into the exponent; for subnormals
    # (ee == -6, r < 8) the same formula gives r (E4M3FN bias 7).
    code = ((ee + 7) << 3) + r - 8
    code = tl.where(r == 0, 0, code)
    code = code | (sign.to(tl.int32) << 7)
    code = tl.where(x != x, 0x7F, code)  # E4M3FN NaN is S.1111.111
    return code.to(tl.uint8)


@triton.jit
def e8m0_rceil_bits(amax):
    """MX scale byte, rule rceil: ceil(log2(q)) + 127 for q = div_rn(amax, 6), clamped to [0, 254].

    +Inf counts as the largest finite float32 (byte 253); NaN -> 0xFF; amax = 0 -> byte 0.
    """
    # rceil (docs/numerics.md, MXFP4): PTX cvt.rp.satfinite.ue8m0x2.f32 on the float32 amax/6.
    a = tl.minimum(amax, 3.4028234663852886e38)  # fp4sim: Inf saturates to FLT_MAX first
    a = tl.where(amax != amax, 0.0, a)  # NaN lanes (byte set below) divide nothing invalid
    q = tl.math.div_rn(a, tl.full(a.shape, E2M1_MAX, tl.float32))
    qb = q.to(tl.uint32, bitcast=True)
    byte = ((qb + 0x7FFFFF) >> 23) & 0xFF  # round the power of two up (mantissa != 0 carries)
    # q subnormal or zero: byte 0 (2^-127 = float32 bits 0x400000) iff q <= 2^-127, else 1.
    byte = tl.where(qb < 0x800000, tl.where(qb <= 0x400000, 0, 1), byte)
    byte = tl.where(amax != amax, 0xFF, byte)  # E8M0 NaN = 0xFF (OCP MX v1.0 5.4)
    return byte.to(tl.uint8)


@triton.jit
def e8m0_rceil_exponent(amax):
    """The unbiased exponent e of ``e8m0_rceil_bits`` (byte - 127) as int32."""
    return e8m0_rceil_bits(amax).to(tl.int32) - 127


@triton.jit
def _pow2_from_byte(byte):
    """float32 2^(byte - 127) for an E8M0 byte 0..254 (byte 0 is the subnormal 2^-127)."""
    b = byte.to(tl.uint32)
    normal = (b << 23).to(tl.float32, bitcast=True)
    return tl.where(b == 0, 5.877471754111438e-39, normal)  # 2^-127 as a float32 subnormal


@triton.jit
def _neg_pow2_from_byte(byte):
    """float32 2^(127 - byte) for an E8M0 byte 0..254 (exact: the exponent lies in -127..127)."""
    b = byte.to(tl.int32)
    e = 254 - b  # biased exponent of 2^-(b - 127)
    normal = (tl.maximum(e, 1).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    # e == 0 happens only for byte 254, i.e. 2^-127 (subnormal); byte 255 gives NaN.
    val = tl.where(e == 0, 5.877471754111438e-39, normal)
    return tl.where(b == 255, float("nan"), val)


@triton.jit
def _block_amax(xb):
    """max |x| over the last axis of (R, NB, BLOCK); NaN if the block holds a NaN; an Inf counts
    as the largest finite float32 (fp4sim ``saturate_inf``).

    Explicit, because Triton's max does not promise NaN propagation (maxnum on the GPU).
    """
    amax = tl.minimum(tl.max(tl.abs(xb), axis=2), 3.4028234663852886e38)  # Inf -> FLT_MAX
    has_nan = tl.max((xb != xb).to(tl.int32), axis=2) > 0
    return tl.where(has_nan, float("nan"), amax)


@triton.jit
def nvfp4_quantize_rows(x, BLOCK: tl.constexpr):
    """NVFP4 (E4M3 block scale, no tensor scale) of a 2-D float32 tile along its columns.

    Returns (codes uint8 [R, C], scale_bits uint8 [R, C // BLOCK], scale float32 [R, C // BLOCK]).
    """
    ROWS: tl.constexpr = x.shape[0]
    COLS: tl.constexpr = x.shape[1]
    NB: tl.constexpr = COLS // BLOCK
    xb = tl.reshape(x, (ROWS, NB, BLOCK))
    amax = _block_amax(xb)
    # Block scale amax/6 in float32 then RNE to E4M3 (docs/numerics.md, NVFP4; fp4sim default).
    scale = e4m3_rne_sat(tl.math.div_rn(amax, tl.full(amax.shape, E2M1_MAX, tl.float32)))
    # Zero-scale blocks get codes 0 below; dividing by 1 there keeps 1/0 out of every lane.
    recip = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale == 0, 1.0, scale))
    codes = e2m1_rne_codes(xb * recip[:, :, None])
    codes = tl.where(scale[:, :, None] == 0, 0, codes)  # zero_scale_codes="zeros"
    codes = tl.reshape(codes, (ROWS, COLS))
    return codes, e4m3_bits(scale), scale


@triton.jit
def nvfp4_fake_quantize_rows(x, BLOCK: tl.constexpr):
    """Dequantized NVFP4 (no tensor scale) of a 2-D float32 tile: decode(codes) * block scale."""
    codes, _sb, scale = nvfp4_quantize_rows(x, BLOCK)
    return dequantize_rows(codes, scale, BLOCK)


@triton.jit
def nvfp4_quantize_rows_tensor_scale(x, tensor_scale, BLOCK: tl.constexpr):
    """NVFP4 with a float32 tensor scale t: s = E4M3(amax/6/t), codes of x * (1/(s*t))."""
    ROWS: tl.constexpr = x.shape[0]
    COLS: tl.constexpr = x.shape[1]
    NB: tl.constexpr = COLS // BLOCK
    xb = tl.reshape(x, (ROWS, NB, BLOCK))
    amax = _block_amax(xb)
    t = tl.full(amax.shape, 1.0, tl.float32) * tensor_scale
    s6 = tl.math.div_rn(amax, tl.full(amax.shape, E2M1_MAX, tl.float32))
    scale = e4m3_rne_sat(tl.math.div_rn(s6, t))  # docs/numerics.md: E4M3(amax/6/s_tensor)
    total = scale * t
    # As above: zero-scale blocks get codes 0, so they divide by 1 instead of 0.
    recip = tl.math.div_rn(tl.full(total.shape, 1.0, tl.float32), tl.where(total == 0, 1.0, total))
    codes = e2m1_rne_codes(xb * recip[:, :, None])
    codes = tl.where(total[:, :, None] == 0, 0, codes)  # zero_scale_codes="zeros"
    codes = tl.reshape(codes, (ROWS, COLS))
    return codes, e4m3_bits(scale), scale


@triton.jit
def mxfp4_quantize_rows(x, BLOCK: tl.constexpr):
    """MXFP4 (E8M0 rceil scale) of a 2-D float32 tile along its columns.

    Returns (codes uint8 [R, C], scale_bits uint8 [R, C // BLOCK], scale float32 [R, C // BLOCK]).
    """
    ROWS: tl.constexpr = x.shape[0]
    COLS: tl.constexpr = x.shape[1]
    NB: tl.constexpr = COLS // BLOCK
    xb = tl.reshape(x, (ROWS, NB, BLOCK))
    amax = _block_amax(xb)
    byte = e8m0_rceil_bits(amax)
    inv = _neg_pow2_from_byte(byte)  # code = RNE_sat(x / 2^e) (OCP MX v1.0 6.3), exact multiply
    codes = e2m1_rne_codes(xb * inv[:, :, None])
    codes = tl.where(amax[:, :, None] == 0, 0, codes)  # fp4sim: amax = 0 -> codes 0 (no -0)
    codes = tl.reshape(codes, (ROWS, COLS))
    scale = tl.where(byte == 255, float("nan"), _pow2_from_byte(byte))
    return codes, byte, scale


@triton.jit
def mxfp4_fake_quantize_rows(x, BLOCK: tl.constexpr):
    """Dequantized MXFP4 (rceil) of a 2-D float32 tile: decode(codes) * 2^e."""
    codes, _sb, scale = mxfp4_quantize_rows(x, BLOCK)
    return dequantize_rows(codes, scale, BLOCK)


@triton.jit
def e2m1_rne_nonneg_values(y):
    """E2M1 RNE-sat *value* of a finite float32 y >= 0, with one exactly rounded add.

    The grid step is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; (y + step 2^23) - step 2^23 rounds y
    to a multiple of the step, ties to the even multiple (IEEE RNE of the add: the sum's ulp is
    the step), which is E2M1's ties-to-even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
    3.5->4, 5->4; OCP MX v1.0 5.3.3). Equal to ``e2m1_decode(e2m1_rne_codes(y))`` there.
    """
    y = tl.minimum(y, E2M1_MAX)  # .satfinite
    step = tl.where(y < 2.0, 0.5, tl.where(y < 4.0, 1.0, 2.0))
    magic = step * 8388608.0  # step * 2^23 (exact)
    return (y + magic) - magic


@triton.jit
def e2m1_nonneg_value_to_code(q):
    """E2M1 code of a non-negative E2M1 value q (0, 0.5, ..., 6) from its float32 bits."""
    bits = q.to(tl.uint32, bitcast=True)
    # q >= 1: code = 2 * (exponent - 126) + top mantissa bit = (bits >> 22) - 252.
    big = (bits >> 22).to(tl.int32) - 252
    return tl.where(q < 1.0, (q * 2.0).to(tl.int32), big).to(tl.uint8)


# float32 RN(1/6) (0x3E2AAAAB): the divisor's reciprocal for the fma-corrected amax / 6.
_RCP_6 = tl.constexpr(0.16666667163372040)


@triton.jit
def div6_rn_fma(a):
    """RN(a / 6) for finite float32 a >= 0 in three instructions instead of ``div.rn.f32``.

    q = RN(a * RN(1/6)) is within 1 ulp; the remainder r = a - 6q is exact in one fma and
    q + r * RN(1/6) rounds to the correctly rounded quotient (Markstein's correction step,
    IEEE 754 fma). Checked by exhaustion rather than by the theorem: ``property_tests/
    test_kernels_fp4_jit.py`` compares it with ``div_rn`` on every finite float32 a >= 2^-100 and
    its E4M3 rounding on every finite a >= 0 (CUDA; below 2^-100 Triton's flush-to-zero float
    ops may change the quotient, never the E4M3 scale, which is 0 there).
    """
    q = a * _RCP_6
    r = tl.fma(-q, E2M1_MAX, a)
    return tl.fma(r, _RCP_6, q)


@triton.jit
def rcp_rn_e4m3(s):
    """RN(1 / s) for a positive E4M3 value s (1/s <= 2^9), via one Newton step with fmas.

    r0 = ``rcp.approx.ftz.f32`` (PTX ISA: the approximate reciprocal, one MUFU instruction,
    where ``1.0 / s``'s ``div.full.f32`` took about nine SASS instructions with its range
    checks); one Newton-Raphson step e = 1 - s r0, r1 = r0 + r0 e (two fmas) then rounds
    correctly for all 126 positive finite E4M3 values (none has a reciprocal near a float32
    rounding midpoint); that is not taken from the error bound but checked against ``div_rn``
    on all of them (CUDA test). Every positive E4M3 value
    is a normal float32, so the flush-to-zero form changes nothing. s = 0 gives a non-finite
    result: callers select it away.
    """
    r0 = tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=r,r", [s], dtype=tl.float32, is_pure=True, pack=1)
    e = tl.fma(-s, r0, 1.0)
    return tl.fma(r0, e, r0)


@triton.jit
def e4m3_rne_sat_cvt(x):
    """``e4m3_rne_sat`` through the hardware: PTX ``cvt.rn.satfinite.e4m3x2.f32`` (sm_89+) and back.

    Same value as ``e4m3_rne_sat`` for every finite x (RNE, saturating at +-448, subnormals to
    2^-9); checked on the GPU against ``e4m3_rne_sat`` on every finite float32 of either sign.
    The interpreter has no such cast: callers pass ``HW_CVT=False`` there.
    """
    return x.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def nvfp4_fake_quantize_probs(x, BLOCK: tl.constexpr, HW_CVT: tl.constexpr):
    """``nvfp4_fake_quantize_rows`` for finite x >= 0 (attention probabilities), fast.

    Bit-identical to the general function there (the op order of the module docstring):
    with ``HW_CVT`` (GPU) the block scale is ``e4m3_rne_sat_cvt(div6_rn_fma(amax))`` and the
    reciprocal ``rcp_rn_e4m3(s)``, each equal to the exact ``div_rn`` / integer path on its
    domain (exhaustive CUDA tests); without it (the interpreter) the exact path itself. A block
    with scale 0 gets reciprocal 0, so its elements become 0 with no per-element select.
    Element rounding: y = x * r rounded to float32 (``mul.rn.f32``, never contracted into the
    add below: an fma would round the exact product, PTX ISA; seen on an H100 before this was
    explicit: a tie 0.25 went to 0.5), then (y + 2^22 h') - 2^22 h' with
    2^22 h' = 2^(max(exponent(y), 0) + 22): the float32 ulp of the sum is the E2M1 grid step
    (0.5 below 2, 1 in [2, 4), 2 from 4; OCP MX v1.0 5.3.3), so IEEE RNE of the add is E2M1's
    ties-to-even; values rounding above 6 saturate to 6 (satfinite).
    """
    ROWS: tl.constexpr = x.shape[0]
    COLS: tl.constexpr = x.shape[1]
    NB: tl.constexpr = COLS // BLOCK
    xb = tl.reshape(x, (ROWS, NB, BLOCK))
    amax = tl.max(xb, axis=2)
    if HW_CVT:
        scale = e4m3_rne_sat_cvt(div6_rn_fma(amax))
        recip = tl.where(scale == 0, 0.0, rcp_rn_e4m3(scale))
        y = libdevice.mul_rn(xb, tl.broadcast_to(recip[:, :, None], xb.shape))
    else:
        scale = e4m3_rne_sat(tl.math.div_rn(amax, tl.full(amax.shape, E2M1_MAX, tl.float32)))
        safe = tl.where(scale == 0, 1.0, scale)  # no 1/0 lane; selected away just below
        recip = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe)
        recip = tl.where(scale == 0, 0.0, recip)
        y = xb * recip[:, :, None]  # NumPy's float32 multiply (interpreter): rounded
    exp_bits = tl.maximum(y.to(tl.uint32, bitcast=True) & 0x7F800000, 0x3F800000)
    magic = (exp_bits + (22 << 23)).to(tl.float32, bitcast=True)
    v = tl.minimum((y + magic) - magic, E2M1_MAX)
    return tl.reshape(v * scale[:, :, None], (ROWS, COLS))


@triton.jit
def mxfp4_quantize_nonneg_rows(x, BLOCK: tl.constexpr):
    """``mxfp4_quantize_rows`` for finite x >= 0, cheaper: (codes, scale_bits, scale, values).

    Bit-identical codes and scale bytes on finite non-negative inputs (tested); ``values`` is
    the dequantized tile.
    """
    ROWS: tl.constexpr = x.shape[0]
    COLS: tl.constexpr = x.shape[1]
    NB: tl.constexpr = COLS // BLOCK
    xb = tl.reshape(x, (ROWS, NB, BLOCK))
    amax = tl.max(xb, axis=2)
    byte = e8m0_rceil_bits(amax)
    q = e2m1_rne_nonneg_values(xb * _neg_pow2_from_byte(byte)[:, :, None])  # x / 2^e exactly
    scale = _pow2_from_byte(byte)
    codes = tl.reshape(e2m1_nonneg_value_to_code(q), (ROWS, COLS))
    values = tl.reshape(q * scale[:, :, None], (ROWS, COLS))
    return codes, byte, scale, values


__all__ = [
    "dequantize_rows",
    "e2m1_nonneg_value_to_code",
    "e2m1_rne_nonneg_values",
    "mxfp4_quantize_nonneg_rows",
    "nvfp4_fake_quantize_probs",
    "div6_rn_fma",
    "rcp_rn_e4m3",
    "e4m3_rne_sat_cvt",
    "e2m1_decode",
    "e4m3_decode",
    "e8m0_decode",
    "pack_fp4_rows",
    "unpack_fp4_rows",
    "e2m1_rne_codes",
    "e4m3_bits",
    "e4m3_rne_sat",
    "e8m0_rceil_bits",
    "e8m0_rceil_exponent",
    "mxfp4_fake_quantize_rows",
    "mxfp4_quantize_rows",
    "nvfp4_fake_quantize_rows",
    "nvfp4_quantize_rows",
    "nvfp4_quantize_rows_tensor_scale",
]
