"""``summary.md``: the report as a pull-request comment (rendered from the analysed report).

Order: what to act on, kernel verdicts, findings, thresholds, the ranking against both
ground truths. Reads only the report dict; computes nothing.
"""

from __future__ import annotations

from typing import Any

from fp4sim.reports.schema import problem_line


def fmt(value: Any) -> str:
    """A number as the tables print it (3 significant digits; — for a missing value)."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def own_mark(row: dict[str, Any]) -> str:
    """★ for an own variant; a kernel gets it only where the tolerance rule always held."""
    if row.get("rule_of") and row["rule_agree"] < row["rule_of"]:
        return f" ✗ {row['rule_agree']}/{row['rule_of']}"
    return " ★" if row["is_own_variant"] else ""


def truth_cell(row: dict[str, Any], suffix: str) -> str:
    """Geomean against a ground truth, or "= by construction" where the row is an identity
    (in every tensor) or the ground truth itself."""
    if row["variant"] == {"ste": "ste_autograd", "ste_tiled": "ste_tiled"}[suffix]:
        return "(itself)"
    same = row.get(f"identity_{suffix}") or []
    value = fmt(row[f"grad_vs_{suffix}_geomean"])
    if len(same) == 3:
        return f"{value} (= by construction)"
    if same:
        return f"{value} ({', '.join(same)} = by construction)"
    return value


def ranking_lines(ranking: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| rank | recipe | implementation | variant | vs ste_autograd (geomean) | worst | "
        "vs ste_tiled (geomean) | worst | vs exact (geomean) | fwd O rel L2 (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ranking:
        lines.append(
            f"| {row['rank'] or 'ground truth'} | {row['recipe']} | {row['implementation']} | "
            f"{row['variant']}{own_mark(row)} | {truth_cell(row, 'ste')} | "
            f"{fmt(row['grad_vs_ste_worst'])} | {truth_cell(row, 'ste_tiled')} | "
            f"{fmt(row['grad_vs_ste_tiled_worst'])} | {fmt(row['grad_vs_exact_geomean'])} | "
            f"{fmt(row['fwd_rel_l2_median'])} |"
        )
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    """The pull-request comment: actions, findings, threshold results and the ranking."""
    settings = report["settings"]
    lines = [
        "## fp4sim report",
        "",
        f"{len(report['scenarios'])} scenarios × recipes {', '.join(settings['recipes'])} × "
        f"implementations {', '.join(settings['implementations'])}; seed {settings['seed']}, "
        f"device {settings['device']}, {settings['preset']} set.",
        "",
    ]
    actions = report["summary"].get("actions") or []
    if actions:
        lines += ["### Act on", ""]
        lines += [f"- **{a['text']}**" if a["severity"] == "bad" else f"- {a['text']}"
                  for a in actions]
        lines.append("")
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
        if finding.get("definition"):
            lines.append(f"  - ({finding['definition']})")
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
                f"| `{t['threshold']}` | {fmt(t['worst_value'])} | {t['worst_case'] or '—'} "
                f"| {'pass' if t['passed'] else '**FAIL**'} |"
            )
        lines.append("")
    lines += [
        "### Ranking (gradient error = max relative L2 of dQ, dK, dV)",
        "",
        *ranking_lines(report["summary"]["ranking"]),
        "",
        "★ = the recipe's own backward variant (or the autograd of a kernel that agrees with the "
        "recipe in every scenario); ✗ n/m = a kernel that agrees with the recipe under the FP4 "
        "tolerance rule in only n of m scenarios; \"= by construction\" = the variant and the "
        "ground truth are the same formula (float32 rounding apart), an identity, not evidence. "
        "ste_autograd puts the STE on the normalized P (valued at the forward's P~/l); "
        "ste_tiled is literal autograd through the tiled forward, the STE on each tile's P.",
        "",
    ]
    return "\n".join(lines) + "\n"
