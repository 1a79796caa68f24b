"""The diagnosis engine's configurable reference (fp4sim.judge.diagnosis.deviant) with every
knob at its default equals fp4sim.reference, and its quantizer equals the torch quantizer bit
for bit: a hypothesis is then exactly "the reference with one deviation"."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fp4sim import reference
from fp4sim.judge.diagnosis.deviant import deviant_attention, faithful
from fp4sim.judge.diagnosis.fake_quant import QuantKnobs, e4m3_round, quantize_parts
from fp4sim.reference.quant_torch import e4m3_decode_torch, e4m3_encode_torch, quantize_torch_full
from fp4sim.testing.generators import generate_tensor

SHAPES = [  # (B, H, Hkv, Lq, Lk, d, causal)
    (1, 1, 1, 1, 2, 64, True),
    (2, 4, 2, 37, 77, 64, False),
    (1, 2, 1, 50, 130, 128, True),
    (1, 2, 2, 80, 80, 64, True),
]


def _inputs(rng: np.random.Generator, shape: tuple) -> tuple[torch.Tensor, ...]:
    b, h, hkv, lq, lk, d, _ = shape
    q = rng.standard_t(4, (b, h, lq, d))
    k = rng.standard_t(4, (b, hkv, lk, d))
    v = rng.standard_normal((b, hkv, lk, d))
    do = rng.standard_normal((b, h, lq, d))
    return tuple(torch.from_numpy(a.astype(np.float32)) for a in (q, k, v, do))


@pytest.mark.parametrize("recipe_name", ["attn-qat", "attn-qat-consistent", "infer-nvfp4",
                                         "infer-mxfp4", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_faithful_knobs_equal_the_reference(recipe_name: str, shape: tuple) -> None:
    recipe = reference.get_recipe(recipe_name)
    q, k, v, do = _inputs(np.random.default_rng(len(recipe_name) + shape[3]), shape)
    causal = shape[-1]
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    fwd = reference.fp4_attention_forward(q64, k64, v64, recipe, causal=causal,
                                          accum_dtype=torch.float64)
    grads = reference.attention_backward(recipe.backward, fwd, q64, k64, v64, do64, recipe,
                                         causal=causal)
    out = deviant_attention(q, k, v, do64, causal, None, faithful(recipe))
    for name, ref in zip(("O", "dQ", "dK", "dV"), (fwd.o, *grads), strict=True):
        # same operations in the same order: equal, up to float64 rounding where the
        # reference's exact variant takes another path (bf16 recipe)
        tol = 0.0 if recipe.quantizes_anything else 1e-13
        assert float((out[name] - ref).abs().max()) <= tol * float(ref.abs().max()), name


def test_e4m3_rounding_equals_the_torch_encoder() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, 20000) * 10.0 ** rng.uniform(-7, 3, 20000)
    x = torch.from_numpy(np.abs(x).astype(np.float32))
    assert torch.equal(e4m3_round(x), e4m3_decode_torch(e4m3_encode_torch(x)))


@pytest.mark.parametrize("distribution", ["gaussian", "ties", "near_ties", "zero_blocks",
                                          "below_flush", "student_t"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quant_codes_and_scale_bytes_equal_the_torch_quantizer(
    distribution: str, fmt: str
) -> None:
    x = torch.from_numpy(generate_tensor(np.random.default_rng(3), (6, 64), distribution))
    kn = QuantKnobs(fmt=fmt, block=16 if fmt == "nvfp4" else 32)
    codes, scale_bits, values = quantize_parts(x, kn)
    ref = quantize_torch_full(x, fmt)
    assert torch.equal(codes.reshape(6, 64), ref.codes)
    assert torch.equal(scale_bits, ref.scale_bits)
    assert torch.equal(values, ref.values)


def test_a_knob_changes_the_output() -> None:
    """The knobs are live: one deviation moves O (guards against a knob wired to nothing)."""
    recipe = reference.get_recipe("attn-qat")
    q, k, v, _ = _inputs(np.random.default_rng(1), SHAPES[1])
    base = faithful(recipe)
    o = deviant_attention(q, k, v, None, False, None, base)["O"]
    from dataclasses import replace

    for change in ({"p_max": "final"}, {"s_mult": 2.0}, {"block_n": 32},
                   {"v": base.v.with_(axis=-2)}, {"l_from": "tilde"}):
        o2 = deviant_attention(q, k, v, None, False, None, replace(base, **change))["O"]
        assert not torch.equal(o, o2), change


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_split_kv_knobs_equal_the_decode_schedule(fmt: str, shape: tuple) -> None:
    """The split-KV knobs (a hypothesis of the engine) against an independent float64 model
    of a split-KV kernel, property_tests/decode_schedule.py (written for kernels.decode): the
    same O for 2 and 3 splits, and ``kv_split_tiles`` equals the split count that gives the
    same tiles a split."""
    from dataclasses import replace

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_schedule import decode_schedule_reference

    q, k, v, _ = _inputs(np.random.default_rng(shape[4]), shape)
    causal = shape[-1]
    base = faithful(reference.get_recipe(f"infer-{fmt}"))
    n_tiles = -(-shape[4] // base.block_n)
    for splits in (2, 3):
        want = decode_schedule_reference(q, k, v, fmt, causal, splits)["o"]
        got = deviant_attention(q, k, v, None, causal, None, replace(base, kv_splits=splits))
        # the schedule keeps m and l as float32 values: agreement to float32 rounding
        assert float((got["O"] - want).abs().max()) <= 1e-6 * float(want.abs().max()), splits
        per = -(-n_tiles // splits)
        by_length = deviant_attention(q, k, v, None, causal, None,
                                      replace(base, kv_split_tiles=per))
        assert torch.equal(by_length["O"], got["O"]), (splits, per)
    one_pass = deviant_attention(q, k, v, None, causal, None, base)["O"]
    assert not torch.equal(one_pass, got["O"])  # the knob is live
