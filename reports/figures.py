"""Matplotlib figures of the report, drawn from the analysed report (``report.json``).

Each function returns a ``matplotlib.figure.Figure`` (no pyplot state); the page builder
embeds them with ``fp4sim.publish.html.HtmlReport.figure``. The figures plot numbers that the
analysis stored (``summary.variant_errors``, ``summary.forward``, the P-mass rows, the
cases' distributions and counts) and compute none; every chart lists the scenarios in the
report's order, and every panel has a legend.
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

import fp4sim
from fp4sim.formats import E2M1_CODE_VALUES
from fp4sim.reports.metrics import LOG10_EDGES, histogram_cdf

VARIANT_COLORS: dict[str, str] = {
    "exact": "#6e7781",
    "drop_in": "#cf222e",
    "p_only": "#bf8700",
    "o_only": "#8250df",
    "attn_qat": "#1a7f37",
    "ste_autograd": "#0969da",
    "ste_tiled": "#1b7c83",
    "kernel": "#e16f24",
}
RECIPE_COLORS = ["#0969da", "#1a7f37", "#cf222e", "#8250df", "#bf8700", "#6e7781", "#e16f24"]
LOG_FLOOR = 1e-8
"""Bars on log axes are drawn at least this high (an exact 0 shows as a stub at the floor)."""
# Tick labels of the code-use charts, by code 0..15 (bit 3 is the sign), from the one home of
# the E2M1 values (fp4sim.formats; docs/numerics.md "E2M1"): "0", ".5", ..., "6", "-0", ...
E2M1_LABELS = [f"{v:g}".replace("0.", ".") for v in E2M1_CODE_VALUES]


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


def principle_figure(variant_rows: Sequence[dict[str, Any]]) -> Figure:
    """Gradient error of every backward variant against each ground truth, per scenario
    (``summary.variant_errors`` rows, in scenario order): one column per recipe; rows: dQ, dK
    against ste_autograd, dQ, dK against ste_tiled, dV against ste_autograd (the two
    ground truths' dV are the same formula)."""
    recipes = list(dict.fromkeys(r["recipe"] for r in variant_rows))
    panels = (
        ("ste_autograd", "dq_dk", "dQ, dK vs ste_autograd (STE on normalized P)",
         "max rel. L2 of dQ, dK"),
        ("ste_tiled", "dq_dk", "dQ, dK vs ste_tiled (STE on tile P)", "max rel. L2 of dQ, dK"),
        ("ste_autograd", "dv", "dV vs ste_autograd (= vs ste_tiled)", "rel. L2 of dV"),
    )
    columns = max(len(recipes), 1)
    fig = Figure(figsize=(7.4 * columns, 9.0), layout="constrained")
    axes = fig.subplots(len(panels), columns, squeeze=False)
    for col, recipe in enumerate(recipes):
        mine = [r for r in variant_rows if r["recipe"] == recipe]
        groups = list(dict.fromkeys(r["scenario"] for r in mine))
        for row, (truth, key, title, ylabel) in enumerate(panels):
            chosen = [r for r in mine if r["ground_truth"] == truth]
            variants = list(dict.fromkeys(r["variant"] for r in chosen))
            lookup = {(r["variant"], r["scenario"]): r[key] for r in chosen}
            series = {v: [lookup.get((v, g)) for g in groups] for v in variants}
            ax = axes[row][col]
            grouped_bars(ax, groups, series, VARIANT_COLORS)
            ax.set_title(f"recipe {recipe}: {title}", fontsize=10)
            ax.set_ylabel(ylabel)
            if row < len(panels) - 1:
                ax.tick_params(axis="x", labelbottom=False)
            ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def p_mass_figure(p_rows: Sequence[dict[str, Any]], scenario_order: Sequence[str]) -> Figure:
    """P mass kept by the forward and the backward quantizer, per scenario (in the report's
    order) and recipe."""
    rows = list(p_rows)
    present = {r["scenario"] for r in rows}
    scenarios = [s for s in scenario_order if s in present]
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
    fig = Figure(figsize=(max(6.0, 0.75 * len(scenarios) + 5), 4.3), layout="constrained")
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
    ax.set_ylim(0, 1.15)
    ax.axhline(1.0, color="#57606a", linewidth=0.8, linestyle=":")
    ax.set_ylabel("P mass kept: sum P~ / sum P")
    ax.set_title("P mass kept: forward (plain) vs backward (hatched) quantizer", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def forward_figure(forward_rows: Sequence[dict[str, Any]]) -> Figure:
    """Relative L2 of O vs exact attention (``summary.forward`` rows, in scenario order),
    per scenario and recipe / implementation."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in forward_rows))
    keys = list(dict.fromkeys((r["recipe"], r["implementation"]) for r in forward_rows))
    series: dict[str, list[float | None]] = {}
    colors: dict[str, str] = {}
    for i, (recipe, impl) in enumerate(keys):
        name = recipe if impl == "reference" else f"{recipe} [{impl}]"
        lookup = {
            r["scenario"]: r["relative_l2"]
            for r in forward_rows
            if (r["recipe"], r["implementation"]) == (recipe, impl)
        }
        series[name] = [lookup.get(s) for s in scenarios]
        colors[name] = RECIPE_COLORS[i % len(RECIPE_COLORS)]
    fig = Figure(figsize=(max(6.0, 0.75 * len(scenarios) + 5), 3.9), layout="constrained")
    ax = fig.subplots()
    known = [v for vals in series.values() for v in vals if v is not None and v > 0]
    spread = max(known) / min(known) if known else 1.0
    grouped_bars(ax, scenarios, series, colors, log=spread > 20)
    ax.set_ylabel("rel. L2 of O vs float64 exact")
    ax.set_title("Forward error", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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
                    cmp, label, style = entry.get("vs_exact"), "ste_autograd vs exact", "--"
                else:
                    cmp, label, style = entry.get("vs_ste"), variant, "-"
                if cmp:
                    draw(ax, cmp[dist_key], label, VARIANT_COLORS.get(variant), style)
    titles = ["O (forward)", "dQ vs ste_autograd", "dK vs ste_autograd", "dV vs ste_autograd"]
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
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:  # a case of NaN outputs draws no line
            ax.legend(fontsize=5.5, loc="upper left")
    return fig


SCALE_DECODERS = {"nvfp4": fp4sim.e4m3_decode, "mxfp4": fp4sim.e8m0_decode}
"""Block-scale byte -> value: E4M3 for NVFP4 (PTX ISA), E8M0 for MXFP4 (OCP MX v1.0 spec)."""


def case_diagnostics_figure(diagnostics: dict[str, Any]) -> Figure:
    """E2M1 code use of Q, K, V, P and the histogram of the decoded block scales of Q, K, V."""
    fig = Figure(figsize=(13.5, 3.0))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.24, wspace=0.3)
    axes = fig.subplots(1, 5)
    tensors = diagnostics.get("tensors") or {}
    p_counts = (diagnostics.get("p") or {}).get("code_counts")
    for ax, name in zip(axes[:4], ("q", "k", "v", "p"), strict=True):
        counts = p_counts if name == "p" else (tensors.get(name) or {}).get("code_counts")
        label = "P (forward, visible entries)" if name == "p" else name.upper()
        if counts:
            total = max(sum(counts), 1)
            ax.bar(
                range(16),
                np.asarray(counts) / total,
                color="#0969da" if name != "p" else "#1a7f37",
                label=label,
            )
            ax.legend(fontsize=6.5, loc="upper right")
        else:
            ax.text(0.5, 0.5, "not quantized", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="#57606a")
        ax.set_xticks(range(16))
        ax.set_xticklabels(E2M1_LABELS, fontsize=6, rotation=90)
        ax.set_title(f"{name.upper()} E2M1 code use", fontsize=8.5)
        ax.set_ylabel("fraction of elements", fontsize=7)
        ax.set_xlabel("E2M1 value", fontsize=7)
        ax.tick_params(labelsize=7)
        _style(ax)
    ax = axes[4]
    drawn = False
    for name, color in (("q", "#0969da"), ("k", "#cf222e"), ("v", "#1a7f37")):
        stats = tensors.get(name)
        decode = SCALE_DECODERS.get((stats or {}).get("format", ""))
        if not stats or decode is None:
            continue
        counts = np.asarray(stats["scale_byte_counts"], dtype=float)
        used = np.nonzero(counts)[0]
        values = decode(used.astype(np.uint8)).astype(np.float64)
        keep = np.isfinite(values) & (values > 0)  # a zero scale (all-zero block) has no log
        if not keep.any():
            continue
        order = np.argsort(values[keep])
        xs, fs = values[keep][order], (counts[used][keep] / max(counts.sum(), 1))[order]
        ax.plot(xs, fs, marker="o", markersize=2.5, linewidth=1.0, label=name.upper(),
                color=color)
        drawn = True
    ax.set_xscale("log", base=2)
    ax.set_title("block scales (decoded)", fontsize=8.5)
    ax.set_ylabel("fraction of blocks", fontsize=7)
    ax.set_xlabel("scale value (log2 axis)", fontsize=7)
    if drawn:
        ax.legend(fontsize=6.5)
    ax.tick_params(labelsize=7)
    _style(ax)
    return fig
