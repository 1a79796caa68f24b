"""The report page: turns the report dict into ``index.html`` (plots first, numbers beside).

Layout: findings (computed sentences, each with its figure and the numbers behind it),
the ranking and thresholds, the forward-error overview, then one section per scenario
with a collapsible block per recipe × implementation (error distributions of O, dQ, dK,
dV; FP4 diagnostics; D identity; tracebacks of crashed cases), and last the settings,
versions and metric definitions.
"""

from __future__ import annotations

import json
from typing import Any

from fp4sim.reports import figures
from fp4sim.reports.html import HtmlReport
from fp4sim.reports.metrics import ELEMENT_GUARD_EPS
from fp4sim.reports.summary import grad_metric, problem_line

METRIC_HEADERS = ("rel L2", "rel L1", "RMSE", "max abs", "cosine", "norm ratio")
METRIC_KEYS = ("relative_l2", "relative_l1", "rmse", "max_abs", "cosine", "norm_ratio")


def _metric_cells(cmp: dict[str, Any] | None) -> list[Any]:
    if not cmp:
        return [None] * (len(METRIC_KEYS) + 3)
    el = cmp["element_relative_error"]["quantiles"]
    row = cmp["row_relative_error"]["quantiles"]
    return [cmp["metrics"][k] for k in METRIC_KEYS] + [el["p50"], el["p99"], row["p99"]]


FULL_HEADERS = [*METRIC_HEADERS, "elem p50", "elem p99", "row p99"]


def _finding_kind(holds: bool | None) -> str:
    return "info" if holds is None else ("good" if holds else "bad")


def _finding_callout(page: HtmlReport, finding: dict[str, Any]) -> None:
    page.callout(
        finding.get("headline") or finding["text"],
        kind=_finding_kind(finding.get("holds")),
        points=finding.get("points") or (),
    )


def _principle_block(page: HtmlReport, report: dict[str, Any], finding: dict[str, Any]) -> None:
    _finding_callout(page, finding)
    with page.row():
        page.figure(
            figures.principle_figure(report["cases"], report["settings"]["variants"]),
            caption="Relative L2 against the STE ground truth per backward variant (log scale; "
            "lower is closer). Top: max over dQ, dK (through dS, where S and D act); "
            "bottom: dV (through P~).",
        )
        rows = [
            [
                r["scenario"],
                r["recipe"],
                r["drop_in"],
                r["attn_qat"],
                r["ratio"],
                r["drop_in_dv"],
                r["attn_qat_dv"],
            ]
            for r in finding["rows"]
        ]
        classes = ["good" if r["ratio"] >= finding["far_factor"] else None for r in finding["rows"]]
        page.table(
            [
                "scenario",
                "recipe",
                "drop-in dQ,dK",
                "Attn-QAT dQ,dK",
                "ratio",
                "drop-in dV",
                "Attn-QAT dV",
            ],
            rows,
            row_classes=classes,
            text_columns=2,
            caption="Rel. L2 vs STE (green: drop-in ≥ "
            f"{finding['far_factor']:g}x farther in dQ, dK)",
        )


def _p_mass_block(page: HtmlReport, finding: dict[str, Any]) -> None:
    _finding_callout(page, finding)
    if not finding["rows"]:
        return
    with page.row():
        page.figure(
            figures.p_mass_figure(finding["rows"]),
            caption="Fraction of the P mass the FP4 quantizer keeps: forward (against the "
            "running max, per tile) and backward (the normalized P).",
        )
        rows = [
            [
                r["scenario"],
                r["recipe"],
                r["lk"],
                r["mass_kept_forward"],
                r["mass_kept_backward"],
                r["code_mismatch_rate"],
            ]
            for r in sorted(finding["rows"], key=lambda r: r["lk"] or 0)
        ]
        classes = ["bad" if (r[4] is not None and r[4] < 0.9) else None for r in rows]
        page.table(
            ["scenario", "recipe", "Lk", "kept fwd", "kept bwd", "P-code mismatch"],
            rows,
            row_classes=classes,
            text_columns=2,
            caption="P mass kept (red: backward keeps < 90%)",
        )


def _verdicts_block(page: HtmlReport, report: dict[str, Any]) -> None:
    """Per external kernel: the tolerance-rule verdict, then its statistical comparison."""
    for verdict in report["verdicts"]:
        page.callout(
            verdict["headline"],
            kind="good" if verdict["passed"] else "bad",
            points=verdict["points"],
        )
        tallies = verdict["recipes"]
        page.table(
            ["recipe", "scenarios in agreement", "worst error / bound"],
            [[r["recipe"], f"{r['agree']}/{r['of']}", r["worst_ratio"]] for r in tallies],
            row_classes=["good" if 0 < r["agree"] == r["of"] else "bad" for r in tallies],
            text_columns=2,
            caption=f"{verdict['implementation']}: the FP4 tolerance rule of `fp4sim check` "
            "(|out - ref64| <= 2x (forward) or 3x (backward) the float32 reference's error + "
            "floors) per recipe",
        )
        stats = verdict.get("statistics")
        if stats and stats["tensors"]:
            page.table(
                ["tensor", "rows", "label", "KS p", "mean diff", "CI low", "CI high",
                 "median diff", "CI low", "CI high"],
                [
                    [
                        name,
                        t["rows"],
                        t["label"],
                        t["ks_pvalue"],
                        t["mean_difference"],
                        *(t["mean_difference_ci"] or [None, None]),
                        t["median_difference"],
                        *(t["median_difference_ci"] or [None, None]),
                    ]
                    for name, t in stats["tensors"].items()
                ],
                text_columns=3,
                caption=f"{verdict['implementation']} vs recipe {verdict['recipe']}: per-row "
                "relative error against exact attention, kernel minus the recipe's reference "
                f"(overall: {stats['label']})",
            )
    page.bullets(["Statistical tests: " + a for a in report.get("statistics_assumptions", [])])


def _case_block(page: HtmlReport, case: dict[str, Any]) -> None:
    if case["status"] == "error":
        page.traceback_block(
            f"This case failed to run: {problem_line(case['error'])}. The rest of the report "
            "is unaffected.",
            case["error"] or "",
        )
        return
    if case["status"] == "skipped":
        page.paragraph(f"Skipped: {case['error']}", css_class="muted")
        return
    with page.row():
        page.figure(
            figures.case_error_figure(case),
            caption="Top: CDF of the per-element relative error; middle: its histogram; "
            "bottom: CDF of the per-row relative error. Gradients against the STE "
            "ground truth (the STE itself against the exact gradient, dashed).",
        )
        with page.block():
            fwd_rows = [
                [name, *_metric_cells(case["forward"].get(key))]
                for key, name in (
                    ("o_vs_exact", "O vs exact"),
                    ("o_hp_vs_exact", "O_hp vs exact"),
                    ("o_vs_recipe_reference", "O vs recipe ref."),
                )
                if case["forward"].get(key)
            ]
            page.table(["forward", *FULL_HEADERS], fwd_rows, caption="Forward output")
            grad_rows = []
            for variant in case["gradients"]:
                grad_rows.append(
                    [
                        variant,
                        grad_metric(case, variant, "vs_ste", "dq"),
                        grad_metric(case, variant, "vs_ste", "dk"),
                        grad_metric(case, variant, "vs_ste", "dv"),
                        grad_metric(case, variant, "vs_ste", "dq", metric="cosine"),
                        grad_metric(case, variant, "vs_exact", "dq"),
                        grad_metric(case, variant, "vs_exact", "dk"),
                        grad_metric(case, variant, "vs_exact", "dv"),
                        (case["d_identity"].get(variant) or {}).get("relative_to_d"),
                    ]
                )
            page.table(
                [
                    "variant",
                    "dQ vs STE",
                    "dK vs STE",
                    "dV vs STE",
                    "dQ cos STE",
                    "dQ vs exact",
                    "dK vs exact",
                    "dV vs exact",
                    "rowsum dS / D",
                ],
                grad_rows,
                caption="Gradients: relative L2 (and cosine of dQ); D-identity residual",
            )
    for variant, block in case["gradients"].items():
        if block.get("error"):
            page.traceback_block(f"backward variant {variant} crashed", block["error"])
    diag = case.get("diagnostics")
    if diag:
        with page.row():
            page.figure(
                figures.case_diagnostics_figure(diag),
                caption="E2M1 code use (fraction of elements per code) and block-scale bytes.",
            )
            rows = []
            for name, stats in diag["tensors"].items():
                if stats:
                    rows.append(
                        [
                            name.upper(),
                            stats["format"],
                            stats["elements"],
                            stats["saturated_elements"],
                            stats["flushed_blocks"],
                            stats["zeroed_nonzero_elements"],
                            stats["zeroed_mass_fraction"],
                        ]
                    )
            p = diag["p"]
            rows.append(
                [
                    "P",
                    "fwd",
                    p.get("nonzero_blocks_forward"),
                    p.get("saturated_forward"),
                    p.get("flushed_blocks_forward"),
                    None,
                    1 - p["mass_kept_forward"] if p.get("mass_kept_forward") is not None else None,
                ]
            )
            rows.append(
                [
                    "P",
                    "bwd",
                    p.get("nonzero_blocks_backward"),
                    p.get("saturated_backward"),
                    p.get("flushed_blocks_backward"),
                    None,
                    1 - p["mass_kept_backward"]
                    if p.get("mass_kept_backward") is not None
                    else None,
                ]
            )
            with page.block():
                page.table(
                    [
                        "tensor",
                        "format",
                        "elements / P blocks",
                        "saturated",
                        "flushed blocks",
                        "zeroed elements",
                        "mass lost",
                    ],
                    rows,
                    text_columns=2,
                    caption="Saturation and flushes",
                )
                page.table(
                    ["P", "value"],
                    [
                        ["mass kept, forward", p.get("mass_kept_forward")],
                        ["mass kept, backward", p.get("mass_kept_backward")],
                        ["worst row mass kept, forward", p.get("mass_kept_forward_row_min")],
                        ["fwd/bwd code mismatch rate", p.get("code_mismatch_rate")],
                    ],
                    caption="P quantization",
                )
    with page.collapsible("All metrics of this case"):
        rows = []
        for variant, block in case["gradients"].items():
            for tensor in ("dq", "dk", "dv"):
                for ref, cmp in (block.get(tensor) or {}).items():
                    rows.append([variant, tensor, ref, *_metric_cells(cmp)])
        page.table(["variant", "grad", "against", *FULL_HEADERS], rows, text_columns=3)


def build_page(report: dict[str, Any]) -> str:
    settings = report["settings"]
    versions = report["versions"]
    page = HtmlReport(
        "fp4sim report: FP4 attention errors and gradient errors",
        subtitle=(
            f"{report['created_utc']} · seed {settings['seed']} · device {settings['device']} · "
            f"{settings['preset']} set · torch {versions['torch']} · fp4sim {versions['fp4sim']}"
        ),
    )
    errors = [c for c in report["cases"] if c["status"] == "error"]
    if errors:
        page.callout(
            f"{len(errors)} case(s) failed to run (crashed, timed out or raised); details in "
            "their sections, every other number is complete.",
            kind="bad",
            points=[
                f"{c['scenario']} / {c['recipe']} / {c['implementation']}: "
                f"{problem_line(c['error'])}"
                for c in errors
            ],
        )
    failed = [t for t in report["thresholds"] if not t["passed"]]
    if failed:
        page.callout("Thresholds broken: " + ", ".join(t["threshold"] for t in failed), kind="bad")

    findings = {f["id"]: f for f in report["summary"]["findings"]}
    page.heading("Findings")
    if report.get("verdicts"):
        page.heading("Kernel verdicts", 3)
        _verdicts_block(page, report)
    if "principles" in findings:
        page.heading("Drop-in QAT vs Attn-QAT against the STE ground truth", 3)
        _principle_block(page, report, findings["principles"])
    if "p_mass" in findings:
        page.heading("P mass kept by the forward and the backward", 3)
        _p_mass_block(page, findings["p_mass"])
    if "d_identity" in findings:
        page.heading("The D identity", 3)
        f = findings["d_identity"]
        page.paragraph(f["text"])
        page.table(
            ["variant", "worst RMS rowsum(dS) / RMS D", "scenario", "recipe"],
            [
                [r["variant"], r["worst_relative_to_d"], r["scenario"], r["recipe"]]
                for r in f["rows"]
            ],
        )

    page.heading("Ranking")
    if report["thresholds"]:
        page.table(
            ["threshold", "worst value", "where", "matching cases", "result"],
            [
                [
                    t["threshold"],
                    t["worst_value"],
                    t["worst_case"],
                    t["cases"],
                    "pass" if t["passed"] else "FAIL",
                ]
                for t in report["thresholds"]
            ],
            row_classes=["good" if t["passed"] else "bad" for t in report["thresholds"]],
            caption="--fail-on thresholds (worst value over the matching cases)",
        )
    ranking = report["summary"]["ranking"]
    page.table(
        [
            "rank",
            "recipe",
            "implementation",
            "variant",
            "own",
            "vs STE geomean",
            "vs STE worst",
            "worst scenario",
            "vs exact geomean",
            "vs exact worst",
            "fwd O rel L2 (median)",
        ],
        [
            [
                r["rank"] or "ground truth",
                r["recipe"],
                r["implementation"],
                r["variant"],
                r["is_own_variant"],
                r["grad_vs_ste_geomean"],
                r["grad_vs_ste_worst"],
                r["grad_vs_ste_worst_scenario"],
                r["grad_vs_exact_geomean"],
                r["grad_vs_exact_worst"],
                r["fwd_rel_l2_median"],
            ]
            for r in ranking
        ],
        text_columns=4,
        caption="Recipes × backward variants ranked by the geometric mean (over scenarios) of the "
        "max relative L2 of dQ, dK, dV against the STE ground truth",
    )

    page.heading("Forward error")
    with page.row():
        page.figure(
            figures.forward_figure(report["cases"]),
            caption="Relative L2 of the FP4 output O against float64 exact attention.",
        )
        rows = [
            [
                c["scenario"],
                c["recipe"],
                c["implementation"],
                c["forward"]["o_vs_exact"]["metrics"]["relative_l2"],
                c["forward"]["o_vs_exact"]["metrics"]["cosine"],
                c["forward"]["o_vs_exact"]["element_relative_error"]["quantiles"]["p99"],
            ]
            for c in report["cases"]
            if c["status"] == "ok"
        ]
        page.table(
            ["scenario", "recipe", "impl.", "rel L2", "cosine", "elem p99"], rows, text_columns=3
        )

    page.heading("Scenarios")
    for name, scenario in report["scenarios"].items():
        shape = scenario["shape"]
        page.heading(f"Scenario {name}", 3)
        page.paragraph(
            f"{scenario['description']}. Shape: B={shape['batch']}, H={shape['heads']}, "
            f"Hkv={shape['kv_heads']}, Lq={shape['lq']}, Lk={shape['lk']}, d={shape['head_dim']}, "
            f"{'causal' if shape['causal'] else 'not causal'}; generator entropy "
            f"{scenario['seed']['generator_entropy']}."
        )
        for case in [c for c in report["cases"] if c["scenario"] == name]:
            title = (
                f"{name} · recipe {case['recipe']} · {case['implementation']} · {case['status']}"
            )
            if case.get("rule"):  # an external kernel under the FP4 tolerance rule
                title += " · " + ("agrees" if case["rule"]["agrees"] else "DISAGREES")
            with page.collapsible(title, open=case["status"] == "error"):
                _case_block(page, case)

    page.heading("Settings and definitions")
    page.bullets(
        [
            "Relative L2 = ||a - r|| / ||r||; relative L1 likewise; RMSE; max abs; cosine; "
            "norm ratio = ||a|| / ||r||.",
            f"Per-element relative error = |a - r| / (|r| + {ELEMENT_GUARD_EPS:g} * rms(r)); "
            f"per-row relative error = ||a_row - r_row|| / (||r_row|| + {ELEMENT_GUARD_EPS:g} * "
            "rms of the row norms). Histograms on fixed log10 bins from 1e-8 to 1e2 (exact "
            "matches below the first bin).",
            "STE ground truth: autograd through the FP4 forward with straight-through quantizers "
            "(reference variant ste_autograd). Exact: float64 attention and its autograd gradient.",
            "Gradient error of a variant: max of the relative L2 of dQ, dK, dV.",
            "D identity: rowsum(dS) with dS = P * (dP - D), recomputed here from each variant's "
            "formulas; shown as RMS relative to the RMS of D = rowsum(dO * O_exact).",
        ]
    )
    page.code_block(
        json.dumps(
            {
                "settings": {k: v for k, v in settings.items() if k != "log10_edges"},
                "versions": versions,
                "timing": report["timing"],
            },
            indent=2,
        )
    )
    return page.render()
