"""Hypothesis strategies of heavy-tailed inputs for the emulator properties.

A drawn ``BlockCase`` holds the distribution and its parameters; ``make_blocks`` builds the
float32 array deterministically from it (NumPy generator seeded by the case), so examples are
cheap and Hypothesis shrinks over parameters. Kinds: Student-t, log-normal magnitudes with
random signs, Gaussian rows with planted outlier channels, all-zero blocks (including -0.0),
and E2M1 tie values (and their ulp neighbours) scaled by random powers of two, with one
element per block set to 6 * 2^k so that the block scale maps the ties exactly onto E2M1 ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from fp4sim import formats

# docs/numerics.md: the E2M1 rounding ties and values (inputs only; the oracles are elsewhere).
E2M1_TIES = np.array(formats.E2M1_TIES, dtype=np.float32)
E2M1_GRID = np.array(formats.E2M1_MAGNITUDES, dtype=np.float32)
KINDS = ("student_t", "lognormal", "outlier_channels", "zero_blocks", "ties", "scale_ties")


def _e4m3_positive_values() -> np.ndarray:
    """All finite positive E4M3 values, from the format's fields (OCP OFP8: bias 7)."""
    codes = np.arange(1, 0x7F)
    exponent, mantissa = codes >> 3, codes & 7
    return np.where(exponent == 0, mantissa * 2.0**-9,
                    (1 + mantissa / 8) * 2.0 ** (exponent - 7)).astype(np.float32)


E4M3_POSITIVE = _e4m3_positive_values()
# Midpoints of consecutive E4M3 values: a block scale amax/6 landing here is an E4M3 tie.
E4M3_MIDPOINTS = ((E4M3_POSITIVE[:-1].astype(np.float64) + E4M3_POSITIVE[1:]) / 2).astype(
    np.float32)


@dataclass(frozen=True)
class BlockCase:
    kind: str
    rows: int
    blocks: int  # blocks per row
    block_size: int
    param: float  # Student-t df, log-normal sigma, or outlier magnitude (log10)
    exponent: int  # the whole tensor is multiplied by 2^exponent
    seed: int


def _ulp_neighbours(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each magnitude moved by -2..+2 ulps (float32, never below 0), chosen at random."""
    steps = rng.integers(-2, 3, size=values.shape)
    magnitude = np.abs(values.astype(np.float32)).view(np.int32).astype(np.int64)
    bits = np.maximum(magnitude + steps, 0).astype(np.int32).view(np.float32)
    return np.copysign(bits, values).astype(np.float32)


def make_blocks(case: BlockCase) -> np.ndarray:
    """float32 array (rows, blocks * block_size) for ``case``."""
    rng = np.random.default_rng(case.seed)
    n = case.blocks * case.block_size
    shape = (case.rows, n)
    if case.kind == "student_t":
        x = rng.standard_t(case.param, size=shape)
    elif case.kind == "lognormal":
        x = rng.lognormal(0.0, case.param, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    elif case.kind == "outlier_channels":
        x = rng.standard_normal(shape)
        channels = rng.choice(n, size=max(1, n // 16), replace=False)
        x[:, channels] *= 10.0 ** case.param
    elif case.kind == "zero_blocks":
        x = rng.standard_t(3.0, size=shape)
        blocks = x.reshape(case.rows, case.blocks, case.block_size)
        zero = rng.random((case.rows, case.blocks)) < 0.5
        blocks[zero] = 0.0
        negative_zero = zero & (rng.random((case.rows, case.blocks)) < 0.5)
        blocks[negative_zero] = -0.0
        x = blocks.reshape(shape)
    elif case.kind == "ties":
        # Element ties: x = tie * s with block max 6 * s, so that the NVFP4 scale is exactly
        # s and x / s is exactly a tie. s is a power of two (exact for MX too) in half of the
        # blocks and an E4M3 value with a mantissa (1/s inexact in float32) in the others.
        ties = rng.choice(np.concatenate([E2M1_TIES, E2M1_GRID]), size=shape).astype(np.float32)
        near = rng.random(shape) < 0.3
        ties[near] = _ulp_neighbours(ties[near], rng)
        x = ties * rng.choice([-1.0, 1.0], size=shape)
        blocks = x.reshape(case.rows, case.blocks, case.block_size)
        blocks[:, :, 0] = 6.0 * rng.choice([-1.0, 1.0], size=(case.rows, case.blocks))
        normal_e4m3 = E4M3_POSITIVE[(E4M3_POSITIVE >= 2.0**-6) & (E4M3_POSITIVE <= 64)]
        s = np.where(rng.random((case.rows, case.blocks)) < 0.5, 1.0,
                     rng.choice(normal_e4m3, size=(case.rows, case.blocks)))
        x = (blocks * s[..., None]).reshape(shape)
    elif case.kind == "scale_ties":
        # Scale ties: block max = 6 * (an E4M3 midpoint), +-2 ulps, so amax / 6 is at or next
        # to an E4M3 tie (where amax / 6 and amax * float32(1/6) can round differently);
        # the other elements are Student-t below the max.
        x = rng.standard_t(3.0, size=shape)
        blocks = x.reshape(case.rows, case.blocks, case.block_size)
        mid = rng.choice(E4M3_MIDPOINTS[E4M3_MIDPOINTS <= 64], size=(case.rows, case.blocks))
        amax = _ulp_neighbours((6.0 * mid.astype(np.float64)).astype(np.float32), rng)
        scale = amax / np.maximum(np.max(np.abs(blocks), axis=-1), 1e-30) * 0.999
        blocks *= scale[..., None]
        blocks[:, :, 0] = amax * rng.choice([-1.0, 1.0], size=(case.rows, case.blocks))
        x = blocks.reshape(shape)
    else:
        raise ValueError(f"unknown kind {case.kind!r}")
    return (x * 2.0 ** case.exponent).astype(np.float32)


@st.composite
def block_cases(draw, block_size: int = 16, max_rows: int = 4, max_blocks: int = 4,
                kinds: tuple[str, ...] = KINDS, exponents: tuple[int, int] = (-12, 12)):
    kind = draw(st.sampled_from(kinds))
    if kind == "student_t":
        param = draw(st.sampled_from([1.0, 2.0, 3.0, 5.0]))
    elif kind == "lognormal":
        param = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    elif kind == "outlier_channels":
        param = draw(st.sampled_from([1.0, 2.0, 3.0]))
    else:
        param = 0.0
    return BlockCase(
        kind=kind,
        rows=draw(st.integers(1, max_rows)),
        blocks=draw(st.integers(1, max_blocks)),
        block_size=block_size,
        param=param,
        exponent=draw(st.integers(*exponents)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def heavy_tailed_arrays(block_size: int = 16, **kwargs) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays (rows, blocks * block_size) from ``block_cases``."""
    return block_cases(block_size=block_size, **kwargs).map(make_blocks)


def float32_specials() -> np.ndarray:
    """Zeros, infinities, NaNs with several payloads and signs, extremes."""
    bits = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                     0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000, 0x7F7FFFFF,
                     0xFF7FFFFF, 0x00800000, 0x80800000, 0x00000001, 0x80000001, 0x007FFFFF],
                    dtype=np.uint32)
    return bits.view(np.float32)


@st.composite
def element_arrays(draw, max_size: int = 64):
    """Element-level float32 arrays: ties and their ulp neighbours at random powers of two,
    random bit patterns (finite and not), and specials."""
    seed = draw(st.integers(0, 2**32 - 1))
    size = draw(st.integers(1, max_size))
    rng = np.random.default_rng(seed)
    ties = rng.choice(np.concatenate([E2M1_TIES, E2M1_GRID, [6.5, 7.0, 8.0, 1e30]]), size)
    ties = _ulp_neighbours(ties.astype(np.float32), rng)
    ties *= rng.choice([-1.0, 1.0], size).astype(np.float32)
    random_bits = rng.integers(0, 2**32, size=size, dtype=np.uint64).astype(np.uint32)
    pick = rng.integers(0, 3, size)
    specials = rng.choice(float32_specials(), size)
    return np.where(pick == 0, ties, np.where(pick == 1, random_bits.view(np.float32), specials))
