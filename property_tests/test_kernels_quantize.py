"""``kernels.quantize_fp4`` bit-exact against the emulator ``fp4sim.quantize`` (defaults).

Packed bytes, scale bytes and the tensor scale are compared as integers / float32 bit patterns.
Inputs come from ``fp4sim.testing.strategies.tensor_cases``: Student-t, log-normal, sparse
outliers, exact E2M1 ties scaled by powers of two and their one-ulp neighbours, E4M3 scale ties,
all-zero blocks (with -0), blocks below the NVFP4 flush threshold, and NaN/Inf specials, in
float32, float16 and bfloat16.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4sim.testing.strategies import tensor_cases

triton = pytest.importorskip("triton")

from fp4sim.kernels.quantize import quantize_fp4  # noqa: E402

_CAN_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the interpreter's NaN/Inf arithmetic
    pytest.mark.skipif(not _CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DISTRIBUTIONS = (
    "student_t",
    "lognormal",
    "sparse_outliers",
    "ties",
    "near_ties",
    "scale_ties",
    "zero_blocks",
    "below_flush",
    "specials",
)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """Low nibble = element 2i (docs/numerics.md, 'Packing')."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def _emulator(x32: np.ndarray, fmt: str, tensor_scale: str | float | None):
    fp4sim = pytest.importorskip("fp4sim")
    if not hasattr(fp4sim, "quantize"):
        pytest.fail("fp4sim.quantize is missing")
    settings = {} if tensor_scale is None else {"tensor_scale": tensor_scale}
    return fp4sim.quantize(x32, fmt, axis=-1, **settings)


# A new shape or dtype JIT-compiles the kernel inside the example (hundreds of ms on a GPU
# machine without the fp4sim plugin's profiles, whose default deadline is 200 ms): no deadline.
_NO_DEADLINE = settings(deadline=None)


def _check_against_oracles(x: torch.Tensor, fmt: str, tensor_scale: str | float | None) -> None:
    packed, scale_bits, ts = quantize_fp4(x.to(DEVICE), fmt, tensor_scale=tensor_scale)
    packed, scale_bits = packed.cpu().numpy(), scale_bits.cpu().numpy()
    x32 = x.to(torch.float32).numpy()
    assert scale_bits.shape == (*x.shape[:-1], x.shape[-1] // (16 if fmt == "nvfp4" else 32))
    assert packed.shape == (*x.shape[:-1], x.shape[-1] // 2)

    q = _emulator(x32, fmt, tensor_scale)
    np.testing.assert_array_equal(packed, np.asarray(q.packed, np.uint8))
    np.testing.assert_array_equal(_unpack(packed), np.asarray(q.codes, np.uint8))
    np.testing.assert_array_equal(scale_bits, np.asarray(q.scale_bits, np.uint8))
    if tensor_scale is None:
        assert ts is None and q.tensor_scale is None
    else:
        want = np.asarray(q.tensor_scale, np.float32).reshape(()).view(np.uint32)
        got = np.asarray(ts.cpu().numpy(), np.float32).reshape(()).view(np.uint32)
        assert got == want, (got, want)


@given(
    case=tensor_cases(
        fmt="nvfp4",
        distributions=_DISTRIBUTIONS,
        dtypes=("float32", "bfloat16", "float16"),
        max_rows=3,
        max_blocks=5,
    )
)
@_NO_DEADLINE
def test_nvfp4_bit_exact(case) -> None:
    x = torch.from_numpy(case.x).to(_TORCH_DTYPES[case.dtype])
    _check_against_oracles(x, "nvfp4", None)


@given(case=tensor_cases(fmt="nvfp4", distributions=_DISTRIBUTIONS, max_rows=3, max_blocks=5))
@_NO_DEADLINE
def test_nvfp4_tensor_scale_bit_exact(case) -> None:
    _check_against_oracles(torch.from_numpy(case.x), "nvfp4", "amax")


@given(
    case=tensor_cases(
        fmt="mxfp4",
        distributions=_DISTRIBUTIONS,
        dtypes=("float32", "bfloat16"),
        max_rows=3,
        max_blocks=4,
    )
)
@_NO_DEADLINE
def test_mxfp4_bit_exact(case) -> None:
    x = torch.from_numpy(case.x).to(_TORCH_DTYPES[case.dtype])
    _check_against_oracles(x, "mxfp4", None)


@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(["nvfp4", "mxfp4"]))
@_NO_DEADLINE
def test_extreme_magnitudes_bit_exact(seed: int, fmt: str) -> None:
    """Random float32 bit patterns (every exponent, subnormals, NaN, Inf) in 3-D tensors."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=(2, 3, 64), dtype=np.uint64).astype(np.uint32)
    # Half the blocks: one exponent per block, so the small elements are not all flushed.
    scaled = rng.standard_t(2, size=(2, 3, 64)) * 2.0 ** rng.integers(-140, 120, size=(2, 3, 1))
    with np.errstate(over="ignore"):
        x = np.where(rng.random((2, 3, 1)) < 0.5, bits.view(np.float32), scaled.astype(np.float32))
    _check_against_oracles(torch.from_numpy(np.ascontiguousarray(x, np.float32)), fmt, None)


def _e2m1_codes_np(v: np.ndarray) -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF


def _e4m3_values() -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.arange(1, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _ulp_shift(x: np.ndarray, k: int) -> np.ndarray:
    return (
        (x.astype(np.float32).view(np.uint32).astype(np.int64) + k)
        .astype(np.uint32)
        .view(np.float32)
    )


def test_nvfp4_uses_reciprocal_of_scale() -> None:
    """Blocks where x * (1/s) and x / s round to different codes (scale_op='reciprocal')."""
    s_all = _e4m3_values()
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    s_grid, t_grid = np.meshgrid(s_all, ties, indexing="ij")
    blocks = []
    for k in range(-3, 4):
        x = _ulp_shift((s_grid.astype(np.float64) * t_grid).astype(np.float32), k)
        differ = _e2m1_codes_np(x * (np.float32(1) / s_grid)) != _e2m1_codes_np(x / s_grid)
        for s, xv in zip(s_grid[differ], x[differ], strict=True):
            block = np.zeros(16, np.float32)
            block[:3] = [6 * s, xv, -xv]  # amax 6s: the block scale is exactly s
            blocks.append(block)
    assert len(blocks) >= 50
    _check_against_oracles(torch.from_numpy(np.stack(blocks)), "nvfp4", None)


@pytest.mark.parametrize("mode", ["amax", "float"])
def test_nvfp4_tensor_scale_op_order(mode: str) -> None:
    """Block amaxes where E4M3((amax/6)/t) differs from E4M3(amax/(6t)): the order is checked."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    big = np.float32(1234.5678)
    t = big / np.float32(448.0 * 6.0)  # the float32 tensor scale 'amax' gives
    e4 = np.arange(0, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    mids = ((e4[1:] + e4[:-1]) / 2)[:-4]  # keep 6 * mid * t below big
    base = (6 * mids * np.float64(t)).astype(np.float32)
    rows = []
    for k in range(-4, 5):
        amax = _ulp_shift(base, k)
        a = ((amax / np.float32(6)) / t).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        b = (amax / (t * np.float32(6))).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        rows += [amax[a != b]]
    amaxes = np.concatenate(rows)
    assert amaxes.size >= 5
    x = np.zeros((amaxes.size + 1, 16), np.float32)
    x[:-1, 0] = amaxes
    x[:-1, 1] = -amaxes / 3
    x[-1, 0] = big
    tensor_scale = "amax" if mode == "amax" else float(t)
    _check_against_oracles(torch.from_numpy(x), "nvfp4", tensor_scale)


@pytest.mark.parametrize("fmt,tensor_scale", [("nvfp4", None), ("nvfp4", "amax"), ("mxfp4", None)])
def test_special_tensors_bit_exact(fmt: str, tensor_scale: str | None) -> None:
    """All-zero (with -0), Inf-holding, NaN-holding and tiny tensors, as fp4sim documents."""
    inf_row = np.linspace(-3, 3, 64, dtype=np.float32)
    inf_row[5] = np.inf
    nan_row = np.linspace(-3, 3, 64, dtype=np.float32)
    nan_row[40] = np.nan
    cases = [
        np.where(np.arange(64) % 3 == 0, -0.0, 0.0).astype(np.float32)[None],
        inf_row[None],
        np.stack([inf_row, -inf_row]),
        nan_row[None],
        (np.linspace(-1, 1, 64) * 1e-40).astype(np.float32)[None],
        (np.linspace(-1, 1, 64) * 3e-38).astype(np.float32)[None],
    ]
    for x in cases:
        _check_against_oracles(torch.from_numpy(np.ascontiguousarray(x)), fmt, tensor_scale)


def test_non_contiguous_input_is_copied() -> None:
    x = torch.randn(32, 6)
    xt = x.t()  # (6, 32), non-contiguous
    assert not xt.is_contiguous()
    a = quantize_fp4(xt.to(DEVICE), "nvfp4")
    b = quantize_fp4(xt.contiguous().to(DEVICE), "nvfp4")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of the nvfp4 block size 16"):
        quantize_fp4(torch.zeros(2, 24, device=DEVICE), "nvfp4")
    with pytest.raises(TypeError, match="unsupported dtype"):
        quantize_fp4(torch.zeros(2, 32, dtype=torch.int32, device=DEVICE), "nvfp4")
    with pytest.raises(ValueError, match="unsupported FP4 format"):
        quantize_fp4(torch.zeros(2, 32, device=DEVICE), "fp8")
    with pytest.raises(ValueError, match="nvfp4 only"):
        quantize_fp4(torch.zeros(2, 32, device=DEVICE), "mxfp4", tensor_scale="amax")


def test_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        quantize_fp4(torch.zeros(2, 32), "nvfp4")


def test_low_nibble_is_element_2i() -> None:
    """A test that can fail: a nibble swap would put code 2 (1.0) in the high nibble."""
    x = torch.zeros(1, 16, device=DEVICE)
    x[0, 0] = 6.0  # amax 6 -> scale 1 -> code 7
    x[0, 1] = 1.0  # code 2
    packed, bits, _ = quantize_fp4(x, "nvfp4")
    assert packed[0, 0].item() == 0x27
    assert bits[0, 0].item() == 0x38  # E4M3 1.0 = 0.0111.000
