"""fp4sim.adapters for FastVideo's kernels, on the CPU without FastVideo installed.

The Blackwell inference adapter's marshalling is checked against a stand-in ``fp4attn_cuda``
written here from the layouts of FastVideo's quantizers (fp4_quantization_4d.cu at commit
2f3d4074): it decodes what the adapter passes with the emulator's decoders and computes
attention on the decoded operands. The training adapter is checked for the flags FastVideo's
training backend passes (backends/attn_qat_train.py:75-90) with a stand-in kernel module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

import fp4sim
from fp4sim import reference
from fp4sim.adapters import fastvideo_attn_qat_infer as infer
from fp4sim.adapters import fastvideo_attn_qat_train as train
from fp4sim.adapters.importing import KernelPackageMissing
from fp4sim.harness import KernelSpec, load_attention_kernel


def _sage3_offset(row: np.ndarray, col: np.ndarray, cols: int) -> np.ndarray:
    # fp4_quantization_4d.cu:247-254: 64-row groups; in a group, byte
    # (col / 4) * 256 + col % 4 + (row / 16) * 4 + (row % 16) * 16
    r = row % 64
    return (row // 64) * 64 * cols + (col // 4) * 256 + col % 4 + (r // 16) * 4 + (r % 16) * 16


def _unswizzle(buf: np.ndarray, rows: int, cols: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return buf.reshape(-1)[_sage3_offset(i, j, cols)]


def _decode(packed: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    codes = fp4sim.unpack_fp4(packed)
    vals = fp4sim.e2m1_decode(codes).astype(np.float64)
    scales = fp4sim.e4m3_decode(scale_bytes).astype(np.float64)
    return vals * np.repeat(scales, 16, axis=-1)


class StandInCore:
    """``fp4attn_cuda`` of the same API: checks what api.cu checks, decodes, attends."""

    def __init__(self) -> None:
        self.decoded: dict[str, np.ndarray] = {}

    def fwd(self, q, k, v, sfq, sfk, sfv, delta_s, unpadded_k, out, softmax_scale, is_causal,
            per_block_mean, is_bf16, single_level_p_quant):
        for t in (q, k, v):
            assert t.dtype == torch.uint8 and t.is_contiguous()
        for t in (sfq, sfk, sfv):
            assert t.dtype == torch.float8_e4m3fn
        b, h, lq, half_d = q.shape
        d, lk = 2 * half_d, k.shape[2]
        assert k.shape == (b, h, lk, half_d) and v.shape == (b, h, d, lk // 2)  # api.cu:266-268
        assert delta_s.shape == (b, h, lq // 128, lk) and float(delta_s.abs().max()) == 0
        assert out is None and single_level_p_quant and per_block_mean
        sf = {n: t.view(torch.uint8).numpy() for n, t in (("q", sfq), ("k", sfk), ("v", sfv))}
        qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
        dq, dk, dv = (np.empty((b, h, n, m)) for n, m in ((lq, d), (lk, d), (d, lk)))
        # K row r holds token 2 i + 8 j + t for r = 8 i + 2 j + t within 32 (cu:162-168)
        r = np.arange(lk)
        loc = r % 32
        token = r - loc + 2 * (loc // 8) + 8 * ((loc % 8) // 2) + loc % 2
        for i in range(b):
            for j in range(h):
                dq[i, j] = _decode(qn[i, j], _unswizzle(sf["q"][i, j], lq, d // 16))
                dk[i, j, token] = _decode(kn[i, j], _unswizzle(sf["k"][i, j], lk, d // 16))
                dv[i, j] = _decode(vn[i, j], _unswizzle(sf["v"][i, j], d, lk // 16))
        self.decoded = {"q": dq, "k": dk, "v": np.swapaxes(dv, -1, -2)}
        qt, kt, vt = (torch.from_numpy(self.decoded[n]) for n in ("q", "k", "v"))
        s = softmax_scale * qt @ kt.transpose(-1, -2)
        keep = torch.arange(lk)[None, :] < unpadded_k
        if is_causal:
            keep = keep & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None])
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        o = (p @ vt).to(torch.bfloat16 if is_bf16 else torch.float16)
        return [o, torch.zeros(b, h, lq)]


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> StandInCore:
    stand_in = StandInCore()
    module = types.ModuleType(infer.CORE_MODULE)
    module.fwd = stand_in.fwd  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, infer.CORE_MODULE, module)
    return stand_in


def _bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(rng.standard_t(4, size=shape).astype(np.float32)).bfloat16()


@pytest.mark.parametrize("rows,cols", [(64, 4), (128, 8), (256, 16), (192, 4)])
def test_sage3_swizzle_matches_the_quantizers_byte_formula(rows: int, cols: int) -> None:
    s = np.random.default_rng(rows + cols).integers(0, 256, (rows, cols), dtype=np.uint8)
    buf = infer.sage3_swizzle_scales(s)
    want = np.zeros(rows * cols, dtype=np.uint8)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    want[_sage3_offset(i, j, cols)] = s
    np.testing.assert_array_equal(buf, want)
    assert not np.array_equal(buf, fp4sim.swizzle_scales_blackwell(s)[: rows * cols])


def test_k_token_order_is_the_quantizers_permutation() -> None:
    # the order listed in fp4_quantization_4d.cu:164 for one group of 32
    listed = [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
              4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31]
    order = infer.k_token_order(96)
    assert order[:32].tolist() == listed
    assert sorted(order.tolist()) == list(range(96))
    assert order[64:].tolist() == [64 + t for t in listed]


@pytest.mark.parametrize(
    "lq,lk,d,causal", [(128, 128, 64, False), (200, 136, 128, False), (130, 130, 64, True)]
)
def test_infer_marshalling_decodes_to_the_emulators_operands(core, lq, lk, d, causal) -> None:
    rng = np.random.default_rng(lq * lk + d)
    q, k, v = _bf16(rng, (1, 2, lq, d)), _bf16(rng, (1, 2, lk, d)), _bf16(rng, (1, 2, lk, d))
    o = infer.attention(q, k, v, causal, None)
    assert o.shape == q.shape and o.dtype == torch.bfloat16
    qf, kf, vf = (x.float().numpy() for x in (q, k, v))
    want = {
        "q": fp4sim.fake_quantize(qf, "nvfp4"),
        "k": fp4sim.fake_quantize(kf, "nvfp4"),
        "v": fp4sim.fake_quantize(vf, "nvfp4", axis=-2, pad=True),  # V blocked along keys
    }
    for name, n in (("q", lq), ("k", lk), ("v", lk)):
        got = core.decoded[name][:, :, :n]
        np.testing.assert_array_equal(got, want[name].astype(np.float64), err_msg=name)
        assert not core.decoded[name][:, :, n:].any()  # padding tokens decode to zero
    # the output is attention on the emulator's operands (bf16-rounded)
    qt, kt, vt = (torch.from_numpy(want[n]).double() for n in ("q", "k", "v"))
    ref = torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, is_causal=causal, scale=1.0 / math.sqrt(d))
    torch.testing.assert_close(o.double(), ref.bfloat16().double(), rtol=0, atol=0.02)


def test_infer_adapter_checks_inputs_and_reports_a_missing_package(monkeypatch) -> None:
    q = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="GQA"):
        infer.attention(q, q[:, :1], q[:, :1], False, None)
    monkeypatch.setitem(sys.modules, infer.CORE_MODULE, None)  # import raises ImportError
    with pytest.raises(KernelPackageMissing, match="PYTHONPATH.*Checking a public kernel"):
        infer.attention(q, q, q, False, None)


class _FakeFunction:
    def __init__(self) -> None:
        self.args: tuple = ()

    def __call__(self, q, k, v, causal, sm_scale, *flags):
        self.args = (q, k, v, causal, sm_scale, *flags)
        return q * 1  # differentiable stand-in


def test_train_adapter_passes_the_backends_flags(monkeypatch) -> None:
    fake = _FakeFunction()
    module = types.ModuleType(train.KERNEL_MODULE)
    module.attention = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, train.KERNEL_MODULE, module)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    q = torch.ones(1, 2, 40, 64, dtype=torch.bfloat16).transpose(1, 2).transpose(1, 2)
    train.attention(q, q, q, True, None)
    _, _, _, causal, sm_scale, *flags = fake.args
    assert causal is True and sm_scale == pytest.approx(1 / 8)
    # backends/attn_qat_train.py:75-90, in the order of _attention.forward's parameters
    assert flags == [True, False, True, True, False, True, True, False, False, False]
    assert train.backend_flags(10)[2] is False and train.backend_flags(12)[2] is False
    with pytest.raises(ValueError, match="bfloat16"):
        train.attention(q.float(), q.float(), q.float(), False, None)
    with pytest.raises(ValueError, match="no GQA"):
        train.attention(q, q[:, :1], q[:, :1], False, None)


def test_train_adapter_reports_a_missing_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, train.KERNEL_MODULE, None)
    q = torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16)
    with pytest.raises(KernelPackageMissing, match="attn_qat_train is not importable"):
        train.attention(q, q, q, False, None)


def test_adapters_declare_specs_the_harness_reads() -> None:
    for target, claims in (
        ("fp4sim.adapters.fastvideo_attn_qat_train:attention", "fastvideo-attn-qat"),
        ("fp4sim.adapters.fastvideo_attn_qat_infer:attention", "fastvideo-attn-qat-infer"),
    ):
        loaded = load_attention_kernel(target)
        assert isinstance(loaded.spec, KernelSpec) and loaded.spec.claims == claims
        assert not loaded.spec.gqa and loaded.spec.layout == "bhld"
        assert reference.get_recipe(claims).name == claims
    assert train.SPEC.dtypes == ("bfloat16",) and train.SPEC.backward
    assert not infer.SPEC.backward


def test_fastvideo_recipe_differs_from_attn_qat_in_its_tile_width_only() -> None:
    fv, base = reference.get_recipe("fastvideo-attn-qat"), reference.get_recipe("attn-qat")
    assert dataclasses.replace(fv, name=base.name, block_n=base.block_n) == base
    assert fv.block_n == 32


@pytest.mark.skipif(
    importlib.util.find_spec("fastvideo_kernel") is None or not torch.cuda.is_available(),
    reason="FastVideo's fastvideo_kernel package and a CUDA GPU are needed",
)
def test_real_fastvideo_kernel_forward_agrees_with_its_recipe() -> None:
    rng = np.random.default_rng(0)
    q, k, v = (_bf16(rng, (1, 2, 256, 64)).cuda() for _ in range(3))
    o = train.attention(q, k, v, False, None).double().cpu()
    ref = reference.fp4_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                  recipe="fastvideo-attn-qat")
    assert float((o - ref).norm() / ref.norm()) < 0.01
