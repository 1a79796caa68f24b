"""The package as a NumPy-only user meets it.

`pip install fp4sim` brings NumPy alone (torch, Triton, matplotlib and Hypothesis are extras), so
the emulator, `fp4sim --version`, `python -m fp4sim` and the pytest plugin must work without
them, and the subcommands that need an extra must say which one (exit 2), not raise. A fresh
virtual environment per run is too slow for CI, so each check runs in a subprocess whose
import system refuses the optional packages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fp4sim

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch", "triton", "matplotlib", "hypothesis", "scipy", "safetensors", "ml_dtypes")

# Installed first in the child: any import of an optional package fails as if it were absent.
_BLOCKER = textwrap.dedent(
    f"""
    import sys

    BLOCKED = {OPTIONAL!r}

    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Absent())
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported before the blocker"
    """
)


def _run_blocked(body: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCKER + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_emulator_runs_with_numpy_alone() -> None:
    result = _run_blocked(
        """
        import numpy as np
        import fp4sim

        x = np.array([[0.25, 0.75, 1.25, 2.5, 5.0, -6.0] + [0.0] * 10], dtype=np.float32)
        q = fp4sim.quantize(x, "nvfp4")
        # block amax 6 -> scale E4M3(6/6) = 1.0 (byte 0x38); the ties go to even codes
        assert q.scale_bits.tolist() == [[0x38]], q.scale_bits
        print(q.codes[0, :6].tolist())
        fp4sim.fake_quantize(x, "mxfp4", pad=True)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 2, 2, 4, 6, 15]"


@pytest.mark.parametrize("entry", ["module", "script"])
def test_version_without_extras(entry: str) -> None:
    # `python -m fp4sim` runs fp4sim/__main__.py; the console script calls fp4sim.cli.main
    call = (
        'import runpy; sys.argv = ["fp4sim", "--version"]; runpy.run_module("fp4sim", '
        'run_name="__main__")'
        if entry == "module"
        else 'from fp4sim.cli import main; sys.exit(main(["--version"]))'
    )
    result = _run_blocked(call)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fp4sim {fp4sim.__version__}"


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["check", "quantizer", "--kernel", "pkg:fn", "--format", "nvfp4"], "fp4sim[torch,test]"),
        (["check", "attention", "--kernel", "pkg:fn"], "fp4sim[torch,test]"),
        (["report", "--out", "never-written"], "fp4sim[report]"),
        (["simulate", "--out", "never-written"], "fp4sim[report]"),
    ],
)
def test_subcommand_without_its_extra_is_a_usage_error(argv: list[str], extra: str) -> None:
    result = _run_blocked(f"from fp4sim.cli import main; sys.exit(main({argv!r}))")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"fp4sim {argv[0]}: needs ") and f"pip install '{extra}'" in lines[0]
    assert not (ROOT / "never-written").exists()


def test_pytest_plugin_loads_without_hypothesis_or_torch() -> None:
    result = _run_blocked(
        """
        import fp4sim.testing.plugin as plugin

        assert plugin.settings is None  # no profiles without Hypothesis, and no error
        assert plugin._recipe_names() == ()  # fp4_recipe becomes one skipped case
        """
    )
    assert result.returncode == 0, result.stderr


def test_version_has_one_home_and_numpy_is_the_only_requirement() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fp4sim.__version__"
    # the core needs NumPy only; everything else is an extra
    assert [d.split(">")[0] for d in project["project"]["dependencies"]] == ["numpy"]
