"""pytest plugin (entry point ``pytest11``) for FP4 test suites.

Loaded in every pytest run of an environment with fp4sim installed, so it imports only
pytest and (when installed) Hypothesis at load time; torch, the reference and the kernels
are imported by the fixtures that need them, which skip naming the missing extra.

What a user's tests get without copying anything:

* Hypothesis profiles ``ci`` (deterministic: derandomized, no example database, 25
  examples, no deadline), ``dev`` (50 examples) and ``thorough`` (1000 examples); select
  with ``--hypothesis-profile=NAME`` or the ``HYPOTHESIS_PROFILE`` environment variable;
* fixtures: ``fp4_recipe`` (parametrized over the reference's preset names, restrict with
  ``@pytest.mark.fp4_recipes("attn-qat", ...)``), ``fp4_recipe_name``, ``fp4_reference``
  (the ``reference`` package), ``fp4_emulator`` (``fp4sim``), ``fp4_kernels`` (the
  ``kernels`` package, skipped when Triton cannot run here), ``fp4_device``,
  ``fp4_strategies`` (``fp4sim.testing.strategies``), ``fp4_rng`` (a seeded NumPy
  Generator), ``fp4_system_properties`` (a callable ``check(kernel, spec=None,
  recipe="attn-qat", **kw)`` that runs the kernel system properties in process and fails
  the test with every verdict line if one fails; returns the verdicts);
* markers ``gpu`` (skipped without CUDA), ``interpreter``, ``slow``, ``exhaustive``,
  ``fp4_recipes``.

The strategies are also plain imports: ``from fp4sim.testing.strategies import
attention_inputs, fp4_arrays, tie_values``.
"""

from __future__ import annotations

import importlib
import os
import zlib
from typing import Any

import numpy as np
import pytest

import fp4sim

try:
    from hypothesis import HealthCheck, settings
except ModuleNotFoundError:  # without the [test] extra the plugin still loads, minus profiles
    settings = None
else:
    settings.register_profile(
        "ci",
        max_examples=25,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("dev", max_examples=50, deadline=None, print_blob=True)
    settings.register_profile(
        "thorough",
        max_examples=1000,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )

_MARKERS = (
    "gpu: needs a CUDA device (skipped without one)",
    "interpreter: runs Triton kernels (on the CPU only under TRITON_INTERPRET=1)",
    "slow: thorough runs, excluded from the default CI selection",
    "exhaustive: sweeps all 2^32 float32 bit patterns",
    "fp4_recipes(*names): restrict the fp4_recipe fixture to these preset names",
)


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    explicit = getattr(config.option, "hypothesis_profile", None)
    from_env = os.environ.get("HYPOTHESIS_PROFILE")
    if explicit is None and from_env and settings is not None:
        settings.load_profile(from_env)


def _cuda_available() -> bool:
    try:
        # lazy: optional extra: the plugin loads in every pytest run without it
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def _import_or_skip(module: str, extra: str) -> Any:
    """``module``, or skip the test naming the extra that installs what it lacks."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        pytest.skip(f"{module} needs {err.name}, which is not installed (pip install '{extra}')")


def _recipe_names() -> tuple[str, ...]:
    try:
        # lazy: needs torch, an optional extra: the plugin loads in every pytest run without it
        from fp4sim import reference
    except ModuleNotFoundError:  # no torch: one skipped case instead of a collection error
        return ()
    return tuple(reference.RECIPE_NAMES)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fp4_recipe_name" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("fp4_recipes")
    names = tuple(marker.args) if marker is not None and marker.args else _recipe_names()
    if not names:
        reason = "fp4_recipe needs torch, which is not installed (pip install 'fp4sim[torch]')"
        metafunc.parametrize("fp4_recipe_name", [pytest.param("", marks=pytest.mark.skip(reason))])
        return
    metafunc.parametrize("fp4_recipe_name", names)


@pytest.fixture
def fp4_recipe(fp4_recipe_name: str) -> Any:
    """The reference ``Recipe`` for each preset name (see ``fp4_recipe_name``)."""
    reference = _import_or_skip("fp4sim.reference", "fp4sim[torch]")
    return reference.get_recipe(fp4_recipe_name)


@pytest.fixture(scope="session")
def fp4_reference() -> Any:
    """The ``reference`` package (PyTorch FP4 attention reference)."""
    return _import_or_skip("fp4sim.reference", "fp4sim[torch]")


@pytest.fixture(scope="session")
def fp4_emulator() -> Any:
    """The ``fp4sim`` core package (NumPy bit-exact emulator)."""
    return fp4sim


@pytest.fixture(scope="session")
def fp4_device() -> str:
    """'cuda' when a CUDA device is present, else 'cpu'."""
    return "cuda" if _cuda_available() else "cpu"


@pytest.fixture(scope="session")
def fp4_kernels(fp4_device: str) -> Any:
    """The ``kernels`` package; skips unless CUDA is present or TRITON_INTERPRET=1."""
    if fp4_device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    try:
        # lazy: torch and Triton are optional extras; the plugin loads in every pytest run
        from fp4sim import kernels
    except ImportError as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"kernels not importable: {err}")
    return kernels


@pytest.fixture(scope="session")
def fp4_strategies() -> Any:
    """``fp4sim.testing.strategies`` (also importable directly)."""
    return _import_or_skip("fp4sim.testing.strategies", "fp4sim[test]")


@pytest.fixture
def fp4_rng(request: pytest.FixtureRequest) -> Any:
    """A NumPy Generator seeded from the test's node id (stable across runs)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fp4_system_properties(fp4_device: str) -> Any:
    """``check(kernel, spec=None, *, recipe=None, quantizer=False, **kw)``: run
    ``fp4sim.testing.system.run_system_properties`` on ``fp4_device`` (seed 0 unless given)
    and raise AssertionError with every verdict line if a property fails. Without ``spec``
    and ``recipe`` the kernel's own ``fp4sim_spec`` (capabilities, claimed recipe) decides,
    as in ``fp4sim check``; else attn-qat with every capability."""
    system = _import_or_skip("fp4sim.testing.system", "fp4sim[test]")

    def check(kernel: Any, spec: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("device", fp4_device)
        kwargs.setdefault("seed", 0)
        return system.assert_system_properties(kernel, spec, **kwargs)

    return check
