"""Likely causes of an attention disagreement: reference emulations of known bugs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from fp4sim.testing.assertions import AttentionErrorReport
from fp4sim.testing.strategies import AttentionCase


@dataclass(frozen=True)
class _Candidate:
    cause: str
    recipe: Any
    causal: bool
    backward_variant: str | None = None  # None: the recipe's own
    hp_scores: bool = False  # backward S from Q, K instead of Q^, K^
    drop_diagonal: bool = False  # causal mask shifted: the diagonal key masked
    pad_keys_unmasked: bool = False  # keys zero-padded to a multiple of 16, not masked


def _candidates(recipe: Any, causal: bool, lk: int, forward_failed: bool) -> list[_Candidate]:
    out: list[_Candidate] = []
    if forward_failed:
        if recipe.v is not None:
            other = "keys" if recipe.v_axis == "head_dim" else "head_dim"
            out.append(
                _Candidate(
                    f"V blocked along the wrong axis ({other} instead of {recipe.v_axis})",
                    dataclasses.replace(recipe, v_axis=other, v_pad_keys=True),
                    causal,
                )
            )
        if recipe.p_policy == "block":
            out.append(
                _Candidate(
                    "P quantized against the wrong max (the final row max instead of the"
                    " running max of its key tile)",
                    dataclasses.replace(recipe, p_policy="consistent"),
                    causal,
                )
            )
        if recipe.p_policy == "consistent":
            out.append(
                _Candidate(
                    "P quantized against the wrong max (the running max instead of the final)",
                    dataclasses.replace(recipe, p_policy="block"),
                    causal,
                )
            )
        for bn in (32, 128):
            if bn != recipe.block_n:
                try:
                    variant = dataclasses.replace(recipe, block_n=bn)
                except ValueError:
                    continue
                out.append(
                    _Candidate(
                        f"P tiles of {bn} keys instead of {recipe.block_n} (running max differs)",
                        variant,
                        causal,
                    )
                )
        if recipe.p is not None:
            out.append(
                _Candidate(
                    "P not quantized (or its mass flushed differently)",
                    dataclasses.replace(recipe, p=None, p_policy="none"),
                    causal,
                )
            )
        if causal:
            out.append(
                _Candidate(
                    "causal mask off by one (the diagonal key masked)",
                    recipe,
                    True,
                    drop_diagonal=True,
                )
            )
        out.append(
            _Candidate(f"causal flag {'ignored' if causal else 'applied'}", recipe, not causal)
        )
        if lk % 16 and not causal:
            out.append(
                _Candidate(
                    "padded keys not masked (zero keys enter the softmax and the P block scale)",
                    recipe,
                    causal,
                    pad_keys_unmasked=True,
                )
            )
    else:
        own = recipe.backward
        table = {
            "o_only": "D from the quantized O (rowsum(dO*O) instead of rowsum(dO*O_hp))",
            "p_only": "dV from the unquantized P (P instead of P~ in dV = P^T dO)",
            "drop_in": "drop-in high-precision backward (S from Q, K; D from O; dV from P)",
            "attn_qat": "Attn-QAT surrogate backward instead of the STE ground truth",
            "ste_autograd": "STE autograd backward instead of the Attn-QAT surrogate",
            "exact": "exact (unquantized) attention backward",
        }
        for variant, cause in table.items():
            if variant != own:
                out.append(_Candidate(cause, recipe, causal, backward_variant=variant))
        out.append(
            _Candidate(
                "backward recomputes S in high precision (from Q, K instead of Q^, K^)",
                recipe,
                causal,
                hp_scores=True,
            )
        )
    return out


def _candidate_outputs(
    cand: _Candidate, case: AttentionCase, do_np: np.ndarray, want_grads: bool
) -> dict[str, Any]:
    import torch

    from fp4sim import reference
    q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
    lq = q.shape[-2]
    if cand.drop_diagonal:
        q = torch.cat([q, torch.zeros_like(q[..., :1, :])], dim=-2)
    if cand.pad_keys_unmasked:
        extra = (-k.shape[-2]) % 16
        k = torch.nn.functional.pad(k, (0, 0, 0, extra))
        v = torch.nn.functional.pad(v, (0, 0, 0, extra))
    fwd = reference.fp4_attention_forward(
        q,
        k,
        v,
        cand.recipe,
        causal=cand.causal,
        sm_scale=case.sm_scale,
        accum_dtype=torch.float64,
    )
    out = {"O": fwd.o[..., :lq, :]}
    if want_grads and not (cand.drop_diagonal or cand.pad_keys_unmasked):
        if cand.hp_scores:
            fwd = dataclasses.replace(fwd, q_hat=q, k_hat=k)
        variant = cand.backward_variant or cand.recipe.backward
        do = torch.from_numpy(do_np).double()
        dq, dk, dv = reference.attention_backward(
            variant, fwd, q, k, v, do, cand.recipe, causal=cand.causal, sm_scale=case.sm_scale
        )
        out |= {"dQ": dq, "dK": dk, "dV": dv}
    return out


def _key_blocks_over(report_name: str, actual: Any, truth: Any, bound: float, lk: int) -> str:
    """For dK, dV: which 16-key blocks hold the rows over the bound."""
    err = (actual.double() - truth.double()).abs().amax(dim=-1)  # (B, Hkv, Lk)
    over_keys = sorted({int(j) for j in (err > bound).nonzero()[:, -1].tolist()})
    if not over_keys:
        return ""
    blocks = sorted({j // 16 for j in over_keys})
    text = (
        f"{report_name}: keys over the bound {over_keys[:12]}{'...' if len(over_keys) > 12 else ''}"
    )
    text += f" in 16-key blocks {blocks}"
    last_block = (lk - 1) // 16
    if lk % 16 and lk > 16 and blocks == [last_block]:
        text += (
            f"; only the last, partial key block (Lk={lk}, {lk % 16} valid keys of 16):"
            " likely padded keys leaking into a block scale"
        )
    return text


def attention_causes(
    case: AttentionCase,
    recipe: Any,
    actual: dict[str, Any],
    failed: list[AttentionErrorReport],
    do_np: np.ndarray,
    fwd64: Any,
) -> list[str]:
    """Likely causes of an attention disagreement: a known bug whose reference emulation
    agrees with the kernel at least 10x better than the recipe does, plus where it is."""
    import torch

    causes: list[str] = []
    names = [r.name for r in failed if r.name in actual]
    forward_failed = "O" in names
    truth_err = {r.name: r.max_error for r in failed}
    for cand in _candidates(recipe, case.causal, case.spec.lk, forward_failed):
        try:
            outs = _candidate_outputs(cand, case, do_np, not forward_failed)
        except Exception:  # a candidate that does not apply to this shape
            continue
        compared = [n for n in names if n in outs]
        if not compared:
            continue
        explained = True
        for n in compared:
            err = float((actual[n].double() - outs[n].double()).abs().max())
            if not (err <= 0.1 * truth_err[n]) or not np.isfinite(err):
                explained = False
                break
        if explained:
            causes.append(cand.cause + " (matches a reference emulation of it)")
    for r in failed:
        if r.name in ("dK", "dV"):
            truth = _reference_grads(case, recipe, do_np, fwd64).get(r.name)
            if truth is not None:
                where = _key_blocks_over(r.name, actual[r.name], truth, r.bound, case.spec.lk)
                if where:
                    causes.append(where)
    if forward_failed and recipe.p is not None:
        from fp4sim import reference
        q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
        diag = (
            reference.fp4_attention_forward(
                q,
                k,
                v,
                recipe,
                causal=case.causal,
                sm_scale=case.sm_scale,
                accum_dtype=torch.float64,
                diagnostics=True,
            ).diagnostics
            or {}
        )
        frac = diag.get("p_fwd_flushed_block_fraction", 0.0)
        if frac and frac > 0:
            causes.append(
                f"{frac:.1%} of the forward's nonzero P blocks flush to zero in the reference"
                " (amax below 6*2^-10): a kernel that keeps that P mass disagrees"
            )
    return causes


def _reference_grads(case: AttentionCase, recipe: Any, do_np: np.ndarray, fwd64: Any) -> dict:
    """The recipe's float64 gradients for ``case`` (recomputed; cheap at test sizes)."""
    import torch

    from fp4sim import reference
    q, k, v = (torch.from_numpy(a).double() for a in (case.q, case.k, case.v))
    dq, dk, dv = reference.attention_backward(
        recipe.backward,
        fwd64,
        q,
        k,
        v,
        torch.from_numpy(do_np).double(),
        recipe,
        causal=case.causal,
        sm_scale=case.sm_scale,
    )
    return {"dQ": dq, "dK": dk, "dV": dv}
