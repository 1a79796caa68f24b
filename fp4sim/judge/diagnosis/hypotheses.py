"""The hypothesis library: families of deviations real FP4 attention kernels make, each
generated from parameters (operands x settings) rather than listed by hand.

A hypothesis is the faithful knobs (deviant.faithful) with one deviation; its ``name`` is a
stable identifier (family:detail) and ``text`` the sentence shown to the kernel author.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from fp4sim.formats import BLOCK_SIZES
from fp4sim.judge.diagnosis.deviant import Knobs
from fp4sim.judge.diagnosis.fake_quant import QuantKnobs

FAMILIES = (
    "granularity",
    "scale",
    "which_quantized",
    "p_flow",
    "mask",
    "gqa",
    "factor",
    "running_max",
    "tail",
    "rounding",
)


@dataclass(frozen=True)
class Hypothesis:
    name: str
    family: str
    text: str
    knobs: Knobs


# Operands of the forward and the operand each backward product reads (knob, words).
_FWD = (("q", "Q"), ("k", "K"), ("v", "V"), ("p", "P"))
_BWD = (
    ("q_for_s", "Q in the backward's recomputed S"),
    ("k_for_s", "K in the backward's recomputed S"),
    ("v_for_dp", "V in dP = dO V^T"),
    ("k_for_dq", "K in dQ = dS K"),
    ("q_for_dk", "Q in dK = dS^T Q"),
    ("p_for_dv", "the backward's P~ in dV = P~^T dO"),
)
_DTYPES = ("bfloat16", "float16")
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def _axis_words(name: str, axis: int) -> str:
    if name in ("v", "v_for_dp"):
        return "head_dim" if axis == -1 else "keys"
    if name in ("p", "p_for_dv"):
        return "keys" if axis == -1 else "queries"
    return "head_dim" if axis == -1 else "tokens"


def _granularity(base: Knobs) -> Iterator[Hypothesis]:
    ops = [(n, w, getattr(base, n)) for n, w in _FWD]
    ops += [(n, w, getattr(base, {"q_for_s": "q", "k_for_s": "k", "v_for_dp": "v",
                                  "k_for_dq": "k", "q_for_dk": "q", "p_for_dv": "p"}[n]))
            for n, w in _BWD]
    for name, words, kn in ops:
        if kn is None:
            continue
        where = "" if len(name) == 1 else " (backward)"
        changes: list[tuple[str, str, QuantKnobs]] = []
        for block in (8, 16, 32, 64, 0):
            if block != kn.block:
                size = "one scale per row" if block == 0 else f"blocks of {block}"
                changes.append((f"block{block}", f"quantized in {size} instead of {kn.block}",
                                kn.with_(block=block)))
        other = -2 if kn.axis == -1 else -1
        ours, theirs = _axis_words(name, other), _axis_words(name, kn.axis)
        changes.append(("axis", f"blocked along the wrong axis ({ours} instead of {theirs})",
                        kn.with_(axis=other)))
        fmt = "mxfp4" if kn.fmt == "nvfp4" else "nvfp4"
        changes.append((fmt, f"quantized as {fmt.upper()} instead of {kn.fmt.upper()}",
                        kn.with_(fmt=fmt, block=BLOCK_SIZES[fmt])))
        for tag, text, new in changes:
            yield from _operand_change(base, name, f"granularity:{name}:{tag}", "granularity",
                                       f"{words}{where} {text}", new)


# the backward products that read each forward operand
_READS = {"q": ("q_for_s", "q_for_dk"), "k": ("k_for_s", "k_for_dq"), "v": ("v_for_dp",),
          "p": ("p_for_dv",)}


def _operand_change(base: Knobs, name: str, hid: str, family: str, text: str,
                    new: QuantKnobs | None) -> Iterator[Hypothesis]:
    """A forward operand's quantizer changed in the forward and the backward, in the
    forward only, and (for a forward operand) in the backward only."""
    reads = _READS.get(name)
    if reads is None:
        yield Hypothesis(hid, family, text, replace(base, **{name: new}))
        return
    yield Hypothesis(hid, family, f"{text} (forward and backward)",
                     replace(base, **{name: new}))
    kept = {r: getattr(base, name) for r in reads}
    yield Hypothesis(f"{hid}:fwd_only", family, f"{text} (in the forward only)",
                     replace(base, **{name: new}, **kept))
    yield Hypothesis(f"{hid}:bwd_only", family, f"{text} (in the backward only)",
                     replace(base, **{r: new for r in reads}))


# scale-arithmetic deviations: (id, words, QuantKnobs changes)
_SCALE = (
    ("div4", "block scale amax/4 instead of amax/6", {"divisor": 4.0}),
    ("div8", "block scale amax/8 instead of amax/6", {"divisor": 8.0}),
    ("e4m3_up", "E4M3 block scale rounded up instead of to nearest", {"e4m3_round": "up"}),
    ("e4m3_down", "E4M3 block scale rounded down (truncated) instead of to nearest",
     {"e4m3_round": "down"}),
    ("scale_f32", "block scale kept in float32 (not rounded to E4M3)", {"scale_dtype": "float32"}),
    ("scale_pow2", "block scale rounded up to a power of two (E8M0-like)",
     {"scale_dtype": "e8m0"}),
    ("divide", "data divided by the scale (x / s) instead of multiplied by 1/s",
     {"scale_op": "divide"}),
    ("amax_recip", "block scale amax * (1/6) instead of amax / 6", {"amax_op": "reciprocal"}),
    ("lower_clamp", "block scale clamped below at 2^-6", {"lower_clamp": True}),
    ("tensor_scale", "an extra amax tensor scale (two-level NVFP4)", {"tensor_scale": "amax"}),
    ("ties_away", "E2M1 ties rounded away from zero instead of to even", {"elem_round": "away"}),
    ("ties_zero", "E2M1 ties rounded toward zero instead of to even", {"elem_round": "zero"}),
    ("trunc", "E2M1 values truncated toward zero instead of rounded", {"elem_round": "trunc"}),
    ("pre_bf16", "x/s rounded to bfloat16 before E2M1 (double rounding)",
     {"pre_round": "bfloat16"}),
    ("pre_fp16", "x/s rounded to float16 before E2M1 (double rounding)",
     {"pre_round": "float16"}),
)
_MX_SCALE = (
    ("mx_floor", "MX scale by the OCP floor rule instead of rceil", {"scale_rule": "floor"}),
    ("mx_ceil", "MX scale by ceil(log2 amax) - 2 instead of rceil", {"scale_rule": "ceil"}),
    ("mx_even", "MX scale by the round-to-even rule instead of rceil", {"scale_rule": "even"}),
)


def _scale(base: Knobs) -> Iterator[Hypothesis]:
    # One operand, or the quantizer shared by several (a kernel often has one routine).
    targets = [((n,), w) for n, w in _FWD if getattr(base, n) is not None]
    shared = tuple(n for n in ("q", "k", "v") if getattr(base, n) is not None)
    if len(shared) > 1:
        targets.append((shared, "Q, K, V"))
    every = tuple(n for n, _ in _FWD if getattr(base, n) is not None)
    if len(every) > len(shared):
        targets.append((every, "every operand (Q, K, V, P)"))
    for names, words in targets:
        fmt = getattr(base, names[0]).fmt
        table = _SCALE if fmt == "nvfp4" else _MX_SCALE + _SCALE[10:]
        for sid, text, change in table:
            kw = {n: getattr(base, n).with_(**change) for n in names}
            # the backward reads the same quantized operands (_SAME); P's backward quantizer too
            yield Hypothesis(f"scale:{'+'.join(names)}:{sid}", "scale", f"{words}: {text}",
                             replace(base, **kw))


def _which_quantized(base: Knobs) -> Iterator[Hypothesis]:
    quantized = [name for name, _ in _FWD if getattr(base, name) is not None]
    if len(quantized) > 1:
        # a kernel that quantizes nothing (plain attention, e.g. SDPA) checked against an FP4
        # recipe: every operand at once, which no single-operand change explains on large cases
        yield Hypothesis("which:all:none", "which_quantized",
                         "nothing quantized: plain high-precision attention (the bf16 recipe's "
                         "numerics), forward and backward",
                         replace(base, **{name: None for name in quantized}))
    for name, words in _FWD:
        if getattr(base, name) is None:
            continue
        yield from _operand_change(base, name, f"which:{name}:none", "which_quantized",
                                   f"{words} not quantized (used in high precision)", None)
    for name, words in _BWD:
        if getattr(base, name) is None:
            continue
        if name == "p_for_dv":
            continue  # dV from the unquantized P: p_flow family
        yield Hypothesis(f"which:{name}:none", "which_quantized",
                         f"{words} not quantized (high precision instead of the forward's FP4)",
                         replace(base, **{name: None}))
    if base.q is not None and base.k is not None:
        yield Hypothesis(
            "which:s_bwd:none", "which_quantized",
            "backward recomputes S in high precision (from Q, K instead of Q^, K^; dQ, dK "
            "still from K^, Q^)", replace(base, q_for_s=None, k_for_s=None))
        yield Hypothesis(
            "which:qk_bwd:none", "which_quantized",
            "backward recomputes S in high precision from the unquantized Q, K (and uses Q, K"
            " in dQ, dK) instead of Q^, K^",
            replace(base, q_for_s=None, k_for_s=None, k_for_dq=None, q_for_dk=None))
        yield Hypothesis(
            "which:dqdk:none", "which_quantized",
            "dQ, dK use the unquantized K, Q (dQ = dS K, dK = dS^T Q instead of K^, Q^)",
            replace(base, k_for_dq=None, q_for_dk=None))
        yield Hypothesis(
            "which:bwd_all:none", "which_quantized",
            "backward in high precision throughout (S, dP, dQ, dK from Q, K, V)",
            replace(base, q_for_s=None, k_for_s=None, k_for_dq=None, q_for_dk=None,
                    v_for_dp=None))
    nv = QuantKnobs()
    extra_q = (
        ("do_for_dv", "dO quantized to NVFP4 (along head_dim) in dV = P~^T dO", nv),
        ("do_for_dv", "dO quantized to NVFP4 (along queries) in dV = P~^T dO", nv.with_(axis=-2)),
        ("do_for_dp", "dO quantized to NVFP4 in dP = dO V^T", nv),
        ("ds_for_dqk", "dS quantized to NVFP4 (along keys) in dQ, dK", nv),
    )
    for name, text, kn in extra_q:
        tag = f"{name}:{'q' if kn.axis == -2 else 'd'}"
        yield Hypothesis(f"which:{tag}:fp4", "which_quantized", text, replace(base, **{name: kn}))


def _p_flow(base: Knobs) -> Iterator[Hypothesis]:
    rows = [
        ("p_norm", "before", "P normalized before quantization in the forward "
         "(FQ(exp(S - LSE)) V instead of FQ(exp(S - m)) V / l)"),
        ("l_from", "tilde", "l summed from the quantized P~ instead of the high-precision P"),
        ("o_from", "hp", "O computed from the unquantized P (P V / l instead of P~ V / l)"),
        ("dv_from", "hp", "dV from the unquantized P (P instead of P~ in dV = P^T dO)"),
        ("dv_from", "tilde_fwd",
         "dV from the forward's P~ (quantized against the running max) instead of the "
         "backward's FQ(P)"),
        ("ds_from", "tilde", "dS = P~ (dP - D) from the quantized P~ instead of P"),
        ("d_from", "o", "D from the quantized O (rowsum(dO*O) instead of rowsum(dO*O_hp);"
         " equivalently O_hp accumulated from P~)"),
    ]
    for knob, value, text in rows:
        if getattr(base, knob) == value:
            continue
        if base.p is None and knob in ("p_norm", "l_from", "o_from", "o_hp_from", "dv_from"):
            continue
        yield Hypothesis(f"p_flow:{knob}:{value}", "p_flow", text,
                         replace(base, **{knob: value}))


def _mask(base: Knobs, causal: bool) -> Iterator[Hypothesis]:
    # (id, words, forward knobs, the same knobs for the backward's mask)
    devs = [("flip", "causal flag ignored (no mask)" if causal else
             "causal mask applied (not asked for)", {"causal_flip": True},
             {"bwd_causal_flip": True})]
    if causal:
        devs += [
            ("top_left", "causal mask aligned top-left (query i sees keys j <= i) instead of "
             "bottom-right (j <= i + Lk - Lq)", {"mask_align": "top_left"},
             {"bwd_mask_align": "top_left"}),
            ("offset-1", "causal mask off by one (the diagonal key masked)",
             {"mask_offset": -1}, {"bwd_mask_offset": -1}),
            ("offset+1", "causal mask off by one (one key past the diagonal visible)",
             {"mask_offset": 1}, {"bwd_mask_offset": 1}),
        ]
    right = {"bwd_causal_flip": False, "bwd_mask_align": "bottom_right", "bwd_mask_offset": 0}
    for tag, words, fwd, bwd in devs:
        yield Hypothesis(f"mask:{tag}", "mask", words, replace(base, **fwd))
        yield Hypothesis(f"mask:{tag}:fwd_only", "mask", f"{words}, in the forward only",
                         replace(base, **fwd, **right))
        yield Hypothesis(f"mask:{tag}:bwd_only", "mask", f"{words}, in the backward only",
                         replace(base, **bwd))


def _gqa(base: Knobs, group: int) -> Iterator[Hypothesis]:
    if group <= 1:
        return
    text = "GQA head mapping h % Hkv instead of h // (H / Hkv)"
    yield Hypothesis("gqa:modulo", "gqa", text, replace(base, head_map="modulo"))
    yield Hypothesis("gqa:modulo:fwd_only", "gqa", f"{text}, in the forward only",
                     replace(base, head_map="modulo", head_map_bwd=base.head_map))
    yield Hypothesis("gqa:modulo:bwd_only", "gqa", f"{text}, in the backward only",
                     replace(base, head_map_bwd="modulo"))
    yield Hypothesis("gqa:dkv_first", "gqa",
                     "GQA dK, dV taken from the first query head of a group instead of summed",
                     replace(base, dkv_reduce="first"))
    yield Hypothesis("gqa:dkv_mean", "gqa",
                     "GQA dK, dV averaged over a head group instead of summed",
                     replace(base, dkv_reduce="mean"))


def _factor(base: Knobs, tau: float, default_tau: float) -> Iterator[Hypothesis]:
    mults = [
        ("missing_sm_scale", 1.0 / tau, "sm_scale missing"),
        ("double_sm_scale", tau, "sm_scale applied twice"),
        ("missing_log2e", LN2, "exp2 without the log2(e) factor"),
        ("double_log2e", LOG2E, "log2(e) applied with exp (or twice)"),
    ]
    if not math.isclose(tau, default_tau):
        mults.append(("ignored_sm_scale", default_tau / tau,
                      "the sm_scale argument ignored (1/sqrt(d) used)"))
    for tag, mult, words in (("base2", LOG2E, "the LSE saved in base 2 (m log2 e + log2 l) "
                              "but read as a natural log by the backward"),
                             ("base_e_as_2", LN2, "a natural-log LSE read as base 2 by the "
                              "backward")):
        yield Hypothesis(f"factor:lse:{tag}", "factor", words, replace(base, lse_mult=mult))
    for tag, mult, words in mults:
        yield Hypothesis(f"factor:s:{tag}", "factor", f"{words} in the scores (forward and "
                         "backward)", replace(base, s_mult=mult))
        yield Hypothesis(f"factor:s_fwd:{tag}", "factor", f"{words} in the forward scores only",
                         replace(base, s_mult=mult, s_mult_bwd=1.0))
        yield Hypothesis(f"factor:s_bwd:{tag}", "factor",
                         f"{words} in the backward's recomputed scores",
                         replace(base, s_mult_bwd=mult))
    grads = (
        ("missing_sm_scale", 1.0 / tau, "sm_scale missing"),
        ("double_sm_scale", tau, "sm_scale applied twice"),
        ("ln2", LN2, "an extra ln 2 factor"),
        ("log2e", LOG2E, "an extra log2(e) factor"),
        ("x2", 2.0, "a factor 2"),
        ("half", 0.5, "a factor 1/2"),
    )
    if not math.isclose(tau, default_tau):
        grads += (("ignored_sm_scale", default_tau / tau, "1/sqrt(d) instead of sm_scale"),)
    for tag, mult, words in grads:
        for knobs, what in ((("dq_mult",), "dQ"), (("dk_mult",), "dK"),
                            (("dq_mult", "dk_mult"), "dS (dQ and dK)"), (("dv_mult",), "dV")):
            if what == "dV" and tag in ("missing_sm_scale", "double_sm_scale"):
                continue
            yield Hypothesis(f"factor:{'+'.join(knobs)}:{tag}", "factor", f"{words} in {what}",
                             replace(base, **{k: mult for k in knobs}))


def _running_max(base: Knobs, lk: int) -> Iterator[Hypothesis]:
    n_tiles = -(-lk // base.block_n)
    if base.p is not None and base.p_max == "running" and n_tiles > 1:
        # split-KV (flash-decoding): P~ quantized against a running max that restarts at each
        # split; a fixed number of splits, or a fixed split length
        for n in (2, 3, 4, 8):
            yield Hypothesis(
                f"running_max:splits{n}", "running_max",
                f"the keys cut into {n} splits (split-KV / flash-decoding), each with its own "
                f"running max: P~ quantized against its split's max, then the splits merged "
                f"(if by design, declare it: the recipe option kv_splits={n}, `fp4sim check "
                f"--kv-splits {n}`)",
                replace(base, kv_splits=n, kv_split_tiles=0))
        if base.kv_splits > 1 or base.kv_split_tiles:
            declared = (f"{base.kv_splits} splits" if base.kv_splits > 1 else
                        f"splits of {base.kv_split_tiles * base.block_n} keys")
            yield Hypothesis(
                "running_max:one_pass", "running_max",
                f"one running max over all keys (no split-KV), where the recipe declares "
                f"{declared}", replace(base, kv_splits=0, kv_split_tiles=0))
        for t in (1, 2, 4, 8, 16):
            if t < n_tiles:
                keys = t * base.block_n
                yield Hypothesis(
                    f"running_max:split_keys{keys}", "running_max",
                    f"the keys cut into splits of {keys} (split-KV / flash-decoding), each "
                    f"with its own running max: P~ quantized against its split's max, then "
                    f"the splits merged (if by design, declare it: the recipe option "
                    f"kv_split_keys={keys}, `fp4sim check --kv-split-keys {keys}`)",
                    replace(base, kv_split_tiles=t, kv_splits=0))
    if base.p is not None:
        other = "final" if base.p_max == "running" else "running"
        text = ("P quantized against the wrong max (the final row max instead of the running "
                "max of its key tile)" if other == "final" else
                "P quantized against the wrong max (the running max instead of the final)")
        yield Hypothesis(f"running_max:p_max:{other}", "running_max", text,
                         replace(base, p_max=other))
        yield Hypothesis(f"running_max:p_max:{other}:fwd_only", "running_max",
                         f"{text}, in the forward only", replace(base, p_max=other,
                                                                 p_max_bwd=base.p_max))
        yield Hypothesis(f"running_max:p_max:{other}:bwd_only", "running_max",
                         f"{text}, in the backward's P~ only", replace(base, p_max_bwd=other))
    for bn in (16, 32, 128):
        if bn != base.block_n and (base.p is None or bn % base.p.block == 0):
            yield Hypothesis(f"running_max:block_n{bn}", "running_max",
                             f"key tiles of {bn} instead of {base.block_n} (running max differs)",
                             replace(base, block_n=bn))
    yield Hypothesis("running_max:no_acc_rescale", "running_max",
                     "output accumulator (P~ V) not rescaled by exp(m_old - m_new) when the "
                     "running max grows", replace(base, rescale="no_acc"))
    yield Hypothesis("running_max:no_acc_hp_rescale", "running_max",
                     "high-precision accumulator (P V, for O_hp and D) not rescaled by "
                     "exp(m_old - m_new) when the running max grows",
                     replace(base, rescale="no_acc_hp"))
    yield Hypothesis("running_max:no_l_rescale", "running_max",
                     "row sum l not rescaled by exp(m_old - m_new) when the running max grows",
                     replace(base, rescale="no_l"))


def _tail(base: Knobs, lk: int) -> Iterator[Hypothesis]:
    if lk % 16 and base.p is not None:
        yield Hypothesis("tail:p_unquantized", "tail",
                         "the last, partial 16-key block of P left unquantized (high-precision P"
                         " in P~, forward and backward)", replace(base, p_tail="unquantized"))
    if lk % base.block_n:
        yield Hypothesis("tail:bwd_drops_tile", "tail",
                         f"the backward skips the last, partial {base.block_n}-key tile (its dK,"
                         " dV stay 0 and it adds nothing to dQ)",
                         replace(base, bwd_tail_tile="dropped"))
    for pad_to in (16, 32, 64, 128):
        if lk % pad_to == 0:
            continue
        yield Hypothesis(f"tail:softmax:{pad_to}", "tail",
                         f"padded keys not masked (Lk padded to a multiple of {pad_to}: zero keys"
                         " enter the softmax)", replace(base, pad_keys="softmax", pad_to=pad_to))
        if base.p is not None:
            yield Hypothesis(f"tail:p_scale:{pad_to}", "tail",
                             f"padded keys of the last, partial key block leak into the P block "
                             f"scale (keys padded to a multiple of {pad_to})",
                             replace(base, pad_keys="p_scale", pad_to=pad_to))


def _rounding(base: Knobs) -> Iterator[Hypothesis]:
    where = (
        ("round_s", "S"),
        ("round_acc", "the P~ V accumulator (after every key tile)"),
        ("round_o", "the output O (kept in a narrower type than the one returned)"),
        ("round_p", "P (before its quantization)"),
        ("round_o_hp", "O_hp (before D = rowsum(dO*O_hp))"),
        ("round_dp", "dP"),
        ("round_ds", "dS"),
    )
    for knob, words in where:
        for dt in _DTYPES:
            yield Hypothesis(f"rounding:{knob}:{dt}", "rounding",
                             f"{words} rounded to {dt}", replace(base, **{knob: dt}))


def attention_hypotheses(
    base: Knobs, *, causal: bool, group: int, lk: int, tau: float, backward: bool = True,
    default_tau: float | None = None,
) -> list[Hypothesis]:
    """Every hypothesis for a case (families that cannot show on it are left out);
    ``tau`` the case's softmax scale, ``default_tau`` 1/sqrt(d)."""
    default_tau = tau if default_tau is None else default_tau
    gens = (
        _granularity(base),
        _scale(base),
        _which_quantized(base),
        _p_flow(base),
        _mask(base, causal),
        _gqa(base, group),
        _factor(base, tau, default_tau),
        _running_max(base, lk),
        _tail(base, lk),
        _rounding(base),
    )
    out: list[Hypothesis] = []
    seen: set[str] = set()
    for gen in gens:
        for hyp in gen:
            if hyp.name in seen or hyp.knobs == base:
                continue
            seen.add(hyp.name)
            out.append(hyp)
    if not backward:  # forward-only kernels: backward-only deviations cannot show
        out = [h for h in out if changes_forward(h.knobs, base)]
    return out


FORWARD_KNOBS = frozenset({
    "q", "k", "v", "p", "p_max", "block_n", "kv_splits", "kv_split_tiles", "p_norm", "l_from",
    "o_from", "rescale", "causal_flip", "mask_align", "mask_offset", "pad_keys", "pad_to",
    "head_map", "s_mult", "round_s", "round_p", "round_acc", "round_o", "p_tail"})


def changes_forward(kn: Knobs, base: Knobs) -> bool:
    """Whether ``kn`` changes O (else only the gradients)."""
    return bool(set(kn.changed(base)) & FORWARD_KNOBS)
