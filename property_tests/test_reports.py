"""`fp4sim report`: numbers against direct computations, schema, thresholds, HTML, output folder.

One small report (three tiny scenarios × two recipes) is computed once per module; the
tests recompute its numbers directly from the scenario's regenerated inputs with torch
and the reference (not with reports.metrics), so a wrong metric, a mixed-up reference
or a stale input shows up as a mismatch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fp4sim import reference
from fp4sim.cli import main as fp4sim_main
from fp4sim.publish import folder as output
from fp4sim.reports import identities, metrics, runner, schema, summary
from fp4sim.reports.scenarios import (
    ALL_SCENARIOS,
    FULL_SCENARIOS,
    QUICK_SCENARIOS,
    get_scenario,
    scenario_inputs,
)

SEED = 3
SCENARIOS = ("smoke", "smoke-key-bias", "smoke-causal", "smoke-long-rows")
RECIPES = ("attn-qat", "attn-qat-consistent")


def run_cli(*args: str) -> int:
    return fp4sim_main(["report", *args])


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    out = tmp_path_factory.mktemp("reports") / "small"
    code = run_cli(
        "--out",
        str(out),
        "--seed",
        str(SEED),
        "--scenarios",
        *SCENARIOS,
        "--recipes",
        *RECIPES,
        "--fail-on",
        "fwd_rel_l2<=10",
        "--fail-on",
        "fwd_cosine>=0.5",
    )
    report = json.loads((out / "report.json").read_text())
    return out, report, code


def case_of(report: dict, scenario: str, recipe: str, implementation: str = "reference") -> dict:
    matches = [
        c
        for c in report["cases"]
        if (c["scenario"], c["recipe"], c["implementation"]) == (scenario, recipe, implementation)
    ]
    assert len(matches) == 1, (scenario, recipe, implementation)
    return matches[0]


def direct_run(scenario_name: str, recipe: str, seed: int = SEED):
    """Inputs, FP4 forward, exact output and gradient, recomputed outside the report."""
    scenario = get_scenario(scenario_name)
    q, k, v, do = (torch.from_numpy(a) for a in scenario_inputs(scenario, seed))
    sm = 1.0 / math.sqrt(scenario.spec.head_dim)
    fwd = reference.fp4_attention_forward(
        q, k, v, recipe, causal=scenario.causal, sm_scale=sm, mode="tiled", diagnostics=True
    )
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    o64 = reference.attention_exact(q64, k64, v64, causal=scenario.causal, sm_scale=sm)
    exact_grads = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    return scenario, (q, k, v, do), sm, fwd, o64.detach(), exact_grads


def rel_l2(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.double(), r.double()
    return float(torch.linalg.vector_norm(a - r) / torch.linalg.vector_norm(r))


def close(actual: float, expected: float, rtol: float = 1e-9, atol: float = 1e-15) -> bool:
    return abs(actual - expected) <= atol + rtol * abs(expected)


# ---------------------------------------------------------------------------------------
# metrics on hand-made cases
# ---------------------------------------------------------------------------------------


def test_scalar_metrics_by_hand():
    a = np.array([1.0, 2.0, 2.0])
    r = np.array([1.0, 2.0, 4.0])
    m = metrics.error_metrics(a, r)
    assert m["relative_l2"] == pytest.approx(2.0 / math.sqrt(21.0), rel=1e-15)
    assert m["relative_l1"] == pytest.approx(2.0 / 7.0, rel=1e-15)
    assert m["rmse"] == pytest.approx(math.sqrt(4.0 / 3.0), rel=1e-15)
    assert m["max_abs"] == 2.0
    assert m["cosine"] == pytest.approx(13.0 / (3.0 * math.sqrt(21.0)), rel=1e-15)
    assert m["norm_ratio"] == pytest.approx(3.0 / math.sqrt(21.0), rel=1e-15)
    assert metrics.relative_l2([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert metrics.relative_l2([1.0, 0.0], [0.0, 0.0]) == math.inf
    assert metrics.cosine_similarity([0.0], [0.0]) == 1.0


def test_elementwise_guard_and_histogram():
    r = np.array([2.0, 0.0, -2.0, 2.0])  # rms 1.7320508...
    a = np.array([2.0, 1e-3, -1.0, 2.2])
    e = metrics.elementwise_relative_error(a, r)
    guard = metrics.ELEMENT_GUARD_EPS * math.sqrt(3.0)
    np.testing.assert_allclose(
        e, [0.0, 1e-3 / guard, 1.0 / (2 + guard), 0.2 / (2 + guard)], rtol=1e-12
    )
    h = metrics.log_histogram(e)
    assert h["underflow"] == 1 and h["total"] == 4 and sum(h["counts"]) == 3
    edges = np.asarray(metrics.LOG10_EDGES)
    for value in e[1:]:
        bin_index = int(np.searchsorted(edges, math.log10(value), side="right")) - 1
        assert h["counts"][bin_index] >= 1
    rows = metrics.row_relative_error(
        np.array([[1.0, 0.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 5.0]])
    )
    norms = np.array([1.0, 5.0])
    guard_rows = metrics.ELEMENT_GUARD_EPS * math.sqrt(np.mean(norms**2))
    np.testing.assert_allclose(rows, [0.0, math.sqrt(10.0) / (5.0 + guard_rows)], rtol=1e-12)


# ---------------------------------------------------------------------------------------
# the small report
# ---------------------------------------------------------------------------------------


def test_small_report_exit_code_and_files(small_report):
    out, report, code = small_report
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json", "summary.md"]
    assert report["exit_code"] == 0
    assert all(c["status"] == "ok" for c in report["cases"])
    assert [t["passed"] for t in report["thresholds"]] == [True, True]
    assert not list(out.parent.glob(".small.*")), "temporary folders left behind"


def test_json_is_schema_valid_and_complete(small_report):
    _, report, _ = small_report
    assert schema.validate_report(report) == []
    assert report["settings"]["seed"] == SEED
    assert report["settings"]["scenarios"] == list(SCENARIOS)
    assert report["settings"]["recipes"] == list(RECIPES)
    assert report["versions"]["torch"] == torch.__version__
    assert len(report["cases"]) == len(SCENARIOS) * len(RECIPES)
    assert report["settings"]["ground_truths"] == ["ste_autograd", "ste_tiled"]
    truths = {"ste_autograd": "vs_ste", "ste_tiled": "vs_ste_tiled"}
    for case in report["cases"]:
        assert set(case["gradients"]) == set(report["settings"]["variants"])
        for variant, block in case["gradients"].items():
            # every variant against both ground truths (a ground truth against the other)
            expected = {"vs_exact", *(key for t, key in truths.items() if t != variant)}
            for g in ("dq", "dk", "dv"):
                assert set(block[g]) == expected, (variant, g)
    # strict JSON: no NaN/Infinity literals
    json.loads(
        (small_report[0] / "report.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"),
    )


def test_schema_rejects_broken_reports(small_report):
    _, report, _ = small_report
    broken = json.loads(json.dumps(report))
    del broken["cases"][0]["forward"]["o_vs_exact"]["metrics"]["cosine"]
    broken["cases"][1]["forward"]["o_vs_exact"]["row_relative_error"]["histogram"]["total"] += 1
    broken["cases"][2]["scenario"] = "nope"
    del broken["versions"]
    problems = schema.validate_report(broken)
    assert any("cosine" in p for p in problems)
    assert any("add up" in p for p in problems)
    assert any("unknown scenario" in p for p in problems)
    assert any("missing keys ['versions']" in p for p in problems)
    with pytest.raises(schema.ReportSchemaError):
        schema.assert_valid_report(broken)


@pytest.mark.parametrize("scenario_name", ["smoke", "smoke-causal"])
def test_forward_numbers_match_direct_computation(small_report, scenario_name):
    _, report, _ = small_report
    _, _, _, fwd, o_exact, _ = direct_run(scenario_name, "attn-qat")
    got = case_of(report, scenario_name, "attn-qat")["forward"]["o_vs_exact"]
    o, r = fwd.o.double(), o_exact
    assert close(got["metrics"]["relative_l2"], rel_l2(o, r))
    assert close(got["metrics"]["max_abs"], float((o - r).abs().max()))
    assert close(got["metrics"]["rmse"], float((o - r).pow(2).mean().sqrt()))
    cosine = float((o * r).sum() / (torch.linalg.vector_norm(o) * torch.linalg.vector_norm(r)))
    assert close(got["metrics"]["cosine"], cosine)
    # the per-element distribution: guard eps * rms(ref), fixed log10 bins
    err = ((o - r).abs() / (r.abs() + 1e-3 * r.pow(2).mean().sqrt())).flatten().numpy()
    counts, _ = np.histogram(np.log10(err[err > 0]), bins=np.linspace(-8, 2, 41))
    hist = got["element_relative_error"]["histogram"]
    assert hist["counts"] == counts.tolist()
    assert hist["underflow"] == int((err == 0).sum() + (np.log10(err[err > 0]) < -8).sum())
    assert close(got["element_relative_error"]["quantiles"]["p99"], float(np.quantile(err, 0.99)))
    assert close(got["element_relative_error"]["max"], float(err.max()))


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradient_numbers_match_direct_computation(small_report, recipe):
    _, report, _ = small_report
    scenario, (q, k, v, do), sm, fwd, _, exact_grads = direct_run("smoke-key-bias", recipe)
    ste, tiled = (
        reference.attention_backward(
            truth, fwd, q, k, v, do, recipe, causal=scenario.causal, sm_scale=sm
        )
        for truth in ("ste_autograd", "ste_tiled")
    )
    case = case_of(report, "smoke-key-bias", recipe)
    for variant in ("drop_in", "attn_qat", "o_only"):
        grads = reference.attention_backward(
            variant, fwd, q, k, v, do, recipe, causal=scenario.causal, sm_scale=sm
        )
        for i, name in enumerate(("dq", "dk", "dv")):
            block = case["gradients"][variant][name]
            for key, truth in (("vs_ste", ste), ("vs_ste_tiled", tiled)):
                assert close(
                    block[key]["metrics"]["relative_l2"],
                    rel_l2(grads[i], truth[i]),
                    rtol=1e-7,
                    atol=1e-12,
                ), (variant, name, key)
            assert close(
                block["vs_exact"]["metrics"]["relative_l2"],
                rel_l2(grads[i], exact_grads[i]),
                rtol=1e-7,
            ), (variant, name)


def _rowsum_ds_float64(variant, fwd, q, k, v, do, causal, sm):
    """rowsum(dS) from the formulas of docs/attention-math.md, in float64, written here
    independently of the reference's backward: P = exp(S - LSE) with S from Q^, K^ (not for
    drop-in), dP = dO V^T (V^ for the QAT variants), D = rowsum(dO * O) or rowsum(dO * O_hp)."""
    f64 = torch.float64
    quantized = variant != "drop_in"
    qs = (fwd.q_hat if quantized else q).to(f64)
    ks = (fwd.k_hat if quantized else k).to(f64)
    vs = (fwd.v_hat if quantized else v).to(f64)
    s = sm * qs @ ks.transpose(-1, -2)
    if causal:
        lq, lk = s.shape[-2:]
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~visible, -math.inf)
    p = torch.exp(s - fwd.lse.to(f64).unsqueeze(-1))
    o_used = fwd.o_hp if variant in ("p_only", "attn_qat") else fwd.o
    d_row = (do.to(f64) * o_used.to(f64)).sum(-1, keepdim=True)
    ds = p * (do.to(f64) @ vs.transpose(-1, -2) - d_row)
    return ds.sum(-1)


def test_ds_rowsum_matches_an_independent_float64_recomputation(small_report):
    """The report's rowsum(dS) (from the reference's own dS) vs the formulas in float64."""
    _, report, _ = small_report
    scenario, (q, k, v, do), sm, fwd, o_exact, _ = direct_run("smoke-key-bias", "attn-qat")
    d_rms = float((do.double() * o_exact).sum(-1).pow(2).mean().sqrt())
    case = case_of(report, "smoke-key-bias", "attn-qat")
    for variant in ("drop_in", "o_only", "attn_qat"):
        residual = _rowsum_ds_float64(variant, fwd, q, k, v, do, scenario.causal, sm)
        rms = float(residual.pow(2).mean().sqrt())
        got = case["ds_rowsum"][variant]
        # float32 dS against float64: a few ulps of float32 of the row's |P dP| sums
        assert got["rms"] == pytest.approx(rms, rel=1e-4, abs=1e-6), variant
        assert got["relative_to_d"] == pytest.approx(rms / d_rms, rel=1e-4, abs=1e-6), variant
    # the identity: D from O_hp makes the row sums vanish, D from O does not
    assert case["ds_rowsum"]["attn_qat"]["relative_to_d"] < 1e-5
    assert case["ds_rowsum"]["drop_in"]["relative_to_d"] > 1e-2


def test_diagnostics_match_the_reference_forward(small_report):
    _, report, _ = small_report
    _, (q, _, _, _), _, fwd, _, _ = direct_run("smoke", "attn-qat")
    diag = case_of(report, "smoke", "attn-qat")["diagnostics"]
    raw = fwd.diagnostics
    assert diag["p"]["mass_kept_forward"] == raw["p_mass_kept_fwd"]
    assert diag["p"]["mass_kept_backward"] == raw["p_mass_kept_bwd"]
    assert diag["p"]["code_mismatch_rate"] == raw["p_code_mismatch_rate"]
    assert diag["p"]["code_counts"] == raw["p_code_histogram"]
    for name in ("q", "k", "v"):
        assert diag["tensors"][name]["code_counts"] == raw[f"{name}_code_histogram"], name
        assert diag["tensors"][name]["saturated_elements"] == raw[f"{name}_saturated"]
        assert diag["tensors"][name]["flushed_blocks"] == raw[f"{name}_flushed_blocks"]
    assert diag["tensors"]["q"]["elements"] == q.numel()
    assert diag["tensors"]["q"]["blocks"] == q.numel() // 16


def test_thresholds_ranking_and_findings_follow_the_cases(small_report):
    _, report, _ = small_report
    ok = report["cases"]
    worst_fwd = max(c["forward"]["o_vs_exact"]["metrics"]["relative_l2"] for c in ok)
    assert report["thresholds"][0]["worst_value"] == worst_fwd
    worst_cos = min(c["forward"]["o_vs_exact"]["metrics"]["cosine"] for c in ok)
    assert report["thresholds"][1]["worst_value"] == worst_cos
    for row in report["summary"]["ranking"]:
        cases = [c for c in ok if c["recipe"] == row["recipe"]]
        if row["is_ground_truth"]:
            assert row["rank"] is None
            continue
        errs = [
            max(
                c["gradients"][row["variant"]][g]["vs_ste"]["metrics"]["relative_l2"]
                for g in ("dq", "dk", "dv")
            )
            for c in cases
        ]
        geo = math.exp(sum(math.log(max(e, 1e-12)) for e in errs) / len(errs))
        assert row["grad_vs_ste_geomean"] == pytest.approx(geo, rel=1e-12)
        assert row["grad_vs_ste_worst"] == max(errs)
    ranked = [r for r in report["summary"]["ranking"] if r["rank"] is not None]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    keys = [r["grad_vs_ste_geomean"] for r in ranked]
    assert keys == sorted(keys)
    md = (small_report[0] / "summary.md").read_text()
    assert "| rank |" in md
    for finding in report["summary"]["findings"]:
        for sentence in finding.get("points") or [finding["text"]]:
            assert sentence in md


def _vs(case: dict, variant: str, tensor: str, key: str = "vs_ste") -> float:
    return case["gradients"][variant][tensor][key]["metrics"]["relative_l2"]


def test_principle_finding_is_computed_from_the_cases(small_report):
    _, report, _ = small_report
    principle = next(f for f in report["summary"]["findings"] if f["id"] == "principles")
    stressed = {"smoke-key-bias", "smoke-long-rows"}
    assert {(r["scenario"], r["recipe"]) for r in principle["rows"]} == {
        (s, r) for s in stressed | {"smoke"} for r in RECIPES
    }
    for recipe in RECIPES:
        rows = []
        for scenario in sorted(stressed):
            case = case_of(report, scenario, recipe)
            drop = max(_vs(case, "drop_in", t, "vs_ste_tiled") for t in ("dq", "dk"))
            qat = max(_vs(case, "attn_qat", t, "vs_ste_tiled") for t in ("dq", "dk"))
            rows.append((drop, qat, scenario))
            # against the default ground truth Attn-QAT's dQ, dK are the same formula
            assert max(_vs(case, "attn_qat", t) for t in ("dq", "dk")) < 4e-6
        worst = max(rows)
        assert f"drop-in up to {worst[0]:.3g} on {worst[2]}" in principle["text"]
        # the evidence, against ste_tiled: on the key-bias case drop-in is far, Attn-QAT close
        drop, qat, _ = next(r for r in rows if r[2] == "smoke-key-bias")
        assert drop >= 3 * qat, (recipe, drop, qat)
    # the identity is stated as one, never as "stays close"
    assert "equal it by construction" in principle["text"]
    assert "stays at most" not in principle["text"]
    assert principle["holds"] is True


def test_identities_are_detected_and_a_broken_one_is_flagged(small_report):
    _, report, _ = small_report
    rows = report["summary"]["identities"]

    def kinds(recipe, variant, truth, tensor):
        return {r["kind"] for r in rows if (r["recipe"], r["variant"], r["ground_truth"],
                                            r["tensor"]) == (recipe, variant, truth, tensor)}

    for recipe in RECIPES:
        for tensor in ("dq", "dk"):
            assert kinds(recipe, "attn_qat", "ste_autograd", tensor) == {"identity"}
            assert kinds(recipe, "attn_qat", "ste_tiled", tensor) == set()  # evidence
        assert kinds(recipe, "ste_tiled", "ste_autograd", "dv") == {"identity"}
    # dV of attn_qat is the forward's P~ only under the consistent policy
    assert kinds("attn-qat-consistent", "attn_qat", "ste_autograd", "dv") == {"identity"}
    assert kinds("attn-qat", "attn_qat", "ste_autograd", "dv") == set()
    assert not any(r["kind"] == "broken" for r in rows)
    assert report["summary"]["actions"] == [] or all(
        "BROKEN" not in a["text"] for a in report["summary"]["actions"]
    )
    # a known identity that measures apart is a broken identity, and an action
    cases = json.loads(json.dumps(report["cases"]))
    case = next(c for c in cases if (c["scenario"], c["recipe"]) == ("smoke", "attn-qat"))
    case["gradients"]["attn_qat"]["dq"]["vs_ste"]["metrics"]["relative_l2"] = 1e-3
    broken = identities.identities(cases, summary.GROUND_TRUTHS)
    assert [r["kind"] for r in broken if r["relative_l2"] == 1e-3] == ["broken"]
    finding = summary.truths_finding(cases, broken)
    assert finding["holds"] is False and "BROKEN identity" in finding["text"]
    actions = summary.actions(cases, [finding], [], [])
    assert any("BROKEN identity" in a["text"] for a in actions)
    # an unexplained equality is not an identity
    assert identities.classify(None, 1e-9) == "numerically_equal"
    assert identities.classify("reason", 1e-9) == "identity"
    assert identities.classify("reason", 1e-2) == "broken"
    assert identities.classify(None, 1e-2) is None


def test_ranking_and_summary_show_both_ground_truths(small_report):
    out, report, _ = small_report
    rows = {(r["recipe"], r["variant"]): r for r in report["summary"]["ranking"]}
    assert rows[("attn-qat", "ste_autograd")]["rank"] is None
    assert rows[("attn-qat", "ste_tiled")]["rank"] is None
    qat = rows[("attn-qat-consistent", "attn_qat")]
    assert qat["identity_ste"] == ["dk", "dq", "dv"]  # the consistent policy: all three
    assert qat["grad_vs_ste_tiled_geomean"] > 1e-2  # and evidence against ste_tiled
    md = (out / "summary.md").read_text()
    assert "vs ste_tiled (geomean)" in md and "(= by construction)" in md


def test_p_mass_finding_long_rows(small_report):
    _, report, _ = small_report
    finding = next(f for f in report["summary"]["findings"] if f["id"] == "p_mass")
    plain = case_of(report, "smoke-long-rows", "attn-qat")["diagnostics"]["p"]
    consistent = case_of(report, "smoke-long-rows", "attn-qat-consistent")["diagnostics"]["p"]
    assert finding["lk"] == 512
    assert f"{100 * plain['mass_kept_backward']:.1f}% in the backward" in finding["text"]
    assert f"{100 * consistent['mass_kept_backward']:.1f}% in the backward" in finding["text"]
    # P entries about 1/512 flush in the attn-qat backward; the consistent policy keeps them
    assert plain["mass_kept_forward"] > 0.9 and plain["mass_kept_backward"] < 0.5
    assert abs(consistent["mass_kept_backward"] - consistent["mass_kept_forward"]) < 1e-6
    assert finding["holds"] is True


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def test_html_parses_and_every_image_is_an_embedded_png(small_report):
    out, report, _ = small_report
    parser = _Images()
    parser.feed((out / "index.html").read_text())
    parser.close()
    assert parser.stack == []
    assert parser.external == []
    # overview figures + an error figure per case + a diagnostics figure per reference case
    assert len(parser.images) >= 3 + 2 * len(report["cases"])
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


# ---------------------------------------------------------------------------------------
# exit codes, thresholds, folders, names, crashing kernels
# ---------------------------------------------------------------------------------------


def test_fail_on_broken_exits_1_and_is_deterministic(small_report, tmp_path):
    _, report, _ = small_report
    out = tmp_path / "strict"
    code = run_cli(
        "--out",
        str(out),
        "--seed",
        str(SEED),
        "--scenarios",
        "smoke",
        "--recipes",
        "attn-qat",
        "--fail-on",
        "fwd_rel_l2<=1e-6",
    )
    assert code == 1
    strict = json.loads((out / "report.json").read_text())
    assert strict["exit_code"] == 1
    assert strict["thresholds"][0]["passed"] is False
    assert "FAIL" in (out / "summary.md").read_text()
    # the same seed gives the same numbers as the module's report
    mine = dict(case_of(strict, "smoke", "attn-qat"), seconds=None)
    theirs = dict(case_of(report, "smoke", "attn-qat"), seconds=None)
    assert mine == theirs


def _without_timing(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "seconds"}


def test_torchrun_sharded_report_equals_the_single_process_one(tmp_path):
    """`torchrun --nproc-per-node 2 -m fp4sim report` (gloo on the CPU): rank 0 writes one
    report whose cases, ranking, findings and verdicts equal the single-process run's."""
    args = ["--scenarios", "smoke", "smoke-causal", "--seed", str(SEED)]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert run_cli(*args, "--out", str(single)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "fp4sim", "report", *args, "--out", str(sharded)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((single / "report.json").read_text())
    two = json.loads((sharded / "report.json").read_text())
    assert two["timing"]["ranks"] == 2 and len(two["timing"]["rank_seconds"]) == 2
    assert "rank 1/2" in done.stderr  # the second rank computed a share
    assert len(one["cases"]) == len(two["cases"]) == 4
    for a, b in zip(one["cases"], two["cases"], strict=True):
        assert _without_timing(a) == _without_timing(b), (a["scenario"], a["recipe"])
    for key in ("ranking", "findings", "identities", "actions"):
        assert one["summary"][key] == two["summary"][key], key
    assert one["exit_code"] == two["exit_code"] == 0
    assert "compute per rank" in done.stderr and "gather and merge" in done.stderr
    # index.html embeds the same timing as report.json
    page = html.unescape((sharded / "index.html").read_text())
    for key in ("compute_seconds", "total_seconds_before_render", "gather_seconds"):
        assert f'"{key}": {two["timing"][key]}' in page, key


def test_no_overwrite_without_flag(small_report, capsys):
    out, _, _ = small_report
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_cli("--out", str(out), "--scenarios", "smoke") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_folder_rules(tmp_path):
    target = tmp_path / "r"
    files = {
        "index_html": "<html></html>",
        "report_json": {"a": 1.5, "b": float("inf")},
        "summary_md": "# s",
    }
    output.write_report_folder(target, **files)
    assert json.loads((target / "report.json").read_text()) == {"a": 1.5, "b": None}
    with pytest.raises(output.ReportFolderError, match="--overwrite"):
        output.write_report_folder(target, **files)
    output.write_report_folder(target, **{**files, "summary_md": "# new"}, overwrite=True)
    assert (target / "summary.md").read_text() == "# new"
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(output.ReportFolderError, match="does not look like"):
        output.write_report_folder(precious, **files, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["r", "work"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--scenarios", "no-such-scenario"], ["unknown scenario", "gaussian", "key-bias-4"]),
        (["--recipes", "fp3"], ["unknown recipe", "attn-qat-consistent"]),
        (["--kernel", "no_such_module_xyz:attn"], ["cannot import module", "no_such_module_xyz"]),
        (["--kernel", "fp4sim.reports.metrics:nope"], ["has no attribute", "nope"]),
        (["--kernel", "nocolon"], ["MODULE:ATTR"]),
        (["--claims", "fp3", "--kernel", "x:y"], ["--claims", "unknown recipe", "attn-qat"]),
        (["--claims", "infer-nvfp4@kv_splits=2", "--kernel", "x:y"],
         ["preset names only", "--kv-splits N"]),
        (["--claims", "infer-nvfp4@kv_split_keys=128", "--kernel", "x:y"],
         ["preset names only", "--kv-split-keys L"]),
        (["--claims", "bf16"], ["no --kernel"]),
        (["--seed", "-5"], ["--seed must be >= 0"]),
        (["--fail-on", "speed<=1"], ["unknown --fail-on metric", "grad_rel_l2_vs_ste"]),
        (["--fail-on", "fwd_rel_l2<1"], ["METRIC<=BOUND"]),
    ],
)
def test_unknown_names_exit_2_with_valid_names(tmp_path, capsys, args, expected):
    code = run_cli("--out", str(tmp_path / "x"), *args)
    err = capsys.readouterr().err
    assert code == 2
    for text in expected:
        assert text in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("out", ["/proc/fp4sim-x", "/nonexistent-fp4sim/x"])
def test_unwritable_out_exits_2_before_any_work(out, capsys):
    start = time.perf_counter()
    code = run_cli("--out", out, "--scenarios", "smoke")
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "cannot write into" in err or "does not exist" in err, err
    assert "[1/" not in err  # no case ran
    assert time.perf_counter() - start < 10


KERNEL_MODULE = """
import torch
from fp4sim import reference
def good(q, k, v, causal, sm_scale):
    return reference.fp4_attention(q, k, v, causal=causal, sm_scale=sm_scale, recipe="attn-qat")

def crashing(q, k, v, causal, sm_scale):
    raise RuntimeError("kernel exploded on purpose")
"""


def test_external_kernels_good_and_crashing(tmp_path, monkeypatch):
    (tmp_path / "my_fp4_kernels.py").write_text(textwrap.dedent(KERNEL_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "k"
    code = run_cli(
        "--out",
        str(out),
        "--scenarios",
        "smoke",
        "--recipes",
        "attn-qat",
        "--kernel",
        "my_fp4_kernels:good",
        "--kernel",
        "my_fp4_kernels:crashing",
        "--kernel-dtype",
        "float32",
        "--claims",
        "attn-qat",
        "--timeout",
        "120",
    )
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert schema.validate_report(report) == []
    good = case_of(report, "smoke", "attn-qat", "kernel:my_fp4_kernels:good")
    bad = case_of(report, "smoke", "attn-qat", "kernel:my_fp4_kernels:crashing")
    assert case_of(report, "smoke", "attn-qat")["status"] == "ok"
    assert good["status"] == "ok"
    # the reference's own autograd wrapper must match the reference forward and its backward
    assert good["forward"]["o_vs_recipe_reference"]["metrics"]["relative_l2"] <= 1e-6
    for g in ("dq", "dk", "dv"):
        assert good["gradients"]["kernel"][g]["vs_recipe_variant"]["metrics"]["relative_l2"] <= 1e-5
    assert bad["status"] == "error" and "kernel exploded on purpose" in bad["error"]
    assert "Traceback" in bad["error"]
    page = (out / "index.html").read_text()
    assert "kernel exploded on purpose" in page and "crashed" in page
    assert report["errors"][0]["implementation"] == "kernel:my_fp4_kernels:crashing"
    # the reference's own autograd wrapper agrees with its recipe under the tolerance rule
    verdicts = {v["implementation"]: v for v in report["verdicts"]}
    assert good["rule"]["agrees"] is True
    assert verdicts["kernel:my_fp4_kernels:good"]["passed"] is True
    assert verdicts["kernel:my_fp4_kernels:crashing"]["passed"] is False
    assert "kernel exploded on purpose" in verdicts["kernel:my_fp4_kernels:crashing"]["text"]


def test_scenario_sets():
    names = [s.name for s in QUICK_SCENARIOS]
    assert len(set(names)) == len(names)
    assert len({s.name for s in FULL_SCENARIOS}) == len(FULL_SCENARIOS)
    tags = {t for s in QUICK_SCENARIOS for t in s.tags}
    assert {"key_bias", "long_rows", "baseline"} <= tags
    assert any(s.causal and s.spec.lq != s.spec.lk for s in QUICK_SCENARIOS)
    assert {s.spec.head_dim for s in QUICK_SCENARIOS} >= {64, 128}
    assert {s.name for s in FULL_SCENARIOS} <= set(ALL_SCENARIOS)
    long_rows = [s for s in QUICK_SCENARIOS if "long_rows" in s.tags]
    assert max(s.spec.lk for s in long_rows) >= 1024
    a = scenario_inputs(get_scenario("smoke"), 1)
    b = scenario_inputs(get_scenario("smoke"), 1)
    c = scenario_inputs(get_scenario("smoke"), 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_threshold_parsing():
    t = summary.parse_threshold("grad_rel_l2_vs_ste@attn-qat<=0.25")
    assert (t.metric, t.op, t.bound, t.recipe) == ("grad_rel_l2_vs_ste", "<=", 0.25, "attn-qat")
    assert summary.parse_threshold("p_mass_kept_backward>=0.9").op == ">="
    cases = [
        {
            "status": "ok",
            "scenario": "s",
            "recipe": "r",
            "implementation": "reference",
            "implementation_kind": "reference",
            "diagnostics": {"p": {"mass_kept_backward": v}},
        }
        for v in (0.95, 0.2)
    ]
    result = summary.evaluate_threshold(summary.parse_threshold("p_mass_kept_backward>=0.9"), cases)
    assert result["passed"] is False and result["worst_value"] == 0.2
    result = summary.evaluate_threshold(summary.parse_threshold("p_mass_kept_backward>=0.1"), cases)
    assert result["passed"] is True


@pytest.mark.slow
def test_default_quick_report_shows_the_findings(tmp_path):
    """The embedded default (what `tox -e report` runs): both principles in numbers."""
    out = tmp_path / "default"
    assert run_cli("--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert schema.validate_report(report) == []
    findings = {f["id"]: f for f in report["summary"]["findings"]}
    assert findings["principles"]["holds"] is True
    assert findings["p_mass"]["holds"] is True


def test_inputs_file_adds_a_captured_scenario(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 16, 32)).astype(np.float32) for _ in range(3))
    np.savez(tmp_path / "acts.npz", q=q, k=k[:, :1], v=v[:, :1])  # GQA: one kv head
    out = tmp_path / "captured"
    code = run_cli(
        "--out", str(out), "--scenarios", "smoke", "--recipes", "attn-qat",
        "--inputs", str(tmp_path / "acts.npz"),
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["scenarios"] == ["smoke", "inputs:acts.npz"]
    case = case_of(report, "inputs:acts.npz", "attn-qat")
    assert case["status"] == "ok"
    # the captured q (rounded to bfloat16) is what ran: O against exact attention recomputed
    bf16 = [torch.from_numpy(a).bfloat16().double() for a in (q, k[:, :1], v[:, :1])]
    o_exact = reference.attention_exact(*bf16, causal=False, sm_scale=32**-0.5)
    fwd = reference.fp4_attention_forward(*(t.float() for t in bf16), "attn-qat", mode="tiled")
    assert close(case["forward"]["o_vs_exact"]["metrics"]["relative_l2"],
                 rel_l2(fwd.o, o_exact), rtol=1e-6)
    assert run_cli("--out", str(tmp_path / "y"), "--inputs", str(tmp_path / "none.npz")) == 2


def test_streamed_reference_gives_the_dense_numbers_to_rounding():
    """A scenario over the streaming threshold runs reference.streaming and the streaming
    metrics; on small cases every relative L2 and P-mass number equals the dense path's to
    float32 rounding: |x_stream - x_dense| <= 64 u (1 + x) (u = 2^-24: a few ulps of the
    gradient's norm, which is at most (1 + x) times the reference's)."""
    scenarios = (get_scenario("smoke-key-bias"), get_scenario("smoke-long-rows"))
    base = dict(scenarios=scenarios, recipes=("attn-qat",),
                implementations=(runner.REFERENCE,), seed=SEED)
    dense = runner.compute(runner.ReportConfig(**base), progress=lambda _m: None)
    streamed = runner.compute(
        runner.ReportConfig(**base, stream_above=0), progress=lambda _m: None
    )
    u = 2.0**-24
    checked = 0
    for a, b in zip(dense.cases, streamed.cases, strict=True):
        assert a["status"] == b["status"] == "ok"
        pairs = [(a["forward"][k], b["forward"][k]) for k in ("o_vs_exact", "o_hp_vs_exact")]
        for variant, block in a["gradients"].items():
            for g in ("dq", "dk", "dv"):
                pairs += [(cmp, b["gradients"][variant][g][ref]) for ref, cmp in block[g].items()]
        for x, y in pairs:
            xv, yv = x["metrics"]["relative_l2"], y["metrics"]["relative_l2"]
            assert abs(xv - yv) <= 64 * u * (1 + xv), (a["scenario"], xv, yv)
            checked += 1
        for key in ("mass_kept_forward", "mass_kept_backward", "code_mismatch_rate"):
            pa, pb = a["diagnostics"]["p"][key], b["diagnostics"]["p"][key]
            assert abs(pa - pb) <= 64 * u * max(abs(pa), 1.0), (a["scenario"], key, pa, pb)
    assert checked > 50
