"""The simulation's report: ``report.json`` (every series), ``index.html``, ``summary.md``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fp4sim.publish.html import HtmlReport
from fp4sim.simulate import metrics
from fp4sim.simulate.runner import SimulationResult, VariantSummary
from fp4sim.simulate.tasks import get_task

REPORT_KIND = "fp4sim-simulate"
REPORT_VERSION = 1
COLORS = {"bf16": "black", "attn_qat": "tab:green", "p_only": "tab:blue",
          "o_only": "tab:orange", "drop_in": "tab:red", "ste_autograd": "tab:purple",
          "kernel": "tab:brown"}

DEFINITIONS = {
    "grad_norm": "global L2 norm of all parameter gradients before clipping",
    "attention_grad_norm.layerN": "L2 norm of the gradients of layer N's qkv projection "
                                  "(weight and bias), before clipping",
    "final_loss": "mean scored cross entropy on held-out evaluation batches after training",
    "final_train_loss": "mean training loss over the last 5% of the steps",
    "spike": f"a step whose gradient norm exceeds {metrics.SPIKE_FACTOR:g}x the median of the "
             f"previous {metrics.SPIKE_WINDOW} steps' finite norms (no spike before "
             f"{metrics.SPIKE_MIN_HISTORY} previous steps); a non-finite norm is a spike; "
             "counted in steps",
    "progress": "(chance loss - final loss) / (chance loss - bf16 final loss)",
    "verdict": f"'{metrics.LEARNS_LIKE_BF16}' if progress >= {metrics.LIKE_BASELINE_PROGRESS}, "
               f"'{metrics.LEARNS_WORSE}' if >= {metrics.FAILS_PROGRESS}, else "
               f"'{metrics.FAILS_TO_LEARN}'; ', unstable' when spikes exceed the bf16 run's by "
               f"more than {metrics.SPIKE_MARGIN}; '{metrics.DIVERGED}' on a non-finite loss or "
               f"norm; '{metrics.FAILED}' on an exception; '{metrics.INCONCLUSIVE}' when bf16 "
               f"got less than {metrics.BASELINE_MIN_PROGRESS:.0%} of the way from chance to 0",
}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_row(summary: VariantSummary) -> dict[str, Any]:
    return {
        "variant": summary.variant,
        "status": summary.status,
        "final_loss": summary.final_loss,
        "final_accuracy": summary.final_accuracy,
        "final_train_loss": summary.final_train_loss,
        "progress": summary.verdict.progress,
        "grad_norm_median": summary.norms.median,
        "grad_norm_p99": summary.norms.p99,
        "grad_norm_max": summary.norms.max,
        "spikes": summary.norms.spikes,
        "non_finite_norms": summary.norms.non_finite,
        "verdict": summary.verdict.text,
        "learning": summary.verdict.learning,
        "stable": summary.verdict.stable,
        "train_seconds": summary.train_seconds,
    }


def split_reproduced(split: dict[str, bool | None]) -> bool | None:
    values = list(split.values())
    if any(v is None for v in values) or not values:
        return None
    return all(values)


def build_report_json(result: SimulationResult) -> dict[str, Any]:
    config = result.config
    return {
        "kind": REPORT_KIND,
        "version": REPORT_VERSION,
        "smoke_run": config.smoke,
        "config": dataclasses.asdict(config),
        "task": {"name": config.task, "description": get_task(config.task).description,
                 "chance_loss": result.chance_loss},
        "environment": result.environment,
        "wall_seconds": result.wall_seconds,
        "definitions": DEFINITIONS,
        "summary": [summary_row(s) for s in result.summaries],
        "paper_split": result.split,
        "paper_split_reproduced": split_reproduced(result.split),
        "runs": {
            run.variant: {
                "description": run.description, "recipe": run.recipe,
                "backward": run.backward, "status": run.status, "error": run.error,
                "steps_completed": run.steps_completed, "train_seconds": run.train_seconds,
                "diagnostics_seconds": run.diagnostics_seconds, "eval": run.eval,
                "series": run.series, "diagnostics": run.diagnostics,
            }
            for run in result.runs
        },
    }


# -- figures ----------------------------------------------------------------------------


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` finite values (NaN where none)."""
    data = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(data)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, data, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(1, data.size + 1)
    lower = np.maximum(0, index - window)
    n = counts[index] - counts[lower]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[index] - sums[lower]) / np.maximum(n, 1), np.nan)


def _color(name: str) -> str | None:
    return COLORS.get(name)


def loss_figure(result: SimulationResult) -> Figure:
    figure = Figure(figsize=(7.5, 4.2))
    axes = figure.add_subplot()
    steps = result.config.training.steps
    window = max(1, steps // 50)
    for run in result.runs:
        losses = run.series.get("loss", [])
        if not losses:
            continue
        x = np.arange(1, len(losses) + 1)
        axes.plot(x, losses, color=_color(run.variant), alpha=0.2, linewidth=0.7)
        axes.plot(x, moving_average(losses, window), color=_color(run.variant),
                  label=run.variant, linewidth=1.5)
    axes.axhline(result.chance_loss, color="grey", linestyle=":", label="chance")
    axes.set_xlabel("step")
    axes.set_ylabel("scored training loss (nats)")
    axes.set_title(f"training loss (thin: per step; thick: mean of {window} steps)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _norm_axes(axes: Any, result: SimulationResult, key: str, title: str) -> None:
    for run in result.runs:
        values = np.asarray(run.series.get(key, []), dtype=np.float64)
        if values.size == 0:
            continue
        x = np.arange(1, values.size + 1)
        axes.plot(x, np.where(values > 0, values, np.nan), color=_color(run.variant),
                  label=run.variant, linewidth=0.8, alpha=0.85)
        spikes = metrics.spike_steps(values)
        if key == "grad_norm" and spikes:
            spike_values = values[spikes]
            axes.scatter(np.asarray(spikes) + 1, np.where(np.isfinite(spike_values),
                         spike_values, np.nan), color=_color(run.variant), marker="x", s=25)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3, which="both")


def grad_norm_figure(result: SimulationResult) -> Figure:
    figure = Figure(figsize=(7.5, 4.2))
    axes = figure.add_subplot()
    _norm_axes(axes, result, "grad_norm", "gradient norm before clipping (x: spikes)")
    axes.set_ylabel("global gradient norm")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def attention_norm_figure(result: SimulationResult) -> Figure:
    layers = result.config.model.n_layers
    figure = Figure(figsize=(4.2 * layers, 3.6))
    shared = None
    for layer in range(layers):
        axes = figure.add_subplot(1, layers, layer + 1, sharey=shared)
        shared = shared or axes
        _norm_axes(axes, result, f"attention_grad_norm.layer{layer}",
                   f"layer {layer}: qkv-projection gradient norm")
    shared.legend(fontsize=7)
    figure.tight_layout()
    return figure


# -- html and markdown -----------------------------------------------------------------

TABLE_HEADERS = ["variant", "verdict", "final loss", "final acc.", "progress",
                 "norm median", "norm p99", "norm max", "spikes", "train s"]


def table_rows(result: SimulationResult) -> list[list[Any]]:
    return [[s.variant, s.verdict.text, _finite_or_none(s.final_loss), s.final_accuracy,
             s.verdict.progress, s.norms.median, s.norms.p99, s.norms.max, s.norms.spikes,
             round(s.train_seconds, 1)] for s in result.summaries]


def _config_lines(result: SimulationResult) -> list[str]:
    config = result.config
    model, training = config.model, config.training
    return [
        f"config '{config.name}'{' (SMOKE RUN)' if config.smoke else ''}, task '{config.task}' "
        f"(chance loss {result.chance_loss:.3f}), seed {config.seed}, device {config.device} "
        f"({result.environment.get('device_name')})",
        f"model: {model.n_layers} layers, width {model.width}, {model.n_heads} heads of "
        f"{model.head_dim}, vocabulary {model.vocab_size}, sequence {model.seq_len}, "
        f"{model.positions} positions"
        + (f", token shift x {model.token_shift_scale:g}" if model.token_shift else ""),
        f"training: {training.steps} steps, batch {training.batch_size}, AdamW lr {training.lr:g} "
        f"betas {training.betas} weight decay {training.weight_decay:g}, warm-up "
        f"{training.warmup_steps}, {training.lr_schedule} rate"
        + (f" to {training.min_lr_ratio:g} x lr" if training.lr_schedule != "constant" else "")
        + f", gradient clipping at {training.grad_clip:g}",
        f"FP4 recipe '{config.recipe}' with P tiles of {config.block_n} keys"
        + (f"; kernel {config.kernel}" if config.kernel else "")
        + f"; {config.jobs} parallel job(s); deterministic algorithms "
        + ("on" if config.deterministic else "off"),
        f"total wall time {result.wall_seconds:.1f} s; torch {result.environment.get('torch')}; "
        f"{result.environment.get('date_utc')} UTC",
    ]


def _diagnostics_table(run: Any) -> tuple[list[str], list[list[Any]]] | None:
    entries = [entry for entry in run.diagnostics if "error" not in entry]
    if not entries:
        return None
    keys = sorted({key for entry in entries for key in entry if key != "step"})
    headers = ["quantity"] + [f"step {entry['step'] + 1}" for entry in entries]
    rows = [[key] + [entry.get(key) for entry in entries] for key in keys]
    return headers, rows


def build_html(result: SimulationResult) -> str:
    config = result.config
    page = HtmlReport("fp4sim simulate: training stability of FP4 attention backward variants",
                      subtitle=" | ".join(_config_lines(result)[:1]))
    if config.smoke:
        page.callout("SMOKE RUN: this reduced configuration checks that every variant "
                     "trains end to end; it is not expected to reproduce the paper's full "
                     "split (see docs/bench/simulate.md). Run --config gpu on a GPU for the "
                     "result.", kind="bad")
    reproduced = split_reproduced(result.split)
    if reproduced is not None:
        page.callout(
            "The runs " + ("reproduce" if reproduced else "do NOT reproduce")
            + " the Attn-QAT paper's qualitative split (attn_qat learns like bf16 and is "
            "stable; p_only learns like bf16; drop_in and o_only learn worse, and each "
            "either fails to learn or is unstable).",
            kind="good" if reproduced else "bad")
    page.heading("Summary")
    page.table(TABLE_HEADERS, table_rows(result),
               row_classes=[_row_class(s) for s in result.summaries], text_columns=2)
    if result.split:
        page.table(["paper's expectation", "holds"],
                   [[name, value] for name, value in result.split.items()])
    page.heading("Curves")
    with page.row():
        page.figure(loss_figure(result), caption="scored training loss per step, all variants")
        page.figure(grad_norm_figure(result),
                    caption="global gradient norm before clipping (log scale)")
    page.figure(attention_norm_figure(result),
                caption="per-layer attention (qkv projection) gradient norms, log scale, "
                        "shared axes")
    page.heading("First-layer FP4 diagnostics")
    page.paragraph("At the listed steps the first layer's actual q, k, v and the gradient dO "
                   "reaching its output are replayed through the reference with the FP4 recipe "
                   "(for every run, bf16 included). grad_rel_error.X and dq_cosine.X compare "
                   "backward variant X with the exact gradient of unquantized attention.")
    for run in result.runs:
        table = _diagnostics_table(run)
        errors = [entry for entry in run.diagnostics if "error" in entry]
        with page.collapsible(f"{run.variant}: diagnostics"):
            if table:
                page.table(*table)
            for entry in errors:
                page.traceback_block(f"diagnostics at step {entry['step'] + 1} failed",
                                     entry["error"])
            if not table and not errors:
                page.paragraph("no checkpoint reached")
    failed = [run for run in result.runs if run.error]
    if failed:
        page.heading("Failures")
        for run in failed:
            page.traceback_block(f"{run.variant} failed after {run.steps_completed} steps",
                                 run.error or "")
    page.heading("Configuration and definitions")
    page.bullets(_config_lines(result))
    page.bullets([f"{run.variant}: {run.description}" for run in result.runs])
    page.table(["term", "definition"], [[k, v] for k, v in DEFINITIONS.items()], text_columns=2)
    return page.render()


def _row_class(summary: VariantSummary) -> str | None:
    if summary.verdict.learning in (metrics.BASELINE,):
        return None
    if summary.verdict.learning == metrics.LEARNS_LIKE_BF16 and summary.verdict.stable:
        return "good"
    return "bad"


def _md_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def build_summary_md(result: SimulationResult) -> str:
    lines = ["# fp4sim simulate", ""]
    if result.config.smoke:
        lines += ["**SMOKE RUN** (reduced configuration; not expected to reproduce the "
                  "paper's full split).", ""]
    lines += [f"- {line}" for line in _config_lines(result)] + [""]
    lines.append("| " + " | ".join(TABLE_HEADERS) + " |")
    lines.append("|" + "---|" * len(TABLE_HEADERS))
    for row in table_rows(result):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    lines.append("")
    if result.split:
        reproduced = split_reproduced(result.split)
        lines.append(f"Paper's qualitative split reproduced: {_md_cell(reproduced)}")
        lines += [f"- {name}: {_md_cell(value)}" for name, value in result.split.items()]
        lines.append("")
    for run in result.runs:
        if run.error:
            last = run.error.strip().splitlines()[-1]
            lines.append(f"- {run.variant} FAILED after {run.steps_completed} steps: {last}")
    lines += ["", "Definitions:"] + [f"- {k}: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"
