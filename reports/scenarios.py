"""Named report scenarios: an input distribution of ``fp4sim.testing.generators`` × a shape.

A :class:`Scenario` fixes everything but the seed: the ``AttentionInputSpec`` (distribution,
its parameters, batch/heads/lengths/head dim), causality and tags that the findings use
(``key_bias``, ``long_rows``, ``baseline``). Inputs are regenerated from
``(scenario, seed)`` alone by :func:`scenario_inputs`, so a test can recompute any
number of the report.

Sets: ``QUICK_SCENARIOS`` (the default, sized to finish on a 2-core CPU in well under three
minutes), ``FULL_SCENARIOS`` (more strengths, lengths and head dims) and
``PRODUCTION_SCENARIOS`` (training and decode shapes, L = 16k to 128k, streamed).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fp4sim.judge.inputs import (
    AttentionInputSpec,
    generate_attention_inputs,
    round_to_dtype,
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    spec: AttentionInputSpec
    causal: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)
    sm_scale: float | None = None
    # captured activations (``--inputs FILE``): q, k, v (and dO or None) instead of drawn ones
    arrays: tuple[np.ndarray | None, ...] | None = field(default=None, compare=False, repr=False)
    source: str | None = None

    def shape_summary(self) -> dict[str, int | bool]:
        s = self.spec
        return {
            "batch": s.batch,
            "heads": s.heads,
            "kv_heads": s.kv_heads,
            "lq": s.lq,
            "lk": s.lk,
            "head_dim": s.head_dim,
            "causal": self.causal,
        }

    def to_json(self) -> dict[str, object]:
        params = {
            name: getattr(self.spec, name)
            for name in self.spec.__dataclass_fields__
            if name not in ("batch", "heads", "kv_heads", "lq", "lk", "head_dim")
        }
        return {
            "name": self.name,
            "description": self.description,
            "distribution": self.spec.distribution,
            "spec": params,
            "shape": self.shape_summary(),
            "sm_scale": self.sm_scale,
            "tags": list(self.tags),
            "source": self.source,
        }


def _spec(
    distribution: str,
    lq: int,
    lk: int,
    d: int = 64,
    heads: int = 2,
    kv_heads: int = 2,
    **params: float,
) -> AttentionInputSpec:
    return AttentionInputSpec(
        batch=1,
        heads=heads,
        kv_heads=kv_heads,
        lq=lq,
        lk=lk,
        head_dim=d,
        distribution=distribution,
        dtype="bfloat16",
        **params,
    )


def _scenario(
    name: str,
    description: str,
    spec: AttentionInputSpec,
    *,
    causal: bool = False,
    tags: tuple[str, ...] = (),
) -> Scenario:
    return Scenario(name=name, description=description, spec=spec, causal=causal, tags=tags)


def _long_rows(lk: int, lq: int = 64, d: int = 64) -> Scenario:
    suffix = "" if d == 64 else f"-d{d}"
    return _scenario(
        f"long-rows-L{lk}{suffix}",
        f"nearly flat softmax over {lk} keys (logits scaled by 0.1): P entries are about "
        f"1/L = {1 / lk:.1e}, below the NVFP4 flush threshold of 6*2^-10 = 5.9e-3 once "
        "normalized",
        _spec("flat", lq, lk, d, logit_scale=0.1),
        tags=("long_rows",),
    )


def _key_bias(strength: float, lq: int = 128, lk: int = 128, d: int = 64) -> Scenario:
    suffix = "" if (lq, lk, d) == (128, 128, 64) else f"-Lq{lq}-Lk{lk}-d{d}"
    return _scenario(
        f"key-bias-{strength:g}{suffix}",
        f"Gaussian q, k, v plus a bias vector of about {strength:g}x the key norm shared by "
        f"every key of a head (Lq {lq}, Lk {lk}, d {d}; a bias the softmax ignores, which "
        "breaks D = rowsum(dO*O) with an FP4 forward)",
        _spec("key_bias", lq, lk, d, key_bias=strength),
        tags=("key_bias",),
    )


QUICK_SCENARIOS: tuple[Scenario, ...] = (
    _scenario(
        "gaussian",
        "i.i.d. N(0, 1) q, k, v; L = 128, d = 64",
        _spec("gaussian", 128, 128),
        tags=("baseline",),
    ),
    _scenario(
        "student-t",
        "i.i.d. Student-t (3 degrees of freedom) q, k, v: heavy tails",
        _spec("student_t", 128, 128, df=3.0),
    ),
    _key_bias(1.0),
    _key_bias(2.0),
    _key_bias(4.0),
    _scenario(
        "outlier-channels",
        "4 of 64 head-dim channels of q and k scaled by 4",
        _spec("outlier_channels", 128, 128, outlier_channels=4, outlier_channel_scale=4.0),
    ),
    _scenario(
        "attention-sink",
        "key 0 is a sink (logit margin about 4)",
        _spec("attention_sink", 128, 128, sink_strength=2.0),
    ),
    _scenario("peaky", "logits x3: peaky softmax", _spec("peaky", 128, 128, logit_scale=3.0)),
    _scenario("flat", "logits x0.2: flat softmax", _spec("flat", 128, 128, logit_scale=0.2)),
    _long_rows(256),
    _long_rows(512),
    _long_rows(1024),
    _scenario(
        "causal-d128-Lq64-Lk256",
        "Gaussian, causal (bottom-right aligned), d = 128, Lq = 64 != Lk = 256, "
        "grouped-query (2 query heads per kv head)",
        _spec("gaussian", 64, 256, d=128, heads=2, kv_heads=1),
        causal=True,
    ),
)

FULL_SCENARIOS: tuple[Scenario, ...] = (
    *QUICK_SCENARIOS,
    _scenario(
        "gaussian-d128",
        "i.i.d. N(0, 1), d = 128",
        _spec("gaussian", 128, 128, d=128),
        tags=("baseline",),
    ),
    _scenario(
        "gaussian-causal-L512",
        "i.i.d. N(0, 1), causal, L = 512",
        _spec("gaussian", 512, 512),
        causal=True,
    ),
    _scenario(
        "student-t-df2", "Student-t with 2 degrees of freedom", _spec("student_t", 128, 128, df=2.0)
    ),
    _key_bias(0.5),
    _key_bias(8.0),
    _key_bias(4.0, lq=128, lk=1024),
    _scenario(
        "outlier-channels-x16",
        "2 of 64 channels of q and k scaled by 16",
        _spec("outlier_channels", 128, 128, outlier_channels=2, outlier_channel_scale=16.0),
    ),
    _scenario(
        "attention-sink-strong",
        "key 0 is a strong sink (logit margin about 9)",
        _spec("attention_sink", 128, 512, sink_strength=3.0),
    ),
    _scenario(
        "massive-activations",
        "4 tokens with q, k, v rows x20",
        _spec("massive_activations", 128, 128, massive_tokens=4, massive_scale=20.0),
    ),
    _scenario(
        "peaky-x6", "logits x6: very peaky softmax", _spec("peaky", 128, 128, logit_scale=6.0)
    ),
    _long_rows(2048),
    _long_rows(1024, d=128),
    _scenario(
        "causal-L1024",
        "Gaussian, causal, Lq = 256, Lk = 1024",
        _spec("gaussian", 256, 1024),
        causal=True,
        tags=("long_rows",),
    ),
)

SMOKE_SCENARIOS: tuple[Scenario, ...] = (
    _scenario(
        "smoke",
        "tiny Gaussian case for tests and quick checks (Lq 32, Lk 64, d 32)",
        _spec("gaussian", 32, 64, d=32, heads=1, kv_heads=1),
        tags=("baseline",),
    ),
    _scenario(
        "smoke-key-bias",
        "tiny key-bias case (strength 4) for tests",
        _spec("key_bias", 32, 64, d=32, heads=1, kv_heads=1, key_bias=4.0),
        tags=("key_bias",),
    ),
    _scenario(
        "smoke-causal",
        "tiny causal case, Lq 16 != Lk 48",
        _spec("gaussian", 16, 48, d=32, heads=1, kv_heads=1),
        causal=True,
    ),
    _scenario(
        "smoke-long-rows",
        "tiny long-row case for tests: 16 queries over 512 keys, logits x0.1 (P about 1/512)",
        _spec("flat", 16, 512, d=32, heads=1, kv_heads=1, logit_scale=0.1),
        tags=("long_rows",),
    ),
)

PRODUCTION_SCENARIOS: tuple[Scenario, ...] = (
    _scenario(
        "long-rows-L16384",
        "nearly flat softmax over 16384 keys (logits x0.1), B = H = 1, Lq = Lk = 16384, d = 64: "
        "P entries about 6e-5, where a normalized-P backward flushes every block",
        _spec("flat", 16384, 16384, d=64, heads=1, kv_heads=1, logit_scale=0.1),
        tags=("long_rows", "production"),
    ),
    _scenario(
        "video-dit-L32760",
        "a video diffusion transformer's self-attention: Gaussian, B = 1, H = 12, "
        "Lq = Lk = 32760, d = 128, not causal",
        _spec("gaussian", 32760, 32760, d=128, heads=12, kv_heads=12),
        tags=("production",),
    ),
    _scenario(
        "llm-L131072-decode",
        "an LLM decoding 16 tokens against a 131072-token context: Gaussian, B = 1, H = 8 "
        "query heads on 1 kv head (grouped-query), Lq = 16, Lk = 131072, d = 128, causal "
        "(bottom-right aligned)",
        _spec("gaussian", 16, 131072, d=128, heads=8, kv_heads=1),
        causal=True,
        tags=("production",),
    ),
)
"""Production shapes (``--production``): run by the streaming reference (memory linear in L,
``reference.streaming``); hours of CPU time, meant for a GPU or a sharded run."""

ALL_SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (*FULL_SCENARIOS, *SMOKE_SCENARIOS, *PRODUCTION_SCENARIOS)
}


def scenario_names() -> list[str]:
    return list(ALL_SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The named scenario; ``ValueError`` listing the valid names otherwise."""
    try:
        return ALL_SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r}; valid scenarios: {', '.join(ALL_SCENARIOS)}"
        ) from None


def inputs_scenario(path: str, arrays: dict[str, np.ndarray]) -> Scenario:
    """A scenario of captured activations (``--inputs FILE``: q, k, v and optionally do,
    BHLD). They are rounded to bfloat16, the scenarios' dtype, so that every kernel dtype
    and the reference see the same values; a missing dO is drawn from the seed."""
    q, k, v = (round_to_dtype(np.asarray(arrays[n], np.float32), "bfloat16") for n in "qkv")
    do = arrays.get("do")
    if do is not None:
        do = round_to_dtype(np.asarray(do, np.float32), "bfloat16")
    b, h, lq, d = q.shape
    spec = AttentionInputSpec(
        batch=b, heads=h, kv_heads=k.shape[1], lq=lq, lk=k.shape[2], head_dim=d,
        dtype="bfloat16",
    )
    name = f"inputs:{Path(path).name}"
    return Scenario(
        name=name,
        description=f"captured activations from {path} (rounded to bfloat16; not causal)",
        spec=spec,
        tags=("captured",),
        arrays=(q, k, v, do),
        source=str(path),
    )


def scenario_seed(seed: int, name: str) -> list[int]:
    """Entropy of the scenario's NumPy generator: the run seed and a CRC32 of the name."""
    return [int(seed), zlib.crc32(name.encode("utf-8"))]


def scenario_inputs(
    scenario: Scenario, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q, k, v, do) float32 arrays: q, k, v from the generator, then dO ~ N(0, 1) of q's
    shape from the same stream; all four exactly representable in ``spec.dtype`` (bfloat16
    for the built-in scenarios, so a bf16 kernel sees exactly the reference's inputs)."""
    rng = np.random.default_rng(scenario_seed(seed, scenario.name))
    if scenario.arrays is not None:
        q, k, v, do = scenario.arrays
        if do is None:
            do = round_to_dtype(rng.standard_normal(q.shape).astype(np.float32), "bfloat16")
        return q, k, v, do
    q, k, v = generate_attention_inputs(rng, scenario.spec)
    do = round_to_dtype(rng.standard_normal(q.shape).astype(np.float32), scenario.spec.dtype)
    return q, k, v, do
