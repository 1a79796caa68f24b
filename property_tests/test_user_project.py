"""End to end, as a user runs it (issue 12 "What it must show", issue 14): the `fp4sim`
command in a temporary project folder holding its own `reference.py` and `kernels/`, in a
subprocess without the repository on sys.path. No GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from property_tests.user_project import kernel, make_user_project, run_fp4sim

# small draws: each run is a fresh interpreter importing torch (a few seconds); the system
# properties (issue 20) have their own tests
FAST = ("--examples", "6", "--max-len", "24", "--head-dims", "64", "--shrink-seconds", "3",
        "--no-system")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    return make_user_project(tmp_path / "proj")


def test_plain_float32_attention_passes_bf16(project: Path) -> None:
    done = run_fp4sim(project, "check", "attention", "--recipe", "bf16", "--kernel",
                      kernel("plain"), "--kernel-dtype", "float32", *FAST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 6 examples agree" in done.stdout
    assert "untested: GQA (kernel declares no GQA support)" in done.stdout  # from fp4sim_spec


def test_unquantized_kernel_fails_against_attn_qat(project: Path) -> None:
    done = run_fp4sim(project, "check", "attention", "--recipe", "attn-qat", "--kernel",
                      kernel("unquantized"), "--kernel-dtype", "float32", *FAST)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL after" in done.stdout and "O (forward): FAIL" in done.stdout
    # diagnosis printed first, then the script written at the default path
    assert done.stdout.index("O (forward)") < done.stdout.index("reproduce: python")
    assert (project / "fp4sim-check-repro-attention.py").is_file()


@pytest.mark.parametrize(("name", "said"), [("hang", "timed out after 5 s"),
                                            ("segfault", "crashed with signal 11")])
def test_hanging_and_crashing_kernels_are_failures(project: Path, name: str, said: str) -> None:
    done = run_fp4sim(project, "check", "attention", "--recipe", "bf16", "--kernel",
                      kernel(name), "--timeout", "5", *FAST, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert said in done.stdout and "Traceback" not in done.stderr


def test_output_dtype_must_equal_input_dtype(project: Path) -> None:
    done = run_fp4sim(project, "check", "attention", "--recipe", "bf16", "--kernel",
                      kernel("float64_out"), "--kernel-dtype", "bfloat16", *FAST)
    assert done.returncode == 2 and "dtype float64 != input dtype bfloat16" in done.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (("check", "attention", "--kernel", kernel("always_raises")), "this kernel always fails"),
        (("check", "attention", "--kernel", kernel("plain"), "--device", "cuda"), "CUDA"),
        (("check", "attention", "--kernel", kernel("plain"), "--head-dims", "0"), "head dims"),
        (("check", "attention", "--kernel", kernel("plain"), "--max-len", "0"), "--max-len"),
        (("check", "quantizer", "--format", "nvfp4", "--kernel", "k:q", "--tensor-scale", "-1"),
         "positive"),
        (("check", "quantizer", "--format", "nvfp4", "--kernel", "k:q", "--tensor-scale", "0"),
         "positive"),
        (("check", "quantizer", "--format", "nvfp4", "--kernel", "k:q", "--max-rows", "0"),
         "--max-rows"),
        (("check", "quantizer", "--format", "nvfp4", "--kernel", "k:q", "--max-blocks", "-1"),
         "--max-blocks"),
        (("check", "quantizer", "--format", "nvfp4", "--kernel", "fp4sim:quantize", "--device",
          "cuda"), "CUDA"),
        (("check", "attention", "--kernel", kernel("plain"), "--repro-out", "/nonexistent/r.py"),
         "does not exist"),
        (("simulate", "--seed", "-1"), "--seed"),
        (("simulate", "--device", "tpu"), "--device"),
        (("simulate", "--block-n", "7"), "block-n 7"),
        (("simulate", "--kernel", "nosuch:fn", "--variants", "bf16"), "cannot import module"),
    ],
)
def test_usage_errors_exit_2_in_one_line(project: Path, argv: tuple[str, ...], said: str) -> None:
    done = run_fp4sim(project, *argv, "--timeout", "60")
    assert done.returncode == 2, done.stdout + done.stderr
    assert said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (project / "fp4sim-simulate").exists()


def test_repro_files_are_never_overwritten_and_stale_ones_removed(project: Path) -> None:
    existing = project / "mine.py"
    existing.write_text("# the user's file\n")
    done = run_fp4sim(project, "check", "attention", "--kernel", kernel("plain"),
                      "--repro-out", str(existing))
    assert done.returncode == 2 and "--overwrite-repro" in done.stderr
    assert existing.read_text() == "# the user's file\n"
    # a stale default script for this kernel goes once the kernel passes
    default = project / "fp4sim-check-repro-attention.py"
    stale = run_fp4sim(project, "check", "attention", "--recipe", "attn-qat", "--kernel",
                       kernel("plain"), "--kernel-dtype", "float32", *FAST)
    assert stale.returncode == 1 and default.is_file(), stale.stdout + stale.stderr
    fixed = run_fp4sim(project, "check", "attention", "--recipe", "bf16", "--kernel",
                       kernel("plain"), "--kernel-dtype", "float32", *FAST)
    assert fixed.returncode == 0 and not default.exists(), fixed.stdout + fixed.stderr
