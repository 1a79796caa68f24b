"""The report page: turns the analysed report dict into ``index.html``.

Layout: first what to act on (failed cases, failing kernels, broken thresholds and
identities, unusable gradients), then the findings (computed sentences, each with its
figure and the numbers behind it), the ranking against both ground truths and the
thresholds, the forward-error overview, then one section per scenario with a collapsible
block per recipe × implementation (error distributions of O, dQ, dK, dV; FP4 diagnostics;
rowsum(dS); tracebacks of crashed cases), and last the settings, versions and metric
definitions. Reads the report only; every number was computed and analysed before.
"""

from __future__ import annotations

import json
from typing import Any

from fp4sim.publish.html import HtmlReport, figure_to_png
from fp4sim.reports import figures
from fp4sim.reports.markdown import truth_cell
from fp4sim.reports.metrics import ELEMENT_GUARD_EPS
from fp4sim.reports.schema import problem_line
from fp4sim.reports.summary import grad_metric

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
    """A finding that fails is a warning; one that holds is information, not a green light
    (what a user must act on is listed separately, first)."""
    return "warn" if holds is False else "info"


def _finding_callout(page: HtmlReport, finding: dict[str, Any]) -> None:
    page.callout(
        finding.get("headline") or finding["text"],
        kind=_finding_kind(finding.get("holds")),
        points=finding.get("points") or (),
    )


def _principle_block(page: HtmlReport, report: dict[str, Any], finding: dict[str, Any]) -> None:
    _finding_callout(page, finding)
    page.figure(
        figures.principle_figure(report["summary"]["variant_errors"]),
        caption="Relative L2 against each ground truth per backward variant (log scale; lower "
        "is closer; scenarios in the report's order). Attn-QAT and principle-2-only share "
        "ste_autograd's dQ, dK formula (bars at float32 rounding: an identity, not evidence); "
        "ste_tiled shares no formula with any explicit backward.",
    )
    rows = [
        [
            r["scenario"],
            r["recipe"],
            r["drop_in_ste_tiled"],
            r["attn_qat_ste_tiled"],
            r["ratio_ste_tiled"],
            r["drop_in_ste"],
            r["attn_qat_ste"],
            r["drop_in_dv_ste"],
            r["attn_qat_dv_ste"],
        ]
        for r in finding["rows"]
    ]
    classes = [
        "bad"
        if ({"key_bias", "long_rows"} & set(r["tags"]))
        and r["ratio_ste_tiled"] < finding["far_factor"]
        else None
        for r in finding["rows"]
    ]
    page.table(
        [
            "scenario",
            "recipe",
            "drop-in dQ,dK vs ste_tiled",
            "Attn-QAT dQ,dK vs ste_tiled",
            "ratio",
            "drop-in dQ,dK vs ste_autograd",
            "Attn-QAT dQ,dK vs ste_autograd",
            "drop-in dV",
            "Attn-QAT dV",
        ],
        rows,
        row_classes=classes,
        text_columns=2,
        caption="Relative L2 (red: a key-bias or long-row scenario where drop-in is less than "
        f"{finding['far_factor']:g}x farther than Attn-QAT from ste_tiled). dV is the same "
        "against both ground truths.",
    )


def _p_mass_block(page: HtmlReport, finding: dict[str, Any], order: list[str]) -> None:
    _finding_callout(page, finding)
    if finding.get("definition"):
        page.paragraph(finding["definition"], css_class="muted")
    if not finding["rows"]:
        return
    rank = {name: i for i, name in enumerate(order)}
    with page.row():
        page.figure(
            figures.p_mass_figure(finding["rows"], order),
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
            for r in sorted(finding["rows"], key=lambda r: rank.get(r["scenario"], len(rank)))
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


CaseFigures = dict[str, bytes]
"""The PNGs of one case's figures: ``errors`` and (reference cases) ``diagnostics``."""

ERRORS_CAPTION = (
    "Top: CDF of the per-element relative error; middle: its histogram; bottom: CDF of the "
    "per-row relative error. Gradients against ste_autograd (ste_autograd itself against "
    "the exact gradient, dashed)."
)
DIAGNOSTICS_CAPTION = (
    "E2M1 code use (fraction of elements per code) and the decoded block scales (E4M3 for "
    "NVFP4, E8M0 for MXFP4)."
)


def case_figures(case: dict[str, Any]) -> CaseFigures:
    """Render one ok case's figures (the bulk of the page's rendering time; independent per
    case, so ``reports.distributed`` can spread them over ranks)."""
    if case["status"] != "ok":
        return {}
    out = {"errors": figure_to_png(figures.case_error_figure(case))}
    if case.get("diagnostics"):
        out["diagnostics"] = figure_to_png(figures.case_diagnostics_figure(case["diagnostics"]))
    return out


def _case_block(page: HtmlReport, case: dict[str, Any], pngs: CaseFigures | None) -> None:
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
    pngs = pngs if pngs is not None else case_figures(case)
    with page.row():
        page.image_png(pngs["errors"], alt=ERRORS_CAPTION, caption=ERRORS_CAPTION)
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
                        *(grad_metric(case, variant, "vs_ste", t) for t in ("dq", "dk", "dv")),
                        *(grad_metric(case, variant, "vs_ste_tiled", t) for t in ("dq", "dk")),
                        grad_metric(case, variant, "vs_ste", "dq", metric="cosine"),
                        *(grad_metric(case, variant, "vs_exact", t) for t in ("dq", "dk", "dv")),
                        (case["ds_rowsum"].get(variant) or {}).get("relative_to_d"),
                    ]
                )
            page.table(
                [
                    "variant",
                    "dQ vs ste_autograd",
                    "dK vs ste_autograd",
                    "dV vs ste_autograd",
                    "dQ vs ste_tiled",
                    "dK vs ste_tiled",
                    "dQ cos ste_autograd",
                    "dQ vs exact",
                    "dK vs exact",
                    "dV vs exact",
                    "RMS rowsum(dS) / RMS D",
                ],
                grad_rows,
                caption="Gradients: relative L2 (and cosine of dQ); the row sums of dS",
            )
    for variant, block in case["gradients"].items():
        if block.get("error"):
            page.traceback_block(f"backward variant {variant} crashed", block["error"])
    diag = case.get("diagnostics")
    if diag:
        with page.row():
            page.image_png(
                pngs["diagnostics"], alt=DIAGNOSTICS_CAPTION, caption=DIAGNOSTICS_CAPTION
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


def _actions_block(page: HtmlReport, report: dict[str, Any]) -> None:
    actions = report["summary"]["actions"]
    if not actions:
        page.callout(
            "Nothing to act on: every case ran, every threshold holds, every kernel agrees with "
            "its recipe, every identity holds and no recipe's own gradient is unusable.",
            kind="good",
        )
        return
    for action in actions:
        page.callout(action["text"], kind=action["severity"])
    errors = [c for c in report["cases"] if c["status"] == "error"]
    if errors:
        page.bullets(
            [
                f"{c['scenario']} / {c['recipe']} / {c['implementation']}: "
                f"{problem_line(c['error'])}"
                for c in errors
            ]
        )


def _truths_block(page: HtmlReport, report: dict[str, Any], finding: dict[str, Any]) -> None:
    _finding_callout(page, finding)
    page.paragraph(
        "ste_autograd assumes the straight-through estimator stands in for the quantizer of "
        "the function softmax -> quantize -> P~V^: it keeps the softmax Jacobian (so "
        "rowsum(dS) = 0) and does not depend on the tile width or order. ste_tiled assumes "
        "the tiled forward as written, differentiated literally: gradients also flow through "
        "the running max and the rescalings, which see quantized values while the STE passes "
        "unquantized ones. Attn-QAT's dQ, dK share ste_autograd's formula; no explicit "
        "backward shares ste_tiled's, so distances to it are evidence (docs/attention-math.md, "
        "\"Two placements of the STE\"). An identity is declared when a comparison is the same "
        f"formula by construction and measures at most {finding['identity_tolerance']:.2g}.",
        css_class="muted",
    )
    groups = finding.get("groups") or []
    if groups:
        page.table(
            ["variant", "ground truth", "grads", "recipes", "kind", "reason", "scenarios",
             "max rel L2"],
            [
                [g["variant"], g["ground_truth"], ", ".join(g["tensors"]),
                 ", ".join(g["recipes"]), g["kind"], g["reason"] or "—", g["scenarios"],
                 g["max_relative_l2"]]
                for g in groups
            ],
            row_classes=["bad" if g["kind"] == "broken" else None for g in groups],
            text_columns=6,
            caption="Comparisons that are identities by construction (or measure as equal "
            "without a known reason), grouped; every case is in report.json "
            "(summary.identities)",
        )


def build_page(
    report: dict[str, Any], rendered: dict[int, CaseFigures] | None = None
) -> str:
    """The page; ``rendered``: case index -> its figures, rendered elsewhere (other ranks);
    missing ones are rendered here."""
    settings = report["settings"]
    versions = report["versions"]
    order = list(settings["scenarios"])
    page = HtmlReport(
        "fp4sim report: FP4 attention errors and gradient errors",
        subtitle=(
            f"{report['created_utc']} · seed {settings['seed']} · device {settings['device']} · "
            f"{settings['preset']} set · torch {versions['torch']} · fp4sim {versions['fp4sim']}"
        ),
    )
    page.heading("Act on")
    _actions_block(page, report)

    findings = {f["id"]: f for f in report["summary"]["findings"]}
    page.heading("Findings")
    if report.get("verdicts"):
        page.heading("Kernel verdicts", 3)
        _verdicts_block(page, report)
    if "principles" in findings:
        page.heading("Drop-in QAT vs Attn-QAT against both ground truths", 3)
        _principle_block(page, report, findings["principles"])
    if "p_mass" in findings:
        page.heading("P mass kept by the forward and the backward", 3)
        _p_mass_block(page, findings["p_mass"], order)
    if "ground_truths" in findings:
        page.heading("The two ground truths and the identities", 3)
        _truths_block(page, report, findings["ground_truths"])
    if "ds_rowsum" in findings:
        page.heading("Row sums of dS (the D identity)", 3)
        f = findings["ds_rowsum"]
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
            "vs ste_autograd geomean",
            "worst",
            "worst scenario",
            "vs ste_tiled geomean",
            "worst",
            "worst scenario",
            "vs exact geomean",
            "fwd O rel L2 (median)",
        ],
        [
            [
                r["rank"] or "ground truth",
                r["recipe"],
                r["implementation"],
                r["variant"],
                r["is_own_variant"],
                truth_cell(r, "ste"),
                r["grad_vs_ste_worst"],
                r["grad_vs_ste_worst_scenario"],
                truth_cell(r, "ste_tiled"),
                r["grad_vs_ste_tiled_worst"],
                r["grad_vs_ste_tiled_worst_scenario"],
                r["grad_vs_exact_geomean"],
                r["fwd_rel_l2_median"],
            ]
            for r in ranking
        ],
        text_columns=6,
        caption="Recipes × backward variants ranked by the geometric mean (over scenarios) of the "
        "max relative L2 of dQ, dK, dV against the default ground truth ste_autograd, with the "
        "same against ste_tiled; \"= by construction\": the same formula as that ground truth "
        "(float32 rounding apart), an identity, not evidence",
    )

    page.heading("Forward error")
    with page.row():
        page.figure(
            figures.forward_figure(report["summary"]["forward"]),
            caption="Relative L2 of the FP4 output O against float64 exact attention.",
        )
        page.table(
            ["scenario", "recipe", "impl.", "rel L2", "cosine", "elem p99"],
            [
                [r["scenario"], r["recipe"], r["implementation"], r["relative_l2"], r["cosine"],
                 r["element_p99"]]
                for r in report["summary"]["forward"]
            ],
            text_columns=3,
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
        for index, case in enumerate(report["cases"]):
            if case["scenario"] != name:
                continue
            title = (
                f"{name} · recipe {case['recipe']} · {case['implementation']} · {case['status']}"
            )
            if case.get("rule"):  # an external kernel under the FP4 tolerance rule
                title += " · " + ("agrees" if case["rule"]["agrees"] else "DISAGREES")
            with page.collapsible(title, open=case["status"] == "error"):
                _case_block(page, case, (rendered or {}).get(index))

    page.heading("Settings and definitions")
    page.bullets(
        [
            "Relative L2 = ||a - r|| / ||r||; relative L1 likewise; RMSE; max abs; cosine; "
            "norm ratio = ||a|| / ||r||.",
            f"Per-element relative error = |a - r| / (|r| + {ELEMENT_GUARD_EPS:g} * rms(r)); "
            f"per-row relative error = ||a_row - r_row|| / (||r_row|| + {ELEMENT_GUARD_EPS:g} * "
            "rms of the row norms). Histograms on fixed log10 bins from 1e-8 to 1e2 (exact "
            "matches below the first bin).",
            "Ground truths: autograd through the FP4 forward with straight-through quantizers, "
            "the STE for P either on the normalized P valued at the forward's P~/l "
            "(ste_autograd, the default) or on each tile's unnormalized P of the tiled loop "
            "(ste_tiled). Exact: float64 attention and its autograd gradient.",
            "Gradient error of a variant: max of the relative L2 of dQ, dK, dV.",
            "rowsum(dS): the row sums of each variant's dS = P * (dP - D), from the "
            "reference's own backward; shown as RMS relative to the RMS of "
            "D = rowsum(dO * O_exact).",
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
