"""`fp4sim check` exit codes, messages and reproduction scripts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import strategies as st

from fp4sim.cli import build_parser, main
from fp4sim.judge.attention import AttentionCheckConfig
from fp4sim.testing.check_driver import run_hypothesis
from fp4sim.testing.check_quantizer import QuantizerCheckConfig

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = "property_tests.mutant_kernels"


@pytest.fixture(autouse=True)
def _private_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the CLI resolves MODULE:ATTR from the current directory first, as `python -m` does, and
    # writes (or removes stale) default repro scripts there: a private folder keeps parallel
    # workers and the checkout out of each other's way; the repository root on the import path
    # (here and, through PYTHONPATH, in the check's child processes) finds the mutant kernels
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantizer", "--format", "nvfp4", "--kernel", "no_such_module:f"], "cannot import"),
        (["quantizer", "--format", "nvfp4", "--kernel", "fp4sim.testing:nothing"], "no attribute"),
        (
            ["quantizer", "--format", "nvfp4", "--kernel", "fp4sim.testing.generators:DTYPES"],
            "not callable",
        ),
        (
            ["quantizer", "--format", "nvfp4", "--kernel", "fp4sim.testing.generators"],
            "MODULE:ATTR",
        ),
        (
            ["quantizer", "--format", "nvfp4", "--kernel", f"{MUTANTS}:reference_attention"],
            "positional argument",
        ),
        (
            [
                "quantizer",
                "--format",
                "mxfp4",
                "--tensor-scale",
                "amax",
                "--kernel",
                f"{MUTANTS}:emulator_mxfp4",
            ],
            "nvfp4 only",
        ),
        (
            [
                "attention",
                "--recipe",
                "no-such-recipe",
                "--kernel",
                f"{MUTANTS}:reference_attention",
            ],
            "unknown recipe",
        ),
        (["attention", "--kernel", f"{MUTANTS}:emulator_nvfp4"], "positional argument"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert "usage error" in err and message in err, err


def test_no_target_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2


def test_correct_quantizer_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "check",
        "quantizer",
        "--format",
        "nvfp4",
        "--kernel",
        f"{MUTANTS}:emulator_nvfp4",
        "--examples",
        "30",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "OK: 30 examples agree" in captured.out
    # progress goes to stderr, so the verdict on stdout stays one clean line
    assert "fp4sim check quantizer: property_tests.mutant_kernels:emulator_nvfp4 loaded" in \
        captured.err, captured.err
    assert "examples checked" not in captured.out


def test_numpy_only_kernel_is_probed(capsys: pytest.CaptureFixture[str]) -> None:
    # emulator_mxfp4 accepts torch and numpy; --input numpy forces the NumPy path
    argv = [
        "check",
        "quantizer",
        "--format",
        "mxfp4",
        "--kernel",
        f"{MUTANTS}:emulator_mxfp4",
        "--examples",
        "10",
        "--input",
        "numpy",
    ]
    assert main(argv) == 0


def test_failure_exits_1_and_the_repro_reruns_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repro = tmp_path / "repro.py"
    argv = [
        "check",
        "quantizer",
        "--format",
        "nvfp4",
        "--kernel",
        f"{MUTANTS}:mutant_swapped_nibbles",
        "--repro-out",
        str(repro),
        "--seed",
        "3",
    ]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL after" in out and "nibble order swapped" in out and "@reproduce_failure" in out
    # the script runs standalone from another directory and reproduces the failure
    done = subprocess.run(
        [sys.executable, str(repro)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failure reproduced" in done.stderr and "nibble order swapped" in done.stderr


def test_the_kernels_claims_pick_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    """No --recipe or --claims: the recipe the kernel's fp4sim_spec claims (it was attn-qat
    whatever the spec said, so a correct infer-nvfp4 kernel failed); with --kv-splits the
    claimed recipe with those splits; a named recipe still wins."""
    base = ["check", "attention", "--kernel", f"{MUTANTS}:reference_infer_nvfp4",
            "--examples", "4", "--max-len", "24", "--head-dims", "64", "--no-system"]
    assert main(base) == 0
    assert "recipe infer-nvfp4)" in capsys.readouterr().out
    assert main([*base, "--kv-splits", "2"]) == 0  # one key tile at these lengths
    assert "recipe infer-nvfp4@kv_splits=2)" in capsys.readouterr().out
    assert main([*base, "--recipe", "attn-qat", "--shrink-seconds", "2", "--quiet"]) == 1
    assert "recipe attn-qat); " in capsys.readouterr().out  # the FAIL line names it too
    assert main([*base, "--claims", "infer-nvfp4@kv_splits=2", "--kv-splits", "3"]) == 2
    assert "give one split-KV schedule" in capsys.readouterr().err
    assert main([*base, "--kv-splits", "3", "--kv-split-keys", "128"]) == 2
    assert "--kv-splits, --kv-split-keys with the recipe" in capsys.readouterr().err
    assert main([*base, "--kv-split-keys", "100"]) == 2
    assert "multiple of block_n=64" in capsys.readouterr().err


def test_attention_failure_repro(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repro = tmp_path / "repro_attn.py"
    argv = [
        "check",
        "attention",
        "--kernel",
        f"{MUTANTS}:mutant_causal_off_by_one",
        "--causal",
        "--max-len",
        "24",
        "--head-dims",
        "64",
        "--repro-out",
        str(repro),
        "--shrink-seconds",
        "5",
    ]
    assert main(argv) == 1
    assert "causal mask off by one" in capsys.readouterr().out
    import runpy

    from fp4sim.testing.repro import rerun

    script = runpy.run_path(str(repro), run_name="not_main")  # loads CONFIG and CASE
    assert rerun("attention", script["CONFIG"], script["CASE"]) == 1


def _check_subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser("check")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    check = sub.choices["check"]
    targets = next(a for a in check._actions if isinstance(a, argparse._SubParsersAction))
    return dict(targets.choices)


@pytest.mark.parametrize("target", ["quantizer", "attention"])
def test_every_check_option_has_help_and_its_default(target: str) -> None:
    missing = []
    for action in _check_subparsers()[target]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        if "default" not in text and "(required)" not in text:
            missing.append("/".join(action.option_strings) or action.dest)
    assert not missing, f"check {target}: options without help or default: {missing}"


def test_examples_help_states_the_config_defaults() -> None:
    for target, config in (("quantizer", QuantizerCheckConfig), ("attention",
                                                                 AttentionCheckConfig)):
        action = next(a for a in _check_subparsers()[target]._actions
                      if "--examples" in a.option_strings)
        default = next(f.default for f in dataclasses.fields(config) if f.name == "examples")
        assert f"(default {default})" in action.help, (target, action.help)


def test_long_checks_print_progress() -> None:
    """Progress every N examples, and at least every few seconds: a check whose examples are
    slow is never silent; the first disagreement and the shrinking are announced."""
    lines: list[str] = []
    result = run_hypothesis(st.integers(0, 10**6), lambda x: None, examples=30, seed=0,
                            shrink_seconds=1.0, case_key=lambda x: x, log=lines.append,
                            progress_every=10, progress_seconds=1e9)
    assert result.ok and lines == [f"{n}/30 examples checked" for n in (10, 20, 30)], lines
    lines.clear()
    run_hypothesis(st.integers(0, 10**6), lambda x: None, examples=5, seed=0,
                   shrink_seconds=1.0, case_key=lambda x: x, log=lines.append,
                   progress_every=100, progress_seconds=0.0)
    assert len(lines) == 5, lines  # the time limit alone: one line per slow example
    lines.clear()
    result = run_hypothesis(st.integers(0, 10**6), lambda x: "bad" if x >= 10 else None,
                            examples=200, seed=0, shrink_seconds=5.0, case_key=lambda x: x,
                            log=lines.append, progress_every=1000, progress_seconds=0.0)
    assert not result.ok and result.case == 10
    first = result.first_failure_at
    assert f"disagreement at example {first}; shrinking it (at most 5 s)" in lines, lines
    assert any(line.startswith("shrinking: ") for line in lines), lines
