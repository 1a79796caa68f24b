"""``Recipe.kv_splits``: the forward of a split-KV (flash-decoding) kernel in the reference.

The reference computes every key tile at once with the running max restarting at each split
(``reference.softmax.split_running_max``); the independent model here runs the reference's
one-pass tiled softmax on each split's own keys and merges the splits in float64
(``property_tests/decode_schedule.py``, split boundaries recomputed from the documented rule).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from decode_schedule import merge_partials, schedule_splits  # noqa: E402

from fp4sim import reference  # noqa: E402
from fp4sim.judge import attention as ca  # noqa: E402
from fp4sim.judge.diagnosis import diagnose_attention  # noqa: E402
from fp4sim.judge.diagnosis.engine import kernel_outputs_from_callable  # noqa: E402
from fp4sim.judge.inputs import (  # noqa: E402
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
)
from fp4sim.reference.recipes import get_recipe  # noqa: E402
from fp4sim.reference.softmax import softmax_forward  # noqa: E402
from fp4sim.reference.ste_tiled import tiled_forward_autograd  # noqa: E402
from fp4sim.reference.streaming import streaming_forward  # noqa: E402


def _fixed_length_splits(lk: int, keys: int) -> list[tuple[int, int]]:
    return [(a, min(a + keys, lk)) for a in range(0, lk, keys)]


@pytest.mark.parametrize("lk", [65, 200, 448])
@pytest.mark.parametrize("option", ["kv_splits=1", "kv_splits=2", "kv_splits=3", "kv_splits=5",
                                    "kv_split_keys=64", "kv_split_keys=128"])
def test_split_softmax_equals_split_passes_merged(lk: int, option: str) -> None:
    """The same scores S: one call with the split-KV option against one one-pass call per
    split merged in float64: the same max per tile and P codes bit for bit, O to float64
    rounding. Splits: decode_schedule's rule for a number of splits, fixed lengths here."""
    name, _, value = option.partition("=")
    g = torch.Generator().manual_seed(lk + int(value))
    s = torch.randn(1, 2, 5, -(-lk // 64) * 64, generator=g, dtype=torch.float64) * 4
    s[..., lk:] = float("-inf")  # padded keys, as the reference masks them
    v = torch.randn(1, 2, s.shape[-1], 8, generator=g, dtype=torch.float64)
    one = get_recipe("infer-nvfp4")
    split = get_recipe(f"infer-nvfp4@{option}")
    sm = softmax_forward(s, split, "tiled")
    o = sm.p_tilde @ v / sm.l.unsqueeze(-1)
    ranges = (schedule_splits(lk, int(value)) if name == "kv_splits" else
              _fixed_length_splits(lk, int(value)))
    ms, ls, accs, m_tiles, codes = [], [], [], [], []
    for a, e in ranges:
        e_pad = -(-e // 64) * 64
        part = softmax_forward(s[..., a:e_pad], one, "tiled")
        ms.append(part.m)
        ls.append(part.l)
        accs.append(part.p_tilde @ v[..., a:e_pad, :])
        m_tiles.append(part.m_tiles)
        codes.append(part.pq.codes)
    assert torch.equal(sm.m_tiles, torch.cat(m_tiles, dim=-1))
    assert torch.equal(sm.pq.codes, torch.cat(codes, dim=-2))
    merged = merge_partials(torch.stack(ms, -1), torch.stack(ls, -1), torch.stack(accs, -2))
    assert torch.allclose(o, merged, rtol=1e-12, atol=1e-14)
    if len(ranges) > 1:  # the test can fail: one pass differs
        assert not torch.equal(softmax_forward(s, one, "tiled").m_tiles, sm.m_tiles)


def test_recipe_names_carry_the_option() -> None:
    r = get_recipe("infer-mxfp4@kv_splits=4")
    assert (r.name, r.kv_splits, r.p) == ("infer-mxfp4@kv_splits=4", 4, get_recipe("infer-mxfp4").p)
    assert get_recipe("infer-mxfp4").kv_splits == 1
    assert get_recipe("infer-nvfp4@kv_split_keys=128").kv_split_keys == 128
    for bad, words in (("infer-nvfp4@kv_splits=0", "N >= 1"), ("infer-nvfp4@block_n=32",
                       "expected kv_splits=N"), ("infer@kv_splits=2", "unknown recipe"),
                       ("attn-qat-consistent@kv_splits=2", "consistent P policy"),
                       ("infer-nvfp4@kv_split_keys=100", "multiple of block_n=64")):
        with pytest.raises(ValueError, match=words):
            get_recipe(bad)
    with pytest.raises(ValueError, match="both set"):
        dataclasses.replace(get_recipe("infer-nvfp4@kv_splits=2"), kv_split_keys=128)


def _inputs(lq: int, lk: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, lq, 64, generator=g), torch.randn(1, 2, lk, 64, generator=g) * 2,
            torch.randn(1, 2, lk, 64, generator=g))


@pytest.mark.parametrize("causal", [False, True])
def test_ste_tiled_forward_follows_the_splits(causal: bool) -> None:
    """The autograd ground truth's own loop restarts its max per split: its O equals the
    reference's under kv_splits (and not the one-pass O). Causal, Lq 100 and Lk 300 (5 tiles,
    splits of 2): the early rows see no key of the last split, whose first tile is then all
    masked (seen wiping those rows' sums while the loop rescaled by the split's own max)."""
    q, k, v = _inputs(100, 300)
    rec = get_recipe("infer-nvfp4@kv_splits=3")
    o, _, _ = tiled_forward_autograd(q, k, v, rec, causal, 0.125, torch.float64)
    want = reference.fp4_attention_forward(q, k, v, rec, causal=causal,
                                           accum_dtype=torch.float64).o
    one = reference.fp4_attention_forward(q, k, v, "infer-nvfp4", causal=causal,
                                          accum_dtype=torch.float64).o
    assert torch.allclose(o.detach(), want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(want, one, rtol=1e-6, atol=1e-8)


def test_streaming_reference_refuses_splits() -> None:
    q, k, v = _inputs(5, 100)
    with pytest.raises(ValueError, match="kv_splits"):
        streaming_forward(q, k, v, "infer-nvfp4@kv_splits=2")


def _one_pass_kernel(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
    return reference.fp4_attention_forward(q, k, v, "infer-nvfp4", causal=causal,
                                           sm_scale=sm_scale).o.to(q.dtype)


@pytest.mark.parametrize("declared", ["kv_splits=3", "kv_split_keys=64"])
def test_one_pass_kernel_against_declared_splits_is_named(declared: str) -> None:
    spec = AttentionInputSpec(lq=3, lk=200, head_dim=64, dtype="float32")
    q, k, v = generate_attention_inputs(np.random.default_rng(0), spec)
    case = AttentionCase(spec, 0, False, None, q, k, v)
    found = diagnose_attention(case, get_recipe(f"infer-nvfp4@{declared}"),
                               kernel_outputs_from_callable(_one_pass_kernel, None), None)
    assert found.named is not None and found.named.name == "running_max:one_pass", (
        "\n".join(found.lines()))


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="the Triton decode kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("lq, lk, causal, declared", [
    (2, 65, False, "kv_splits=3"), (3, 200, True, "kv_splits=3"), (16, 330, False, "kv_splits=3"),
    (3, 200, True, "kv_split_keys=128"), (16, 330, False, "kv_split_keys=128")])
def test_split_kv_kernel_passes_once_declared(lq: int, lk: int, causal: bool,
                                              declared: str) -> None:
    """fp4sim's own decode kernel with 3 splits, or with splits of 2 key tiles, checked
    against infer-nvfp4 with that schedule declared: the tolerance rule holds (one pass it
    fails it: test_diagnosis_engine's split tests)."""
    fixed = declared.startswith("kv_split_keys")
    from fp4sim.kernels import fp4_decode_attention, pack_for_inference

    def kernel(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ops = pack_for_inference(q.to(dev), k.to(dev), v.to(dev), "nvfp4")
        n_tiles = -(-k.shape[-2] // 64)
        o = fp4_decode_attention(*ops, "nvfp4", causal=causal, sm_scale=sm_scale,
                                 num_splits=-(-n_tiles // 2) if fixed else 3)
        return o.to(device=q.device, dtype=q.dtype)

    spec = AttentionInputSpec(lq=lq, lk=lk, head_dim=64, dtype="bfloat16")
    q, k, v = generate_attention_inputs(np.random.default_rng(lk), spec)
    case = AttentionCase(spec, lk, causal, None, q, k, v)
    config = ca.AttentionCheckConfig(kernel="in-process", recipe=f"infer-nvfp4@{declared}",
                                     backward=False)
    outcome = ca.evaluate_attention_case(kernel, case, config, diagnose=False)
    assert outcome.ok, outcome.describe(case)
