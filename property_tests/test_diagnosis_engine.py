"""The differential diagnosis engine names the real defect of a sample of mutants (the
existing property_tests/mutant_kernels.py and kernels built from one deviation), re-tests on
larger inputs where the shrunk case cannot tell defects apart, and never gives a correct
kernel or the reference a cause."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fp4sim import reference  # noqa: E402
from fp4sim.judge import attention as ca  # noqa: E402
from fp4sim.judge.diagnosis import diagnose_attention  # noqa: E402
from fp4sim.judge.diagnosis.deviant import Knobs, deviant_attention, faithful  # noqa: E402
from fp4sim.judge.diagnosis.engine import kernel_outputs_from_callable  # noqa: E402
from fp4sim.judge.inputs import (  # noqa: E402
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
)
from property_tests import mutant_kernels as mk  # noqa: E402

RECIPE = reference.get_recipe("attn-qat")
CONFIG = ca.AttentionCheckConfig(kernel="in-process")


def _case(lq: int, lk: int, causal: bool = False, seed: int = 3, dtype: str = "float32",
          heads: int = 1, kv_heads: int = 1) -> AttentionCase:
    spec = AttentionInputSpec(lq=lq, lk=lk, head_dim=64, dtype=dtype, heads=heads,
                              kv_heads=kv_heads)
    q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
    return AttentionCase(spec, seed, causal, None, q, k, v)


class _Deviant(torch.autograd.Function):
    """A kernel computing the deviant reference (float64) under ``knobs``, with its own
    explicit backward: a mutant with exactly one known defect."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, knobs):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k, v)
        ctx.args = (causal, sm_scale, knobs)
        out = deviant_attention(q, k, v, None, causal, sm_scale, knobs)["O"]
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v = ctx.saved_tensors
        causal, sm_scale, knobs = ctx.args
        g = deviant_attention(q, k, v, do.double(), causal, sm_scale, knobs)
        return g["dQ"].to(q.dtype), g["dK"].to(k.dtype), g["dV"].to(v.dtype), None, None, None


def deviant_kernel(knobs: Knobs) -> Any:
    def kernel(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
        return _Deviant.apply(q, k, v, causal, sm_scale, knobs)

    return kernel


def _diagnose(kernel: Any, case: AttentionCase) -> Any:
    outputs = kernel_outputs_from_callable(kernel, ca.grad_output)
    return diagnose_attention(case, RECIPE, outputs, ca.grad_output)


BASE = faithful(RECIPE)
# (kernel, case, hypothesis name the engine must give)
SAMPLE = {
    "v_wrong_axis": (mk.mutant_v_wrong_axis, _case(3, 20), "granularity:v:axis"),
    "p_wrong_max": (mk.mutant_p_wrong_max, _case(16, 100), "running_max:p_max:final:fwd_only"),
    "d_from_quantized_o": (mk.mutant_d_from_quantized_o, _case(3, 20), "p_flow:d_from:o"),
    "s_high_precision_bwd": (mk.mutant_s_high_precision, _case(3, 20), "which:qk_bwd:none"),
    "causal_off_by_one": (mk.mutant_causal_off_by_one, _case(3, 20, causal=True),
                          "mask:offset-1:fwd_only"),
    # shrunk to Lq = 1, Lk = 2 a top-left mask and an off-by-one coincide: the re-test
    # inputs must tell them apart
    "top_left_mask": (deviant_kernel(replace(BASE, mask_align="top_left")),
                      _case(1, 2, causal=True), "mask:top_left"),
    "gqa_modulo": (deviant_kernel(replace(BASE, head_map="modulo")),
                   _case(3, 20, heads=4, kv_heads=2), "gqa:modulo"),
    "missing_log2e": (deviant_kernel(replace(BASE, s_mult=np.log(2.0))), _case(2, 9),
                      "factor:s:missing_log2e"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_engine_names_the_defect(name: str) -> None:
    kernel, case, want = SAMPLE[name]
    start = time.monotonic()
    found = _diagnose(kernel, case)
    assert found.failing, f"{name}: the case does not fail"
    assert found.named is not None and found.named.name == want, "\n".join(found.lines())
    assert found.retest_shapes, "named without a re-test on larger inputs"
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("seed", range(3))
def test_correct_kernel_and_reference_get_no_cause(seed: int) -> None:
    for kernel in (mk.reference_attention, deviant_kernel(BASE)):
        for case in (_case(3, 20, seed=seed), _case(2, 70, causal=True, seed=seed)):
            found = _diagnose(kernel, case)
            assert found.named is None and not found.failing, "\n".join(found.lines())
            outcome = ca.evaluate_attention_case(kernel, case, CONFIG, diagnose=True)
            assert outcome.ok and not outcome.causes, outcome.describe(case)


def test_no_known_hypothesis_is_said_when_true() -> None:
    """A defect outside the library (O scaled by 1.01 on every other head dim) gets the
    honest answer, not a wrong name."""

    def odd(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
        o = mk.reference_attention(q, k, v, causal, sm_scale)
        scale = torch.ones(o.shape[-1], dtype=o.dtype)
        scale[1::2] = 1.01
        return o * scale

    found = _diagnose(odd, _case(3, 20))
    assert found.failing and found.named is None
    assert found.lines()[0].startswith("no known hypothesis explains it")


# quantizer mutants -> (input distribution that shows the defect, hypothesis id)
QUANT_SAMPLE = {
    "mutant_ties_away": ("ties", "ties:away"),
    "mutant_swapped_nibbles": ("gaussian", "nibbles:swapped"),
    "mutant_scale_rounded_up": ("gaussian", "scale:e4m3_up"),
    "mutant_bf16_double_rounding": ("near_ties", "double:bf16"),
    "mutant_block32": ("gaussian", "block:32"),
}


@pytest.mark.parametrize("name", sorted(QUANT_SAMPLE))
def test_quantizer_diagnosis_names_the_setting(name: str) -> None:
    import fp4sim
    from fp4sim.testing.assertions import compare_quantized
    from fp4sim.testing.check_quantizer import diagnose_quantizer
    from fp4sim.testing.generators import generate_tensor

    distribution, want = QUANT_SAMPLE[name]
    x = generate_tensor(np.random.default_rng(1), (2, 64), distribution)
    expected = fp4sim.quantize(x, "nvfp4")
    diff = compare_quantized(x, expected, *getattr(mk, name)(x), axis=-1)
    assert diff is not None
    causes = diagnose_quantizer(x, expected, diff, "nvfp4", {})
    assert f"[{want}:" in causes[0], causes


def test_quantizer_diagnosis_retests_tied_explanations() -> None:
    """A quantizer that divides by the scale (x / s), on one block where that, double
    rounding through bfloat16 and truncation write the same bytes: on the case alone they
    all explain it (the first named is a wrong one); re-tested through the kernel on inputs
    where they disagree, the division is named and said to be confirmed."""
    import fp4sim
    from fp4sim.judge.diagnosis.quantizer import written_values
    from fp4sim.testing.assertions import compare_quantized
    from fp4sim.testing.check_quantizer import diagnose_quantizer

    def divider(x):  # noqa: ANN001, ANN202
        q = fp4sim.quantize(x, "nvfp4", scale_op="divide")
        return np.asarray(q.packed), np.asarray(q.scale_bits), None

    def kernel_values(x):  # noqa: ANN001, ANN202
        q = fp4sim.quantize(x, "nvfp4", scale_op="divide")
        return written_values(np.asarray(q.codes, np.uint8).reshape(-1, 16),
                              np.asarray(q.scale_bits, np.uint8).reshape(-1), "nvfp4")

    x = np.zeros((1, 16), np.float32)
    x[0, 0], x[0, 1] = 6 * 1.875, 2.5 * 1.875  # x / s = 2.5 exactly, x * RN(1/s) above it
    expected = fp4sim.quantize(x, "nvfp4")
    diff = compare_quantized(x, expected, *divider(x), axis=-1)
    assert diff is not None
    alone = diagnose_quantizer(x, expected, diff, "nvfp4", {})
    assert "[scale:op:" not in alone[0] and "divided by the scale" in alone[1], alone
    causes = diagnose_quantizer(x, expected, diff, "nvfp4", {}, kernel_values)
    assert "[scale:op:" in causes[0] and "confirmed on" in causes[0], causes


def test_quantizer_diagnosis_says_none_when_no_setting_explains() -> None:
    import fp4sim
    from fp4sim.testing.assertions import compare_quantized
    from fp4sim.testing.check_quantizer import diagnose_quantizer
    from fp4sim.testing.generators import generate_tensor

    x = generate_tensor(np.random.default_rng(1), (2, 64), "gaussian")
    expected = fp4sim.quantize(x, "nvfp4")
    packed = np.asarray(expected.packed).copy()
    packed[0, 3] ^= 0x21  # two unrelated code bits
    diff = compare_quantized(x, expected, packed, expected.scale_bits, axis=-1)
    causes = diagnose_quantizer(x, expected, diff, "nvfp4", {})
    assert causes[0].startswith("no known hypothesis explains it"), causes


def _no_gqa_kernel(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
    """A kernel that, like many, needs as many k/v heads as query heads."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale)


def test_a_kernel_failing_on_gqa_inputs_is_pointed_to_no_gqa() -> None:
    do = np.ones((1, 4, 8, 64))
    gqa = ca.call_attention_kernel(_no_gqa_kernel, _case(8, 8, heads=4, kv_heads=2), CONFIG, do)
    assert gqa.causes[0] == "kernel error" and "pass --no-gqa" in gqa.causes[1], gqa.causes
    plain = ca.call_attention_kernel(_no_gqa_kernel, _case(8, 8, heads=4, kv_heads=4), CONFIG, do)
    assert plain.problem is None, plain.problem


def _split_kv_kernel(splits_for: Any) -> Any:
    """The repository's split-KV decode kernel (kernels.decode, written before the split-KV
    hypotheses) as a forward-only kernel: ``splits_for(key tiles)`` splits, its own running
    max in each (interpreter on the CPU)."""
    from fp4sim.kernels import fp4_decode_attention, pack_for_inference

    def kernel(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ops = pack_for_inference(q.to(dev), k.to(dev), v.to(dev), "nvfp4")
        n_tiles = -(-k.shape[-2] // 64)
        o = fp4_decode_attention(*ops, "nvfp4", causal=causal, sm_scale=sm_scale,
                                 num_splits=splits_for(n_tiles))
        return o.to(device=q.device, dtype=q.dtype)

    return kernel


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="the Triton decode kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits_for, lk, want", [
    (lambda n: 3, 130, "running_max:splits3"),  # a fixed number of splits
    (lambda n: -(-n // 2), 200, "running_max:split_keys128"),  # a fixed split length
], ids=["three_splits", "splits_of_128_keys"])
def test_split_kv_decode_kernel_is_named(splits_for: Any, lk: int, want: str) -> None:
    """A flash-decoding kernel quantizes each split's P~ against that split's running max: a
    different function from the one-pass recipe it is checked against (infer-nvfp4); the
    engine names the split rule from the kernel's outputs alone, re-tested on larger inputs
    (where the split counts and lengths differ from the shrunk case's)."""
    spec = AttentionInputSpec(lq=3, lk=lk, head_dim=64, dtype="bfloat16")
    q, k, v = generate_attention_inputs(np.random.default_rng(0), spec)
    case = AttentionCase(spec, 0, False, 0.0625, q, k, v)
    found = diagnose_attention(case, reference.get_recipe("infer-nvfp4"),
                               kernel_outputs_from_callable(_split_kv_kernel(splits_for), None),
                               None)
    assert found.failing == ["O"]
    assert found.named is not None and found.named.name == want, "\n".join(found.lines())
    assert found.retest_shapes


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")),
                    reason="the Triton decode kernel needs CUDA or TRITON_INTERPRET=1")
def test_what_the_check_fails_is_failing_for_the_engine() -> None:
    """Shrunk cases often fail by one row just over the forward bound. The engine judges the
    failing tensors by the rule's own bound and factors (forward for O), so it diagnoses what
    the check fails; with one factor of 3 for every tensor and an extra output-rounding term,
    this case (the shrunk case `fp4sim check` found for the 3-split kernel) had nothing
    failing and got "no known hypothesis"."""
    spec = AttentionInputSpec(lq=2, lk=65, head_dim=64, dtype="bfloat16")
    q, k, v = generate_attention_inputs(np.random.default_rng(1), spec)
    case = AttentionCase(spec, 1, False, 0.0625, q, k, v)
    kernel = _split_kv_kernel(lambda n: 3)
    config = ca.AttentionCheckConfig(kernel="in-process", recipe="infer-nvfp4", backward=False)
    outcome = ca.evaluate_attention_case(kernel, case, config, diagnose=True)
    assert not outcome.ok
    # named (not only "closest"): the hypothesis explains this case and three larger ones
    assert "[hypothesis running_max:splits" in outcome.causes[0], outcome.describe(case)


def _o_kept_in_bfloat16(q, k, v, causal=False, sm_scale=None):  # noqa: ANN001, ANN202
    """A float32 kernel that keeps O in bfloat16 and returns it widened (as a bf16-only kernel
    behind a float32 wrapper does): the reference's O through a bf16 store."""
    o = reference.fp4_attention_forward(q, k, v, "infer-nvfp4", causal=causal,
                                        sm_scale=sm_scale).o
    return o.to(torch.bfloat16).to(q.dtype)


def test_output_kept_in_a_narrower_type_is_named() -> None:
    """Seen on fp4sim's own inference kernel wrapped for float32 (2026-12-03): before the
    output-rounding hypothesis the engine said only "explains the shrunk case only: the P~ V
    accumulator rounded to bfloat16", which larger inputs did not confirm."""
    spec = AttentionInputSpec(lq=3, lk=40, head_dim=64, dtype="float32")
    q, k, v = generate_attention_inputs(np.random.default_rng(2), spec)
    case = AttentionCase(spec, 2, False, None, q, k, v)
    found = diagnose_attention(case, reference.get_recipe("infer-nvfp4"),
                               kernel_outputs_from_callable(_o_kept_in_bfloat16, None), None)
    assert found.failing == ["O"]
    assert found.named is not None and found.named.name == "rounding:round_o:bfloat16", (
        "\n".join(found.lines()))
    assert found.retest_shapes
