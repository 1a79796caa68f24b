"""The in-register FP4 device functions of ``kernels.fp4_jit`` against independent oracles.

Element casts are compared bit for bit with ``ml_dtypes`` (finite inputs; the saturation and
NaN policies are checked against the rules of docs/numerics.md), and the E8M0 ``rceil`` byte
against a float64 brute force. Inputs: every float32 bit pattern class (random bits), the
rounding ties of each format and their float32 neighbours, and the subnormal boundaries.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

ml_dtypes = pytest.importorskip("ml_dtypes")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fp4sim.formats import E2M1_MAGNITUDES  # noqa: E402
from fp4sim.kernels import fp4_jit  # noqa: E402

_CAN_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 4096


@triton.jit
def _elementwise_kernel(x_ptr, e2m1_ptr, dec_ptr, e4v_ptr, e4b_ptr, e8_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    codes = fp4_jit.e2m1_rne_codes(x)
    tl.store(e2m1_ptr + offs, codes)
    tl.store(dec_ptr + offs, fp4_jit.e2m1_decode(codes))
    tl.store(e4v_ptr + offs, fp4_jit.e4m3_rne_sat(x))
    tl.store(e4b_ptr + offs, fp4_jit.e4m3_bits(x))
    tl.store(e8_ptr + offs, fp4_jit.e8m0_rceil_bits(tl.abs(x)))


def _run_elementwise(x: np.ndarray) -> dict[str, np.ndarray]:
    assert x.dtype == np.float32 and x.size == N
    xt = torch.from_numpy(x.copy()).to(DEVICE)
    outs = {
        "e2m1": torch.full((N,), 0xAA, dtype=torch.uint8, device=DEVICE),
        "dec": torch.full((N,), float("nan"), dtype=torch.float32, device=DEVICE),
        "e4v": torch.full((N,), 12345.0, dtype=torch.float32, device=DEVICE),
        "e4b": torch.full((N,), 0xAA, dtype=torch.uint8, device=DEVICE),
        "e8": torch.full((N,), 0xAA, dtype=torch.uint8, device=DEVICE),
    }
    _elementwise_kernel[(1,)](
        xt, outs["e2m1"], outs["dec"], outs["e4v"], outs["e4b"], outs["e8"], N
    )
    return {k: v.cpu().numpy() for k, v in outs.items()}


def _neighbours(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(0))])


def _inputs(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e2m1_vals = np.array(E2M1_MAGNITUDES, np.float32)
    e2m1_ties = (e2m1_vals[1:] + e2m1_vals[:-1]) / 2
    e4_all = np.arange(0, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    e4_ties = (e4_all[1:] + e4_all[:-1]) / 2
    special = np.concatenate(
        [
            _neighbours(e2m1_ties),
            _neighbours(e2m1_vals),
            _neighbours(e4_ties),
            _neighbours(np.array([448, 464, 480, 2.0**-10, 2.0**-9, 2.0**-6], np.float32)),
            _neighbours(6 * 2.0 ** np.arange(-127, 126, dtype=np.float64)).astype(np.float32),
            np.array([0, 3.5264830524668625e-38, 1e-45, 1e-40, 3e38, np.inf, np.nan], np.float32),
        ]
    ).astype(np.float32)
    special = np.concatenate([special, -special])
    n_rest = N - special.size
    assert n_rest >= 1000, special.size
    rand_bits = rng.integers(0, 2**32, size=n_rest // 2, dtype=np.uint64).astype(np.uint32)
    n_t = n_rest - rand_bits.size
    scaled = rng.standard_t(2, size=n_t) * 2.0 ** rng.integers(-12, 10, size=n_t)
    scaled = scaled.astype(np.float32)
    x = np.concatenate([special, scaled, rand_bits.view(np.float32)])
    rng.shuffle(x)
    return np.ascontiguousarray(x)


def _e8m0_rceil_oracle(amax: np.ndarray) -> np.ndarray:
    """ceil(log2(float32(amax / 6))) + 127 clamped to [0, 254], by float64 search (exact);
    Inf counts as the largest float32, NaN gives 0xFF (fp4sim ``mx_scale_bits``)."""
    out = np.empty(amax.shape, np.uint8)
    a32 = np.minimum(amax.astype(np.float32), np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):  # NaN amax (signalling payloads too) is a case here
        q = (a32 / np.float32(6)).astype(np.float64)
    for i, qq in enumerate(q):
        if np.isnan(qq):
            out[i] = 0xFF
            continue
        e = -127
        while e < 127 and qq > 2.0**e:
            e += 1
        out[i] = e + 127
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_element_casts_match_oracles(seed: int) -> None:
    x = _inputs(seed)
    got = _run_elementwise(x)
    finite = np.isfinite(x)
    nan = np.isnan(x)

    # E2M1: ml_dtypes RNE on finite values; saturation clamps to +-6 first (PTX .satfinite).
    ref_codes = np.clip(x[finite], -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    np.testing.assert_array_equal(got["e2m1"][finite], ref_codes)
    assert np.all(got["e2m1"][nan] == 7), "NaN -> +6 (code 7), PTX policy"
    inf = np.isinf(x)
    np.testing.assert_array_equal(got["e2m1"][inf], np.where(x[inf] > 0, 7, 15))
    dec_ref = (got["e2m1"].view(ml_dtypes.float4_e2m1fn)).astype(np.float32)
    np.testing.assert_array_equal(got["dec"].view(np.uint32), dec_ref.view(np.uint32))

    # E4M3FN: ml_dtypes RNE; saturation = clamp to +-448 first (ml_dtypes overflows to NaN).
    ref_e4 = np.clip(x[finite], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(got["e4b"][finite], ref_e4.view(np.uint8))
    np.testing.assert_array_equal(
        got["e4v"][finite].view(np.uint32), ref_e4.astype(np.float32).view(np.uint32)
    )
    assert np.all(got["e4b"][nan] & 0x7F == 0x7F)
    assert np.all(np.isnan(got["e4v"][nan]))
    np.testing.assert_array_equal(got["e4b"][inf], np.where(x[inf] > 0, 0x7E, 0xFE))

    # E8M0 rceil of |x|.
    np.testing.assert_array_equal(got["e8"], _e8m0_rceil_oracle(np.abs(x)))


def test_elementwise_test_can_fail() -> None:
    """The oracle comparison distinguishes RNE from round-half-away (0.25 -> 0, not 0.5)."""
    x = np.zeros(N, np.float32)
    x[:4] = [0.25, 0.75, 2.5, 5.0]
    got = _run_elementwise(x)
    assert list(got["e2m1"][:4]) == [0, 2, 4, 6]
    assert list(got["e2m1"][:4]) != [1, 2, 5, 7]  # what ties-away would give


@triton.jit
def _nonneg_kernel(x_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr, HW_CVT: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    nv_general = fp4_jit.nvfp4_fake_quantize_rows(x, 16)
    nv_fast = fp4_jit.nvfp4_fake_quantize_probs(x, 16, HW_CVT)
    mx_codes, mx_bits, _s, mx_vals = fp4_jit.mxfp4_quantize_nonneg_rows(x, 32)
    mx_codes_g, mx_bits_g, _sg = fp4_jit.mxfp4_quantize_rows(x, 32)
    mx_vals_g = fp4_jit.mxfp4_fake_quantize_rows(x, 32)
    nv_diff = nv_general.to(tl.uint32, bitcast=True) != nv_fast.to(tl.uint32, bitcast=True)
    mx_diff = (mx_codes != mx_codes_g) | (
        mx_vals.to(tl.uint32, bitcast=True) != mx_vals_g.to(tl.uint32, bitcast=True)
    )
    byte_diff = tl.reshape(
        tl.broadcast_to((mx_bits != mx_bits_g)[:, :, None], (R, C // 32, 32)), (R, C)
    )
    tl.store(out_ptr + offs, nv_diff.to(tl.int32) + 2 * mx_diff.to(tl.int32) + 4 * byte_diff)


@pytest.mark.parametrize("seed", [0, 1])
def test_nonneg_quantizers_equal_general_ones(seed: int) -> None:
    """The cheaper P quantizers (x >= 0) give bit-identical values, codes and scale bytes
    (``nvfp4_fake_quantize_probs`` with the hardware E4M3 cast on the GPU)."""
    rng = np.random.default_rng(seed)
    rows, cols = 64, 64
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = rng.random((rows, cols)) * np.exp(rng.normal(0, 3, (rows, 1)))  # P-like magnitudes
    # Rows 0..15: exact E2M1 ties after a power-of-two block scale (block amax 6 * 2^e).
    for r in range(16):
        e = 2.0 ** rng.integers(-10, 2)
        x[r] = rng.choice(ties, cols) * e
        x[r, ::16] = 6 * e
    x = x.astype(np.float32)
    x[16:24] = _neighbours_rows(x[:8])  # one float32 ulp off the ties
    x[24:28] *= np.float32(2.0**-12)  # blocks at the NVFP4 flush threshold
    x[28, :] = 0.0
    x[29, :32] = 0.0
    got = torch.full((rows, cols), -1, dtype=torch.int32, device=DEVICE)
    _nonneg_kernel[(1,)](torch.from_numpy(x).to(DEVICE), got, rows, cols, DEVICE == "cuda")
    got = got.cpu().numpy()
    assert got.min() >= 0, "every element written"
    assert not got.any(), np.argwhere(got != 0)[:5]


def _neighbours_rows(x: np.ndarray) -> np.ndarray:
    up = np.nextafter(x, np.float32(np.inf))
    down = np.nextafter(x, np.float32(0))
    return np.where(np.arange(x.shape[1]) % 2 == 0, up, down).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The GPU fast path of the P quantizer, by exhaustion (CUDA only: the interpreter has no
# hardware E4M3 cast and would take hours over 2^31 values)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fast_scale_mismatch_kernel(counts_ptr, start, BLOCK: tl.constexpr):
    bits = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    finite = bits < 0x7F800000  # every finite float32 >= 0 (+0 included)
    a = tl.where(finite, bits, 0).to(tl.uint32).to(tl.float32, bitcast=True)
    exact_q = tl.math.div_rn(a, tl.full(a.shape, 6.0, tl.float32))
    fast_q = fp4_jit.div6_rn_fma(a)
    plain_q = a * 0.16666667163372040  # no correction step: must differ somewhere
    exact_s = fp4_jit.e4m3_rne_sat(exact_q)
    fast_s = fp4_jit.e4m3_rne_sat_cvt(fast_q)
    neg = -a  # the cast of negative values too (sign handling of the hardware cvt)
    cvt_diff = (fp4_jit.e4m3_rne_sat_cvt(a).to(tl.uint32, bitcast=True)
                != fp4_jit.e4m3_rne_sat(a).to(tl.uint32, bitcast=True)) | (
        fp4_jit.e4m3_rne_sat_cvt(neg).to(tl.uint32, bitcast=True)
        != fp4_jit.e4m3_rne_sat(neg).to(tl.uint32, bitcast=True))
    # Quotients are compared where neither the quotient nor the fma remainder (about
    # a * 2^-23) is subnormal: Triton's float32 ops flush subnormals (ftz) there; below it
    # only the block scale matters (and is compared: all such scales round to E4M3 zero).
    normal = a >= 7.888609052210118e-31  # 2^-100
    q_diff = (fast_q.to(tl.uint32, bitcast=True) != exact_q.to(tl.uint32, bitcast=True)) & normal
    plain_diff = (plain_q.to(tl.uint32, bitcast=True)
                  != exact_q.to(tl.uint32, bitcast=True)) & normal
    s_diff = fast_s.to(tl.uint32, bitcast=True) != exact_s.to(tl.uint32, bitcast=True)
    tl.atomic_add(counts_ptr + 0, tl.sum((s_diff & finite).to(tl.int32)))
    tl.atomic_add(counts_ptr + 1, tl.sum((q_diff & finite).to(tl.int32)))
    tl.atomic_add(counts_ptr + 2, tl.sum((cvt_diff & finite).to(tl.int32)))
    tl.atomic_add(counts_ptr + 3, tl.sum((plain_diff & finite).to(tl.int32)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (hardware E4M3 cast)")
def test_gpu_fast_block_scale_exhaustive() -> None:
    """On every finite float32 amax >= 0: e4m3(div6_rn_fma(amax)) equals the exact path
    e4m3_rne_sat(div_rn(amax, 6)); the hardware E4M3 cast equals the integer one on +-x; and the
    fma-corrected quotient equals div_rn for amax >= 2^-100. The uncorrected product
    ``amax * RN(1/6)`` must differ from div_rn somewhere (the comparison can fail)."""
    counts = torch.zeros(4, dtype=torch.int32, device="cuda")
    block, total = 4096, 0x7F800000
    chunk = block * 65536
    for start in range(0, total, chunk):
        grid = (triton.cdiv(min(chunk, total - start), block),)
        _fast_scale_mismatch_kernel[grid](counts, start, BLOCK=block)
    scale_diff, quotient_diff, cvt_diff, plain_diff = counts.tolist()
    assert plain_diff > 0, "the harness sees no difference even without the correction step"
    assert cvt_diff == 0, f"hardware E4M3 cast differs on {cvt_diff} values"
    assert quotient_diff == 0, f"fma-corrected amax/6 differs from div_rn on {quotient_diff}"
    assert scale_diff == 0, f"fast block scale differs on {scale_diff} values"


@triton.jit
def _rcp_kernel(x_ptr, fast_ptr, exact_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    s = tl.load(x_ptr + offs)
    tl.store(fast_ptr + offs, fp4_jit.rcp_rn_e4m3(s))
    tl.store(exact_ptr + offs, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (rcp.approx + Newton)")
def test_gpu_reciprocal_of_every_e4m3_value() -> None:
    """rcp_rn_e4m3 equals div_rn(1, s) bit for bit on all 126 positive finite E4M3 values."""
    values = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    x = torch.from_numpy(np.concatenate([values, np.ones(2, np.float32)])).to("cuda")
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    _rcp_kernel[(1,)](x, fast, exact, N=128)
    assert torch.equal(fast.view(torch.int32), exact.view(torch.int32)), (
        (fast != exact).nonzero()[:5])
