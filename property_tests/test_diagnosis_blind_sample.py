"""The diagnosis engine on a sample of the BLIND mutant set (property_tests/blind_mutants/,
written without sight of the hypothesis library): each is caught on a fixed case and the
named hypothesis is the catalog's defect (BENCHMARKS.md has the whole set over 5 seeds)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fp4sim import reference  # noqa: E402
from fp4sim.judge import attention as ca  # noqa: E402
from fp4sim.judge.diagnosis import diagnose_attention  # noqa: E402
from fp4sim.judge.diagnosis.engine import kernel_outputs_from_callable  # noqa: E402
from fp4sim.judge.inputs import (  # noqa: E402
    AttentionCase,
    AttentionInputSpec,
    generate_attention_inputs,
)
from property_tests.blind_mutants import attention as blind  # noqa: E402

RECIPE = reference.get_recipe("attn-qat")


def _case(lq: int, lk: int, causal: bool = False, heads: int = 1, kv_heads: int = 1,
          seed: int = 5) -> AttentionCase:
    spec = AttentionInputSpec(lq=lq, lk=lk, head_dim=64, dtype="float32", heads=heads,
                              kv_heads=kv_heads)
    q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
    return AttentionCase(spec, seed, causal, None, q, k, v)


# blind mutant -> (a case that shows it, the hypothesis the catalog's defect corresponds to)
SAMPLE = {
    "mut_CausalTopLeft": (_case(5, 20, causal=True), "mask:top_left"),
    "mut_GqaModulo": (_case(3, 20, heads=4, kv_heads=2), "gqa:modulo"),
    "mut_LFromQuantizedP": (_case(3, 40), "p_flow:l_from:tilde"),
    "mut_DqMissingSmScale": (_case(3, 20), "factor:dq_mult:missing_sm_scale"),
    "mut_BwdDropsTailTile": (_case(3, 80), "tail:bwd_drops_tile"),
    "mut_ScoresFp16": (_case(4, 40), "rounding:round_s:float16"),
}


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_blind_mutant_is_caught_and_named(name: str) -> None:
    case, want = SAMPLE[name]
    kernel = getattr(blind, name)
    outputs = kernel_outputs_from_callable(kernel, ca.grad_output)
    found = diagnose_attention(case, RECIPE, outputs, ca.grad_output)
    assert found.failing, f"{name}: the case does not fail the tolerance rule"
    assert found.named is not None and found.named.name == want, "\n".join(found.lines())
