"""`fp4sim report --kernel` on a user's own kernels (issues 12 and 14), end to end.

Each test runs the `fp4sim report` command in a subprocess inside a temporary user project
(its own ``reference.py`` and ``kernels/``, from ``user_project``), on the smallest scenario,
and reads the written report: the per-kernel verdict, the exit code, and that a hanging or
segfaulting kernel fails only its own case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from user_project import kernel, make_user_project, run_fp4sim

from fp4sim.reports import schema

SMALL = ("--scenarios", "smoke", "--timeout", "120")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_user_project(tmp_path_factory.mktemp("user_project"))


def report(project: Path, out: str, *args: str) -> tuple[int, dict, str, str]:
    """Run `fp4sim report` there; (exit code, report.json, summary.md, stderr)."""
    done = run_fp4sim(project, "report", "--out", out, *args)
    folder = project / out
    assert (folder / "report.json").is_file(), done.stderr
    data = json.loads((folder / "report.json").read_text())
    assert schema.validate_report(data) == []
    assert data["exit_code"] == done.returncode
    return done.returncode, data, (folder / "summary.md").read_text(), done.stderr


def verdict_of(data: dict, name: str) -> dict:
    (verdict,) = [v for v in data["verdicts"] if v["implementation"] == f"kernel:{kernel(name)}"]
    return verdict


def test_bf16_only_kernel_runs_and_a_correct_kernel_exits_0(project: Path) -> None:
    code, data, md, err = report(
        project, "bf16", *SMALL, "--recipes", "bf16", "--kernel", kernel("bf16_only"),
        "--kernel-dtype", "bfloat16",
    )
    assert code == 0, err
    (case,) = [c for c in data["cases"] if c["implementation_kind"] == "external"]
    assert case["status"] == "ok" and case["rule"]["agrees"] and case["rule"]["dtype"] == "bfloat16"
    verdict = verdict_of(data, "bf16_only")
    assert verdict["passed"] and (verdict["agree"], verdict["of"]) == (1, 1)
    assert verdict["statistics"]["tensors"]["O"]["rows"] == 32  # Lq of the smoke scenario
    assert "PASS" in md and "agrees with recipe bf16" in md


def test_unquantized_kernel_claiming_attn_qat_fails_with_a_verdict(project: Path) -> None:
    # it matches bf16, which runs too, but it claims attn-qat (added to the recipes run)
    code, data, md, err = report(
        project, "unq", *SMALL, "--recipes", "bf16", "--kernel", kernel("unquantized"),
        "--claims", "attn-qat",
    )
    assert code == 1
    # the progress line never says "ok" next to a disagreement
    progress = [x for x in err.splitlines() if kernel("unquantized") in x and " x attn-qat x " in x]
    assert progress and all("ran, DISAGREES with the recipe" in x for x in progress), progress
    assert not any(": ok" in x for x in progress), progress
    assert data["settings"]["recipes"] == ["bf16", "attn-qat"]
    verdict = verdict_of(data, "unquantized")
    assert (verdict["recipe"], verdict["basis"], verdict["passed"]) == (
        "attn-qat", "claimed", False
    )
    assert verdict["agrees_instead"] == ["bf16"]
    findings = md.split("### Findings", 1)[1]
    line = next(x for x in findings.splitlines() if "FAIL" in x)
    assert kernel("unquantized") in line and "disagrees with its claimed recipe attn-qat" in line
    assert "worst case: smoke" in findings
    # not ranked as a recipe's own variant: marked with its agreement count instead
    ranked = [x for x in md.splitlines() if x.startswith("|") and kernel("unquantized") in x]
    assert any("attn-qat" in x and "✗ 0/1" in x for x in ranked)
    assert not any("attn-qat" in x and "★" in x for x in ranked)


def test_nan_kernel_exits_1(project: Path) -> None:
    code, data, md, _ = report(project, "nan", *SMALL, "--recipes", "bf16",
                               "--kernel", kernel("nan"))
    assert code == 1
    verdict = verdict_of(data, "nan")
    assert verdict["nonfinite_scenarios"] == ["smoke"] and not verdict["passed"]
    assert "NaN/Inf where the reference is finite" in md


def test_hanging_and_segfaulting_kernels_fail_only_their_cases(project: Path) -> None:
    code, data, md, err = report(
        project, "faults", "--scenarios", "smoke", "--recipes", "bf16", "--timeout", "5",
        "--kernel", kernel("hang"), "--kernel", kernel("segfault"),
        "--kernel", kernel("unquantized"),
    )
    assert code == 1, err
    cases = {c["implementation"]: c for c in data["cases"]}
    hang = cases[f"kernel:{kernel('hang')}"]
    segv = cases[f"kernel:{kernel('segfault')}"]
    assert hang["status"] == "error" and hang["failure"] == "timed out after 5 s"
    assert segv["status"] == "error" and segv["failure"].startswith("crashed with signal 11")
    assert "timed out after 5 s" in md and "crashed with signal 11" in md
    good = verdict_of(data, "unquantized")
    assert good["passed"] and good["recipe"] == "bf16" and (good["agree"], good["of"]) == (1, 1)
    assert not verdict_of(data, "hang")["passed"] and not verdict_of(data, "segfault")["passed"]
    page = (project / "faults" / "index.html").read_text()
    assert "timed out after 5 s" in page and "crashed with signal 11" in page
