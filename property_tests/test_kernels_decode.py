"""``kernels.fp4_decode_attention`` (split-KV FP4 decode) against the reference of its schedule.

What is checked (NVFP4 and MXFP4, Lq = 1 and 16, causal and not, GQA, ragged Lk, 1 to many
splits; ``property_tests/decode_schedule.py`` holds the reference and the derived bounds):

* Output vs the float64 reference of the same schedule (each split the reference recipe's tiled
  forward over its keys, running max from the split start; float64 merge): elementwise
  ``|O - O_ref| <= (2^-8 + 2^-12) |O_ref| + 2 (n + t + S + 8) 2^-24 * 2 max|V^|``
  (``output_tolerance`` docstring derives it), with at most max(1, 2%) rows beyond it (P-code
  flips at rounding ties, as ``test_kernels_inference``). The bound is printed.
* One split is the inference kernel's function: against ``fp4_inference_attention`` under the
  same rule.
* Partials and merge: the kernel's (m, l, acc) per split against the reference's (bounds in
  ``_check_partials``), and the kernel's O against the float64 merge of its own partials
  (only float32 rounding of the merge and the bf16 output may differ).
* GQA mapping: query head h reads kv head h // G; the same case with the kv heads swapped is
  far outside the bound (so the check can fail).
* ``tile_v``'s decode layout of V gives the same bits as ``pack_for_inference``'s.
* GPU only (skipped without CUDA): the fast decode modes ('asm', 'ops') against 'exact' and all
  three against the reference at decode lengths, outputs poisoned with NaN first.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from decode_schedule import (  # noqa: E402
    check_output,
    decode_schedule_reference,
    merge_partials,
    schedule_splits,
)

from fp4sim.kernels import decode as decode_mod  # noqa: E402
from fp4sim.kernels.decode import (  # noqa: E402
    MERGE_MODES,
    fp4_decode_attention,
    split_bounds,
    tile_v,
)
from fp4sim.kernels.inference import fp4_inference_attention, pack_for_inference  # noqa: E402

ON_GPU = torch.cuda.is_available()
_CAN_RUN = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not _CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
DEVICE = "cuda" if ON_GPU else "cpu"
F32_EPS = 2.0**-24  # float32 unit roundoff


def _inputs(seed: int, b: int, h: int, hkv: int, lq: int, lk: int, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g) * 1.5  # peakier softmax: more running-max moves
    v = torch.randn(b, hkv, lk, d, generator=g) * torch.exp(torch.randn(b, hkv, lk, 1, generator=g))
    return q, k, v


def _run(q, k, v, fmt, causal, splits, **kw):
    packed = pack_for_inference(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), fmt)
    return fp4_decode_attention(*packed, fmt=fmt, causal=causal, num_splits=splits, **kw)


def _assert_report(rep: dict, label: str) -> None:
    print(f"{label}: bound rel {rep['rel']:.3g} + abs {rep['abs']:.3g} (n={rep['n']}, "
          f"S={rep['splits']}); rows beyond {rep['bad_rows']}/{rep['rows']} "
          f"(allowed {rep['allowed_bad_rows']}); max excess {rep['max_excess']:.3g}; "
          f"rel L2 {rep['rel_l2']:.3g}")
    assert rep["ok"], rep


def _check_partials(parts, ref: dict, d: int) -> None:
    """Kernel partials vs the reference's, and the kernel's own merge vs float64.

    m: |dm| <= 2 d 2^-24 B + 8 2^-24 |m| with B = max_j tau sum_i |q^_i k^_ji| (the S error of
    a float32 dot product, gamma_d B, doubled; the log2(e) scaling and back: a few roundings of
    |m|). l = sum_j exp(S_j - m): each term's relative error is at most |dS| + |dm| <=
    4 d 2^-24 B + 16 2^-24 |m| plus the approximate exp2 (2^-21 relative), plus the float32 sum
    (n 2^-24): relative bound on l.
    """
    m_k, l_k, _acc_k = (t.double().cpu() for t in parts)
    m_r, l_r = ref["m"], ref["l"]
    both = torch.isfinite(m_r)
    assert torch.equal(torch.isfinite(m_k), both), "different rows see no key in a split"
    bnd = ref["s_bound"].unsqueeze(-1).expand_as(m_r)
    tol_m = 2 * d * F32_EPS * bnd + 8 * F32_EPS * m_r.abs()
    dm = torch.where(both, (m_k - m_r).abs(), torch.zeros_like(m_r))
    assert bool((dm <= torch.where(both, tol_m, torch.ones_like(tol_m))).all()), float(dm.max())
    n = max(e - a for a, e in ref["ranges"])
    tol_l = 4 * d * F32_EPS * bnd + 16 * F32_EPS * m_r.abs() + 2.0**-21 + n * F32_EPS
    rel_l = torch.where(both, (l_k - l_r).abs() / l_r.clamp_min(1e-300), torch.zeros_like(l_r))
    assert bool((rel_l <= tol_l).all()), float((rel_l - tol_l).max())
    print(f"partials: max |dm| {float(dm.max()):.3g}, max rel dl {float(rel_l.max()):.3g}")


def _check_merge(o: torch.Tensor, parts) -> None:
    """O of the kernel vs the float64 merge of the kernel's own partials.

    Bound: 2^-8 |O64| (bf16 output, round to nearest: 8 significant bits) +
    2 (S + 4) 2^-24 sum_s w_s |acc_s| / L
    (float32 weights exp2(m_s - M) within 2^-21 relative are counted as 4 roundings; the S-term
    sums of w l and w acc; the division), doubled.
    """
    m, l_s, acc = (t.double().cpu() for t in parts)
    o64 = merge_partials(m, l_s, acc)
    s = m.shape[-1]
    big = m.amax(dim=-1, keepdim=True)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    w = torch.where(torch.isfinite(m), torch.exp(m - big), torch.zeros_like(m))
    total = (w * l_s).sum(dim=-1).clamp_min(1e-300).unsqueeze(-1)
    mag = (w.unsqueeze(-1) * acc.abs()).sum(dim=-2) / total
    tol = 2.0**-8 * o64.abs() + 2 * (s + 4) * F32_EPS * mag + 2.0**-133
    diff = (o.double().cpu() - o64).abs()
    assert bool((diff <= tol).all()), float((diff - tol).max())
    print(f"merge: S={s}, max |O - merge64(partials)| {float(diff.max()):.3g}")


CASES = [  # (B, H, Hkv, Lq, Lk, causal, splits)
    (1, 4, 1, 1, 300, False, 3),  # Lq = 1, GQA 4:1, ragged last tile
    (1, 2, 1, 16, 257, True, 2),  # Lq = 16 causal, bottom-right, a 1-key last tile
    (2, 4, 2, 16, 200, False, 4),  # batch 2, GQA 2:1, one tile per split
    (1, 2, 2, 5, 3, True, 1),  # Lq > Lk causal: the first two rows see no key
    (1, 2, 1, 100, 150, True, 2),  # prefill-like causal: 2 row blocks spanning both heads
]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_schedule_reference(case, fmt: str) -> None:
    b, h, hkv, lq, lk, causal, splits = case
    q, k, v = _inputs(1, b, h, hkv, lq, lk)
    o, parts = _run(q, k, v, fmt, causal, splits, return_partials=True)
    ref = decode_schedule_reference(q, k, v, fmt, causal, splits)
    _assert_report(check_output(o.float().cpu(), ref), f"{fmt} {case}")
    _check_partials(parts, ref, q.shape[-1])
    _check_merge(o.float(), parts)
    o_plain = _run(q, k, v, fmt, causal, splits)
    assert torch.equal(o_plain.cpu(), o.cpu())  # returning partials changes nothing
    # the serial merge (the default is the blocked one) of the same partials: the same formula
    # summed in another order
    o_serial, parts_s = _run(q, k, v, fmt, causal, splits, return_partials=True, merge="serial")
    assert all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(parts, parts_s, strict=True))
    _assert_report(check_output(o_serial.float().cpu(), ref), f"{fmt} {case} serial merge")
    _check_merge(o_serial.float(), parts)
    for out in (o, o_serial):
        if lq > lk and causal:
            rows = out[:, :, : lq - lk].cpu().float()
            assert torch.equal(rows, torch.zeros_like(rows))


def test_many_splits_blocked_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 splits of one tile, the blocked merge's tiles shrunk so that both of its passes take
    three steps of 8 splits, the last one padded. (The interpreter walks every tile in every
    split, so more splits cost quadratic time here; hence smaller blocks, not more splits.)"""
    monkeypatch.setattr(decode_mod, "_MERGE_TILE", 1024)
    monkeypatch.setattr(decode_mod, "_MERGE_MAX_TILE", 64)
    assert decode_mod.merge_blocks(8, 128, 20) == (8, 8, 8, 16)
    q, k, v = _inputs(7, 1, 4, 1, 2, 20 * 64 - 30)
    o, parts = _run(q, k, v, "nvfp4", True, 20, return_partials=True, merge="blocked")
    assert parts[0].shape[-1] == 20
    ref = decode_schedule_reference(q, k, v, "nvfp4", True, 20)
    _assert_report(check_output(o.float().cpu(), ref), "20 splits, blocked merge")
    _check_merge(o.float(), parts)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_one_split_is_the_inference_function(fmt: str) -> None:
    q, k, v = _inputs(2, 1, 4, 2, 16, 150)
    packed = pack_for_inference(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), fmt)
    o_inf = fp4_inference_attention(*packed, fmt=fmt, causal=True).double().cpu()
    o_dec = fp4_decode_attention(*packed, fmt=fmt, causal=True, num_splits=1)
    ref = decode_schedule_reference(q, k, v, fmt, True, 1)
    _assert_report(check_output(o_dec.float().cpu(), ref), f"{fmt} one split vs schedule")
    _assert_report(check_output(o_dec.float().cpu(), {**ref, "o": o_inf}), f"{fmt} vs inference")


def test_gqa_mapping_is_checked() -> None:
    """H = 6 on Hkv = 2: heads 0-2 read kv head 0, heads 3-5 kv head 1; swapping the kv heads
    in the reference must break the bound (the check is sensitive to the mapping)."""
    q, k, v = _inputs(3, 1, 6, 2, 4, 130)
    o = _run(q, k, v, "nvfp4", False, 2).float().cpu()
    ref = decode_schedule_reference(q, k, v, "nvfp4", False, 2)
    _assert_report(check_output(o, ref), "gqa 6:2")
    swapped = decode_schedule_reference(q, k.flip(1), v.flip(1), "nvfp4", False, 2)
    rep = check_output(o, swapped)
    print(f"with kv heads swapped: {rep['bad_rows']} of {rep['rows']} rows beyond the bound")
    assert not rep["ok"]


@settings(max_examples=6 if not ON_GPU else 10, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(
    fmt=st.sampled_from(["nvfp4", "mxfp4"]),
    lq=st.sampled_from([1, 2, 16]),
    group=st.sampled_from([1, 2, 4]),
    lk=st.integers(1, 330),
    splits=st.integers(1, 6),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
    merge=st.sampled_from(MERGE_MODES),
)
def test_random_shapes_match_schedule(fmt, lq, group, lk, splits, causal, seed, merge) -> None:
    q, k, v = _inputs(seed, 1, group, 1, lq, lk)
    o, parts = _run(q, k, v, fmt, causal, splits, return_partials=True, merge=merge)
    ref = decode_schedule_reference(q, k, v, fmt, causal, splits)
    assert parts[0].shape[-1] == len(ref["ranges"])
    _assert_report(check_output(o.float().cpu(), ref), f"{fmt} lq={lq} G={group} lk={lk}")
    _check_merge(o.float(), parts)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("lk", [37, 64, 200])
def test_tiled_v_layout_is_the_same_function(fmt: str, lk: int) -> None:
    """``tile_v`` (each 64-key tile's V^T contiguous) gives the same output bits as
    ``pack_for_inference``'s V^T: the same values in another order; its shape is checked."""
    q, k, v = _inputs(6, 1, 4, 2, 3, lk)
    packed = pack_for_inference(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), fmt)
    vt = tile_v(packed[4], packed[5])
    assert vt[0].shape == (1, 2, math.ceil(lk / 64), 64, 32)
    a = fp4_decode_attention(*packed, fmt=fmt, causal=True, num_splits=2)
    b = fp4_decode_attention(*packed[:4], *vt, fmt=fmt, causal=True, num_splits=2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tiled v_scales must have shape"):
        fp4_decode_attention(*packed[:4], vt[0], vt[1][:, :, :, :, :1], fmt=fmt)


def test_split_bounds_follow_the_documented_rule() -> None:
    for lk in (1, 63, 64, 65, 1000, 131072):
        for s in (1, 2, 3, 7, 64, 5000):
            tps, ranges = split_bounds(lk, s)
            assert ranges == schedule_splits(lk, s)
            assert all(a % 64 == 0 and a < e for a, e in ranges) and ranges[-1][1] == lk
            assert len(ranges) <= s and all(e - a <= 64 * tps for a, e in ranges)
            assert tps == math.ceil(math.ceil(lk / 64) / min(s, math.ceil(lk / 64)))


def test_default_splits_follow_the_documented_rule() -> None:
    """``default_num_splits`` on a 132-multiprocessor card (H200) at the decode table's shapes:
    four waves of programs where splits keep >= 32 key tiles, else two where they keep >= 16,
    else one."""
    cases = {  # (batch * kv heads, rows a program, Lk) -> splits
        (1, 16, 131072): 396, (1, 16, 8192): 64, (8, 16, 131072): 99, (64, 16, 131072): 25,
        (64, 16, 32768): 13, (64, 16, 8192): 7, (64, 64, 131072): 9, (64, 64, 32768): 9,
        (64, 64, 8192): 5, (1, 128, 131072): 132, (1, 128, 8192): 64,
    }
    for (bkv, rows, lk), want in cases.items():
        assert decode_mod.default_num_splits(bkv, 1, rows, lk, 132) == want, (bkv, rows, lk)


def test_split_products_rule(monkeypatch) -> None:
    """``use_halves``: MXFP4 always, NVFP4 at 16-row programs; the option forces either way."""
    assert decode_mod.use_halves(True, 128) and decode_mod.use_halves(False, 16)
    assert not decode_mod.use_halves(False, 64) and not decode_mod.use_halves(False, 128)
    monkeypatch.setitem(decode_mod._OPTIONS, "halves", False)
    assert not decode_mod.use_halves(True, 16)
    monkeypatch.setitem(decode_mod._OPTIONS, "halves", True)
    assert decode_mod.use_halves(False, 128)


def test_bad_arguments_raise() -> None:
    q, k, v = _inputs(4, 1, 2, 1, 1, 64)
    packed = pack_for_inference(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), "nvfp4")
    with pytest.raises(ValueError, match="decode must be one of"):
        fp4_decode_attention(*packed, decode="fast")
    with pytest.raises(ValueError, match="merge must be one of"):
        fp4_decode_attention(*packed, merge="tree")
    with pytest.raises(ValueError, match="unroll must be 1 or 2"):
        fp4_decode_attention(*packed, unroll=4)
    with pytest.raises(ValueError, match="out must be"):
        fp4_decode_attention(*packed, out=torch.empty(1, 2, 1, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="q_scales must have shape"):
        fp4_decode_attention(*packed, fmt="mxfp4")
    if not ON_GPU:
        with pytest.raises(ValueError, match="interpreter"):
            fp4_decode_attention(*packed, decode="asm")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the tile loop is unrolled only on the GPU")
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(8, 2, 3), (8, 1, 16)], ids=["16rows", "128rows"])
def test_gpu_unroll_gives_the_same_bits(fmt: str, causal: bool, heads) -> None:
    """Two key tiles an iteration run the same operations in the same order: the same output
    and partials bit for bit, in programs of 16 and of 128 query rows: 18 key tiles in 4 splits
    (5, 5, 5, 3 tiles: odd), in 9 splits (2 tiles each: even) and in one split (the direct
    store)."""
    h, hkv, lq = heads
    q, k, v = _inputs(8, 2, h, hkv, lq, 1100, d=128)
    packed = pack_for_inference(q.cuda(), k.cuda(), v.cuda(), fmt)
    packed = (*packed[:4], *tile_v(packed[4], packed[5]))
    for splits in (4, 9, 1):
        runs = [
            fp4_decode_attention(*packed, fmt=fmt, causal=causal, num_splits=splits, unroll=u,
                                 return_partials=splits > 1)
            for u in (1, 2)
        ]
        if splits > 1:
            (o1, p1), (o2, p2) = runs
            assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
        else:
            o1, o2 = runs
        assert torch.equal(o1, o2), f"splits={splits}"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="fast decode modes need CUDA (PTX, fp8 casts)")
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(1, 8, 1, 16, 4100, True, None), (2, 32, 8, 1, 8192, False, 7)])
def test_gpu_decode_modes_match_reference(fmt: str, shape, monkeypatch) -> None:
    """d = 128 at decode lengths: every decode mode within the schedule bound (outputs poisoned
    first), and the fast modes equal to 'exact' up to float32 accumulation order; 'asm' and
    'ops' also with the products split and joined against ``use_halves``'s choice."""
    b, h, hkv, lq, lk, causal, splits = shape
    q, k, v = _inputs(5, b, h, hkv, lq, lk, d=128)
    packed = pack_for_inference(q.cuda(), k.cuda(), v.cuda(), fmt)
    outs = {}
    for mode in ("exact", "asm", "ops"):
        out = torch.full((b, h, lq, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
        fp4_decode_attention(
            *packed, fmt=fmt, causal=causal, num_splits=splits, decode=mode, out=out
        )
        outs[mode] = out.float().cpu()
    for halves in (False, True):
        monkeypatch.setitem(decode_mod._OPTIONS, "halves", halves)
        for mode in ("asm", "ops"):
            out = torch.full((b, h, lq, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
            fp4_decode_attention(
                *packed, fmt=fmt, causal=causal, num_splits=splits, decode=mode, out=out
            )
            outs[f"{mode}, split products {halves}"] = out.float().cpu()
    monkeypatch.setitem(decode_mod._OPTIONS, "halves", None)
    out = torch.full((b, h, lq, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp4_decode_attention(*packed[:4], *tile_v(packed[4], packed[5]), fmt=fmt, causal=causal,
                         num_splits=splits, out=out)
    outs["asm, V tiled"] = out.float().cpu()
    out = torch.full((b, h, lq, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    fp4_decode_attention(*packed, fmt=fmt, causal=causal, num_splits=splits, merge="serial",
                         out=out)
    outs["asm, serial merge"] = out.float().cpu()
    _tps, ranges = split_bounds(lk, splits if splits else 1)
    if splits is None:  # the default rule on this GPU: ask the kernel how many it used
        _o, parts = fp4_decode_attention(*packed, fmt=fmt, causal=causal, return_partials=True)
        n_used = parts[0].shape[-1]
    else:
        n_used = len(ranges)
    ref = decode_schedule_reference(q, k, v, fmt, causal, n_used)
    for mode, o in outs.items():
        _assert_report(check_output(o, ref), f"{fmt} {mode} {shape}")
    for mode in ("asm", "ops"):
        # The same exact products in f16 / bf16 MMAs: one bf16 ulp (2^-7 relative) plus the
        # accumulation floor of the output bound.
        diff = (outs[mode] - outs["exact"]).abs()
        tol = 2.0**-7 * outs["exact"].abs() + 2.0**-14
        assert float((diff <= tol).float().mean()) > 0.999, float(diff.max())
