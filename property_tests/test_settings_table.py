"""One home for the quantization settings (fp4sim.settings) and the kernels' recipe names
(fp4sim.kernels.RECIPES): the emulator, the reference and the report use them as they are."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fp4sim
from fp4sim import kernels, reference
from fp4sim.settings import DEFAULTS, RULES, FormatSettings, applies, defaults_of, settings_of


def test_emulator_and_reference_declare_the_settings_once() -> None:
    assert issubclass(fp4sim.QuantizeSettings, FormatSettings)
    assert issubclass(reference.QuantSpec, FormatSettings)
    assert set(DEFAULTS) == set(RULES)
    spec_fields = {f.name for f in dataclasses.fields(reference.QuantSpec)}
    # QuantSpec leaves out what is chosen per call (pad) or fixed in the reference (rounding).
    assert spec_fields == set(RULES) - {"rounding", "pad"} | {"fmt"}


def test_which_setting_applies_to_which_format() -> None:
    # docs/numerics.md: the E4M3-scale rules are NVFP4's, the E8M0 scale rule MXFP4's.
    assert settings_of("nvfp4") == ("nan", "tensor_scale", "scale_op", "scale_amax_op",
                                    "scale_lower_clamp", "zero_scale_codes", "rounding", "pad")
    assert settings_of("mxfp4") == ("nan", "scale_rule", "rounding", "pad")
    assert defaults_of("mxfp4") == {"rounding": "rne", "nan": "ptx", "scale_rule": "rceil",
                                    "pad": False}


def _other_value(name: str) -> object:
    """A valid non-default value of setting ``name``."""
    rule = RULES[name]
    if rule.kind == "bool":
        return not DEFAULTS[name]
    if rule.kind == "tensor_scale":
        return "amax"
    return next(v for v in rule.allowed if v != DEFAULTS[name])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("name", [n for n in RULES if n not in ("rounding", "pad")])
def test_emulator_reference_and_quantspec_accept_and_reject_alike(fmt: str, name: str) -> None:
    value = _other_value(name)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    if applies(name, fmt):
        codes = fp4sim.quantize(x, fmt, **{name: value}).codes
        ref_codes = reference.quantize_torch(torch.from_numpy(x), fmt, **{name: value})[0]
        np.testing.assert_array_equal(codes, ref_codes.numpy())
        assert reference.QuantSpec(fmt, **{name: value}).settings()[name] == value
    else:
        with pytest.raises(ValueError, match=f"do not apply to {fmt}"):
            fp4sim.quantize(x, fmt, **{name: value})
        with pytest.raises(ValueError, match=f"do not apply to {fmt}"):
            reference.QuantSpec(fmt, **{name: value})
        with pytest.raises(ValueError, match="unsupported settings"):
            reference.quantize_torch(torch.from_numpy(x), fmt, **{name: value})


def test_kernel_recipes_have_one_home() -> None:
    from fp4sim.reports import runner

    assert runner.TRITON_RECIPES is kernels.RECIPES
    assert set(kernels.RECIPES) <= set(reference.RECIPE_NAMES)
