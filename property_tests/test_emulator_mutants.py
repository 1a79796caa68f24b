"""Deliberately broken emulators must fail the same properties the real one passes.

Each mutant is the fp4sim API with one rule broken. ``run_all_properties`` runs every
``check_xxx`` of emulator_checks on a fixed, seeded corpus (heavy-tailed blocks of every kind,
E2M1 ties and their ulp neighbours, specials); the real module must pass it and every mutant
must fail it. The corpus is fixed (no Hypothesis) so the test is deterministic and quick.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from emulator_checks import (
    check_block_monotone,
    check_e2m1_matches_slow_reference,
    check_e2m1_monotone,
    check_e2m1_round_trip,
    check_e2m1_saturation,
    check_e2m1_sign_symmetry,
    check_fake_quantize_idempotent,
    check_nvfp4_flush_threshold,
    check_pack_nibble_order,
    check_power_of_two_invariance,
    check_quantize_matches_reference,
    check_quantize_sign_symmetry,
)
from emulator_inputs import KINDS, BlockCase, float32_specials, make_blocks

import fp4sim

API = ("e2m1_encode", "e2m1_decode", "pack_fp4", "unpack_fp4", "quantize", "dequantize",
       "fake_quantize")


def _corpus_blocks():
    cases = []
    for fmt, bs in (("nvfp4", 16), ("mxfp4", 32)):
        for kind in KINDS:
            for seed in range(2):
                x = make_blocks(BlockCase(kind, rows=2, blocks=3, block_size=bs, param=3.0,
                                          exponent=seed * 5 - 3, seed=seed))
                cases.append((fmt, x))
    return cases


def _corpus_elements():
    grid = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 6.0, 7.0], np.float32)
    up = np.nextafter(grid, np.float32(np.inf))
    down = np.nextafter(grid, np.float32(0))
    values = np.concatenate([grid, up, down, float32_specials(), np.float32([-0.1, -1e-30])])
    return np.concatenate([values, -values])


CORPUS_BLOCKS = _corpus_blocks()
CORPUS_ELEMENTS = _corpus_elements()


def run_all_properties(impl) -> None:
    """Every property on the fixed corpus; raises AssertionError at the first failure."""
    check_e2m1_round_trip(impl)
    check_e2m1_matches_slow_reference(impl, CORPUS_ELEMENTS)
    check_e2m1_sign_symmetry(impl, CORPUS_ELEMENTS)
    check_e2m1_monotone(impl, CORPUS_ELEMENTS)
    check_e2m1_saturation(impl, CORPUS_ELEMENTS)
    check_pack_nibble_order(impl, np.arange(16, dtype=np.uint8).reshape(2, 8))
    check_nvfp4_flush_threshold(impl)
    for fmt, x in CORPUS_BLOCKS:
        check_quantize_matches_reference(impl, x, fmt)
        check_fake_quantize_idempotent(impl, x, fmt)
        check_quantize_sign_symmetry(impl, x, fmt)
        check_block_monotone(impl, x, fmt)
        check_power_of_two_invariance(impl, x, fmt, 2)


def make_impl(**overrides) -> SimpleNamespace:
    impl = SimpleNamespace(**{name: getattr(fp4sim, name) for name in API})
    for name, fn in overrides.items():
        setattr(impl, name, fn)
    return impl


# --- building blocks of the mutants ---------------------------------------------------------

def _away_from_zero(x):
    """Nudge every finite value one ulp away from zero: RNE then sends ties away from zero."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        away = np.nextafter(x, np.copysign(np.float32(np.inf), x))
    return np.where(np.isfinite(x) & (x != 0), away, x).astype(np.float32)


def _through_bf16(x):
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _e4m3_round_up(v):
    """Smallest E4M3 value >= v (the bug: scale rounded up instead of to nearest)."""
    codes = fp4sim.e4m3_encode(v)
    below = fp4sim.e4m3_decode(codes) < v
    return np.where(below & (codes < 0x7E), codes + 1, codes).astype(np.uint8)


def _nvfp4_pipeline(x, element_encode, scale_encode, block_size=16, claimed_block=16):
    """A plain NVFP4 quantizer built from public pieces, with swappable parts. With
    ``block_size != claimed_block`` scales are computed over ``block_size`` elements but
    reported per ``claimed_block`` (the wrong-block-size bug, shapes kept plausible)."""
    real = fp4sim.quantize(x, "nvfp4")
    x32 = np.asarray(x, dtype=np.float32).reshape(-1)
    x32 = np.concatenate([x32, np.zeros(-x32.size % block_size, np.float32)])
    blocks = x32.reshape(-1, block_size)
    amax = np.max(np.abs(blocks), axis=1)
    scale_bits = scale_encode(amax / np.float32(6))
    s = fp4sim.e4m3_decode(scale_bits)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = blocks * (np.float32(1) / s)[:, None]
    codes = element_encode(y)
    codes[s == 0] = 0
    repeat = block_size // claimed_block
    scale_bits = np.repeat(scale_bits, repeat)[: real.scale_bits.size].reshape(
        real.scale_bits.shape)
    codes = codes.reshape(-1)[: real.codes.size].reshape(real.codes.shape)
    return dataclasses.replace(real, codes=codes, scale_bits=scale_bits,
                               scales=fp4sim.e4m3_decode(scale_bits),
                               packed=fp4sim.pack_fp4(codes))


def _with_nvfp4_pipeline(**parts):
    def quantize(x, fmt="nvfp4", axis=-1, **settings):
        if fp4sim.get_block_format(fmt).name != "nvfp4" or settings or axis not in (-1, 1):
            return fp4sim.quantize(x, fmt, axis, **settings)
        return _nvfp4_pipeline(x, **parts)

    def fake_quantize(x, fmt="nvfp4", axis=-1, **settings):
        return fp4sim.dequantize(quantize(x, fmt, axis, **settings))

    return {"quantize": quantize, "fake_quantize": fake_quantize}


CORRECT_PARTS = {"element_encode": fp4sim.e2m1_encode, "scale_encode": fp4sim.e4m3_encode}


def _swap_nibbles(packed):
    return ((packed >> 4) | (packed << 4)).astype(np.uint8)


def _mutants():
    ties_away_encode = lambda x, **kw: fp4sim.e2m1_encode(_away_from_zero(x), **kw)  # noqa: E731
    bf16_encode = lambda x, **kw: fp4sim.e2m1_encode(_through_bf16(x), **kw)  # noqa: E731
    return {
        "ties_away_from_zero": make_impl(
            e2m1_encode=ties_away_encode,
            **_with_nvfp4_pipeline(**{**CORRECT_PARTS, "element_encode": ties_away_encode})),
        "swapped_nibbles": make_impl(
            pack_fp4=lambda c, axis=-1: _swap_nibbles(fp4sim.pack_fp4(c, axis)),
            quantize=lambda *a, **k: dataclasses.replace(
                fp4sim.quantize(*a, **k), packed=_swap_nibbles(fp4sim.quantize(*a, **k).packed))),
        "scale_rounded_up": make_impl(
            **_with_nvfp4_pipeline(**{**CORRECT_PARTS, "scale_encode": _e4m3_round_up})),
        "rounding_through_bf16": make_impl(
            e2m1_encode=bf16_encode,
            quantize=lambda x, *a, **k: fp4sim.quantize(_through_bf16(x), *a, **k),
            fake_quantize=lambda x, *a, **k: fp4sim.fake_quantize(_through_bf16(x), *a, **k)),
        "wrong_block_size": make_impl(
            **_with_nvfp4_pipeline(**CORRECT_PARTS, block_size=32)),
        "nan_to_zero": make_impl(
            e2m1_encode=lambda x, **kw: np.where(np.isnan(np.asarray(x, np.float32)), np.uint8(0),
                                                 fp4sim.e2m1_encode(x, **kw)).astype(np.uint8)),
        "negative_zero_loses_sign": make_impl(
            e2m1_encode=lambda x, **kw: np.where(fp4sim.e2m1_encode(x, **kw) == 8, np.uint8(0),
                                                 fp4sim.e2m1_encode(x, **kw)).astype(np.uint8)),
        "mx_floor_instead_of_rceil": make_impl(
            quantize=lambda x, fmt="nvfp4", axis=-1, **k: fp4sim.quantize(
                x, fmt, axis, **({"scale_rule": "floor"} if fmt == "mxfp4" else {}), **k)),
        "no_saturation_wraps": make_impl(
            e2m1_encode=lambda x, **kw: np.where(
                np.abs(np.asarray(x, np.float32)) > 6, np.uint8(0), fp4sim.e2m1_encode(x, **kw)
            ).astype(np.uint8)),
    }


MUTANTS = _mutants()


def test_real_emulator_passes_all_properties():
    run_all_properties(fp4sim)


def test_mutant_pipeline_with_correct_parts_passes():
    # The harness the mutants are built from is itself correct: failures come from the bug.
    run_all_properties(make_impl(**_with_nvfp4_pipeline(**CORRECT_PARTS)))


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_fails_the_properties(name):
    with pytest.raises(AssertionError):
        run_all_properties(MUTANTS[name])


def run_block_properties(impl) -> None:
    """Only the block-level comparison with the independent reference (codes, scale bytes,
    packed bytes), on the heavy-tailed block corpus."""
    for fmt, x in CORPUS_BLOCKS:
        check_quantize_matches_reference(impl, x, fmt)


QUANTIZE_MUTANTS = ("ties_away_from_zero", "swapped_nibbles", "scale_rounded_up",
                    "rounding_through_bf16", "wrong_block_size", "mx_floor_instead_of_rceil")


@pytest.mark.parametrize("name", QUANTIZE_MUTANTS)
def test_quantize_mutant_fails_the_block_reference(name):
    run_block_properties(fp4sim)
    with pytest.raises(AssertionError):
        run_block_properties(MUTANTS[name])
