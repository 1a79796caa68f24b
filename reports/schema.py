"""The structure of ``report.json``, checked with plain Python (no schema library).

``validate_report(report)`` returns a list of problems (empty when valid);
``assert_valid_report`` raises :class:`ReportSchemaError` listing them. The checks are
structural (keys, types, list lengths) plus a few internal consistencies: histogram
counts add up to their total, every case names a known scenario and recipe, and a case
that is ``ok`` carries its forward comparison, its gradients and (for the reference)
its diagnostics.

Layout (``SCHEMA_VERSION`` 3; 2 added ``verdicts``, ``settings.kernels`` and a case's
``rule``; 3 added the second ground truth ``ste_tiled`` (``vs_ste_tiled`` comparisons,
``settings.ground_truths``), ``summary.actions``, ``summary.identities``, the analysed
tables ``summary.variant_errors`` and ``summary.forward``, and renamed a case's
``d_identity`` to ``ds_rowsum``)::

    schema_version: int, tool: str, created_utc: str, exit_code: int
    versions: {python, numpy, torch, triton?, matplotlib, fp4sim, platform}
    settings: {seed, device, preset, recipes[], scenarios[], implementations[], variants[],
               fail_on[], element_guard_eps, log10_edges[], quantiles[],
               kernels[{name, kind, target, dtype, claims, spec{}, untested[]}]}
    scenarios: {name: {name, description, distribution, spec{}, shape{}, tags[], seed{}}}
    cases: [{scenario, recipe, implementation, implementation_kind, status, error, seconds,
             forward{o_vs_exact, o_hp_vs_exact, o_vs_recipe_reference},
             gradients{variant: {error, dq/dk/dv: {vs_exact, vs_ste?, vs_ste_tiled?,
                        vs_recipe_variant?}}},
             ds_rowsum{variant: {max_abs, rms, relative_to_d}} (row sums of the variant's dS),
             diagnostics{tensors{q,k,v}, p{...}, reference_diagnostics{}} | null,
             recipe_backward, rule? (external kernels: {agrees, dtype, nonfinite,
             tensors[{name, ok, worst_error, bound, ratio, ...}], worst_tensor, worst_ratio}),
             failure? (a worker's "timed out after N s" / "crashed with signal 11 ...")}]
    comparison (vs_*, o_*): {metrics{relative_l2, relative_l1, rmse, max_abs, cosine,
             norm_ratio}, element_relative_error: distribution, row_relative_error: distribution}
    distribution: {mean, max, quantiles{p50, p90, p99, p99.9}, histogram{counts[] (bins of
             settings.log10_edges), underflow, overflow, nan, total}}
    summary: {ranking[], findings[], actions[{severity, text}], identities[],
              variant_errors[], forward[]}, thresholds: [], errors: [],
    timing: {compute_seconds, scenario_seconds{}, ranks, rank_seconds[], gather_seconds,
             analysis_seconds}
    verdicts: [{implementation, target, dtype, recipe, basis ("claimed" | "best match"),
             agree, of, agrees, passed, nonfinite_scenarios[], worst, causes[],
             statistics (reports.error_statistics) | null, headline, points[], text}]
    statistics_assumptions: [str]
"""

from __future__ import annotations

from typing import Any

from fp4sim.reports.metrics import LOG10_EDGES, QUANTILES, SCALAR_METRICS

SCHEMA_VERSION = 3
CASE_STATUSES = ("ok", "error", "skipped")
GRAD_NAMES = ("dq", "dk", "dv")
NUMBER = (int, float)
VERDICT_KEYS = (
    "implementation",
    "recipe",
    "basis",
    "agree",
    "of",
    "agrees",
    "passed",
    "nonfinite_scenarios",
    "worst",
    "causes",
    "statistics",
    "text",
)


class ReportSchemaError(ValueError):
    """report.json does not have the documented structure."""


def problem_line(error: str | None) -> str:
    """The line of a failed case's ``error`` that names its problem: a traceback's last line
    (its message), else the first ("kernel timed out after 5 s", "crashed with signal 11")."""
    lines = (error or "").strip().splitlines()
    if not lines:
        return "failed"
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def dict_keys(self, obj: Any, path: str, keys: tuple[str, ...]) -> bool:
        if not isinstance(obj, dict):
            self.fail(path, f"expected an object, got {type(obj).__name__}")
            return False
        missing = [k for k in keys if k not in obj]
        if missing:
            self.fail(path, f"missing keys {missing}")
            return False
        return True

    def typed(
        self, value: Any, path: str, types: tuple[type, ...] | type, nullable: bool = False
    ) -> bool:
        if value is None and nullable:
            return True
        if isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)
        ):
            self.fail(path, f"expected {types}, got bool")
            return False
        if not isinstance(value, types):
            self.fail(path, f"expected {types}, got {type(value).__name__}")
            return False
        return True

    def str_list(self, value: Any, path: str) -> None:
        if self.typed(value, path, list):
            for i, item in enumerate(value):
                self.typed(item, f"{path}[{i}]", str)

    # -- pieces ---------------------------------------------------------------------------
    def histogram(self, h: Any, path: str) -> None:
        if not self.dict_keys(h, path, ("counts", "underflow", "overflow", "nan", "total")):
            return
        if not self.typed(h["counts"], path + ".counts", list):
            return
        if len(h["counts"]) != len(LOG10_EDGES) - 1:
            self.fail(path, "counts must have one entry fewer than settings.log10_edges")
        for key in ("underflow", "overflow", "nan", "total"):
            self.typed(h[key], f"{path}.{key}", int)
        if all(isinstance(c, int) for c in h["counts"]) and all(
            isinstance(h[k], int) for k in ("underflow", "overflow", "nan", "total")
        ):
            counted = sum(h["counts"]) + h["underflow"] + h["overflow"] + h["nan"]
            if counted != h["total"]:
                self.fail(path, f"counts add up to {counted}, total is {h['total']}")

    def distribution(self, d: Any, path: str) -> None:
        if not self.dict_keys(d, path, ("mean", "max", "quantiles", "histogram")):
            return
        self.typed(d["mean"], path + ".mean", NUMBER, nullable=True)
        self.typed(d["max"], path + ".max", NUMBER, nullable=True)
        keys = tuple(f"p{q * 100:g}" for q in QUANTILES)
        if self.dict_keys(d["quantiles"], path + ".quantiles", keys):
            for k in keys:
                self.typed(d["quantiles"][k], f"{path}.quantiles.{k}", NUMBER, nullable=True)
        self.histogram(d["histogram"], path + ".histogram")

    def comparison(self, c: Any, path: str) -> None:
        if not self.dict_keys(c, path, ("metrics", "element_relative_error", "row_relative_error")):
            return
        if self.dict_keys(c["metrics"], path + ".metrics", SCALAR_METRICS):
            for name in SCALAR_METRICS:
                # null stands for a non-finite value (strict JSON has no inf/nan)
                self.typed(c["metrics"][name], f"{path}.metrics.{name}", NUMBER, nullable=True)
        self.distribution(c["element_relative_error"], path + ".element_relative_error")
        self.distribution(c["row_relative_error"], path + ".row_relative_error")

    def case(
        self, case: Any, path: str, scenarios: dict[str, Any], settings: dict[str, Any]
    ) -> None:
        base = (
            "scenario",
            "recipe",
            "implementation",
            "implementation_kind",
            "status",
            "error",
            "seconds",
        )
        if not self.dict_keys(case, path, base):
            return
        if case["scenario"] not in scenarios:
            self.fail(path, f"unknown scenario {case['scenario']!r}")
        if case["recipe"] not in settings.get("recipes", []):
            self.fail(path, f"recipe {case['recipe']!r} not in settings.recipes")
        if case["implementation"] not in settings.get("implementations", []):
            self.fail(
                path, f"implementation {case['implementation']!r} not in settings.implementations"
            )
        if case["status"] not in CASE_STATUSES:
            self.fail(path, f"status must be one of {CASE_STATUSES}")
        self.typed(case["error"], path + ".error", str, nullable=True)
        if case["status"] == "error" and not case["error"]:
            self.fail(path, "an error case must carry its traceback in 'error'")
        self.typed(case["seconds"], path + ".seconds", NUMBER)
        if case["status"] != "ok":
            return
        if not self.dict_keys(
            case, path, ("forward", "gradients", "ds_rowsum", "diagnostics", "recipe_backward")
        ):
            return
        fwd = case["forward"]
        if self.dict_keys(
            fwd, path + ".forward", ("o_vs_exact", "o_hp_vs_exact", "o_vs_recipe_reference")
        ):
            self.comparison(fwd["o_vs_exact"], path + ".forward.o_vs_exact")
            for key in ("o_hp_vs_exact", "o_vs_recipe_reference"):
                if fwd[key] is not None:
                    self.comparison(fwd[key], f"{path}.forward.{key}")
        if self.typed(case["gradients"], path + ".gradients", dict):
            if not case["gradients"]:
                self.fail(path + ".gradients", "no gradients")
            for variant, block in case["gradients"].items():
                vpath = f"{path}.gradients.{variant}"
                if not self.dict_keys(block, vpath, ("error",)):
                    continue
                if block["error"] is not None:
                    self.typed(block["error"], vpath + ".error", str)
                    continue
                for g in GRAD_NAMES:
                    if self.dict_keys(block, vpath, (g,)) and self.dict_keys(
                        block[g], f"{vpath}.{g}", ("vs_exact",)
                    ):
                        for ref, cmp in block[g].items():
                            self.comparison(cmp, f"{vpath}.{g}.{ref}")
        if self.typed(case["ds_rowsum"], path + ".ds_rowsum", dict):
            for variant, stats in case["ds_rowsum"].items():
                if self.dict_keys(
                    stats, f"{path}.ds_rowsum.{variant}", ("max_abs", "rms", "relative_to_d")
                ):
                    for k in ("max_abs", "rms", "relative_to_d"):
                        self.typed(
                            stats[k], f"{path}.ds_rowsum.{variant}.{k}", NUMBER, nullable=True
                        )
        diag = case["diagnostics"]
        if case["implementation_kind"] == "reference":
            if self.dict_keys(
                diag, path + ".diagnostics", ("tensors", "p", "reference_diagnostics")
            ):
                for name, stats in diag["tensors"].items():
                    if stats is None:
                        continue
                    tpath = f"{path}.diagnostics.tensors.{name}"
                    keys = (
                        "code_counts",
                        "scale_byte_counts",
                        "saturated_elements",
                        "flushed_blocks",
                        "elements",
                        "blocks",
                    )
                    if self.dict_keys(stats, tpath, keys):
                        if (
                            len(stats["code_counts"]) != 16
                            or sum(stats["code_counts"]) != stats["elements"]
                        ):
                            self.fail(
                                tpath, "code_counts must have 16 entries adding up to elements"
                            )
                        if (
                            len(stats["scale_byte_counts"]) != 256
                            or sum(stats["scale_byte_counts"]) != stats["blocks"]
                        ):
                            self.fail(
                                tpath, "scale_byte_counts must have 256 entries adding up to blocks"
                            )
                self.dict_keys(
                    diag["p"],
                    path + ".diagnostics.p",
                    (
                        "mass_kept_forward",
                        "mass_kept_backward",
                        "code_mismatch_rate",
                        "code_counts",
                    ),
                )


def validate_report(report: Any) -> list[str]:
    """Problems found in ``report`` (a parsed report.json); empty when it is valid."""
    ck = _Checker()
    top = (
        "schema_version",
        "tool",
        "created_utc",
        "exit_code",
        "versions",
        "settings",
        "scenarios",
        "cases",
        "summary",
        "thresholds",
        "errors",
        "timing",
        "verdicts",
    )
    if not isinstance(report, dict):
        ck.fail("report", f"expected an object, got {type(report).__name__}")
        return ck.problems
    ck.dict_keys(report, "report", top)  # a missing part is reported; the rest is still checked
    _empty: dict[str, Any] = {}
    report = {
        "versions": _empty,
        "settings": _empty,
        "scenarios": _empty,
        "cases": [],
        "summary": {"ranking": [], "findings": [], "actions": [], "identities": []},
        "thresholds": [],
        "errors": [],
        "verdicts": [],
        "schema_version": SCHEMA_VERSION,
        "exit_code": 0,
        **report,
    }
    if report["schema_version"] != SCHEMA_VERSION:
        ck.fail("report.schema_version", f"expected {SCHEMA_VERSION}")
    ck.typed(report["exit_code"], "report.exit_code", int)
    if ck.dict_keys(
        report["versions"],
        "report.versions",
        ("python", "numpy", "torch", "matplotlib", "fp4sim", "platform"),
    ):
        for k, v in report["versions"].items():
            ck.typed(v, f"report.versions.{k}", str, nullable=True)
    settings = report["settings"]
    skeys = (
        "seed",
        "device",
        "preset",
        "recipes",
        "scenarios",
        "implementations",
        "variants",
        "fail_on",
        "element_guard_eps",
        "log10_edges",
        "quantiles",
    )
    if not ck.dict_keys(settings, "report.settings", skeys):
        return ck.problems
    ck.typed(settings["seed"], "report.settings.seed", int)
    for key in ("recipes", "scenarios", "implementations", "variants", "fail_on"):
        ck.str_list(settings[key], f"report.settings.{key}")
    scenarios = report["scenarios"]
    if ck.typed(scenarios, "report.scenarios", dict):
        for name, sc in scenarios.items():
            if ck.dict_keys(
                sc,
                f"report.scenarios.{name}",
                ("name", "description", "distribution", "spec", "shape", "tags", "seed"),
            ):
                if sc["name"] != name:
                    ck.fail(f"report.scenarios.{name}", "name does not match its key")
        if list(scenarios) != list(settings["scenarios"]):
            ck.fail("report.scenarios", "keys differ from settings.scenarios")
    if ck.typed(report["cases"], "report.cases", list):
        for i, case in enumerate(report["cases"]):
            ck.case(
                case,
                f"report.cases[{i}]",
                scenarios if isinstance(scenarios, dict) else {},
                settings,
            )
        expected = (
            len(settings["scenarios"]) * len(settings["recipes"]) * len(settings["implementations"])
        )
        if len(report["cases"]) != expected:
            ck.fail(
                "report.cases",
                f"{len(report['cases'])} cases, expected scenarios x recipes x "
                f"implementations = {expected}",
            )
    if ck.dict_keys(
        report["summary"], "report.summary", ("ranking", "findings", "actions", "identities")
    ):
        for i, a in enumerate(report["summary"]["actions"]):
            if ck.dict_keys(a, f"report.summary.actions[{i}]", ("severity", "text")):
                if a["severity"] not in ("bad", "warn"):
                    ck.fail(f"report.summary.actions[{i}]", "severity must be bad or warn")
        for i, row in enumerate(report["summary"]["ranking"]):
            ck.dict_keys(
                row,
                f"report.summary.ranking[{i}]",
                (
                    "rank",
                    "recipe",
                    "implementation",
                    "variant",
                    "grad_vs_ste_geomean",
                    "grad_vs_ste_tiled_geomean",
                    "grad_vs_exact_geomean",
                    "fwd_rel_l2_median",
                ),
            )
        for i, f in enumerate(report["summary"]["findings"]):
            if ck.dict_keys(f, f"report.summary.findings[{i}]", ("id", "text")):
                ck.typed(f["text"], f"report.summary.findings[{i}].text", str)
    if ck.typed(report["thresholds"], "report.thresholds", list):
        for i, t in enumerate(report["thresholds"]):
            ck.dict_keys(
                t,
                f"report.thresholds[{i}]",
                ("threshold", "metric", "op", "bound", "worst_value", "worst_case", "passed"),
            )
    ck.typed(report["errors"], "report.errors", list)
    if ck.typed(report["verdicts"], "report.verdicts", list):
        kernels = {
            k.get("name") for k in settings.get("kernels") or [] if isinstance(k, dict)
        }
        for i, v in enumerate(report["verdicts"]):
            vpath = f"report.verdicts[{i}]"
            if not ck.dict_keys(v, vpath, VERDICT_KEYS):
                continue
            if v["implementation"] not in kernels:
                ck.fail(vpath, f"{v['implementation']!r} is not in settings.kernels")
            if v["recipe"] not in settings["recipes"]:
                ck.fail(vpath, f"recipe {v['recipe']!r} not in settings.recipes")
            for key in ("agree", "of"):
                ck.typed(v[key], f"{vpath}.{key}", int)
            for key in ("agrees", "passed"):
                ck.typed(v[key], f"{vpath}.{key}", bool)
            if isinstance(v["agree"], int) and isinstance(v["of"], int) and v["agree"] > v["of"]:
                ck.fail(vpath, "agree exceeds of")
            if v["passed"] is True and (v["agrees"] is not True or v["nonfinite_scenarios"]):
                ck.fail(vpath, "passed although it disagrees or returns NaN/Inf")
            ck.typed(v["text"], f"{vpath}.text", str)
    return ck.problems


def assert_valid_report(report: Any) -> None:
    problems = validate_report(report)
    if problems:
        shown = "\n  ".join(problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ReportSchemaError(f"report.json is not schema-valid:\n  {shown}{more}")
