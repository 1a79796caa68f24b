"""Differential diagnosis of an attention kernel: which named hypothesis (the reference with
one deliberate deviation, hypotheses.py) explains the kernel's output.

Score of a hypothesis H on one input, per tensor t (O, dQ, dK, dV):

    ratio_t = (||K_t - H_t|| + n_t) / (||K_t - R_t|| + n_t)

with K the kernel, R the faithful reference, n_t the L2 norm of the tensor's tolerance bound
(the rule's noise scale, so that a tensor that already agrees keeps ratio ~1 unless H breaks
it). H *explains* the input when the kernel satisfies the tolerance rule against H on every
tensor (a few rows excepted, for FP4 code flips at ties) and the failing tensors' ratios are
small. The shrunk case ranks every hypothesis; the best are re-tested on larger inputs that
tell them apart (shrinking makes defects coincide), and one is named only if it explains all
of them. ``kernel_outputs(case)`` is the only way the engine touches the kernel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fp4sim import reference
from fp4sim.judge.bounds import accumulation_floors
from fp4sim.judge.diagnosis.deviant import Knobs, deviant_attention, faithful
from fp4sim.judge.diagnosis.hypotheses import Hypothesis, attention_hypotheses, changes_forward
from fp4sim.judge.inputs import AttentionCase, generate_attention_inputs
from fp4sim.judge.rule import RULE_FACTORS

TENSORS = ("O", "dQ", "dK", "dV")
# Thresholds: explained when (a) at most ROW_SLACK of a tensor's rows (at least one row)
# exceed the bound against H -- P code flips at ties move single rows -- and (b) every failing
# tensor's residual shrinks to at most EXPLAIN_RATIO of its residual against the reference.
ROW_SLACK = 0.02
EXPLAIN_RATIO = 0.5
# Out-of-bound factors of the noise scale: the rule's own (fp4sim.judge.rule.RULE_FACTORS),
# forward for O and backward for the gradients, so that a tensor the check fails is failing
# here too (a single factor of 3 left O failures between 2x and 3x with nothing to explain)
NOISE_FACTORS = {n: RULE_FACTORS["forward" if n == "O" else "backward"] for n in TENSORS}
UNIT = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11, "float64": 2.0**-53}
RETEST_TOP = 60  # every explaining candidate, cascaded: each input drops the failed


@dataclass
class Score:
    """How one hypothesis fits the kernel on one input."""

    ratios: dict[str, float]  # per tensor, see module docstring
    rows_over: dict[str, tuple[int, int]]  # rows over the bound against H, rows
    blocks: dict[str, tuple[int, int]]  # failing 16-row blocks that H explains, failing blocks
    explains: bool

    @property
    def worst(self) -> float:
        return max(self.ratios.values()) if self.ratios else math.inf


@dataclass
class Ranked:
    hypothesis: Hypothesis
    score: Score
    retests: list[Score] = field(default_factory=list)

    @property
    def key(self) -> float:
        # sum of log ratios over the failing tensors, on every input tried
        total = sum(math.log(max(r, 1e-9)) for r in self.score.ratios.values())
        total += sum(math.log(max(r, 1e-9)) for s in self.retests for r in s.ratios.values())
        return total


@dataclass
class Diagnosis:
    """Outcome: ``named`` is the hypothesis that explains every input tried (or None);
    ``ranked`` the best candidates; ``equivalent`` others explaining exactly as well."""

    named: Hypothesis | None
    ranked: list[Ranked]
    equivalent: list[Hypothesis]
    retest_shapes: list[str]
    seconds: float
    n_hypotheses: int
    failing: list[str]

    def lines(self, top: int = 3) -> list[str]:
        out = []
        if self.named is not None:
            best = self.ranked[0]
            out.append(
                f"{self.named.text} [hypothesis {self.named.name}; residual vs it / vs the "
                f"reference: {_fmt_ratios(best.score)}; confirmed on "
                f"{len(best.retests)} larger input(s) {', '.join(self.retest_shapes)}]"
            )
            if self.equivalent:
                out.append("equally explained by: " + "; ".join(
                    f"{h.text} [{h.name}]" for h in self.equivalent[:3]))
        else:
            out.append(
                f"no known hypothesis explains it ({self.n_hypotheses} tried on "
                f"{', '.join(self.failing) or 'the failing tensors'})"
            )
            for r in self.ranked[:top]:
                state = "explains the shrunk case only" if r.score.explains else "closest"
                out.append(f"  {state}: {r.hypothesis.text} [{r.hypothesis.name}; "
                           f"{_fmt_ratios(r.score)}]")
        return out


def _fmt_ratios(score: Score) -> str:
    parts = []
    for t, r in score.ratios.items():
        txt = f"{t} {r:.2g}"
        ok, n = score.blocks.get(t, (0, 0))
        if n:
            txt += f" ({ok}/{n} failing 16-row blocks explained)"
        parts.append(txt)
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# one input: reference, noise and scores
# ---------------------------------------------------------------------------


@dataclass
class _Input:
    case: Any
    do: np.ndarray | None
    kernel: dict[str, Any]  # float64 torch tensors
    ref: dict[str, Any]
    bound: dict[str, Any]  # elementwise tolerance bound per tensor
    failing: list[str]
    out_dtype: str
    bound_h: dict[str, Any]  # the bound against a hypothesis (floors of either operands)


def _as64(t: Any) -> Any:
    if isinstance(t, np.ndarray):
        return torch.from_numpy(np.asarray(t, dtype=np.float64))
    return t.detach().to("cpu", torch.float64)


def _round_out(x: Any, dtype: str) -> Any:
    return x.to(getattr(torch, dtype)).to(torch.float64) if dtype != "float64" else x


def _run(case: Any, do: np.ndarray | None, knobs: Knobs, dtype: str,
         cache: dict | None = None) -> dict[str, Any]:
    q, k, v = (torch.from_numpy(a) for a in (case.q, case.k, case.v))
    dot = None if do is None else torch.from_numpy(np.asarray(do, dtype=np.float64))
    out = deviant_attention(q, k, v, dot, case.causal, case.sm_scale, knobs, cache)
    return {n: _round_out(t, dtype) for n, t in out.items()}


def _prepare(case: Any, do: np.ndarray | None, kernel: dict[str, Any], recipe: Any,
             base: Knobs) -> _Input:
    """Faithful reference, its tolerance bound (the rule of fp4sim.judge.rule.attention_error with
    float32 accumulation as the low-precision run) and the failing tensors."""
    kern = {n: _as64(t) for n, t in kernel.items() if n in TENSORS}
    out_dtype = case.spec.dtype
    raw = kernel.get("O")
    if raw is not None and hasattr(raw, "dtype"):
        out_dtype = str(raw.dtype).removeprefix("torch.")
        out_dtype = out_dtype if out_dtype in UNIT else case.spec.dtype
    ref64 = _run(case, do if "dQ" in kern else None, base, "float64")
    q, k, v = (torch.from_numpy(a) for a in (case.q, case.k, case.v))
    fwd = reference.fp4_attention_forward(q, k, v, recipe, causal=case.causal,
                                          sm_scale=case.sm_scale, accum_dtype=torch.float32)
    low = {"O": fwd.o}
    if "dQ" in kern and do is not None:
        g = reference.attention_backward(recipe.backward, fwd, q, k, v,
                                         torch.from_numpy(np.asarray(do, np.float32)), recipe,
                                         causal=case.causal, sm_scale=case.sm_scale)
        low |= dict(zip(("dQ", "dK", "dV"), g, strict=True))
    # the rule's componentwise floor (float32 rounding bound of the formulas), as the check
    q64, k64, v64 = (t.double() for t in (q, k, v))
    fwd64 = reference.fp4_attention_forward(q64, k64, v64, recipe, causal=case.causal,
                                            sm_scale=case.sm_scale, accum_dtype=torch.float64)
    do_f = np.zeros(case.q.shape, np.float32) if do is None else np.asarray(do, np.float32)
    floors = accumulation_floors(case, fwd64, do_f)
    # the same floors with unquantized operands: a hypothesis that reads Q, K or V where the
    # recipe reads Q^, K^, V^ has float32 errors where Q^, K^, V^ are 0 (flushed elements)
    raw = dataclasses.replace(fwd64, q_hat=q64, k_hat=k64, v_hat=v64)
    floors_raw = accumulation_floors(case, raw, do_f)
    u = UNIT[out_dtype]
    bound, failing, ref, bound_h = {}, [], {}, {}
    for n in kern:
        if n not in ref64 or n not in low:
            continue
        r = ref64[n]
        ref[n] = _round_out(r, out_dtype)
        lo = _round_out(low[n].to(torch.float64), out_dtype)
        ref_err = float((lo - r).abs().max())
        scale = float(r.abs().max())
        # the rule's bound (fp4sim.judge.rule.attention_error, before its allowances): factor
        # * max ref error + u * max|ref| + the componentwise float32 floors below; so a tensor
        # the check fails is failing here too
        b = NOISE_FACTORS[n] * ref_err + u * scale
        base_b = b
        b = base_b + torch.from_numpy(np.asarray(floors[n], dtype=np.float64))
        bound[n] = b
        bound_h[n] = torch.maximum(
            b, base_b + torch.from_numpy(np.asarray(floors_raw[n], dtype=np.float64)))
        if _rows_over(kern[n], ref[n], b)[0] > 0:
            failing.append(n)
    return _Input(case, do, kern, ref, bound, failing, out_dtype, bound_h)


def _rows(x: Any) -> Any:
    return x.reshape(-1, x.shape[-1])


def _rows_over(a: Any, b: Any, bound: Any) -> tuple[int, int]:
    diff = (a - b).abs()
    diff = torch.where(torch.isnan(diff), torch.inf, diff)
    over = _rows(diff > bound).any(dim=-1)
    return int(over.sum()), int(over.numel())


def _block_explained(a: Any, r: Any, h: Any, bound: Any) -> tuple[int, int]:
    """Failing 16-row blocks (along the sequence axis) of kernel vs reference, and how many
    of them the hypothesis brings within the bound."""
    def blocks(x: Any) -> Any:
        rows = x.any(dim=-1)  # (..., L)
        n = rows.shape[-1]
        pad = (-n) % 16
        rows = torch.nn.functional.pad(rows, (0, pad))
        return rows.reshape(*rows.shape[:-1], -1, 16).any(dim=-1)

    bad_r = blocks((a - r).abs() > bound)
    bad_h = blocks(((a - h).abs() > bound) | torch.isnan(a - h))
    n = int(bad_r.sum())
    return int((bad_r & ~bad_h).sum()), n


def _bound_for(bound: Any, ref: Any, hyp: Any) -> Any:
    """The tolerance bound against a hypothesis whose rows are larger than the reference's:
    float32 rounding errors grow with the values, so each row's bound is scaled by
    rowmax|H| / rowmax|R| (never below 1)."""
    if ref.dim() == 0:
        return bound
    r_row = ref.abs().amax(dim=-1, keepdim=True)
    floor = 1e-3 * float(ref.abs().max()) if ref.numel() else 0.0
    h_row = torch.nan_to_num(hyp.abs(), nan=0.0, posinf=0.0).amax(dim=-1, keepdim=True)
    scale = (h_row / r_row.clamp(min=floor if floor > 0 else 1e-300)).clamp(min=1.0)
    return bound * scale


_OPERAND_KNOBS = ("q", "k", "v", "q_for_s", "k_for_s", "v_for_dp", "k_for_dq", "q_for_dk")


def _reads_raw_operands(kn: Knobs) -> bool:
    """Whether a hypothesis reads an unquantized Q, K or V somewhere."""
    return any(getattr(kn, name) is None for name in _OPERAND_KNOBS)


def _score(inp: _Input, hyp_out: dict[str, Any], raw_operands: bool = False) -> Score:
    ratios, rows_over, blocks = {}, {}, {}
    explains = True
    for n, a in inp.kernel.items():
        if n not in inp.ref or n not in hyp_out:
            continue
        h, r, b_r = hyp_out[n], inp.ref[n], inp.bound[n]
        noise = float(b_r.norm())
        b = _bound_for(inp.bound_h[n] if raw_operands else b_r, r, h)
        d_h = float((a - h).norm())
        d_r = float((a - r).norm())
        # the residual over the bound: a failure far below the noise scale (a structural
        # zero missed by 1e-9) is judged by how much of it is left over the bound
        ex_h = float(((a - h).abs() - b).clamp(min=0).nan_to_num(nan=math.inf).norm())
        ex_r = float(((a - r).abs() - b_r).clamp(min=0).nan_to_num(nan=math.inf).norm())
        if not math.isfinite(d_h):
            ratio = math.inf
        elif d_r + noise == 0:
            ratio = 1.0 if d_h == 0 else math.inf
        else:
            ratio = (d_h + noise) / (d_r + noise)
        over, total = _rows_over(a, h, b)
        rows_over[n] = (over, total)
        if n in inp.failing:
            ratios[n] = ratio
            blocks[n] = _block_explained(a, r, h, b)
            small = ex_r > 0 and ex_h <= 0.1 * ex_r
            if ratio > EXPLAIN_RATIO and not small:
                explains = False
        else:
            ratios[n] = ratio
        if over > max(1, int(ROW_SLACK * total)):
            explains = False
    return Score(ratios, rows_over, blocks, explains and bool(inp.failing))


# ---------------------------------------------------------------------------
# discriminating inputs
# ---------------------------------------------------------------------------

# (lq, lk, heads, kv_heads): ragged lengths, partial blocks, several key tiles, GQA
RETEST_SHAPES = ((37, 77, 2, 1), (80, 80, 2, 2), (21, 200, 4, 2))


def retest_cases(case: Any, supports: Callable[..., bool] | None = None) -> list[Any]:
    """A few larger inputs derived from ``case`` (same dtype, distribution, head dim, causal
    flag, softmax scale) that separate hypotheses a shrunk case cannot."""
    out = []
    for i, (lq, lk, h, hkv) in enumerate(RETEST_SHAPES):
        if case.causal and lq > lk:
            lq, lk = lk, lq
        spec = case.spec.replace(lq=lq, lk=lk, heads=h, kv_heads=hkv, batch=1)
        if supports is not None and not supports(spec, case.causal):
            spec = case.spec.replace(lq=lq, lk=lk, batch=1)
            if not supports(spec, case.causal):
                continue
        seed = (case.seed + 7919 * (i + 1)) % 2**32
        q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
        out.append(AttentionCase(spec, seed, case.causal, case.sm_scale, q, k, v))
    return out


# ---------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------


def diagnose_attention(
    case: Any,
    recipe: Any,
    kernel_outputs: Callable[[Any], dict[str, Any]],
    grad_output: Callable[[Any], np.ndarray] | None,
    *,
    first_outputs: dict[str, Any] | None = None,
    supports: Callable[..., bool] | None = None,
    budget_seconds: float = 25.0,
) -> Diagnosis:
    """Rank the hypotheses on the failing ``case``, re-test the best on larger inputs and
    name the one that explains all (module docstring). ``grad_output(case)`` gives the dO the
    kernel's gradients used (None: forward only); ``first_outputs`` the kernel's outputs on
    ``case`` when already at hand."""
    start = time.monotonic()
    base = faithful(recipe)
    kern = first_outputs if first_outputs is not None else kernel_outputs(case)
    backward = grad_output is not None and "dQ" in kern
    do = grad_output(case) if backward else None
    inp = _prepare(case, do, kern, recipe, base)
    tau = 1.0 / math.sqrt(case.spec.head_dim) if case.sm_scale is None else case.sm_scale
    hyps = attention_hypotheses(
        base, causal=case.causal, group=case.spec.heads // case.spec.kv_heads,
        lk=case.spec.lk, tau=tau, backward=backward,
        default_tau=1.0 / math.sqrt(case.spec.head_dim),
    )
    ranked: list[Ranked] = []
    cache: dict = {}
    o_fails = "O" in inp.failing
    with torch.no_grad():
        for hyp in hyps:
            fwd_change = changes_forward(hyp.knobs, base)
            if o_fails and not fwd_change:
                continue  # a backward-only deviation leaves the failing O as it is
            try:
                if backward and fwd_change and not o_fails:
                    # O agrees: a deviation that moves O out of its bound is out, cheaply
                    o_only = _run(case, None, hyp.knobs, inp.out_dtype, cache)
                    over, total = _rows_over(inp.kernel["O"], o_only["O"], inp.bound["O"])
                    if over > max(1, int(ROW_SLACK * total)):
                        continue
                out = _run(case, do, hyp.knobs, inp.out_dtype, cache)
            except (ValueError, RuntimeError, NotImplementedError):
                continue  # a deviation that cannot apply to this shape
            ranked.append(Ranked(hyp, _score(inp, out, _reads_raw_operands(hyp.knobs))))
    ranked.sort(key=lambda r: (not r.score.explains, r.key))
    # re-test the best candidates on larger inputs
    candidates = [r for r in ranked if r.score.explains][:RETEST_TOP]
    if not candidates:
        candidates = ranked[:3]
    shapes: list[str] = []
    for extra in retest_cases(case, supports):
        if time.monotonic() - start > budget_seconds or not candidates:
            break
        try:
            kout = kernel_outputs(extra)
        except Exception:  # a kernel failure on the re-test input: skip it
            continue
        if kout is None or "O" not in kout:
            continue
        edo = grad_output(extra) if backward else None
        einp = _prepare(extra, edo, kout, recipe, base)
        s = extra.spec
        shapes.append(f"Lq={s.lq} Lk={s.lk} H={s.heads} Hkv={s.kv_heads}")
        ecache: dict = {}
        with torch.no_grad():
            for r in [c for c in candidates if all(s.explains for s in c.retests)]:
                try:
                    out = _run(extra, edo, r.hypothesis.knobs, einp.out_dtype, ecache)
                except (ValueError, RuntimeError, NotImplementedError):
                    r.retests.append(Score({}, {}, {}, False))
                    continue
                sc = _score(einp, out, _reads_raw_operands(r.hypothesis.knobs))
                if not einp.failing:  # kernel agrees here: H must not disagree with it
                    sc.explains = all(o <= max(1, int(ROW_SLACK * t))
                                      for o, t in sc.rows_over.values())
                r.retests.append(sc)
    n_retests = len(shapes)
    survivors = [r for r in candidates if r.score.explains and len(r.retests) == n_retests
                 and all(s.explains for s in r.retests)]
    survivors.sort(key=lambda r: r.key)
    named = survivors[0].hypothesis if survivors else None
    equivalent = []
    if survivors:
        best = survivors[0].key
        equivalent = [r.hypothesis for r in survivors[1:] if abs(r.key - best) < 0.05]
        rest = [r for r in ranked if r is not survivors[0]]
        ranked = [survivors[0]] + rest
    return Diagnosis(named, ranked[:10], equivalent, shapes, time.monotonic() - start,
                     len(hyps), inp.failing)


def kernel_outputs_from_callable(
    kernel: Callable[..., Any], grad_output: Callable[[Any], np.ndarray] | None,
    device: str = "cpu",
) -> Callable[[Any], dict[str, Any]]:
    """An in-process ``kernel_outputs`` for a ``(q, k, v, causal, sm_scale) -> o`` callable
    with autograd (tests and the in-process check)."""
    def run(case: Any) -> dict[str, Any]:
        dtype = getattr(torch, case.spec.dtype)
        q, k, v = (torch.from_numpy(a).to(device=device, dtype=dtype).requires_grad_(True)
                   for a in (case.q, case.k, case.v))
        o = kernel(q, k, v, case.causal, case.sm_scale)
        out = {"O": o.detach().cpu()}
        if grad_output is not None:
            do = torch.from_numpy(grad_output(case)).to(device=o.device, dtype=o.dtype)
            g = torch.autograd.grad(o, (q, k, v), do)
            out |= {n: t.detach().cpu() for n, t in zip(("dQ", "dK", "dV"), g, strict=True)}
        return out

    return run


__all__ = ["Diagnosis", "diagnose_attention", "kernel_outputs_from_callable", "retest_cases"]
