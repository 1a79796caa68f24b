"""The package layers import only downward (docs/DESIGN.md).

Each module is imported in a fresh interpreter and the modules it pulled in are
inspected, so a forbidden import anywhere in its import graph is caught.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The three implementations on the ground, each independent of the other two; the emulator
# core is NumPy only. The comparison layers sit above them (docs/DESIGN.md).
REFERENCE, KERNELS = "fp4sim.reference", "fp4sim.kernels"
HARNESS = "fp4sim.harness"  # the kernel contract: the base of the comparison layers
TOP_LAYER = ("fp4sim.testing", "fp4sim.simulate", "fp4sim.cli", "fp4sim.demo", "fp4sim.reports",
             "fp4sim.adapters", "fp4sim.__main__", HARNESS)
CORE_FORBIDDEN = ("torch", "triton", REFERENCE, KERNELS, "hypothesis", "matplotlib",
                  "ml_dtypes") + TOP_LAYER


def _modules_loaded_by(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env=env)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _submodules(package: str) -> list[str]:
    path = ROOT.joinpath(*package.split("."))
    return [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(path)])]


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _core_modules() -> list[str]:
    return ["fp4sim"] + [m for m in _submodules("fp4sim")
                         if not any(_is_under(m, top) for top in TOP_LAYER + (REFERENCE, KERNELS))]


@pytest.mark.parametrize("module", _core_modules())
def test_emulator_core_imports_numpy_only(module: str) -> None:
    loaded = _modules_loaded_by(module)
    bad = sorted(m for m in loaded for f in CORE_FORBIDDEN if _is_under(m, f))
    assert not bad, f"{module} (emulator core) imports {bad}"


@pytest.mark.parametrize("module", [REFERENCE] + _submodules(REFERENCE))
def test_reference_builds_only_on_the_core(module: str) -> None:
    loaded = _modules_loaded_by(module)
    forbidden = (KERNELS, "triton") + TOP_LAYER
    bad = sorted(m for m in loaded for f in forbidden if _is_under(m, f))
    assert not bad, f"{module} (reference) imports {bad}"


@pytest.mark.parametrize("module", [KERNELS] + _submodules(KERNELS))
def test_kernels_stand_alone(module: str) -> None:
    loaded = _modules_loaded_by(module)
    forbidden = (REFERENCE,) + TOP_LAYER
    bad = sorted(m for m in loaded for f in forbidden if _is_under(m, f))
    assert not bad, f"{module} (kernels) imports {bad}; only fp4sim.formats constants are shared"


@pytest.mark.parametrize("module", [HARNESS] + _submodules(HARNESS))
def test_harness_sits_below_the_comparison_layers(module: str) -> None:
    # check, report and simulate all load user kernels through it: it must not need them,
    # nor any of the three implementations it is used to compare.
    loaded = _modules_loaded_by(module)
    forbidden = (REFERENCE, KERNELS) + tuple(t for t in TOP_LAYER if t != HARNESS)
    bad = sorted(m for m in loaded for f in forbidden if _is_under(m, f))
    assert not bad, f"{module} (harness) imports {bad}"


def test_layer_check_can_fail() -> None:
    # The probe itself must see a known import, or the checks above prove nothing.
    assert "numpy" in _modules_loaded_by("fp4sim")
    assert any(_is_under(m, "torch") for m in _modules_loaded_by(REFERENCE))
