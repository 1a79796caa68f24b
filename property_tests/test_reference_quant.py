"""reference.quant_torch against the NumPy emulator fp4sim, bit for bit (codes and scale bytes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference_inputs import heavy_tailed_floats

import fp4sim
from fp4sim.reference.quant_torch import (
    e2m1_decode_torch,
    e2m1_encode_torch,
    e4m3_decode_torch,
    e4m3_encode_torch,
    e8m0_decode_torch,
    fake_quantize_torch,
    quantize_torch,
    quantize_torch_full,
)


def _fp4sim(name: str):
    """fp4sim public function ``name`` (DESIGN.md); skip while the emulator lacks it."""
    fn = getattr(fp4sim, name, None)
    if fn is None:
        pytest.skip(f"fp4sim.{name} not available yet")
    return fn


def _f32_bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_same_bytes(ours: torch.Tensor, theirs, what: str) -> None:
    theirs = np.asarray(theirs)
    ours_np = ours.numpy()
    assert ours_np.shape == theirs.shape, f"{what}: shape {ours_np.shape} vs {theirs.shape}"
    bad = np.flatnonzero(ours_np.reshape(-1) != theirs.reshape(-1))
    assert bad.size == 0, (
        f"{what}: {bad.size} of {theirs.size} differ; first at {bad[0]}: "
        f"ours {ours_np.reshape(-1)[bad[0]]}, fp4sim {theirs.reshape(-1)[bad[0]]}"
    )


def _assert_same_floats(ours: torch.Tensor, theirs, what: str) -> None:
    """Bitwise float32 equality (NaN payloads canonicalized)."""
    a, b = ours.numpy().astype(np.float32), np.asarray(theirs, dtype=np.float32)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    both_nan = np.isnan(a) & np.isnan(b)
    bad = np.flatnonzero(~both_nan.reshape(-1) & (_f32_bits(a) != _f32_bits(b)).reshape(-1))
    assert bad.size == 0, (
        f"{what}: {bad.size} differ; first ours {a.reshape(-1)[bad[0]]!r} "
        f"fp4sim {b.reshape(-1)[bad[0]]!r}"
    )


SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38],
    dtype=np.float32,
)


def _random_patterns(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@given(seed=st.integers(0, 2**32 - 1), nan=st.sampled_from(("ptx", "ml_dtypes")))
def test_e2m1_encode_matches_fp4sim(seed, nan):
    enc = _fp4sim("e2m1_encode")
    rng = np.random.default_rng(seed)
    x = np.concatenate([heavy_tailed_floats(rng, 4000), _random_patterns(seed, 4000), SPECIALS])
    ours = e2m1_encode_torch(torch.from_numpy(x), nan=nan)
    _assert_same_bytes(ours, enc(x, nan=nan), f"e2m1 codes (nan={nan})")


def test_e2m1_and_e4m3_decode_tables_match_fp4sim():
    codes16 = np.arange(16, dtype=np.uint8)
    _assert_same_floats(
        e2m1_decode_torch(torch.from_numpy(codes16)), _fp4sim("e2m1_decode")(codes16), "e2m1"
    )
    codes256 = np.arange(256, dtype=np.uint8)
    _assert_same_floats(
        e4m3_decode_torch(torch.from_numpy(codes256)), _fp4sim("e4m3_decode")(codes256), "e4m3"
    )
    e8m0_decode = getattr(fp4sim, "e8m0_decode", None)
    if e8m0_decode is not None:
        _assert_same_floats(
            e8m0_decode_torch(torch.from_numpy(codes256)), e8m0_decode(codes256), "e8m0"
        )


@given(seed=st.integers(0, 2**32 - 1))
def test_e4m3_encode_matches_fp4sim(seed):
    enc = _fp4sim("e4m3_encode")
    rng = np.random.default_rng(seed)
    x = np.concatenate([heavy_tailed_floats(rng, 4000), _random_patterns(seed, 4000), SPECIALS])
    ours = e4m3_encode_torch(torch.from_numpy(x))
    _assert_same_bytes(ours, enc(x, overflow="saturate", nan="ptx"), "e4m3 bytes")


SETTINGS = [
    ("nvfp4", {}),
    ("nvfp4", {"tensor_scale": "amax"}),
    ("nvfp4", {"scale_op": "divide"}),
    ("nvfp4", {"scale_amax_op": "reciprocal"}),
    ("nvfp4", {"scale_lower_clamp": True}),
    ("nvfp4", {"zero_scale_codes": "reciprocal", "nan": "ml_dtypes"}),
    ("nvfp4", {"tensor_scale": 0.001}),
    ("nvfp4", {"tensor_scale": "amax", "nan": "ml_dtypes"}),
    ("mxfp4", {"nan": "ml_dtypes"}),
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "floor"}),
    ("mxfp4", {"scale_rule": "ceil"}),
    ("mxfp4", {"scale_rule": "even"}),
]


@st.composite
def quant_arrays(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = draw(st.integers(1, 6))
    blocks = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(("heavy", "probs", "tiny", "zeros_mixed", "specials")))
    n = rows * blocks * 32
    if kind == "heavy":
        x = heavy_tailed_floats(rng, n)
    elif kind == "probs":
        # attention-like probabilities exp(-t), many blocks near the E4M3 flush threshold
        x = np.exp(-rng.exponential(draw(st.sampled_from((1.0, 4.0, 8.0))), n)).astype(np.float32)
    elif kind == "tiny":
        x = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, -5, n)).astype(np.float32)
    elif kind == "zeros_mixed":
        x = heavy_tailed_floats(rng, n)
        x[rng.random(n) < 0.7] = 0.0
    else:
        # NaN, +-Inf, -0, float32 extremes sprinkled into heavy-tailed data
        x = heavy_tailed_floats(rng, n)
        where = rng.random(n) < 0.03
        x[where] = SPECIALS[rng.integers(0, len(SPECIALS), size=int(where.sum()))]
        x[rng.random(n) < 0.2] = -0.0
    x = x.reshape(rows, blocks * 32)
    axis = draw(st.sampled_from((-1, 0)))
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    return x, axis


@pytest.mark.parametrize(("fmt", "settings"), SETTINGS, ids=lambda v: str(v))
@given(data=quant_arrays())
def test_quantize_torch_matches_fp4sim(fmt, settings, data):
    quantize = _fp4sim("quantize")
    x, axis = data
    qt = quantize(x, fmt, axis=axis, **settings)
    xt = torch.from_numpy(x)
    codes, scale_bits, scales, tensor_scale = quantize_torch(xt, fmt, axis, **settings)
    _assert_same_bytes(codes, qt.codes, f"{fmt} {settings} codes")
    _assert_same_bytes(scale_bits, qt.scale_bits, f"{fmt} {settings} scale bytes")
    _assert_same_floats(scales, qt.scales, f"{fmt} {settings} scales")
    if qt.tensor_scale is None:
        assert tensor_scale is None
    else:
        _assert_same_floats(tensor_scale.reshape(()), np.float32(qt.tensor_scale), "tensor scale")
    fq = _fp4sim("fake_quantize")(x, fmt, axis=axis, **settings)
    _assert_same_floats(fake_quantize_torch(torch.from_numpy(x), fmt, axis, **settings), fq, "fq")


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 70))
def test_padding_matches_fp4sim_and_never_changes_valid_scales(seed, n):
    quantize = _fp4sim("quantize")
    x = np.abs(heavy_tailed_floats(np.random.default_rng(seed), 2 * n)).reshape(2, n)
    qt = quantize(x, "nvfp4", axis=-1, pad=True)
    ours = quantize_torch_full(torch.from_numpy(x), "nvfp4", -1, pad=True)
    _assert_same_bytes(ours.codes, qt.codes[..., :n], "codes")
    _assert_same_bytes(ours.scale_bits, qt.scale_bits, "padded scale bytes")
    # a padded block's scale equals the scale of its valid elements alone
    full = (n // 16) * 16
    if full < n:
        tail = quantize_torch_full(torch.from_numpy(x[:, full:]), "nvfp4", -1, pad=True)
        assert torch.equal(tail.scale_bits[:, 0], ours.scale_bits[:, -1])


def test_zero_scale_block_gets_zero_codes_and_value():
    x = torch.full((16,), 1e-3)  # amax/6 below half the smallest E4M3 subnormal: flush
    q = quantize_torch_full(x, "nvfp4")
    assert int(q.scale_bits[0]) == 0 and bool(q.flushed[0])
    assert torch.equal(q.codes, torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(q.values, torch.zeros(16))


def test_quantize_torch_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize_torch(torch.ones(17), "nvfp4")
    with pytest.raises(ValueError, match="unknown FP4 block format"):
        quantize_torch(torch.ones(16), "fp8")
    with pytest.raises(ValueError, match="unsupported settings"):
        quantize_torch(torch.ones(32), "mxfp4", tensor_scale="amax")


@given(data=quant_arrays(), block_n=st.sampled_from((16, 32, 64)))
def test_p_policies_match_fp4sim_tile_by_tile(data, block_n):
    """P quantizers of reference.p_quant against fp4sim on each (rows x block_n) tile."""
    from fp4sim.reference.p_quant import quantize_p_tiles
    from fp4sim.reference.recipes import NVFP4

    x, _ = data
    x = np.abs(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=1.0)).astype(np.float32)
    x = x.reshape(-1)[: (x.size // block_n) * block_n].reshape(-1, block_n)
    if x.size == 0:
        return
    rows = x.shape[0]
    tiles = torch.from_numpy(x).reshape(1, 1, rows, 1, block_n)
    # two-level: per row segment of a tile (fp4sim.quantize_two_level, row axis = keys)
    pq = quantize_p_tiles(tiles, NVFP4, "two_level")
    tl = _fp4sim("quantize_two_level")(x, axis=-1, row_axis=-1)
    _assert_same_bytes(pq.codes.reshape(rows, block_n), tl.inner.codes, "two-level codes")
    _assert_same_bytes(pq.scale_bits.reshape(rows, -1), tl.inner.scale_bits, "two-level scales")
    _assert_same_floats(pq.values.reshape(rows, block_n),
                        _fp4sim("dequantize_two_level")(tl), "two-level values")
    # tile_global: one tensor scale per (block_m rows x block_n keys) tile
    block_m = 2
    pq = quantize_p_tiles(tiles, NVFP4, "tile_global", block_m=block_m)
    for r0 in range(0, rows, block_m):
        tile = x[r0:r0 + block_m]
        qt = _fp4sim("quantize")(tile, "nvfp4", axis=-1, tensor_scale="amax")
        ours_codes = pq.codes.reshape(rows, block_n)[r0:r0 + block_m]
        _assert_same_bytes(ours_codes, qt.codes, "tile_global codes")
        _assert_same_bytes(pq.scale_bits.reshape(rows, -1)[r0:r0 + block_m], qt.scale_bits,
                           "tile_global scale bytes")


@pytest.mark.slow
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_encoders_match_fp4sim_on_a_strided_sweep_of_all_float32_patterns(offset):
    """Every 97th float32 bit pattern (44 million per run, 3 offsets): E2M1 (both NaN
    policies), E4M3, and NVFP4/MXFP4 block scales of the same numbers as block maxima."""
    for start in range(offset, 2**32, 2**26):
        stop = min(start + 2**26, 2**32)
        x = np.arange(start, stop, 97, dtype=np.uint64).astype(np.uint32).view(np.float32)
        xt = torch.from_numpy(x)
        for nan in ("ptx", "ml_dtypes"):
            _assert_same_bytes(e2m1_encode_torch(xt, nan=nan), fp4sim.e2m1_encode(x, nan=nan),
                               "e2m1 sweep")
        _assert_same_bytes(e4m3_encode_torch(xt), fp4sim.e4m3_encode(x), "e4m3 sweep")
        blocks = np.abs(x[: (x.size // 32) * 32]).reshape(-1, 32)
        blocks[:, 0] = np.abs(x[: blocks.shape[0]])  # each pattern once as a block max
        for fmt, kw in (("nvfp4", {}), ("mxfp4", {}), ("mxfp4", {"scale_rule": "even"})):
            ours = quantize_torch(torch.from_numpy(blocks), fmt, -1, **kw)
            want = fp4sim.quantize(blocks, fmt, axis=-1, **kw)
            _assert_same_bytes(ours[1], want.scale_bits, f"{fmt} {kw} sweep scales")
            _assert_same_bytes(ours[0], want.codes, f"{fmt} {kw} sweep codes")
