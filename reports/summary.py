"""Analysis over the cases: the ranking table, the computed findings, ``--fail-on``.

Everything here reads the case dicts produced by ``reports.runner`` (as stored in
``report.json``), so the same functions can be re-run on a loaded report; nothing here
renders (``reports.document`` and ``reports.markdown`` do).

Definitions:

* gradient error of a (case, variant) against a reference (``vs_ste`` = the default STE
  ground truth ``ste_autograd``, ``vs_ste_tiled`` = the literal tiled autograd
  ``ste_tiled``, ``vs_exact``): ``max(relative_l2(dQ), relative_l2(dK), relative_l2(dV))``;
* ranking: per (recipe, implementation, variant) over the scenarios, the geometric mean
  of the gradient error against each ground truth (zeros floored at 1e-12), its worst
  scenario, the same vs the exact gradient, and the median forward relative L2 of O vs
  exact attention; rows sorted by the geometric mean vs the default ground truth. A row
  that equals a ground truth by construction (``reports.identities``) says so.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fp4sim.reports import identities as ident

GRAD_NAMES = ("dq", "dk", "dv")
GROUND_TRUTHS: dict[str, str] = {"ste_autograd": "vs_ste", "ste_tiled": "vs_ste_tiled"}
"""Ground truth variant -> its comparison key (the first is the default)."""
GROUND_TRUTH = "ste_autograd"
INDEPENDENT_TRUTH = "ste_tiled"
"""The ground truth no explicit backward shares a formula with (the evidence for the
principles; the default one is an identity check for Attn-QAT's dQ and dK)."""
TRUTH_SHORT = {
    "ste_autograd": "the STE on the normalized P",
    "ste_tiled": "the STE on each tile's P",
}
FLOOR = 1e-12

FAR_FACTOR = 3.0
"""A variant is "far" from a ground truth relative to another when its error is at least
this many times larger (used by the principle finding)."""

DV_FAR = 0.5
"""A dV relative L2 above this against both ground truths is unusable (half the gradient's
norm is error): it becomes an action item."""


# ---------------------------------------------------------------------------------------
# accessors
# ---------------------------------------------------------------------------------------


def ok_cases(cases: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cases if c.get("status") == "ok"]


def grad_metric(
    case: dict[str, Any],
    variant: str,
    against: str,
    tensor: str | None = None,
    metric: str = "relative_l2",
) -> float | None:
    """A gradient metric of one variant (max over dQ, dK, dV unless ``tensor`` is given)."""
    block = (case.get("gradients") or {}).get(variant)
    if not block or block.get("error"):
        return None
    names = (tensor,) if tensor else GRAD_NAMES
    values = []
    for name in names:
        cmp = (block.get(name) or {}).get(against)
        if cmp is None:
            return None
        values.append(cmp["metrics"][metric])
    if any(v is None for v in values):
        return None
    return max(values) if metric != "cosine" else min(values)


def ds_metric(case: dict[str, Any], variant: str, against: str) -> float | None:
    """max(relative L2 of dQ, of dK): the gradients that flow through dS."""
    values = [grad_metric(case, variant, against, t) for t in ("dq", "dk")]
    return None if None in values else max(v for v in values if v is not None)


def forward_metric(
    case: dict[str, Any], metric: str = "relative_l2", against: str = "o_vs_exact"
) -> float | None:
    cmp = (case.get("forward") or {}).get(against)
    return None if cmp is None else cmp["metrics"][metric]


def own_variant(case: dict[str, Any]) -> str:
    """The variant a case is judged by: the kernel's autograd, or the recipe's own backward."""
    if case.get("implementation_kind") != "reference":
        return "kernel"
    return case.get("recipe_backward") or "attn_qat"


def geometric_mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return math.exp(sum(math.log(max(v, FLOOR)) for v in finite) / len(finite))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------------------------------
# tables the figures plot (the analysed numbers, in the report's scenario order)
# ---------------------------------------------------------------------------------------


def variant_errors(
    cases: Sequence[dict[str, Any]], scenario_order: Sequence[str]
) -> list[dict[str, Any]]:
    """Per reference case (FP4 recipes) and backward variant: max(dQ, dK) and dV relative L2
    against each ground truth, in scenario order."""
    rank = {name: i for i, name in enumerate(scenario_order)}
    rows = []
    for case in sorted(
        (c for c in ok_cases(cases)
         if c["implementation_kind"] == "reference" and c["recipe"] != "bf16"),
        key=lambda c: rank.get(c["scenario"], len(rank)),
    ):
        for variant in case.get("gradients") or {}:
            for truth, key in GROUND_TRUTHS.items():
                if variant == truth:
                    continue
                rows.append(
                    {
                        "scenario": case["scenario"],
                        "recipe": case["recipe"],
                        "variant": variant,
                        "ground_truth": truth,
                        "dq_dk": ds_metric(case, variant, key),
                        "dv": grad_metric(case, variant, key, "dv"),
                    }
                )
    return rows


def forward_rows(
    cases: Sequence[dict[str, Any]], scenario_order: Sequence[str]
) -> list[dict[str, Any]]:
    """Forward error of every ok case (O vs float64 exact attention), in scenario order."""
    rank = {name: i for i, name in enumerate(scenario_order)}
    rows = []
    for c in sorted(ok_cases(cases), key=lambda c: rank.get(c["scenario"], len(rank))):
        cmp = c["forward"]["o_vs_exact"]
        rows.append(
            {
                "scenario": c["scenario"],
                "recipe": c["recipe"],
                "implementation": c["implementation"],
                "relative_l2": cmp["metrics"]["relative_l2"],
                "cosine": cmp["metrics"]["cosine"],
                "element_p99": cmp["element_relative_error"]["quantiles"]["p99"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# ranking
# ---------------------------------------------------------------------------------------


def _over_scenarios(
    group: Sequence[dict[str, Any]], variant: str, against: str
) -> tuple[float | None, float | None, str | None]:
    """(geometric mean, worst, worst scenario) of the gradient error over a group of cases."""
    known = [
        (v, c["scenario"])
        for c in group
        if (v := grad_metric(c, variant, against)) is not None
    ]
    worst = max(known, default=(None, None))
    return geometric_mean([v for v, _ in known]), worst[0], worst[1]


def ranking(
    cases: Sequence[dict[str, Any]], identity_rows: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for case in ok_cases(cases):
        for variant in case.get("gradients") or {}:
            groups.setdefault((case["recipe"], case["implementation"], variant), []).append(case)
    rows = []
    for (recipe, impl, variant), group in groups.items():
        row: dict[str, Any] = {
            "recipe": recipe,
            "implementation": impl,
            "variant": variant,
            "is_own_variant": variant == own_variant(group[0]),
            "is_ground_truth": variant in GROUND_TRUTHS,
            "scenarios": len(group),
        }
        for truth, key in GROUND_TRUTHS.items():
            suffix = key.removeprefix("vs_")
            geo, worst, where = _over_scenarios(group, variant, key)
            row[f"grad_vs_{suffix}_geomean"] = geo
            row[f"grad_vs_{suffix}_worst"] = worst
            row[f"grad_vs_{suffix}_worst_scenario"] = where
            row[f"identity_{suffix}"] = sorted(
                t for t in GRAD_NAMES
                if impl == "reference" and ident.is_identity(identity_rows, recipe, variant,
                                                             truth, (t,))
            )
        geo, worst, where = _over_scenarios(group, variant, "vs_exact")
        row["grad_vs_exact_geomean"] = geo
        row["grad_vs_exact_worst"] = worst
        row["grad_vs_exact_worst_scenario"] = where
        fwd = [v for c in group if (v := forward_metric(c)) is not None]
        row["fwd_rel_l2_median"] = statistics.median(fwd) if fwd else None
        # external kernels: scenarios where the FP4 tolerance rule holds / were judged
        ruled = [c["rule"] for c in group if c.get("rule")]
        row["rule_agree"] = sum(r["agrees"] for r in ruled) if ruled else None
        row["rule_of"] = len(ruled) if ruled else None
        rows.append(row)

    def key(row: dict[str, Any]) -> tuple[bool, float, float, float, str]:
        g = row["grad_vs_ste_geomean"]
        t = row["grad_vs_ste_tiled_geomean"]
        e = row["grad_vs_exact_geomean"]
        return (
            row["is_ground_truth"],
            math.inf if g is None else g,
            math.inf if t is None else t,
            math.inf if e is None else e,
            f"{row['recipe']}/{row['variant']}",
        )

    rows.sort(key=key)
    rank = 0
    for row in rows:
        if row["is_ground_truth"]:
            row["rank"] = None  # a reference everything else is measured against
        else:
            rank += 1
            row["rank"] = rank
    return rows


# ---------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------


def _scenario_tags(scenarios: dict[str, dict[str, Any]], name: str) -> list[str]:
    return list((scenarios.get(name) or {}).get("tags") or [])


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _principle_rows(
    cases: Sequence[dict[str, Any]], scenarios: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for case in ok_cases(cases):
        if case["implementation_kind"] != "reference" or case["recipe"] == "bf16":
            continue
        tags = _scenario_tags(scenarios, case["scenario"])
        if not ({"key_bias", "long_rows", "baseline"} & set(tags)):
            continue
        row: dict[str, Any] = {"scenario": case["scenario"], "recipe": case["recipe"],
                               "tags": tags}
        spec = (scenarios.get(case["scenario"]) or {}).get("spec") or {}
        row["key_bias"] = spec.get("key_bias", 0.0) if "key_bias" in tags else 0.0
        complete = True
        for key in GROUND_TRUTHS.values():
            suffix = key.removeprefix("vs_")
            for variant in ("drop_in", "attn_qat"):
                dqdk = ds_metric(case, variant, key)
                dv = grad_metric(case, variant, key, "dv")
                complete &= dqdk is not None and dv is not None
                row[f"{variant}_{suffix}"] = dqdk
                row[f"{variant}_dv_{suffix}"] = dv
            if complete:
                row[f"ratio_{suffix}"] = row[f"drop_in_{suffix}"] / max(
                    row[f"attn_qat_{suffix}"], FLOOR
                )
        if complete:
            rows.append(row)
    return rows


def _stressed_sentence(recipe: str, rows: list[dict[str, Any]], suffix: str, truth: str) -> str:
    far = [r for r in rows if r[f"ratio_{suffix}"] >= FAR_FACTOR]
    worst_drop = max(rows, key=lambda r: r[f"drop_in_{suffix}"])
    text = (
        f"against {truth} ({TRUTH_SHORT[truth]}), recipe {recipe}: drop-in's dQ, dK are at "
        f"least {FAR_FACTOR:g}x farther than Attn-QAT's in {len(far)} of {len(rows)} key-bias "
        f"/ long-row scenarios (drop-in up to {worst_drop[f'drop_in_{suffix}']:.3g} on "
        f"{worst_drop['scenario']}"
    )
    if far:
        text += f"; Attn-QAT at most {max(r[f'attn_qat_{suffix}'] for r in far):.3g} there"
    text += ")"
    exceptions = [r for r in rows if r[f"ratio_{suffix}"] < FAR_FACTOR]
    if exceptions:
        text += "; not in " + ", ".join(
            f"{r['scenario']} (drop-in {r[f'drop_in_{suffix}']:.3g}, "
            f"Attn-QAT {r[f'attn_qat_{suffix}']:.3g})"
            for r in exceptions
        )
    return text + "."


def principle_finding(
    cases: Sequence[dict[str, Any]],
    scenarios: dict[str, dict[str, Any]],
    identity_rows: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Drop-in vs Attn-QAT on key-bias and long-row scenarios, against both ground truths
    (``holds``: on every key-bias scenario, drop-in is ``FAR_FACTOR`` x farther than
    Attn-QAT from ``ste_tiled``).

    The score is max(rel. L2 of dQ, rel. L2 of dK): the gradients that flow through dS,
    where the recomputed S (principle 1) and D (principle 2) act. Against ``ste_autograd``
    Attn-QAT's dQ and dK are the same formula (an identity, stated as such); the evidence
    is the comparison against ``ste_tiled``, which shares no formula with either backward,
    and it decides ``holds``. dV (through P~ only) is reported beside it."""
    rows = _principle_rows(cases, scenarios)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    points: list[str] = []
    holds: bool | None = None
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        stressed = [r for r in mine if {"key_bias", "long_rows"} & set(r["tags"])]
        if not stressed:
            continue
        # the independent ground truth is the evidence; the verdict is taken on the key-bias
        # scenarios, the stress that principle (2) answers (a bias the softmax ignores moves
        # rowsum(dO * O) but not rowsum(dO * O_hp)); long rows are reported beside it
        biased = [r for r in stressed if "key_bias" in r["tags"]]
        if biased:
            all_far = all(r["ratio_ste_tiled"] >= FAR_FACTOR for r in biased)
            holds = all_far if holds is None else (holds and all_far)
        points.append(_stressed_sentence(recipe, stressed, "ste_tiled", INDEPENDENT_TRUTH))
        # the default ground truth: an identity for Attn-QAT, evidence only about drop-in
        if ident.is_identity(identity_rows, recipe, "attn_qat", GROUND_TRUTH, ("dq", "dk")):
            worst_drop = max(stressed, key=lambda r: r["drop_in_ste"])
            points.append(
                f"against {GROUND_TRUTH} ({TRUTH_SHORT[GROUND_TRUTH]}), recipe {recipe}: "
                f"Attn-QAT's dQ and dK equal it by construction ({ident.SAME_DS}; measured "
                f"at most {max(r['attn_qat_ste'] for r in stressed):.2g}, float32 rounding), "
                "so that comparison is an identity check, not evidence; drop-in is at up to "
                f"{worst_drop['drop_in_ste']:.3g} from it ({worst_drop['scenario']})."
            )
        else:
            points.append(_stressed_sentence(recipe, stressed, "ste", GROUND_TRUTH))
        bias_series = sorted(
            (r for r in mine if "key_bias" in r["tags"] or "baseline" in r["tags"]),
            key=lambda r: (r["key_bias"], r["scenario"]),
        )
        if len(bias_series) >= 2 and recipe == recipes[0]:
            chain = " -> ".join(
                f"{r['scenario']} {r['drop_in_ste_tiled']:.3g}" for r in bias_series
            )
            qat = " -> ".join(f"{r['attn_qat_ste_tiled']:.3g}" for r in bias_series)
            points.append(
                f"As the shared key bias grows ({recipe}), drop-in's dQ, dK error against "
                f"{INDEPENDENT_TRUTH}: {chain}; Attn-QAT's: {qat}."
            )
    if not points:
        headline = (
            "No key-bias or long-row scenario with both drop-in and Attn-QAT gradients ran; "
            "the principle comparison needs them."
        )
    elif holds:
        headline = (
            f"Principles (1)+(2): against the independent ground truth {INDEPENDENT_TRUTH}, "
            f"drop-in's dQ, dK are at least {FAR_FACTOR:g}x farther than Attn-QAT's in every "
            "key-bias scenario (long rows below)."
        )
    elif holds is None:
        headline = (
            "Principles (1)+(2): no key-bias scenario ran, so the comparison against the "
            f"independent ground truth {INDEPENDENT_TRUTH} has no verdict (numbers below)."
        )
    else:
        headline = (
            f"Principles (1)+(2) not shown on every key-bias scenario: against the independent "
            f"ground truth {INDEPENDENT_TRUTH}, drop-in is not {FAR_FACTOR:g}x farther than "
            "Attn-QAT in some of them."
        )
    return {
        "id": "principles",
        "holds": holds,
        "text": headline + (" " + " ".join(points) if points else ""),
        "headline": headline,
        "points": points,
        "rows": rows,
        "far_factor": FAR_FACTOR,
    }


P_MASS_DEFINITION = (
    "P mass kept = sum of the quantized P~ over the sum of the unquantized P, over every "
    "visible entry (forward: each tile against its running max; backward: the normalized "
    "P). It can exceed 100% (\"kept 100.1%\"): E2M1 rounds each entry to the nearest code, "
    "up or down, so the quantized sum can land slightly above the unquantized one. Near 100% "
    "the quantizer keeps the softmax's mass; far below 100% whole blocks flushed to zero."
)


def p_mass_finding(
    cases: Sequence[dict[str, Any]], scenarios: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """P mass kept in forward and backward per recipe on every scenario (long rows highlighted)."""
    rows = []
    for case in ok_cases(cases):
        if case["implementation_kind"] != "reference":
            continue
        p = ((case.get("diagnostics") or {}).get("p")) or {}
        fwd, bwd = p.get("mass_kept_forward"), p.get("mass_kept_backward")
        if fwd is None and bwd is None:
            continue
        shape = (scenarios.get(case["scenario"]) or {}).get("shape") or {}
        rows.append(
            {
                "scenario": case["scenario"],
                "recipe": case["recipe"],
                "lk": shape.get("lk"),
                "long_rows": "long_rows" in _scenario_tags(scenarios, case["scenario"]),
                "mass_kept_forward": fwd,
                "mass_kept_backward": bwd,
                "code_mismatch_rate": p.get("code_mismatch_rate"),
            }
        )
    long_rows = [r for r in rows if r["long_rows"] and r["mass_kept_backward"] is not None]
    if not long_rows:
        return {
            "id": "p_mass",
            "holds": None,
            "rows": rows,
            "text": "No long-row scenario with P mass diagnostics ran.",
            "definition": P_MASS_DEFINITION,
        }
    longest = max(r["lk"] or 0 for r in long_rows)
    at_longest = {r["recipe"]: r for r in long_rows if r["lk"] == longest}
    points = [
        f"{recipe} keeps {_pct(r['mass_kept_forward'])} in the forward and "
        f"{_pct(r['mass_kept_backward'])} in the backward."
        for recipe, r in sorted(at_longest.items())
    ]
    holds = None
    if "attn-qat" in at_longest and "attn-qat-consistent" in at_longest:
        plain, consistent = at_longest["attn-qat"], at_longest["attn-qat-consistent"]
        lost_plain = 1 - plain["mass_kept_backward"]
        lost_consistent = 1 - consistent["mass_kept_backward"]
        holds = lost_plain > 0.1 and lost_consistent < 0.5 * lost_plain
        points.append(
            f"The attn-qat recipe's backward (P~ of the normalized P, entries about 1/L below "
            f"the flush threshold) loses {_pct(lost_plain)} of the P mass while its forward "
            f"keeps {_pct(plain['mass_kept_forward'])}; attn-qat-consistent's backward "
            + (
                f"loses {_pct(lost_consistent)}."
                if lost_consistent > 0
                else "loses none (it quantizes the same numbers as its forward)."
            )
        )
    headline = f"P mass at the longest rows (Lk = {longest}):"
    return {
        "id": "p_mass",
        "holds": holds,
        "text": headline + " " + " ".join(points),
        "headline": headline,
        "points": points,
        "rows": rows,
        "lk": longest,
        "definition": P_MASS_DEFINITION,
    }


def ds_rowsum_finding(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest RMS of rowsum(dS) relative to the RMS of D, per variant (about 0 for D from
    O_hp; the D identity of docs/attention-math.md)."""
    worst: dict[str, tuple[float, str, str]] = {}
    for case in ok_cases(cases):
        for variant, stats in (case.get("ds_rowsum") or {}).items():
            value = stats["relative_to_d"]
            if value is None:
                continue
            if variant not in worst or value > worst[variant][0]:
                worst[variant] = (value, case["scenario"], case["recipe"])
    rows = [
        {"variant": v, "worst_relative_to_d": w[0], "scenario": w[1], "recipe": w[2]}
        for v, w in worst.items()
    ]
    parts = [f"{r['variant']} {r['worst_relative_to_d']:.2g}" for r in rows]
    text = (
        (
            "rowsum(dS): worst RMS of the row sums of dS relative to the RMS of D, per "
            "variant: " + ", ".join(parts) + ". With D = rowsum(dO * O_hp) the row sums "
            "vanish (the D identity); with D = rowsum(dO * O) an FP4 forward leaves "
            "dO * (O_hp - O)."
        )
        if rows
        else "No rowsum(dS) residuals were computed."
    )
    return {"id": "ds_rowsum", "text": text, "rows": rows}


def truths_finding(
    cases: Sequence[dict[str, Any]], identity_rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """How far apart the two ground truths are, per recipe, and which comparisons of the
    report are identities by construction (or broken ones)."""
    points = []
    by_recipe: dict[str, list[float]] = {}
    for case in ok_cases(cases):
        if case["implementation_kind"] != "reference" or case["recipe"] == "bf16":
            continue
        value = ds_metric(case, "ste_tiled", "vs_ste")
        if value is not None:
            by_recipe.setdefault(case["recipe"], []).append(value)
    for recipe, values in by_recipe.items():
        points.append(
            f"recipe {recipe}: ste_tiled's dQ, dK differ from ste_autograd's by "
            f"{min(values):.3g} to {max(values):.3g} (relative L2, over {len(values)} "
            "scenarios); their dV are the same formula."
        )
    groups: dict[tuple[str, str, str, str | None], dict[str, Any]] = {}
    for r in identity_rows:
        entry = groups.setdefault(
            (r["variant"], r["ground_truth"], r["kind"], r["reason"]),
            {"tensors": set(), "recipes": set(), "scenarios": set(), "max": 0.0},
        )
        entry["tensors"].add(r["tensor"])
        entry["recipes"].add(r["recipe"])
        entry["scenarios"].add(r["scenario"])
        entry["max"] = max(entry["max"], r["relative_l2"])
    group_rows = [
        {
            "variant": variant,
            "ground_truth": truth,
            "kind": kind,
            "reason": reason,
            "tensors": [t for t in GRAD_NAMES if t in e["tensors"]],
            "recipes": sorted(e["recipes"]),
            "scenarios": len(e["scenarios"]),
            "max_relative_l2": e["max"],
        }
        for (variant, truth, kind, reason), e in groups.items()
    ]
    for g in group_rows:
        if g["kind"] == "identity":
            points.append(
                f"identity, not evidence: {g['variant']} vs {g['ground_truth']} "
                f"({', '.join(g['tensors'])}; recipes {', '.join(g['recipes'])}): "
                f"{g['reason']}; measured at most {g['max_relative_l2']:.2g}."
            )
    broken = [r for r in identity_rows if r["kind"] == "broken"]
    for r in broken:
        points.append(
            f"BROKEN identity: {r['variant']} vs {r['ground_truth']} {r['tensor']} on "
            f"{r['scenario']} / {r['recipe']} is {r['relative_l2']:.3g} apart, though "
            f"{r['reason']}: one of the two implementations is wrong."
        )
    equal = [r for r in identity_rows if r["kind"] == "numerically_equal"]
    if equal:
        points.append(
            f"{len(equal)} comparison(s) measure below {ident.IDENTITY_TOLERANCE:.2g} with no "
            "known reason (numerically equal on these inputs, not by construction): "
            + ", ".join(
                f"{r['variant']} vs {r['ground_truth']} {r['tensor']} on {r['scenario']} / "
                f"{r['recipe']}"
                for r in equal[:6]
            )
            + ("..." if len(equal) > 6 else "")
        )
    headline = (
        "Two ground truths: ste_autograd (the STE on the normalized P, valued at the "
        "forward's P~/l; the default) and ste_tiled (literal autograd through the tiled "
        "forward, the STE on each tile's unnormalized P)."
    )
    return {
        "id": "ground_truths",
        "holds": False if broken else None,
        "text": headline + " " + " ".join(points),
        "headline": headline,
        "points": points,
        "groups": group_rows,
        "identity_tolerance": ident.IDENTITY_TOLERANCE,
    }


def findings(
    cases: Sequence[dict[str, Any]],
    scenarios: dict[str, dict[str, Any]],
    identity_rows: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    return [
        principle_finding(cases, scenarios, identity_rows),
        p_mass_finding(cases, scenarios),
        truths_finding(cases, identity_rows),
        ds_rowsum_finding(cases),
    ]


def actions(
    cases: Sequence[dict[str, Any]],
    findings_: Sequence[dict[str, Any]],
    thresholds: Sequence[dict[str, Any]],
    verdicts: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """What a user must act on, most severe first: failed cases, failing kernels, broken
    thresholds, broken identities, and gradients too far from both ground truths to use."""
    out: list[dict[str, Any]] = []
    failed = [c for c in cases if c.get("status") == "error"]
    if failed:
        out.append({"severity": "bad", "text": f"{len(failed)} case(s) failed to run "
                    "(crashed, timed out or raised); details in their sections, every other "
                    "number is complete."})
    for v in verdicts:
        if not v["passed"]:
            out.append({"severity": "bad", "text": v["headline"]})
    for t in thresholds:
        if not t["passed"]:
            out.append({"severity": "bad", "text": f"threshold {t['threshold']} broken: "
                        f"worst {_fmt(t['worst_value'])} at {t['worst_case']}"})
    by_id = {f["id"]: f for f in findings_}
    truths = by_id.get("ground_truths") or {}
    for point in truths.get("points", []):
        if point.startswith("BROKEN"):
            out.append({"severity": "bad", "text": point})
    p_mass = {(r["scenario"], r["recipe"]): r["mass_kept_backward"]
              for r in (by_id.get("p_mass") or {}).get("rows", [])}
    far: dict[str, list[str]] = {}
    for case in ok_cases(cases):
        if case["implementation_kind"] != "reference":
            continue
        own = own_variant(case)
        values = [grad_metric(case, own, key, "dv") for key in GROUND_TRUTHS.values()]
        if all(v is not None and v > DV_FAR for v in values):
            kept = p_mass.get((case["scenario"], case["recipe"]))
            where = f"{case['scenario']} (dV rel. L2 {max(v for v in values if v):.3g}"
            if kept is not None:
                where += f"; the backward keeps {_pct(kept)} of the P mass"
            far.setdefault(case["recipe"], []).append(where + ")")
    for recipe, where in far.items():
        out.append(
            {
                "severity": "bad",
                "text": f"recipe {recipe}: its own backward's dV is unusable (relative L2 > "
                f"{DV_FAR:g} against both ground truths) on " + ", ".join(where) + ". "
                "Its backward quantizes the normalized P, whose long-row entries flush; use "
                "a recipe whose backward re-quantizes the forward's P (attn-qat-consistent) "
                "or a tensor-scaled P.",
            }
        )
    return out


# ---------------------------------------------------------------------------------------
# thresholds (--fail-on)
# ---------------------------------------------------------------------------------------

THRESHOLD_METRICS: dict[str, str] = {
    "fwd_rel_l2": "relative L2 of O vs float64 exact attention (worst case)",
    "fwd_cosine": "cosine similarity of O vs exact (worst case)",
    "fwd_rel_l2_vs_recipe_reference": "relative L2 of a kernel's O vs the recipe's reference",
    "grad_rel_l2_vs_ste": "max relative L2 of dQ/dK/dV vs the default STE ground truth "
    "(ste_autograd), own variant",
    "grad_rel_l2_vs_ste_tiled": "max relative L2 of dQ/dK/dV vs the tiled STE ground truth "
    "(ste_tiled), own variant",
    "grad_rel_l2_vs_exact": "max relative L2 of dQ/dK/dV vs the exact gradient, own variant",
    "grad_rel_l2_vs_recipe_variant": "kernel gradients vs the recipe's reference backward",
    "p_mass_kept_forward": "fraction of P mass kept by the forward quantizer (worst case)",
    "p_mass_kept_backward": "fraction of P mass kept by the backward quantizer (worst case)",
    "ds_rowsum": "RMS of rowsum(dS) / RMS of D of the own variant (worst case)",
}

_THRESHOLD_RE = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)(?:@(?P<recipe>[A-Za-z0-9_.:-]+))?\s*(?P<op><=|>=)\s*"
    r"(?P<bound>[-+0-9.eEinfINF]+)\s*$"
)


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    bound: float
    recipe: str | None = None

    @property
    def text(self) -> str:
        where = f"@{self.recipe}" if self.recipe else ""
        return f"{self.metric}{where}{self.op}{self.bound:g}"


def parse_threshold(text: str) -> Threshold:
    """``METRIC[@RECIPE]<=BOUND`` or ``>=``; ``ValueError`` naming the valid metrics."""
    match = _THRESHOLD_RE.match(text)
    if not match:
        raise ValueError(
            f"--fail-on expects METRIC<=BOUND or METRIC>=BOUND (optionally METRIC@RECIPE), "
            f"got {text!r}; metrics: {', '.join(THRESHOLD_METRICS)}"
        )
    metric = match["metric"]
    if metric not in THRESHOLD_METRICS:
        raise ValueError(
            f"unknown --fail-on metric {metric!r}; valid metrics: {', '.join(THRESHOLD_METRICS)}"
        )
    try:
        bound = float(match["bound"])
    except ValueError:
        raise ValueError(f"--fail-on bound {match['bound']!r} is not a number") from None
    return Threshold(metric, match["op"], bound, match["recipe"])


def _case_value(case: dict[str, Any], metric: str) -> float | None:
    variant = own_variant(case)
    p = ((case.get("diagnostics") or {}).get("p")) or {}
    if metric == "fwd_rel_l2":
        return forward_metric(case)
    if metric == "fwd_cosine":
        return forward_metric(case, "cosine")
    if metric == "fwd_rel_l2_vs_recipe_reference":
        return forward_metric(case, against="o_vs_recipe_reference")
    if metric == "grad_rel_l2_vs_ste":
        return grad_metric(case, variant, "vs_ste")
    if metric == "grad_rel_l2_vs_ste_tiled":
        return grad_metric(case, variant, "vs_ste_tiled")
    if metric == "grad_rel_l2_vs_exact":
        return grad_metric(case, variant, "vs_exact")
    if metric == "grad_rel_l2_vs_recipe_variant":
        return grad_metric(case, variant, "vs_recipe_variant")
    if metric == "p_mass_kept_forward":
        return p.get("mass_kept_forward")
    if metric == "p_mass_kept_backward":
        return p.get("mass_kept_backward")
    if metric == "ds_rowsum":
        stats = (case.get("ds_rowsum") or {}).get(variant)
        return None if stats is None else stats["relative_to_d"]
    raise ValueError(f"unknown metric {metric!r}")


def evaluate_threshold(threshold: Threshold, cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The worst value over the matching ok cases and whether it satisfies the bound.

    A threshold that matches no value passes vacuously but says so (``cases == 0``)."""
    worst: tuple[float, str] | None = None
    count = 0
    for case in ok_cases(cases):
        if threshold.recipe and threshold.recipe not in (case["recipe"], case["implementation"]):
            continue
        value = _case_value(case, threshold.metric)
        if value is None:
            continue
        count += 1
        where = f"{case['scenario']} / {case['recipe']} / {case['implementation']}"
        if isinstance(value, float) and math.isnan(value):
            worst = (value, where)
            break
        if worst is None or (value > worst[0] if threshold.op == "<=" else value < worst[0]):
            worst = (value, where)
    if worst is None:
        passed, value, where = True, None, None
    else:
        value, where = worst
        passed = (value <= threshold.bound) if threshold.op == "<=" else (value >= threshold.bound)
        passed = bool(passed) and not math.isnan(value)
    return {
        "threshold": threshold.text,
        "metric": threshold.metric,
        "op": threshold.op,
        "bound": threshold.bound,
        "recipe": threshold.recipe,
        "worst_value": value,
        "worst_case": where,
        "cases": count,
        "passed": passed,
    }
