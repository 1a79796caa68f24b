"""The pytest plugin: cheap to load, profiles, fixtures and markers for users' suites."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]


def test_plugin_import_is_light() -> None:
    code = (
        "import sys, fp4sim.testing.plugin, fp4sim.testing;"
        "heavy = [m for m in ('torch', 'triton', 'reference', 'kernels') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_profiles_are_registered() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None
    assert ci.max_examples <= 50
    assert settings.get_profile("thorough").max_examples >= 1000
    assert settings.get_profile("dev").max_examples > ci.max_examples


def _installed() -> bool:
    """Whether pytest finds the plugin by its entry point (``pip install``), as users get it."""
    return any(ep.name == "fp4sim" for ep in entry_points(group="pytest11"))


@pytest.mark.skipif(not _installed(), reason="fp4sim is not installed: a user's suite finds "
                    "the plugin through its entry point (pip install -e .)")
def test_user_suite_gets_fixtures_and_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import numpy as np
        import pytest
        from hypothesis import given, settings
        from fp4sim.testing.strategies import fp4_arrays

        @pytest.mark.fp4_recipes("attn-qat", "bf16")
        def test_recipe(fp4_recipe, fp4_recipe_name, fp4_reference):
            assert fp4_recipe.name == fp4_recipe_name
            assert fp4_reference.get_recipe(fp4_recipe_name) == fp4_recipe

        def test_emulator_and_rng(fp4_emulator, fp4_rng, fp4_device, fp4_strategies):
            x = fp4_rng.standard_normal((2, 16)).astype(np.float32)
            assert fp4_emulator.quantize(x, "nvfp4").codes.shape == (2, 16)
            assert fp4_device in ("cpu", "cuda")
            assert hasattr(fp4_strategies, "attention_inputs")

        @settings(max_examples=5)
        @given(fp4_arrays())
        def test_strategy(x):
            assert x.shape[-1] % 16 == 0

        @pytest.mark.gpu
        def test_needs_gpu():
            import torch
            assert torch.cuda.is_available()
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--hypothesis-profile=ci", "-o", "addopts=", "--strict-markers"
    )
    import torch

    if torch.cuda.is_available():
        result.assert_outcomes(passed=5)
    else:
        result.assert_outcomes(passed=4, skipped=1)
