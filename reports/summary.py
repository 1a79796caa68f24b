"""Aggregates over the cases: the ranking table, the computed findings, ``--fail-on``.

Everything here reads the case dicts produced by ``reports.runner`` (as stored in
``report.json``), so the same functions can be re-run on a loaded report.

Definitions:

* gradient error of a (case, variant) against a reference (``vs_ste`` / ``vs_exact``):
  ``max(relative_l2(dQ), relative_l2(dK), relative_l2(dV))``;
* ranking: per (recipe, implementation, variant) over the scenarios, the geometric mean
  of the gradient error vs the STE ground truth (zeros floored at 1e-12), its worst
  scenario, the same vs the exact gradient, and the median forward relative L2 of O vs
  exact attention; rows sorted by the geometric mean vs STE.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

GRAD_NAMES = ("dq", "dk", "dv")
GROUND_TRUTH = "ste_autograd"
FLOOR = 1e-12

FAR_FACTOR = 3.0
"""A variant is "far" from the ground truth relative to another when its error is at least
this many times larger (used by the principle finding)."""


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


# ---------------------------------------------------------------------------------------
# ranking
# ---------------------------------------------------------------------------------------


def ranking(cases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for case in ok_cases(cases):
        for variant in case.get("gradients") or {}:
            groups.setdefault((case["recipe"], case["implementation"], variant), []).append(case)
    rows = []
    for (recipe, impl, variant), group in groups.items():
        is_truth = variant == GROUND_TRUTH
        vs_ste = [
            (None if is_truth else grad_metric(c, variant, "vs_ste"), c["scenario"]) for c in group
        ]
        vs_exact = [(grad_metric(c, variant, "vs_exact"), c["scenario"]) for c in group]
        fwd = [forward_metric(c) for c in group]
        ste_known = [(v, s) for v, s in vs_ste if v is not None]
        exact_known = [(v, s) for v, s in vs_exact if v is not None]
        worst = max(ste_known, default=(None, None))
        worst_exact = max(exact_known, default=(None, None))
        fwd_known = [v for v in fwd if v is not None]
        ruled = [c["rule"] for c in group if c.get("rule")]
        rows.append(
            {
                "recipe": recipe,
                "implementation": impl,
                "variant": variant,
                "is_own_variant": variant == own_variant(group[0]),
                "is_ground_truth": is_truth,
                "scenarios": len(group),
                "grad_vs_ste_geomean": geometric_mean([v for v, _ in ste_known]),
                "grad_vs_ste_worst": worst[0],
                "grad_vs_ste_worst_scenario": worst[1],
                "grad_vs_exact_geomean": geometric_mean([v for v, _ in exact_known]),
                "grad_vs_exact_worst": worst_exact[0],
                "grad_vs_exact_worst_scenario": worst_exact[1],
                "fwd_rel_l2_median": statistics.median(fwd_known) if fwd_known else None,
                # external kernels: scenarios where the FP4 tolerance rule holds / were judged
                "rule_agree": sum(r["agrees"] for r in ruled) if ruled else None,
                "rule_of": len(ruled) if ruled else None,
            }
        )

    def key(row: dict[str, Any]) -> tuple[bool, float, float, str]:
        g = row["grad_vs_ste_geomean"]
        e = row["grad_vs_exact_geomean"]
        return (
            row["is_ground_truth"],
            math.inf if g is None else g,
            math.inf if e is None else e,
            f"{row['recipe']}/{row['variant']}",
        )

    rows.sort(key=key)
    rank = 0
    for row in rows:
        if row["is_ground_truth"]:
            row["rank"] = None  # the reference everything else is measured against
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


def _stressed_text(
    recipe: str, rows: list[dict[str, Any]], p_mass: dict[tuple[str, str], float]
) -> str:
    far = [r for r in rows if r["ratio"] >= FAR_FACTOR]
    worst_drop = max(rows, key=lambda r: r["drop_in"])
    text = (
        f"recipe {recipe}: in dQ and dK drop-in is at least {FAR_FACTOR:g}x farther from the "
        f"STE ground truth than Attn-QAT in {len(far)} of {len(rows)} key-bias / long-row "
        f"scenarios (drop-in up to {worst_drop['drop_in']:.3g} on {worst_drop['scenario']}"
    )
    if far:
        text += f"; Attn-QAT at most {max(r['attn_qat'] for r in far):.3g} there"
    text += ")"
    exceptions = [r for r in rows if r["ratio"] < FAR_FACTOR]
    if exceptions:
        text += "; not in " + ", ".join(
            f"{r['scenario']} (drop-in {r['drop_in']:.3g}, Attn-QAT {r['attn_qat']:.3g})"
            for r in exceptions
        )
    dv_far = [r for r in rows if r["attn_qat_dv"] is not None and r["attn_qat_dv"] > 0.5]
    if dv_far:
        parts = []
        for r in dv_far:
            kept = p_mass.get((r["scenario"], recipe))
            where = f"{r['scenario']} ({r['attn_qat_dv']:.3g}"
            if kept is not None:
                where += f"; its backward keeps {_pct(kept)} of the P mass"
            parts.append(where + ")")
        text += ". But Attn-QAT's dV is far from the STE on " + ", ".join(parts)
    return text + "."


def principle_finding(
    cases: Sequence[dict[str, Any]], scenarios: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Drop-in vs Attn-QAT on key-bias and long-row scenarios, against the STE ground truth.

    The score is max(rel. L2 of dQ, rel. L2 of dK) vs STE: the gradients that flow through
    dS, where the recomputed S (principle 1) and D (principle 2) act. dV (through P~ only)
    is reported beside it; its failure mode is the P mass of the next finding."""
    rows = []
    p_mass: dict[tuple[str, str], float] = {}
    for case in ok_cases(cases):
        if case["implementation_kind"] != "reference":
            continue
        kept = (((case.get("diagnostics") or {}).get("p")) or {}).get("mass_kept_backward")
        if kept is not None:
            p_mass[(case["scenario"], case["recipe"])] = kept
        tags = _scenario_tags(scenarios, case["scenario"])
        if not ({"key_bias", "long_rows", "baseline"} & set(tags)) or case["recipe"] == "bf16":
            continue
        values = {
            (variant, tensor): grad_metric(case, variant, "vs_ste", tensor)
            for variant in ("drop_in", "attn_qat")
            for tensor in GRAD_NAMES
        }
        if any(v is None for v in values.values()):
            continue
        drop = max(values[("drop_in", "dq")], values[("drop_in", "dk")])
        qat = max(values[("attn_qat", "dq")], values[("attn_qat", "dk")])
        spec = (scenarios.get(case["scenario"]) or {}).get("spec") or {}
        rows.append(
            {
                "scenario": case["scenario"],
                "recipe": case["recipe"],
                "tags": tags,
                "key_bias": spec.get("key_bias", 0.0) if "key_bias" in tags else 0.0,
                "drop_in_dq": values[("drop_in", "dq")],
                "attn_qat_dq": values[("attn_qat", "dq")],
                "drop_in_dv": values[("drop_in", "dv")],
                "attn_qat_dv": values[("attn_qat", "dv")],
                "drop_in": drop,
                "attn_qat": qat,
                "ratio": drop / max(qat, FLOOR),
            }
        )
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    sentences = []
    holds: bool | None = None
    for recipe in recipes:
        stressed = [
            r for r in rows if r["recipe"] == recipe and {"key_bias", "long_rows"} & set(r["tags"])
        ]
        if not stressed:
            continue
        all_far = all(r["ratio"] >= FAR_FACTOR for r in stressed)
        holds = all_far if holds is None else (holds and all_far)
        sentences.append(_stressed_text(recipe, stressed, p_mass))
        bias_series = sorted(
            (
                r
                for r in rows
                if r["recipe"] == recipe and ("key_bias" in r["tags"] or "baseline" in r["tags"])
            ),
            key=lambda r: (r["key_bias"], r["scenario"]),
        )
        if len(bias_series) >= 2 and recipe == recipes[0]:
            chain = " -> ".join(f"{r['scenario']} {r['drop_in_dq']:.3g}" for r in bias_series)
            qat_max = max(r["attn_qat_dq"] for r in bias_series)
            sentences.append(
                f"Drop-in's dQ error vs STE as the shared key bias grows "
                f"({recipe}): {chain}; Attn-QAT's dQ stays at most {qat_max:.3g}."
            )
    if not sentences:
        text = (
            "No key-bias or long-row scenario with both drop-in and Attn-QAT gradients ran; "
            "the principle comparison needs them."
        )
    else:
        verdict = (
            "Principles (1)+(2) confirmed:"
            if holds
            else "Principles (1)+(2) not confirmed on every case:"
        )
        text = verdict + " " + " ".join(sentences)
    return {
        "id": "principles",
        "holds": holds,
        "text": text,
        "headline": verdict if sentences else text,
        "points": sentences,
        "rows": rows,
        "far_factor": FAR_FACTOR,
    }


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
        }
    longest = max(r["lk"] or 0 for r in long_rows)
    at_longest = {r["recipe"]: r for r in long_rows if r["lk"] == longest}
    parts = []
    for recipe, r in sorted(at_longest.items()):
        parts.append(
            f"{recipe} keeps {100 * r['mass_kept_forward']:.1f}% in the forward and "
            f"{100 * r['mass_kept_backward']:.1f}% in the backward"
        )
    holds = None
    verdict = ""
    if "attn-qat" in at_longest and "attn-qat-consistent" in at_longest:
        plain, consistent = at_longest["attn-qat"], at_longest["attn-qat-consistent"]
        lost_plain = 1 - plain["mass_kept_backward"]
        lost_consistent = 1 - consistent["mass_kept_backward"]
        holds = lost_plain > 0.1 and lost_consistent < 0.5 * lost_plain
        verdict = (
            f" The attn-qat recipe's backward (P~ of the normalized P, entries about 1/L below the "
            f"flush threshold) loses {100 * lost_plain:.1f}% of the P mass while its forward keeps "
            f"{100 * plain['mass_kept_forward']:.1f}%; "
            f"attn-qat-consistent's backward "
            + (
                f"loses {100 * lost_consistent:.1f}%."
                if lost_consistent > 0
                else "loses none (it quantizes the same numbers as its forward)."
            )
        )
    headline = f"P mass at the longest rows (Lk = {longest}):"
    points = [p + "." for p in parts] + ([verdict.strip()] if verdict else [])
    text = headline + " " + " ".join(points)
    return {
        "id": "p_mass",
        "holds": holds,
        "text": text,
        "headline": headline,
        "points": points,
        "rows": rows,
        "lk": longest,
    }


def d_identity_finding(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Largest relative rowsum(dS) residual per variant (should be ~0 for D from O_hp)."""
    worst: dict[str, tuple[float, str, str]] = {}
    for case in ok_cases(cases):
        for variant, stats in (case.get("d_identity") or {}).items():
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
            "D identity: worst RMS of rowsum(dS) relative to RMS of D, per variant: "
            + ", ".join(parts)
            + ". With D = rowsum(dO * O_hp) the row sums vanish; "
            "with D = rowsum(dO * O) an FP4 forward leaves dO * (O_hp - O)."
        )
        if rows
        else ("No D-identity residuals were computed.")
    )
    return {"id": "d_identity", "text": text, "rows": rows}


def findings(
    cases: Sequence[dict[str, Any]], scenarios: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    return [
        principle_finding(cases, scenarios),
        p_mass_finding(cases, scenarios),
        d_identity_finding(cases),
    ]


# ---------------------------------------------------------------------------------------
# thresholds (--fail-on)
# ---------------------------------------------------------------------------------------

THRESHOLD_METRICS: dict[str, str] = {
    "fwd_rel_l2": "relative L2 of O vs float64 exact attention (worst case)",
    "fwd_cosine": "cosine similarity of O vs exact (worst case)",
    "fwd_rel_l2_vs_recipe_reference": "relative L2 of a kernel's O vs the recipe's reference",
    "grad_rel_l2_vs_ste": "max relative L2 of dQ/dK/dV vs the STE ground truth, own variant",
    "grad_rel_l2_vs_exact": "max relative L2 of dQ/dK/dV vs the exact gradient, own variant",
    "grad_rel_l2_vs_recipe_variant": "kernel gradients vs the recipe's reference backward",
    "p_mass_kept_forward": "fraction of P mass kept by the forward quantizer (worst case)",
    "p_mass_kept_backward": "fraction of P mass kept by the backward quantizer (worst case)",
    "d_identity": "RMS rowsum(dS) / RMS D of the own variant (worst case)",
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
    if metric == "grad_rel_l2_vs_exact":
        return grad_metric(case, variant, "vs_exact")
    if metric == "grad_rel_l2_vs_recipe_variant":
        return grad_metric(case, variant, "vs_recipe_variant")
    if metric == "p_mass_kept_forward":
        return p.get("mass_kept_forward")
    if metric == "p_mass_kept_backward":
        return p.get("mass_kept_backward")
    if metric == "d_identity":
        stats = (case.get("d_identity") or {}).get(variant)
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


# ---------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def problem_line(error: str | None) -> str:
    """The line that names a failed case's problem: a traceback's last line (its message),
    else the first ("kernel timed out after 5 s", "kernel crashed with signal 11 ...")."""
    lines = (error or "").strip().splitlines()
    if not lines:
        return "failed"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def _own_mark(row: dict[str, Any]) -> str:
    """★ for an own variant; a kernel gets it only where the tolerance rule always held."""
    if row.get("rule_of") and row["rule_agree"] < row["rule_of"]:
        return f" ✗ {row['rule_agree']}/{row['rule_of']}"
    return " ★" if row["is_own_variant"] else ""


def summary_markdown(report: dict[str, Any]) -> str:
    """The pull-request comment: findings, threshold results and the ranking table."""
    settings = report["settings"]
    lines = [
        "## fp4sim report",
        "",
        f"{len(report['scenarios'])} scenarios × recipes {', '.join(settings['recipes'])} × "
        f"implementations {', '.join(settings['implementations'])}; seed {settings['seed']}, "
        f"device {settings['device']}, {settings['preset']} set.",
        "",
    ]
    errors = [c for c in report["cases"] if c["status"] == "error"]
    if errors:
        lines += [
            f"**{len(errors)} case(s) failed to run** (details in index.html / report.json):",
            "",
        ]
        lines += [
            f"- {c['scenario']}/{c['recipe']}/{c['implementation']}: {problem_line(c['error'])}"
            for c in errors
        ]
        lines.append("")
    lines += ["### Findings", ""]
    if report.get("verdicts"):
        lines += ["#### Kernel verdicts", ""]
        for verdict in report["verdicts"]:
            lines.append(f"- **{verdict['headline']}**")
            lines += [f"  - {point}" for point in verdict["points"]]
        lines += ["", "#### Recipes", ""]
    for finding in report["summary"]["findings"]:
        if finding.get("points"):
            lines.append(f"- {finding['headline']}")
            lines += [f"  - {point}" for point in finding["points"]]
        else:
            lines.append(f"- {finding['text']}")
    lines.append("")
    if report["thresholds"]:
        lines += [
            "### Thresholds",
            "",
            "| threshold | worst value | where | result |",
            "|---|---|---|---|",
        ]
        for t in report["thresholds"]:
            lines.append(
                f"| `{t['threshold']}` | {_fmt(t['worst_value'])} | {t['worst_case'] or '—'} "
                f"| {'pass' if t['passed'] else '**FAIL**'} |"
            )
        lines.append("")
    lines += [
        "### Ranking (gradient error = max relative L2 of dQ, dK, dV)",
        "",
        "| rank | recipe | implementation | variant | vs STE (geomean) | vs STE (worst) | "
        "worst scenario | vs exact (geomean) | fwd O rel L2 (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]["ranking"]:
        own = _own_mark(row)
        lines.append(
            f"| {row['rank'] or 'ground truth'} | {row['recipe']} | {row['implementation']} | "
            f"{row['variant']}{own} | "
            f"{_fmt(row['grad_vs_ste_geomean'])} | {_fmt(row['grad_vs_ste_worst'])} | "
            f"{row['grad_vs_ste_worst_scenario'] or '—'} | {_fmt(row['grad_vs_exact_geomean'])} | "
            f"{_fmt(row['fwd_rel_l2_median'])} |"
        )
    lines += [
        "",
        "★ = the recipe's own backward variant (or the autograd of a kernel that agrees with the "
        "recipe in every scenario); ✗ n/m = a kernel that agrees with the recipe under the FP4 "
        "tolerance rule in only n of m scenarios.",
        "",
    ]
    return "\n".join(lines) + "\n"
