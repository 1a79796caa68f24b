"""The package layers import only downward (docs/DESIGN.md, "Layers").

Each module is imported in a fresh interpreter and the modules it pulled in are
inspected, so a forbidden import anywhere in its import graph is caught. Three tiers:

* the ground: three independent implementations, the emulator core (NumPy only), the
  reference (torch) and the kernels (Triton);
* the comparison base, shared by the comparison layers: ``harness`` (the kernel contract),
  ``judge`` (the FP4 tolerance rule and how one attention case is judged) and ``publish``
  (the report folder and the HTML page);
* the comparison layers, independent of one another: ``testing`` (`fp4sim check`, pytest
  tools), ``reports`` (`fp4sim report`), ``simulate`` (`fp4sim simulate`), ``adapters``
  and ``demo``; only the CLI (``fp4sim.cli``, ``fp4sim.__main__``) sits on top of them all.

The last tests read the source: an import inside a function hides an edge of this graph,
so each one must say why it cannot sit at module level (a ``# lazy: <reason>`` comment).
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REFERENCE, KERNELS = "fp4sim.reference", "fp4sim.kernels"
HARNESS, JUDGE, PUBLISH = "fp4sim.harness", "fp4sim.judge", "fp4sim.publish"
BASE = (HARNESS, JUDGE, PUBLISH)
LAYERS = ("fp4sim.testing", "fp4sim.reports", "fp4sim.simulate", "fp4sim.adapters",
          "fp4sim.demo")
TOP = ("fp4sim.cli", "fp4sim.__main__")
ABOVE_GROUND = BASE + LAYERS + TOP
CORE_FORBIDDEN = ("torch", "triton", REFERENCE, KERNELS, "hypothesis", "matplotlib",
                  "ml_dtypes") + ABOVE_GROUND


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
    if not path.is_dir():
        return []
    return [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(path)])]


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden_in(module: str, forbidden: tuple[str, ...]) -> list[str]:
    loaded = _modules_loaded_by(module)
    return sorted(m for m in loaded for f in forbidden if _is_under(m, f))


def _core_modules() -> list[str]:
    return ["fp4sim"] + [m for m in _submodules("fp4sim")
                         if not any(_is_under(m, p) for p in ABOVE_GROUND + (REFERENCE, KERNELS))]


@pytest.mark.parametrize("module", _core_modules())
def test_emulator_core_imports_numpy_only(module: str) -> None:
    bad = _forbidden_in(module, CORE_FORBIDDEN)
    assert not bad, f"{module} (emulator core) imports {bad}"


@pytest.mark.parametrize("module", [REFERENCE] + _submodules(REFERENCE))
def test_reference_builds_only_on_the_core(module: str) -> None:
    bad = _forbidden_in(module, (KERNELS, "triton") + ABOVE_GROUND)
    assert not bad, f"{module} (reference) imports {bad}"


@pytest.mark.parametrize("module", [KERNELS] + _submodules(KERNELS))
def test_kernels_stand_alone(module: str) -> None:
    bad = _forbidden_in(module, (REFERENCE,) + ABOVE_GROUND)
    assert not bad, f"{module} (kernels) imports {bad}; only fp4sim.formats constants are shared"


@pytest.mark.parametrize("module", [HARNESS] + _submodules(HARNESS))
def test_harness_sits_below_the_comparison_layers(module: str) -> None:
    # check, report and simulate all load user kernels through it: it must not need them,
    # nor any of the three implementations it is used to compare, nor the other bases.
    bad = _forbidden_in(module, (REFERENCE, KERNELS, JUDGE, PUBLISH) + LAYERS + TOP)
    assert not bad, f"{module} (harness) imports {bad}"


def _judge_modules() -> list[str]:
    return [JUDGE] + _submodules(JUDGE) + _submodules(f"{JUDGE}.diagnosis")


@pytest.mark.parametrize("module", _judge_modules())
def test_judge_sits_below_check_and_report(module: str) -> None:
    # `fp4sim report` judges external kernels with it and needs neither Hypothesis nor
    # fp4sim.testing; it compares against the reference, never against the kernels.
    bad = _forbidden_in(module, (KERNELS, "triton", "hypothesis", PUBLISH) + LAYERS + TOP)
    assert not bad, f"{module} (judge) imports {bad}"


# the judge's modules that the NumPy-only install imports through fp4sim.testing
NUMPY_ONLY_JUDGE = (f"{JUDGE}.inputs", f"{JUDGE}.arrays", f"{JUDGE}.rule")


@pytest.mark.parametrize("module", NUMPY_ONLY_JUDGE + ("fp4sim.testing",))
def test_numpy_only_parts_of_the_judge(module: str) -> None:
    bad = _forbidden_in(module, ("torch", "triton", "hypothesis", "matplotlib", REFERENCE))
    assert not bad, f"{module} imports {bad}; it must load with NumPy alone"


@pytest.mark.parametrize("module", [PUBLISH] + _submodules(PUBLISH))
def test_publish_is_plain_output(module: str) -> None:
    # writing files and HTML needs no implementation and no comparison layer
    forbidden = ("torch", "triton", "matplotlib", REFERENCE, KERNELS, HARNESS, JUDGE)
    bad = _forbidden_in(module, forbidden + LAYERS + TOP)
    assert not bad, f"{module} (publish) imports {bad}"


def _layer_modules() -> list[tuple[str, str]]:
    out = []
    for layer in LAYERS:
        subs = _submodules(layer)
        for module in [layer] + subs:
            out.append((layer, module))
            if module != layer:  # one level of subpackages (testing.system, ...)
                out += [(layer, m) for m in _submodules(module)]
    return out


@pytest.mark.parametrize(("layer", "module"), _layer_modules())
def test_comparison_layers_are_independent(layer: str, module: str) -> None:
    # testing, reports, simulate, adapters and demo share only what lies below them
    others = tuple(other for other in LAYERS if other != layer) + TOP
    bad = _forbidden_in(module, others)
    assert not bad, f"{module} ({layer}) imports {bad}; share it through a base module instead"


def test_layer_check_can_fail() -> None:
    # The probe itself must see a known import, or the checks above prove nothing.
    assert "numpy" in _modules_loaded_by("fp4sim")
    assert any(_is_under(m, "torch") for m in _modules_loaded_by(REFERENCE))
    # a known edge from a layer down to a base is seen
    assert _forbidden_in("fp4sim.reports.cli", (PUBLISH,))


# ---------------------------------------------------------------------------------------
# function-level imports
# ---------------------------------------------------------------------------------------

PACKAGE_DIRS = ("fp4sim", "reference", "kernels", "reports")
LAZY_MARK = "# lazy:"


def _package_files() -> list[Path]:
    files = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            # fp4sim/reference, fp4sim/kernels, fp4sim/reports are symlinks to the folders
            if rel.parts[0] == "fp4sim" and (ROOT / rel.parts[0] / rel.parts[1]).is_symlink():
                continue
            files.append(path)
    return files


def unexplained_lazy_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function that carry no ``# lazy: <reason>``: on the
    import's first line, or on the comment line right above it or above the group of
    imports it belongs to (imports separated by blank lines at most)."""
    lines = source.splitlines()
    tree = ast.parse(source)
    bad = []

    def explained(lineno: int) -> bool:
        if LAZY_MARK in lines[lineno - 1]:
            return True
        i = lineno - 2
        while i >= 0:
            text = lines[i].strip()
            if text.startswith(LAZY_MARK):
                return True
            if text == "" or text.startswith(("import ", "from ")) or text.startswith(")") \
                    or (text.endswith(",") and not text.startswith("#")):
                i -= 1  # a blank line or an earlier import of the same group
                continue
            return False
        return False

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                if not explained(child.lineno):
                    bad.append(child.lineno)
            visit(child, inside)

    visit(tree, False)
    return bad


def test_every_function_level_import_says_why() -> None:
    found = []
    for path in _package_files():
        for lineno in unexplained_lazy_imports(path.read_text()):
            found.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not found, (
        "imports inside functions without a '# lazy: <reason>' comment (move them to module"
        " level, or say which optional extra, import cycle or startup cost keeps them there): "
        + ", ".join(found)
    )


def test_lazy_import_check_can_fail() -> None:
    source = (
        "import numpy\n\n"
        "def f():\n"
        "    import torch\n\n"
        "    return torch\n\n"
        "def g():\n"
        "    # lazy: torch is optional\n"
        "    import torch\n"
        "    from fp4sim import reference\n\n"
        "    return torch, reference\n\n"
        "def h():\n"
        "    import json  # lazy: said on the line\n"
        "    x = 1\n"
        "    import os\n"
        "    return json, os, x\n"
    )
    assert unexplained_lazy_imports(source) == [4, 18]
