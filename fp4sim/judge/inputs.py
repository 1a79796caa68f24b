"""Named input distributions for FP4 tests, as pure NumPy functions of a Generator.

No Hypothesis here: strategies (``fp4sim.testing.strategies``) draw an
``AttentionInputSpec`` (or a tensor distribution and its parameters) plus a seed and
call these functions, so every test input is reproducible from ``(spec, seed)`` alone,
and `fp4sim report` uses the same distributions without Hypothesis. The public name is
``fp4sim.testing.generators`` (re-exported); this is the one home, below the comparison
layers, so that both `fp4sim check` and `fp4sim report` can build on it.

Two families:

* attention inputs: ``generate_attention_inputs(rng, spec) -> (q, k, v)`` with
  q of shape (B, H, Lq, d) and k, v of shape (B, Hkv, Lk, d), float32 arrays whose
  values are exactly representable in ``spec.dtype`` (float32, float16 or bfloat16);
  the distributions are listed in ``DISTRIBUTIONS``;
* quantizer inputs: ``generate_tensor(rng, shape, distribution, **params)``, float32
  arrays aimed at the corner cases of block quantization (rounding ties after scaling,
  one ulp from ties, ties that only an exact division keeps, E4M3 scale ties, all-zero
  blocks, blocks below the flush threshold, NaN/Inf and other specials); the names are in
  ``TENSOR_DISTRIBUTIONS``.

``AttentionCase`` is one concrete attention input (spec, seed, causal flag, softmax scale and
the arrays), as drawn by ``fp4sim.testing.strategies.attention_inputs`` or built from a
report scenario.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fp4sim.formats import E2M1, E2M1_TIES

__all__ = [
    "DISTRIBUTIONS",
    "DTYPES",
    "E2M1_TIES",
    "TENSOR_DISTRIBUTIONS",
    "AttentionCase",
    "AttentionInputSpec",
    "generate_attention_inputs",
    "generate_tensor",
    "round_to_dtype",
]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

# E2M1_TIES (re-exported): midpoints between adjacent E2M1 magnitudes, from fp4sim.formats.
_E2M1_MAX = E2M1.max_value  # 6


@dataclass(frozen=True)
class AttentionInputSpec:
    """Everything needed (with a seed) to regenerate one attention input triple.

    Shapes: q (batch, heads, lq, head_dim); k, v (batch, kv_heads, lk, head_dim);
    ``kv_heads`` must divide ``heads`` (grouped-query attention when smaller).
    Parameters not used by ``distribution`` are ignored; their defaults mean "off".
    """

    batch: int = 1
    heads: int = 1
    kv_heads: int = 1
    lq: int = 16
    lk: int = 16
    head_dim: int = 64
    distribution: str = "gaussian"
    # student_t: degrees of freedom (smaller = heavier tails).
    df: float = 4.0
    # lognormal: standard deviation of log|x|.
    sigma: float = 1.0
    # sparse_outliers: fraction of entries multiplied by outlier_scale.
    outlier_fraction: float = 0.0
    outlier_scale: float = 1.0
    # outlier_channels: number of head-dim channels (shared by q and k) and their gain.
    outlier_channels: int = 0
    outlier_channel_scale: float = 1.0
    # key_bias: norm ratio of a vector added to every key of a head.
    key_bias: float = 0.0
    # massive_activations: number of tokens whose q, k, v rows are multiplied by massive_scale.
    massive_tokens: int = 0
    massive_scale: float = 1.0
    # attention_sink: logit margin (in units of sqrt of the logit) of key 0.
    sink_strength: float = 0.0
    # peaky / flat: multiplier of q, i.e. of every logit (>1 peaky, <1 flat).
    logit_scale: float = 1.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "lq", "lk", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"AttentionInputSpec.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {self.distribution!r}; known: {sorted(DISTRIBUTIONS)}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.df <= 0 or self.sigma < 0:
            raise ValueError("df must be > 0 and sigma >= 0")
        if not 0.0 <= self.outlier_fraction <= 1.0:
            raise ValueError("outlier_fraction must lie in [0, 1]")
        if not 0 <= self.outlier_channels <= self.head_dim:
            raise ValueError("outlier_channels must lie in [0, head_dim]")
        if self.massive_tokens < 0:
            raise ValueError("massive_tokens must be >= 0")

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.lq, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.lk, self.head_dim)

    def replace(self, **changes: object) -> AttentionInputSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# dtype rounding
# ---------------------------------------------------------------------------


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32.

    bfloat16 is the top 16 bits of float32; RNE adds 0x7FFF plus the lowest kept bit
    before truncating (the standard bit trick). NaN is kept as NaN.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out).astype(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32 array to ``dtype`` (RNE) and return it as float32.

    float16 overflows to +-inf beyond 65504 (IEEE 754 binary16), as a cast would.
    """
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return _round_to_bfloat16(x)
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


# ---------------------------------------------------------------------------
# attention distributions
# ---------------------------------------------------------------------------

QKV = tuple[np.ndarray, np.ndarray, np.ndarray]


def _standard_normal_qkv(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    q = rng.standard_normal(spec.q_shape)
    k = rng.standard_normal(spec.kv_shape)
    v = rng.standard_normal(spec.kv_shape)
    return q, k, v


def _gaussian(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """q, k, v entries i.i.d. N(0, 1)."""
    return _standard_normal_qkv(rng, spec)


def _student_t(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """q, k, v entries i.i.d. Student-t with ``df`` degrees of freedom (heavy tails)."""
    q = rng.standard_t(spec.df, spec.q_shape)
    k = rng.standard_t(spec.df, spec.kv_shape)
    v = rng.standard_t(spec.df, spec.kv_shape)
    return q, k, v


def _lognormal(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """x = s * exp(sigma * z), s uniform in {-1, +1}, z ~ N(0, 1): log-normal magnitudes."""

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
        return sign * np.exp(spec.sigma * rng.standard_normal(shape))

    return draw(spec.q_shape), draw(spec.kv_shape), draw(spec.kv_shape)


def _sparse_outliers(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """x = z * (1 + (outlier_scale - 1) * b), z ~ N(0, 1), b ~ Bernoulli(outlier_fraction)."""
    q, k, v = _standard_normal_qkv(rng, spec)

    def spike(x: np.ndarray) -> np.ndarray:
        hit = rng.random(x.shape) < spec.outlier_fraction
        return np.where(hit, x * spec.outlier_scale, x)

    return spike(q), spike(k), spike(v)


def _outlier_channels(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """Gaussian q, k, v; ``outlier_channels`` head-dim channels c (the same set for q and k,
    as in LLM activations) get q[..., c] *= g and k[..., c] *= g, g = outlier_channel_scale."""
    q, k, v = _standard_normal_qkv(rng, spec)
    channels = rng.choice(spec.head_dim, size=spec.outlier_channels, replace=False)
    gain = np.ones(spec.head_dim)
    gain[channels] = spec.outlier_channel_scale
    return q * gain, k * gain, v


def _key_bias(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """Gaussian q, k, v; k[b, h, j, :] += key_bias * u[b, h, :] with u ~ N(0, I_d) shared by
    all keys j of a head (a bias the softmax is invariant to, but D = rowsum(dO o O) is not)."""
    q, k, v = _standard_normal_qkv(rng, spec)
    bias = rng.standard_normal((spec.batch, spec.kv_heads, 1, spec.head_dim))
    return q, k + spec.key_bias * bias, v


def _massive_activations(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """Gaussian q, k, v; ``massive_tokens`` token rows (the same key positions in k and v,
    drawn positions in q) multiplied by ``massive_scale`` (LLM "massive activations")."""
    q, k, v = _standard_normal_qkv(rng, spec)
    n_kv = min(spec.massive_tokens, spec.lk)
    n_q = min(spec.massive_tokens, spec.lq)
    kv_rows = rng.choice(spec.lk, size=n_kv, replace=False)
    q_rows = rng.choice(spec.lq, size=n_q, replace=False)
    k[:, :, kv_rows, :] *= spec.massive_scale
    v[:, :, kv_rows, :] *= spec.massive_scale
    q[:, :, q_rows, :] *= spec.massive_scale
    return q, k, v


def _attention_sink(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """Key 0 is a sink: with u a random unit vector per kv head and a = sink_strength * d^(1/4),
    q += a * u (every query of the group) and k[..., 0, :] += a * u, so the logit
    (q . k_0) / sqrt(d) exceeds the others by about sink_strength^2."""
    q, k, v = _standard_normal_qkv(rng, spec)
    u = rng.standard_normal((spec.batch, spec.kv_heads, 1, spec.head_dim))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    amplitude = spec.sink_strength * spec.head_dim**0.25
    group = spec.heads // spec.kv_heads
    q = q + amplitude * np.repeat(u, group, axis=1)
    k[:, :, :1, :] += amplitude * u
    return q, k, v


def _scaled_logits(rng: np.random.Generator, spec: AttentionInputSpec) -> QKV:
    """Gaussian q, k, v with q *= logit_scale: every logit scales by logit_scale
    (peaky softmax for logit_scale > 1, flat for < 1)."""
    q, k, v = _standard_normal_qkv(rng, spec)
    return q * spec.logit_scale, k, v


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, AttentionInputSpec], QKV]] = {
    "gaussian": _gaussian,
    "student_t": _student_t,
    "lognormal": _lognormal,
    "sparse_outliers": _sparse_outliers,
    "outlier_channels": _outlier_channels,
    "key_bias": _key_bias,
    "massive_activations": _massive_activations,
    "attention_sink": _attention_sink,
    "peaky": _scaled_logits,
    "flat": _scaled_logits,
}


def generate_attention_inputs(
    rng: np.random.Generator, spec: AttentionInputSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw (q, k, v) from ``spec.distribution``, rounded to ``spec.dtype``, as float32.

    q: (batch, heads, lq, head_dim); k, v: (batch, kv_heads, lk, head_dim).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    q, k, v = DISTRIBUTIONS[spec.distribution](rng, spec)
    return tuple(round_to_dtype(np.asarray(t, dtype=np.float32), spec.dtype) for t in (q, k, v))


# ---------------------------------------------------------------------------
# quantizer-input distributions (blocks along the last axis)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    """One drawn attention input: regenerate it with ``generate_attention_inputs(
    numpy.random.default_rng(seed), spec)``. The repr omits the arrays."""

    spec: AttentionInputSpec
    seed: int
    causal: bool
    sm_scale: float | None
    q: np.ndarray = field(repr=False, compare=False)
    k: np.ndarray = field(repr=False, compare=False)
    v: np.ndarray = field(repr=False, compare=False)
    # captured activations (``--inputs FILE``): their dO, if any, and the file they came from
    do: np.ndarray | None = field(default=None, repr=False, compare=False)
    source: str | None = None


def _blocked(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Shape (..., n_blocks, block_size) covering the last axis (rounded up)."""
    if not shape:
        raise ValueError("shape must have at least one axis")
    n_blocks = -(-shape[-1] // block_size)
    return (*shape[:-1], n_blocks, block_size)


def _unblock(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    flat = x.reshape(*x.shape[:-2], -1)
    return np.ascontiguousarray(flat[..., : shape[-1]])


def _random_signs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=shape)


def _block_power_of_two(
    rng: np.random.Generator, blocked_shape: tuple[int, ...], min_exp: int, max_exp: int
) -> np.ndarray:
    """One scale 2^e per block, e uniform in [min_exp, max_exp], broadcast over the block."""
    exps = rng.integers(min_exp, max_exp + 1, size=(*blocked_shape[:-1], 1))
    return np.ldexp(1.0, exps)


def _tensor_gaussian(
    rng: np.random.Generator, shape: tuple[int, ...], block_size: int, std: float = 1.0
) -> np.ndarray:
    """x ~ N(0, std^2)."""
    return std * rng.standard_normal(shape)


def _tensor_student_t(
    rng: np.random.Generator, shape: tuple[int, ...], block_size: int, df: float = 3.0
) -> np.ndarray:
    """x ~ Student-t(df)."""
    return rng.standard_t(df, shape)


def _tensor_lognormal(
    rng: np.random.Generator, shape: tuple[int, ...], block_size: int, sigma: float = 2.0
) -> np.ndarray:
    """x = s * exp(sigma * z), s uniform in {-1, +1}, z ~ N(0, 1)."""
    return _random_signs(rng, shape) * np.exp(sigma * rng.standard_normal(shape))


def _tensor_sparse_outliers(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    outlier_fraction: float = 0.01,
    outlier_scale: float = 100.0,
) -> np.ndarray:
    """x = z * (1 + (outlier_scale - 1) * b), z ~ N(0, 1), b ~ Bernoulli(outlier_fraction)."""
    z = rng.standard_normal(shape)
    return np.where(rng.random(shape) < outlier_fraction, z * outlier_scale, z)


def _ties_blocked(
    rng: np.random.Generator, blocked: tuple[int, ...], min_exp: int, max_exp: int,
    mantissa: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(x, is_amax) in blocked layout for the ``ties`` construction, block scales
    ``mantissa`` * 2^e."""
    block_size = blocked[-1]
    ties = rng.choice(np.array(E2M1_TIES), size=blocked)
    amax_at = rng.integers(0, block_size, size=(*blocked[:-1], 1))
    is_amax = np.broadcast_to(np.arange(block_size) == amax_at, blocked)
    magnitudes = np.where(is_amax, _E2M1_MAX, ties)
    scale = mantissa * _block_power_of_two(rng, blocked, min_exp, max_exp)
    return _random_signs(rng, blocked) * magnitudes * scale, is_amax


def _tensor_ties(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    min_exp: int = -4,
    max_exp: int = 4,
) -> np.ndarray:
    """Values exactly on E2M1 rounding ties after block scaling.

    Per block, a power of two 2^e (e uniform in [min_exp, max_exp]); one element is
    +-6 * 2^e (the block amax, so both the NVFP4 scale amax/6 and the MX rceil scale
    equal 2^e exactly, and 1/2^e is exact), the others are +-t * 2^e with t drawn from
    the E2M1 ties {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5}.
    """
    x, _ = _ties_blocked(rng, _blocked(shape, block_size), min_exp, max_exp)
    return _unblock(x, shape)


def _tensor_reciprocal_ties(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    min_exp: int = -4,
    max_exp: int = 4,
) -> np.ndarray:
    """As ``ties``, with NVFP4 block scales s = 1.875 * 2^e (E4M3 mantissa 1.111b), e in
    [min_exp, max_exp] inside E4M3's normal range. amax = 6 s and every other element t s are
    exact, so x / s lands exactly on the tie t, while x * RN(1/s) is an ulp above t for every
    tie from 0.75 up (1/s is inexact for every E4M3 mantissa but 1.0, yet for the smaller
    ones the float32 product rounds back onto t at most ties): the two ways of applying a
    scale (``fp4sim.settings`` ``scale_op``: reciprocal, divide) round differently at
    t = 1.25, 2.5 and 5, whose even neighbour is below. MX scales are powers of two: there
    these are ordinary values."""
    x, _ = _ties_blocked(rng, _blocked(shape, block_size), min_exp, max_exp, mantissa=1.875)
    return _unblock(x, shape)


def _tensor_near_ties(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    min_exp: int = -4,
    max_exp: int = 4,
) -> np.ndarray:
    """As ``ties``, then every non-amax element moved one float32 ulp up or down
    (np.nextafter toward +-inf): RNE decides on the exact float32 input, so half of
    these round away from the tie's even neighbour (docs/numerics.md, E2M1)."""
    x, is_amax = _ties_blocked(rng, _blocked(shape, block_size), min_exp, max_exp)
    x = x.astype(np.float32)
    toward = np.where(rng.random(x.shape) < 0.5, np.float32(-np.inf), np.float32(np.inf))
    return _unblock(np.where(is_amax, x, np.nextafter(x, toward)), shape)


def _tensor_scale_ties(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    min_exp: int = -6,
    max_exp: int = 6,
) -> np.ndarray:
    """Blocks whose NVFP4 scale amax/6 lies exactly on an E4M3 rounding tie.

    amax = 6 * (1 + (2m + 1)/16) * 2^e, m uniform in 0..6, e in [min_exp, max_exp]: the
    midpoint of the E4M3 neighbours (1 + m/8) 2^e and (1 + (m+1)/8) 2^e (3 mantissa bits,
    OCP OFP8 spec); amax/6 in float32 is exact, so RNE picks the even mantissa. The other
    elements are N(0, 1) scaled into (-amax, amax).
    """
    blocked = _blocked(shape, block_size)
    m = rng.integers(0, 7, size=(*blocked[:-1], 1))
    scale = (1.0 + (2 * m + 1) / 16.0) * _block_power_of_two(rng, blocked, min_exp, max_exp)
    amax = _E2M1_MAX * scale
    rest = np.clip(rng.standard_normal(blocked) / 3.0, -0.999, 0.999) * amax
    amax_at = rng.integers(0, block_size, size=(*blocked[:-1], 1))
    x = np.where(np.arange(block_size) == amax_at, _random_signs(rng, blocked) * amax, rest)
    return _unblock(x, shape)


def _tensor_zero_blocks(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    zero_fraction: float = 0.5,
) -> np.ndarray:
    """N(0, 1) with each block independently set to all zeros (+0 or -0) with
    probability zero_fraction."""
    blocked = _blocked(shape, block_size)
    x = rng.standard_normal(blocked)
    zero = rng.random((*blocked[:-1], 1)) < zero_fraction
    signed_zero = np.where(rng.random(blocked) < 0.5, -0.0, 0.0)
    return _unblock(np.where(zero, signed_zero, x), shape)


def _tensor_below_flush(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    min_exp: int = -16,
    max_exp: int = -4,
) -> np.ndarray:
    """N(0, 1) blocks scaled by 2^e * u, e uniform in [min_exp, max_exp], u ~ U(0.5, 1):
    block amaxes straddle the NVFP4 flush threshold 6 * 2^-10 (the E4M3 scale amax/6 rounds
    to 0 below half its smallest subnormal 2^-9, docs/numerics.md)."""
    blocked = _blocked(shape, block_size)
    gain = _block_power_of_two(rng, blocked, min_exp, max_exp) * rng.uniform(
        0.5, 1.0, size=(*blocked[:-1], 1)
    )
    return _unblock(rng.standard_normal(blocked) * gain, shape)


def _tensor_specials(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    block_size: int,
    special_fraction: float = 0.05,
) -> np.ndarray:
    """N(0, 1) with a fraction of entries replaced by a special value drawn uniformly from
    {NaN, +Inf, -Inf, -0.0, +-3e38 (near float32 max), +-1e-40 (float32 subnormal), +-6.0}."""
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 3e38, -3e38, 1e-40, -1e-40, 6.0, -6.0])
    x = rng.standard_normal(shape)
    chosen = rng.choice(specials, size=shape)
    with np.errstate(over="ignore"):
        return np.where(rng.random(shape) < special_fraction, chosen, x)


TENSOR_DISTRIBUTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian": _tensor_gaussian,
    "student_t": _tensor_student_t,
    "lognormal": _tensor_lognormal,
    "sparse_outliers": _tensor_sparse_outliers,
    "ties": _tensor_ties,
    "near_ties": _tensor_near_ties,
    "reciprocal_ties": _tensor_reciprocal_ties,
    "scale_ties": _tensor_scale_ties,
    "zero_blocks": _tensor_zero_blocks,
    "below_flush": _tensor_below_flush,
    "specials": _tensor_specials,
}


def generate_tensor(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    distribution: str = "gaussian",
    *,
    block_size: int = 16,
    dtype: str = "float32",
    **params: float,
) -> np.ndarray:
    """A float32 array of ``shape`` from a quantizer-input distribution.

    ``block_size`` (16 for NVFP4, 32 for MXFP4) is the block length along the last axis
    that block-structured distributions (ties, near_ties, reciprocal_ties, scale_ties,
    zero_blocks, below_flush) build on; ``params`` are the distribution's keyword parameters
    (see each distribution's docstring in ``TENSOR_DISTRIBUTIONS``). The result is rounded to
    ``dtype`` (float32 keeps it as is).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if distribution not in TENSOR_DISTRIBUTIONS:
        raise ValueError(
            f"unknown tensor distribution {distribution!r}; known: {sorted(TENSOR_DISTRIBUTIONS)}"
        )
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    shape = tuple(int(s) for s in shape)
    with np.errstate(over="ignore", invalid="ignore"):
        x = TENSOR_DISTRIBUTIONS[distribution](rng, shape, block_size, **params)
        x = np.asarray(x, dtype=np.float32).reshape(shape)
    return round_to_dtype(x, dtype)
