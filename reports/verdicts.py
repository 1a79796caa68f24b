"""Per-kernel verdicts: does an external kernel do what its recipe says?

The runner judges every external-kernel case with the FP4 tolerance rule of
``fp4sim check attention`` (``fp4sim.judge.attention.evaluate_attention_case``: the rule of
``fp4sim.judge.rule`` with the floors and allowances of ``fp4sim.judge.bounds``) and stores
the result as ``case["rule"]``. Here, per kernel (one implementation per dtype) and recipe,
the scenarios in agreement are counted. A verdict is about the recipe the kernel claims
(``--claims`` or its ``fp4sim_spec``'s ``claims``) or, unclaimed, the recipe it matches best
(agreement in every scenario first, then the most scenarios, then the smallest worst error
/ bound).

A verdict passes when the kernel agrees in every scenario it ran (n = m > 0) and nowhere
returns NaN/Inf where the reference is finite (under any recipe). A case that crashed,
timed out or raised counts as a disagreement. Scenarios outside the kernel's declared
support are skipped and listed, not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fp4sim.reports import error_statistics
from fp4sim.reports.schema import problem_line

NO_CAUSE = "no known cause matched (the reference emulations of known bugs of `fp4sim check`)"


def _ratio(case: Mapping[str, Any]) -> float:
    """Worst error / bound of a judged case (inf for NaN, where JSON holds null)."""
    value = (case.get("rule") or {}).get("worst_ratio")
    return math.inf if value is None else float(value)


def recipe_tally(
    cases: Sequence[Mapping[str, Any]], implementation: str, recipe: str
) -> dict[str, Any]:
    """Agreement of one kernel with one recipe over the scenarios, and its worst case."""
    mine = [c for c in cases if c["implementation"] == implementation and c["recipe"] == recipe]
    attempted = [c for c in mine if c["status"] != "skipped"]
    judged = [c for c in attempted if c["status"] == "ok" and c.get("rule")]
    agreeing = [c for c in judged if c["rule"]["agrees"]]
    failed_runs = [c for c in attempted if c["status"] == "error"]
    worst: dict[str, Any] | None = None
    if failed_runs:
        c = failed_runs[0]
        worst = {"scenario": c["scenario"], "status": "error", "problem": problem_line(c["error"])}
    elif judged:
        c = max(judged, key=_ratio)
        tensor = next(t for t in c["rule"]["tensors"] if t["name"] == c["rule"]["worst_tensor"])
        worst = {
            "scenario": c["scenario"],
            "status": "ok",
            "agrees": c["rule"]["agrees"],
            "tensor": tensor["name"],
            "error": tensor["worst_error"],
            "bound": tensor["bound"],
            "ratio": tensor["ratio"],
            "nonfinite": tensor["nonfinite"],
        }
    return {
        "recipe": recipe,
        "agree": len(agreeing),
        "of": len(attempted),
        "skipped": [c["scenario"] for c in mine if c["status"] == "skipped"],
        "failed_runs": [c["scenario"] for c in failed_runs],
        "nonfinite": [c["scenario"] for c in judged if c["rule"]["nonfinite"]],
        "worst_ratio": math.inf if failed_runs else max(map(_ratio, judged), default=None),
        "worst": worst,
    }


def _fully_agrees(tally: Mapping[str, Any]) -> bool:
    return tally["of"] > 0 and tally["agree"] == tally["of"]


def _best_match(tallies: Mapping[str, Mapping[str, Any]]) -> str:
    def key(recipe: str) -> tuple[bool, int, float]:
        t = tallies[recipe]
        ratio = t["worst_ratio"]
        return (_fully_agrees(t), t["agree"], -(math.inf if ratio is None else ratio))

    return max(tallies, key=key)


def kernel_verdicts(
    cases: Sequence[Mapping[str, Any]],
    kernels: Sequence[Mapping[str, Any]],
    recipes: Sequence[str],
) -> list[dict[str, Any]]:
    """One verdict per external kernel (``kernels``: ``Implementation.to_json()`` dicts);
    ``causes`` and ``statistics`` are left for the runner, ``text`` for :func:`finish`."""
    out = []
    for kernel in kernels:
        tallies = {r: recipe_tally(cases, kernel["name"], r) for r in recipes}
        claims = kernel.get("claims")
        recipe = claims if claims in tallies else _best_match(tallies)
        tally = tallies[recipe]
        nonfinite = sorted({s for t in tallies.values() for s in t["nonfinite"]})
        agrees = _fully_agrees(tally)
        out.append(
            {
                "implementation": kernel["name"],
                "target": kernel.get("target"),
                "dtype": kernel.get("dtype"),
                "recipe": recipe,
                "basis": "claimed" if claims in tallies else "best match",
                "agree": tally["agree"],
                "of": tally["of"],
                "skipped": tally["skipped"],
                "agrees": agrees,
                "nonfinite_scenarios": nonfinite,
                "passed": agrees and not nonfinite,
                "worst": tally["worst"],
                "agrees_instead": [
                    r for r, t in tallies.items() if r != recipe and _fully_agrees(t)
                ],
                "recipes": [
                    {k: t[k] for k in ("recipe", "agree", "of", "worst_ratio")}
                    for t in tallies.values()
                ],
                "untested": list(kernel.get("untested") or []),
                "causes": [],
                "statistics": None,
                "text": "",
            }
        )
    return out


def _worst_text(worst: Mapping[str, Any] | None) -> str:
    if worst is None:
        return "no case ran"
    if worst["status"] == "error":
        return f"{worst['scenario']}: {worst['problem']}"
    if worst["nonfinite"]:
        return f"{worst['scenario']}, {worst['tensor']}: {worst['nonfinite']} NaN/Inf values"
    return (
        f"{worst['scenario']}, {worst['tensor']} error {worst['error']:.3g} vs bound "
        f"{worst['bound']:.3g} ({worst['ratio']:.3g}x the bound)"
    )


def finish(verdict: dict[str, Any]) -> dict[str, Any]:
    """Fill ``verdict["headline"]``, ``["points"]`` and ``["text"]`` (after the runner has set
    ``causes`` and ``statistics``); returns the verdict."""
    name, recipe = verdict["implementation"], verdict["recipe"]
    n, m = verdict["agree"], verdict["of"]
    dtype = f" ({verdict['dtype']} inputs)" if verdict.get("dtype") else ""
    rule = "within the FP4 tolerance rule"
    if m == 0:
        headline = (
            f"FAIL: {name}{dtype} ran on no scenario "
            f"({len(verdict['skipped'])} outside its declared support)"
        )
    elif verdict["agrees"]:
        state = "PASS" if verdict["passed"] else "FAIL"
        headline = (
            f"{state}: {name}{dtype} agrees with recipe {recipe} ({verdict['basis']}) "
            f"{rule} in {n}/{m} scenarios"
        )
    elif verdict["basis"] == "claimed":
        headline = (
            f"FAIL: {name}{dtype} disagrees with its claimed recipe {recipe}: it agrees {rule} "
            f"in only {n}/{m} scenarios"
        )
    else:
        tried = ", ".join(f"{r['recipe']} {r['agree']}/{r['of']}" for r in verdict["recipes"])
        headline = (
            f"FAIL: {name}{dtype} matches none of the recipes run {rule} ({tried}); "
            f"closest: {recipe}"
        )
    points = []
    if verdict["worst"] is not None:
        label = "worst case" if not verdict["agrees"] else "largest error / bound"
        points.append(f"{label}: {_worst_text(verdict['worst'])}")
    worst = verdict["worst"] or {}
    # a failed run or NaN output is its own cause; else the diagnosis of the worst case
    if not verdict["agrees"] and worst.get("status") == "ok" and not worst.get("nonfinite"):
        points.append("likely cause: " + "; ".join(verdict["causes"] or [NO_CAUSE]))
    if verdict["agrees_instead"] and not verdict["agrees"]:
        points.append(
            "it agrees instead with recipe " + ", ".join(verdict["agrees_instead"])
            + " in every scenario"
        )
    if verdict["nonfinite_scenarios"]:
        points.append(
            "returns NaN/Inf where the reference is finite on "
            + ", ".join(verdict["nonfinite_scenarios"])
        )
    if verdict["statistics"] is not None:
        points.append(error_statistics.describe(verdict["statistics"]))
    if verdict["skipped"]:
        points.append(
            "skipped (outside its declared support): " + ", ".join(verdict["skipped"])
        )
    if verdict["untested"]:
        points.append("untested: " + "; ".join(verdict["untested"]))
    verdict["headline"] = headline
    verdict["points"] = points
    verdict["text"] = headline + ". " + ". ".join(points) + ("." if points else "")
    return verdict
