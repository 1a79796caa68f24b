"""Kernel system properties (issue 20): the faithful kernels pass every property, and each
blind system mutant (property_tests/blind_mutants/system.py, written without reading
fp4sim.testing.system) is caught by its property with the cause named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp4sim
from fp4sim import reference
from fp4sim.harness import KernelSpec
from fp4sim.testing.system import (
    ATTENTION_PROPERTIES,
    QUANTIZER_PROPERTIES,
    Verdict,
    format_verdicts,
    run_system_properties,
)
from property_tests.blind_mutants import attention as blind
from property_tests.blind_mutants import catalog
from property_tests.blind_mutants import system as blind_system

SPEC = KernelSpec()  # every capability: all three dtypes, GQA, causal with Lq != Lk

# blind system mutant -> (the property that catches it here, words its cause must contain);
# the recipe each mutant is faithful to comes from the answer key (catalog.py). Where the key
# names another property, the comment says why this one catches it on the CPU.
EXPECTED: dict[str, tuple[str, str]] = {
    "sys_BatchSharedMax": ("independence", "output of batch"),
    "sys_QBatchPowerOfTwoPrescale": ("independence", "output of batch"),
    # key: equivariance (head mapping); the head-independence changes expose it
    "sys_GqaRepeatTiles": ("independence", "depends on KV head"),
    "sys_CausalTileSkipTopLeft": ("edge lengths", "causal decode Lq=1"),
    "sys_DecodeSplitKvNan": ("edge lengths", "wrong result at Lq=1"),
    "sys_ShortKeysPaddedUnmasked": ("edge lengths", "Lk=1"),
    "sys_MaskedRowsNan": ("edge lengths", "masked rows"),
    "sys_CacheByShape": ("stale state", "stale: output unchanged"),
    # key: cuda_graph; without a GPU, new values written into the same buffers show it
    "sys_GraphCapturedInputs": ("stale state", "stale: output unchanged"),
    "sys_QuantizesQInPlace": ("inputs untouched", "modified its input q in place"),
    "sys_DqWrittenIntoDo": ("inputs untouched", "modified its input dO in place"),
    "sys_assumes_contiguous": ("layouts", "read with wrong strides"),
    "sys_OutputFloat32": ("outputs", "dtype float32"),
    "sys_decode_drops_query_axis": ("outputs", "shape"),
    "sys_RandomOrderRowSum": ("repeatability", "forward not repeatable"),
    "sys_KTensorPowerOfTwoRange": ("special values", "Inf in k"),
}
RECIPES = {e["name"]: e["recipe"] for e in catalog.entries("system")}


def _reference_kernel(recipe: str):  # noqa: ANN202
    def kernel(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
        return reference.fp4_attention(q, k, v, causal=causal, sm_scale=sm_scale, recipe=recipe)

    return kernel


FAITHFUL = {
    "reference attn-qat": (_reference_kernel("attn-qat"), "attn-qat"),
    "reference bf16": (_reference_kernel("bf16"), "bf16"),
    "blind faithful attn-qat": (blind.faithful_attn_qat, "attn-qat"),
    "blind faithful bf16": (blind.faithful_bf16, "bf16"),
}


def test_every_blind_system_mutant_is_listed() -> None:
    assert set(EXPECTED) == set(RECIPES) == set(blind_system.SYSTEM)
    assert len(EXPECTED) >= 10


@pytest.mark.parametrize("name", sorted(FAITHFUL))
def test_faithful_kernels_pass_every_property(name: str) -> None:
    kernel, recipe = FAITHFUL[name]
    verdicts = run_system_properties(kernel, SPEC, recipe=recipe, device="cpu", seed=0)
    print(format_verdicts(verdicts, title=name))
    assert [v.name for v in verdicts] == list(ATTENTION_PROPERTIES)
    assert all(v.status != "fail" for v in verdicts), format_verdicts(verdicts)
    untested = {v.name for v in verdicts if v.status == "untested"}
    assert untested <= {"CUDA graphs"}, format_verdicts(verdicts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_blind_system_mutant_caught_with_cause(name: str) -> None:
    prop, words = EXPECTED[name]
    (verdict,) = run_system_properties(blind_system.SYSTEM[name], SPEC, recipe=RECIPES[name],
                                       device="cpu", seed=0, only=[prop])
    print(verdict.line())
    assert verdict.status == "fail", verdict.line()
    assert words in verdict.cause, verdict.line()


def test_verdict_line_and_summary() -> None:
    v = Verdict("stale state", "fail", "stale: output unchanged after new q values",
                {"max_diff": 0.5}, 1.25)
    assert "FAIL" in v.line() and "max_diff=0.5" in v.line() and "1.25 s" in v.line()
    text = format_verdicts([v, Verdict("layouts", "ok", "fine")])
    assert "1/2 hold; FAILED: stale state" in text
    with pytest.raises(ValueError):
        Verdict("x", "passed", "")


def test_unknown_property_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown system properties"):
        run_system_properties(blind.faithful_bf16, SPEC, recipe="bf16", only=["nope"])


def test_declared_limits_make_properties_untested() -> None:
    """A kernel declaring Lk multiples of 64 only: the edge lengths it excludes are listed as
    untested, not run; modifies_inputs turns the input check into 'untested'."""
    spec = KernelSpec(length_multiple=64, modifies_inputs=True, gqa=False)
    verdicts = run_system_properties(_reference_kernel("bf16"), spec, recipe="bf16",
                                     only=["edge lengths", "inputs untouched"])
    by = {v.name: v for v in verdicts}
    assert by["inputs untouched"].status == "untested"
    edge = by["edge lengths"]
    assert edge.status in ("ok", "untested") and "Lq=1 Lk=15" in edge.cause, edge.line()


def _forward_only_infer_kernel(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
    with torch.no_grad():  # no autograd graph: a forward-only kernel, as it declares
        return reference.fp4_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                                       recipe="infer-nvfp4")


_forward_only_infer_kernel.fp4sim_spec = {  # type: ignore[attr-defined]
    "backward": False, "dtypes": ("float32",), "claims": "infer-nvfp4"}


def test_a_callable_is_judged_by_its_own_fp4sim_spec() -> None:
    """No spec and no recipe given (the plugin fixture's call): the callable's ``fp4sim_spec``
    sets the capabilities (forward only) and the recipe (its claims), as ``fp4sim check``
    reads them; seen failing (7 properties) while the default spec and attn-qat were used."""
    only = ["independence", "outputs", "edge lengths", "key permutation"]
    verdicts = run_system_properties(_forward_only_infer_kernel, only=only)
    assert all(v.status == "ok" for v in verdicts), format_verdicts(verdicts)
    # the same kernel against a recipe it does not implement: the claims were what passed it
    (verdict,) = run_system_properties(_forward_only_infer_kernel, recipe="attn-qat",
                                       only=["key permutation"])
    assert verdict.status == "fail" and "tolerance rule" in verdict.cause, verdict.line()


def _refuses_everything(q, k, v, causal, sm_scale):  # noqa: ANN001, ANN202
    raise ValueError("this kernel takes no input of this shape")


def test_special_values_rejection_counts_only_if_the_clean_input_runs() -> None:
    """A kernel that raises on every input has not rejected NaN/Inf: 'untested', not 'ok'."""
    (verdict,) = run_system_properties(_refuses_everything, SPEC, recipe="bf16",
                                       device="cpu", seed=0, only=["special values"])
    assert verdict.status == "untested", verdict.line()
    assert "without a special value too" in verdict.cause, verdict.line()


# ---------------------------------------------------------------------------
# quantizer properties
# ---------------------------------------------------------------------------


def _emulator_quantizer(x):  # noqa: ANN001, ANN202
    q = fp4sim.quantize(np.asarray(x.detach().cpu(), dtype=np.float32), "nvfp4")
    return q.packed, q.scale_bits, None


def _quantizer_modifies_input(x):  # noqa: ANN001, ANN202
    out = _emulator_quantizer(x)
    x.mul_(0.5)
    return out


_SEEN: dict = {}


def _quantizer_caches_by_shape(x):  # noqa: ANN001, ANN202
    return _SEEN.setdefault(tuple(x.shape), _emulator_quantizer(x))


def _quantizer_ignores_strides(x):  # noqa: ANN001, ANN202
    flat = torch.as_strided(x, x.shape, (x.shape[1], 1))
    return _emulator_quantizer(flat)


_CALLS = [0]


def _quantizer_flips_a_bit_per_call(x):  # noqa: ANN001, ANN202
    packed, scales, ts = _emulator_quantizer(x)
    packed = packed.copy()
    _CALLS[0] += 1
    packed.reshape(-1)[_CALLS[0] % packed.size] ^= 1
    return packed, scales, ts


def test_faithful_quantizer_passes() -> None:
    verdicts = run_system_properties(_emulator_quantizer, None, recipe="nvfp4", quantizer=True)
    assert [v.name for v in verdicts] == list(QUANTIZER_PROPERTIES)
    assert all(v.status == "ok" for v in verdicts), format_verdicts(verdicts)


@pytest.mark.parametrize("entry", [e for e in catalog.FAITHFUL if e["kind"] == "quantizer"],
                         ids=lambda e: e["name"])
@pytest.mark.parametrize("input_type", ["torch", "numpy"])
def test_blind_faithful_quantizers_pass(entry: dict, input_type: str) -> None:
    from property_tests.blind_mutants import quantizers

    kernel = getattr(quantizers, entry["name"])
    verdicts = run_system_properties(kernel, None, recipe=entry["format"], quantizer=True,
                                     input_type=input_type)
    assert all(v.status == "ok" for v in verdicts), format_verdicts(verdicts)


@pytest.mark.parametrize(
    ("kernel", "prop", "words"),
    [
        (_quantizer_modifies_input, "inputs untouched", "modified its input x in place"),
        (_quantizer_caches_by_shape, "stale state", "stale: output unchanged"),
        (_quantizer_ignores_strides, "layouts", "read with wrong strides"),
        (_quantizer_flips_a_bit_per_call, "repeatability", "not repeatable"),
    ],
)
def test_quantizer_mutants_caught(kernel, prop: str, words: str) -> None:  # noqa: ANN001
    (verdict,) = run_system_properties(kernel, None, recipe="nvfp4", quantizer=True,
                                       only=[prop])
    assert verdict.status == "fail" and words in verdict.cause, verdict.line()


# ---------------------------------------------------------------------------
# in `fp4sim check`: a child process per run, crashes become that property's verdict
# ---------------------------------------------------------------------------

_CRASHY = '''
import os, signal
from fp4sim import reference

def attn(q, k, v, causal, sm_scale):
    if q.shape[2] == 2:  # a hard crash on the Lq = 2 decode path only
        os.kill(os.getpid(), signal.SIGSEGV)
    return reference.fp4_attention(q, k, v, causal=causal, sm_scale=sm_scale, recipe="bf16")
'''


def test_isolated_run_names_the_crashing_property(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from fp4sim.testing.system.isolated import run_isolated

    (tmp_path / "crashy_kernel.py").write_text(_CRASHY)
    monkeypatch.chdir(tmp_path)
    verdicts = run_isolated("crashy_kernel:attn", recipe="bf16", timeout=120,
                            only=["outputs", "edge lengths", "repeatability"])
    by = {v.name: v for v in verdicts}
    assert [v.name for v in verdicts] == ["repeatability", "outputs", "edge lengths"]
    assert by["edge lengths"].status == "fail"
    assert "crashed with signal 11" in by["edge lengths"].cause, by["edge lengths"].line()
    assert by["outputs"].status == "ok" and by["repeatability"].status == "ok"


def test_check_attention_prints_system_verdicts_and_fails(capsys) -> None:  # noqa: ANN001
    """A kernel that agrees with its recipe but quantizes q in place: the recipe check
    passes, the system properties fail (exit 1) with the cause on its own line."""
    from fp4sim.cli import main

    code = main(["check", "attention", "--kernel",
                 "property_tests.blind_mutants.system:sys_QuantizesQInPlace",
                 "--examples", "2", "--kernel-dtype", "float32", "--max-len", "24"])
    out = capsys.readouterr().out
    assert "system properties" in out
    assert "modified its input q in place" in out
    assert code == 1, out


def test_plugin_fixture_runs_and_asserts(fp4_system_properties) -> None:  # noqa: ANN001
    verdicts = fp4_system_properties(_reference_kernel("bf16"), SPEC, recipe="bf16",
                                     only=["outputs", "inputs untouched"])
    assert [v.status for v in verdicts] == ["ok", "ok"]
    with pytest.raises(AssertionError, match="modified its input q in place"):
        fp4_system_properties(blind_system.SYSTEM["sys_QuantizesQInPlace"], SPEC,
                              recipe="attn-qat", only=["inputs untouched"])
