"""Reference of the split-KV FP4 decode schedule (``kernels.decode`` docstring), for tests and
``benchmarks/gpu_decode_bench.py``.

Built from the reference package's own pieces (``fp4sim.reference``: operand quantization of
the ``infer-nvfp4`` / ``infer-mxfp4`` recipes, the tiled online softmax with P quantized per
64-key tile against the running max): each split is the reference's tiled forward over its own
keys (running max starting at the split), P~ V^ summed in float64, and the partials merged in
float64. Split boundaries are recomputed here from the documented rule, not imported.
"""

from __future__ import annotations

import math

import torch

from fp4sim.reference.exact import default_sm_scale
from fp4sim.reference.masks import visible_mask
from fp4sim.reference.operands import pad_keys, quantize_operands
from fp4sim.reference.recipes import get_recipe
from fp4sim.reference.softmax import padded_length, softmax_forward

TILE = 64  # the recipes' block_n: keys per P tile


def schedule_splits(lk: int, num_splits: int) -> list[tuple[int, int]]:
    """Key ranges [start, end) of the splits: T = ceil(tiles / S) tiles each, none empty."""
    n_tiles = math.ceil(lk / TILE)
    s = max(1, min(num_splits, n_tiles))
    per = math.ceil(n_tiles / s)
    return [(a * TILE, min((a + per) * TILE, lk)) for a in range(0, n_tiles, per)]


def decode_schedule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: str,
    causal: bool,
    num_splits: int,
    sm_scale: float | None = None,
) -> dict:
    """O (float64) of the split schedule, with the per-split partials and helper bounds.

    q (B, H, Lq, d), k, v (B, Hkv, Lk, d) float (CPU). Returns a dict: ``o`` (B, H, Lq, d)
    float64; ``m``, ``l`` (B, H, Lq, S) and ``acc`` (B, H, Lq, S, d) per split (``m``, ``l``
    as float32 values in float64, ``acc`` = P~ V^ summed in float64, relative to the split's
    max); ``v_hat``; ``ranges``; ``s_bound`` (B, H, Lq): max over keys of tau sum_i |q^_i k^_i|
    (bounds the float32 summation error of S).
    """
    recipe = get_recipe(f"infer-{fmt}")
    q, k, v = (torch.as_tensor(t).float().cpu() for t in (q, k, v))
    ops = quantize_operands(q, k, v, recipe, torch.float32)
    _, h, lq, d = q.shape
    lk = k.shape[2]
    tau = default_sm_scale(d, sm_scale)
    lkp = padded_length(lk, TILE)
    kh = pad_keys(ops.k_hat, h, lkp).double()
    vh = pad_keys(ops.v_hat, h, lkp).double()
    qh = ops.q_hat.double()
    vis = visible_mask(lq, lk, lkp, causal)
    # S as the kernel forms it: the dot product (exact products, float32 sum; here the float64
    # sum rounded once) times float32 tau.
    dot = (qh @ kh.transpose(-1, -2)).float()
    s = (dot * torch.tensor(tau, dtype=torch.float32)).masked_fill(~vis, float("-inf"))
    s_bound = (tau * (qh.abs() @ kh.abs().transpose(-1, -2))).amax(dim=-1)
    ranges = schedule_splits(lk, num_splits)
    ms, ls, accs = [], [], []
    for a, e in ranges:
        e_pad = min(a + padded_length(e - a, TILE), lkp)
        sm = softmax_forward(s[..., a:e_pad], recipe, "tiled")
        ms.append(sm.m.double())
        ls.append(sm.l.double())
        accs.append(sm.p_tilde.double() @ vh[..., a:e_pad, :])
    m = torch.stack(ms, dim=-1)
    l_s = torch.stack(ls, dim=-1)
    acc = torch.stack(accs, dim=-2)
    o = merge_partials(m, l_s, acc)
    return {
        "o": o,
        "m": m,
        "l": l_s,
        "acc": acc,
        "v_hat": ops.v_hat.double(),
        "ranges": ranges,
        "s_bound": s_bound,
    }


def merge_partials(m: torch.Tensor, l_s: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """float64 merge of split partials: M = max m_s, w_s = exp(m_s - M), O = sum w acc / sum w l.

    m, l (..., S), acc (..., S, d); rows with no visible key anywhere (M = -inf or L = 0) -> 0.
    """
    m, l_s, acc = m.double(), l_s.double(), acc.double()
    big = m.amax(dim=-1, keepdim=True)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    w = torch.where(torch.isfinite(m), torch.exp(m - big), torch.zeros_like(m))
    total = (w * l_s).sum(dim=-1)
    num = (w.unsqueeze(-1) * acc).sum(dim=-2)
    safe = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return torch.where(total.unsqueeze(-1) > 0, num / safe, torch.zeros_like(num))


def output_tolerance(ref: dict) -> tuple[torch.Tensor, dict]:
    """Elementwise bound |O_kernel - O_ref| <= rel |O_ref| + abs (derived; printed by callers).

    rel = 2^-8 + 2^-12: the bf16 output rounding (round to nearest, 8 significant bits: at most
    2^-8 relative) plus float32 effects that scale with |O| (approximate exp2, the division;
    about 2^-20 each) with a wide margin. abs = 2 (n + t + S + 8) 2^-24 max|V^|: the
    float32 sum of up to n = keys-per-split products P~_j V^_j (each at most P~_j max|V^|,
    and sum P~ / l <= 2 since a block's P~ exceeds P by at most the E2M1 half-step, 1/3 of
    the value at 0.75 -> 1), t = tiles-per-split rescalings by alpha, the S-term merge and a few
    roundings (division, scaling), gamma_k <= k 2^-24 per term (Higham 3.5), doubled.
    """
    n = max(e - a for a, e in ref["ranges"])
    t = math.ceil(n / TILE)
    s = len(ref["ranges"])
    vmax = float(ref["v_hat"].abs().max())
    rel = 2.0**-8 + 2.0**-12
    abs_tol = 2 * (n + t + s + 8) * 2.0**-24 * 2 * vmax
    return rel * ref["o"].abs() + abs_tol, {"rel": rel, "abs": abs_tol, "n": n, "splits": s}


def check_output(o: torch.Tensor, ref: dict, row_fraction: float = 0.02) -> dict:
    """Rows beyond ``output_tolerance``; at most max(1, row_fraction of rows) may be (P-code
    flips at rounding ties, as in ``test_kernels_inference``). Returns a report dict."""
    o = o.double().cpu()
    tol, info = output_tolerance(ref)
    diff = (o - ref["o"]).abs()
    bad_rows = (diff > tol).any(dim=-1)
    allowed = max(1, int(row_fraction * bad_rows.numel()))
    rel_l2 = float((o - ref["o"]).norm() / ref["o"].norm().clamp_min(1e-300))
    return {
        **info,
        "finite": bool(torch.isfinite(o).all()),
        "rows": int(bad_rows.numel()),
        "bad_rows": int(bad_rows.sum()),
        "allowed_bad_rows": allowed,
        "max_excess": float((diff - tol).max()),
        "rel_l2": rel_l2,
        "ok": bool(torch.isfinite(o).all()) and int(bad_rows.sum()) <= allowed,
    }
