"""Matplotlib figures of the report, built from the report dict (``report.json`` content).

Each function returns a ``matplotlib.figure.Figure`` (no pyplot state); the page builder
embeds them with ``reports.html.HtmlReport.figure``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedFormatter,
    FixedLocator,
    FuncFormatter,
    NullFormatter,
    NullLocator,
)

from fp4sim.reports.metrics import LOG10_EDGES, histogram_cdf

VARIANT_COLORS: dict[str, str] = {
    "exact": "#6e7781",
    "drop_in": "#cf222e",
    "p_only": "#bf8700",
    "o_only": "#8250df",
    "attn_qat": "#1a7f37",
    "ste_autograd": "#0969da",
    "kernel": "#e16f24",
}
RECIPE_COLORS = ["#0969da", "#1a7f37", "#cf222e", "#8250df", "#bf8700", "#6e7781", "#e16f24"]
LOG_FLOOR = 1e-8
"""Bars on log axes are drawn at least this high (an exact 0 shows as a stub at the floor)."""
E2M1_LABELS = [
    "0",
    ".5",
    "1",
    "1.5",
    "2",
    "3",
    "4",
    "6",
    "-0",
    "-.5",
    "-1",
    "-1.5",
    "-2",
    "-3",
    "-4",
    "-6",
]


def _log_ticks(axis: Any, lo: int, hi: int, step: int = 2) -> None:
    """Fixed decade ticks with plain-text labels (mathtext labels are slow to render)."""
    ticks = [10.0**e for e in range(lo, hi + 1, step)]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FixedFormatter([f"1e{e}" for e in range(lo, hi + 1, step)]))


def _style(ax: Any) -> None:
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    colors: dict[str, str],
    *,
    log: bool = True,
    hatches: dict[str, str] | None = None,
) -> None:
    """Bars of several series side by side for each group label (None = no bar)."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = np.array(
            [np.nan if v is None else max(v, LOG_FLOOR) if log else v for v in values],
            dtype=float,
        )
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            vals,
            width,
            label=name,
            color=colors.get(name),
            hatch=(hatches or {}).get(name),
            edgecolor="white",
            linewidth=0.3,
        )
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
        drawn = [max(v, LOG_FLOOR) for vals in series.values() for v in vals if v is not None]
        if drawn:
            ax.set_ylim(bottom=min(drawn) / 2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    _style(ax)


def principle_figure(cases: Sequence[dict[str, Any]], variants: Sequence[str]) -> Figure:
    """Gradient error vs STE of every backward variant, per scenario: one column per recipe,
    top row max(dQ, dK) (through dS), bottom row dV (through P~)."""
    from fp4sim.reports.summary import grad_metric, ok_cases

    refs = [
        c
        for c in ok_cases(cases)
        if c["implementation_kind"] == "reference" and c["recipe"] != "bf16"
    ]
    recipes = list(dict.fromkeys(c["recipe"] for c in refs))
    shown = [v for v in variants if v != "ste_autograd"]
    columns = max(len(recipes), 1)
    fig = Figure(figsize=(6.6 * columns, 6.6), layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False)

    def ds_grads(case: dict[str, Any], variant: str) -> float | None:
        values = [grad_metric(case, variant, "vs_ste", t) for t in ("dq", "dk")]
        return None if None in values else max(values)

    for col, recipe in enumerate(recipes):
        rcases = [c for c in refs if c["recipe"] == recipe]
        groups = [c["scenario"] for c in rcases]
        top = {v: [ds_grads(c, v) for c in rcases] for v in shown}
        bottom = {v: [grad_metric(c, v, "vs_ste", "dv") for c in rcases] for v in shown}
        grouped_bars(axes[0][col], groups, top, VARIANT_COLORS)
        grouped_bars(axes[1][col], groups, bottom, VARIANT_COLORS)
        axes[0][col].set_title(f"recipe {recipe}: dQ, dK vs STE ground truth", fontsize=10)
        axes[1][col].set_title(f"recipe {recipe}: dV vs STE ground truth", fontsize=10)
        axes[0][col].set_ylabel("max rel. L2 of dQ, dK")
        axes[1][col].set_ylabel("rel. L2 of dV")
        axes[0][col].tick_params(axis="x", labelbottom=False)
    if recipes:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, ncol=len(labels), loc="outside upper center")
    return fig


def p_mass_figure(p_rows: Sequence[dict[str, Any]]) -> Figure:
    """P mass kept by the forward and the backward quantizer, per scenario and recipe."""
    rows = sorted(p_rows, key=lambda r: (r["lk"] or 0, r["scenario"]))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    series: dict[str, list[float | None]] = {}
    colors: dict[str, str] = {}
    hatches: dict[str, str] = {}
    for i, recipe in enumerate(recipes):
        for phase in ("forward", "backward"):
            name = f"{recipe} {phase}"
            lookup = {r["scenario"]: r[f"mass_kept_{phase}"] for r in rows if r["recipe"] == recipe}
            series[name] = [lookup.get(s) for s in scenarios]
            colors[name] = RECIPE_COLORS[i % len(RECIPE_COLORS)]
            hatches[name] = "//" if phase == "backward" else ""
    fig = Figure(figsize=(max(6.0, 0.75 * len(scenarios) + 3), 4.3), layout="constrained")
    ax = fig.subplots()
    grouped_bars(ax, scenarios, series, colors, log=False, hatches=hatches)
    n = max(len(series), 1)
    width = 0.8 / n
    for i, values in enumerate(series.values()):
        for j, value in enumerate(values):
            if value is not None and value < 0.5:  # a bar too short to see: print its value
                ax.text(
                    j - 0.4 + width * (i + 0.5),
                    value + 0.02,
                    f"{100 * value:.0f}%",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="#cf222e",
                    rotation=90,
                )
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("fraction of P mass kept")
    ax.set_title("P mass kept: forward (plain) vs backward (hatched) quantizer", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, ncol=4, loc="outside lower center")
    return fig


def forward_figure(cases: Sequence[dict[str, Any]]) -> Figure:
    """Relative L2 of O vs exact attention, per scenario and recipe / implementation."""
    from fp4sim.reports.summary import forward_metric, ok_cases

    good = ok_cases(cases)
    scenarios = list(dict.fromkeys(c["scenario"] for c in good))
    keys = list(dict.fromkeys((c["recipe"], c["implementation"]) for c in good))
    series: dict[str, list[float | None]] = {}
    colors: dict[str, str] = {}
    for i, (recipe, impl) in enumerate(keys):
        name = recipe if impl == "reference" else f"{recipe} [{impl}]"
        lookup = {
            c["scenario"]: forward_metric(c)
            for c in good
            if (c["recipe"], c["implementation"]) == (recipe, impl)
        }
        series[name] = [lookup.get(s) for s in scenarios]
        colors[name] = RECIPE_COLORS[i % len(RECIPE_COLORS)]
    fig = Figure(figsize=(max(6.0, 0.75 * len(scenarios) + 3), 3.9), layout="constrained")
    ax = fig.subplots()
    known = [v for vals in series.values() for v in vals if v is not None and v > 0]
    spread = max(known) / min(known) if known else 1.0
    grouped_bars(ax, scenarios, series, colors, log=spread > 20)
    ax.set_ylabel("rel. L2 of O vs float64 exact")
    ax.set_title("Forward error", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return fig


def _cdf_line(
    ax: Any, distribution: dict[str, Any], label: str, color: str | None, style: str = "-"
) -> None:
    xs, fs = histogram_cdf(distribution["histogram"])
    if xs:
        ax.step(xs, fs, where="post", label=label, color=color, linestyle=style, linewidth=1.3)


def _hist_line(
    ax: Any, distribution: dict[str, Any], label: str, color: str | None, style: str = "-"
) -> None:
    h = distribution["histogram"]
    total = max(h["total"], 1)
    edges = np.power(10.0, np.asarray(LOG10_EDGES))
    frac = np.asarray(h["counts"], dtype=float) / total
    if not np.any(frac > 0):  # all NaN, exact or out of range: nothing to draw on a log axis
        return
    ax.stairs(frac, edges, label=label, color=color, linestyle=style, linewidth=1.3)


def case_error_figure(case: dict[str, Any]) -> Figure:
    """Per-element relative-error CDFs (top) and histograms (middle), per-row error CDFs
    (bottom) of O and of dQ, dK, dV for every variant (vs STE; STE itself vs exact)."""
    fig = Figure(figsize=(13.5, 8.2))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.96, bottom=0.05, wspace=0.22, hspace=0.38)
    axes = fig.subplots(3, 4)
    forward = case.get("forward") or {}
    o_lines = [
        ("o_vs_exact", "O vs exact", "#0969da", "-"),
        ("o_hp_vs_exact", "O_hp vs exact", "#6e7781", "--"),
        ("o_vs_recipe_reference", "O vs recipe ref.", "#e16f24", ":"),
    ]
    rows = (
        ("element_relative_error", _cdf_line, "CDF"),
        ("element_relative_error", _hist_line, "fraction"),
        ("row_relative_error", _cdf_line, "CDF"),
    )
    for r, (dist_key, draw, _ylabel) in enumerate(rows):
        ax = axes[r][0]
        for key, label, color, style in o_lines:
            if forward.get(key):
                draw(ax, forward[key][dist_key], label, color, style)
        for c, tensor in enumerate(("dq", "dk", "dv"), start=1):
            ax = axes[r][c]
            for variant, block in (case.get("gradients") or {}).items():
                if not block or block.get("error"):
                    continue
                entry = block.get(tensor) or {}
                if variant == "ste_autograd":
                    cmp, label, style = entry.get("vs_exact"), "STE vs exact", "--"
                else:
                    cmp, label, style = entry.get("vs_ste"), variant, "-"
                if cmp:
                    draw(ax, cmp[dist_key], label, VARIANT_COLORS.get(variant), style)
    titles = ["O (forward)", "dQ vs STE", "dK vs STE", "dV vs STE"]
    row_titles = ["per-element rel. error", "per-element rel. error", "per-row rel. error"]
    for r in range(3):
        for c in range(4):
            ax = axes[r][c]
            ax.set_xscale("log")
            ax.set_xlim(1e-8, 1e2)
            _log_ticks(ax.xaxis, -8, 2)
            if r == 1:
                ax.set_yscale("log")
                ax.set_ylim(1e-5, 1.2)
                _log_ticks(ax.yaxis, -5, 0, 1)
            else:
                ax.set_ylim(0, 1.02)
            ax.set_title(f"{titles[c]}: {row_titles[r]}", fontsize=8.5)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel(rows[r][2], fontsize=8)
            _style(ax)
    for ax in (axes[0][0], axes[0][1]):
        if ax.get_legend_handles_labels()[0]:  # a case of NaN outputs draws no line
            ax.legend(fontsize=6.5, loc="upper left")
    return fig


def case_diagnostics_figure(diagnostics: dict[str, Any]) -> Figure:
    """E2M1 code utilization of Q, K, V, P and the scale-byte histograms of Q, K, V."""
    fig = Figure(figsize=(13.5, 2.8))
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9, bottom=0.2, wspace=0.25)
    axes = fig.subplots(1, 5)
    tensors = diagnostics.get("tensors") or {}
    p_counts = (diagnostics.get("p") or {}).get("code_counts")
    for ax, name in zip(axes[:4], ("q", "k", "v", "p"), strict=True):
        counts = p_counts if name == "p" else (tensors.get(name) or {}).get("code_counts")
        if counts:
            total = max(sum(counts), 1)
            ax.bar(
                range(16), np.asarray(counts) / total, color="#0969da" if name != "p" else "#1a7f37"
            )
        ax.set_xticks(range(16))
        ax.set_xticklabels(E2M1_LABELS, fontsize=6, rotation=90)
        ax.set_title(f"{name.upper()} E2M1 code use", fontsize=8.5)
        ax.tick_params(labelsize=7)
        _style(ax)
    ax = axes[4]
    lo, hi = 255, 0
    for name, color in (("q", "#0969da"), ("k", "#cf222e"), ("v", "#1a7f37")):
        stats = tensors.get(name)
        if not stats:
            continue
        counts = np.asarray(stats["scale_byte_counts"], dtype=float)
        used = np.nonzero(counts)[0]
        if used.size:
            ax.step(
                np.arange(256),
                counts / max(counts.sum(), 1),
                where="mid",
                label=name.upper(),
                color=color,
                linewidth=1.1,
            )
            lo, hi = min(lo, int(used.min())), max(hi, int(used.max()))
    if hi >= lo:
        ax.set_xlim(max(lo - 4, 0), min(hi + 4, 255))
        ax.legend(fontsize=6.5)
    ax.set_title("block scale bytes", fontsize=8.5)
    ax.tick_params(labelsize=7)
    _style(ax)
    return fig
