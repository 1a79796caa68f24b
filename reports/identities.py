"""Which gradient comparisons of the report are identities by construction.

Some backward variants share their formula with a ground truth, so their distance from it
is float32 rounding, not evidence (docs/attention-math.md, "Two placements of the STE").
A finding must say so instead of "stays close". An identity is declared only when it is
both known from the formulas (:func:`construction_reason`) and measured: the relative L2
difference is at most :data:`IDENTITY_TOLERANCE`. A known identity that measures larger is
a broken identity (a bug in one of the two implementations), and a difference that small
without a known reason is reported as numerically equal, not as an identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fp4sim import reference

IDENTITY_TOLERANCE = 64 * 2.0**-24
"""Relative L2 under which two float32 gradients count as equal: 64 units of float32
roundoff (IEEE 754 binary32, u = 2^-24), room for the accumulation depth of the products
and the cancellation in dS = P * (dP - D); measured identities stay below 1.2e-6."""

SAME_DS = (
    "same dS = P * (dP - rowsum(dO * O_hp)) from the quantized S and V^, so dQ and dK are "
    "the same formula"
)
SAME_DV_CONSISTENT = (
    "the consistent P policy's backward quantizes exactly the forward's P~, so "
    "dV = (P~/l)^T dO in both"
)
SAME_DV_TRUTHS = "both STE placements give dV = (P~/l)^T dO with the forward's own P~"
NO_P_QUANT = "the recipe does not quantize P, so the P of dV is the exact softmax in both"
NOTHING_QUANTIZED = "the recipe quantizes nothing, so every variant is the exact gradient"


def construction_reason(recipe: str, variant: str, truth: str, tensor: str) -> str | None:
    """Why ``variant``'s ``tensor`` gradient equals ground truth ``truth``'s by construction
    under ``recipe`` (None if it does not). ``variant`` may itself be a ground truth."""
    if variant == truth or variant == "kernel":
        return None
    try:
        r = reference.get_recipe(recipe)
    except ValueError:
        return None
    if r.q is None and r.k is None and r.v is None and r.p_policy == "none":
        return NOTHING_QUANTIZED
    pair = {variant, truth}
    if pair == {"ste_autograd", "ste_tiled"}:
        return SAME_DV_TRUTHS if tensor == "dv" else None
    if truth == "ste_autograd" and variant in ("attn_qat", "p_only") and tensor in ("dq", "dk"):
        return SAME_DS
    if tensor == "dv" and truth in ("ste_autograd", "ste_tiled"):
        if variant in ("attn_qat", "o_only") and r.p_policy == "consistent":
            return SAME_DV_CONSISTENT
        if variant in ("attn_qat", "o_only", "p_only") and r.p_policy == "none":
            return NO_P_QUANT
    return None


def classify(reason: str | None, value: float | None) -> str | None:
    """``identity`` (known and measured), ``broken`` (known, measured apart),
    ``numerically_equal`` (measured, not known) or None (an ordinary comparison)."""
    if value is None:
        return None
    equal = value <= IDENTITY_TOLERANCE
    if reason is not None:
        return "identity" if equal else "broken"
    return "numerically_equal" if equal else None


def identities(
    cases: Iterable[dict[str, Any]], truths: dict[str, str]
) -> list[dict[str, Any]]:
    """Every identity, broken identity and unexplained equality among the reference cases'
    gradients (``truths``: ground truth -> its comparison key, e.g. ``vs_ste``)."""
    rows = []
    for case in cases:
        if case.get("status") != "ok" or case.get("implementation_kind") != "reference":
            continue
        for variant, block in (case.get("gradients") or {}).items():
            if not block or block.get("error") or variant == "exact":
                continue
            for truth, key in truths.items():
                if variant in truths and list(truths).index(variant) < list(truths).index(truth):
                    continue  # the two ground truths: listed once (the second vs the default)
                for tensor in ("dq", "dk", "dv"):
                    cmp = (block.get(tensor) or {}).get(key)
                    if cmp is None:
                        continue
                    value = cmp["metrics"]["relative_l2"]
                    reason = construction_reason(case["recipe"], variant, truth, tensor)
                    kind = classify(reason, value)
                    if kind is None:
                        continue
                    rows.append(
                        {
                            "scenario": case["scenario"],
                            "recipe": case["recipe"],
                            "variant": variant,
                            "ground_truth": truth,
                            "tensor": tensor,
                            "relative_l2": value,
                            "kind": kind,
                            "reason": reason,
                        }
                    )
    return rows


def is_identity(
    rows: Iterable[dict[str, Any]], recipe: str, variant: str, truth: str, tensors: Iterable[str]
) -> bool:
    """Whether every listed tensor of (recipe, variant) equals ``truth`` by construction in
    every scenario where it was measured (and at least one)."""
    wanted = set(tensors)
    hits = [
        r for r in rows
        if (r["recipe"], r["variant"], r["ground_truth"]) == (recipe, variant, truth)
        and r["tensor"] in wanted
    ]
    return bool(hits) and all(r["kind"] == "identity" for r in hits)
