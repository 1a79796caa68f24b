"""System properties of an attention kernel ``fn(q, k, v, causal, sm_scale) -> o``: what a
recipe check on fresh, contiguous, independent inputs cannot see (issue 20).

Each property takes an ``AttentionContext`` and returns a ``Verdict`` whose cause names the
defect ("output of batch 0 depends on batch 1", "modified its input q in place", ...).
Bit-identity is demanded where the same arithmetic on the same values must give the same
bits (independence, permutation of the batch, repeated calls, layouts); where the values
legitimately change, the recipe check's FP4 tolerance rule decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fp4sim import reference
from fp4sim.testing.system.context import (
    KEY_TILE,
    QUANT_BLOCK,
    AttentionContext,
    bits_equal,
    clear_rejection,
    kernel_error,
    max_diff,
    rule_summary,
)
from fp4sim.testing.system.verdict import Verdict

BASE_LEN = 80  # one full 64-key tile plus a 16-key block: both tile paths run
# Calls of the repeatability property: a kernel whose sums run in a varying order (atomics)
# can give the same bits on two calls by chance (13 % of pairs for a blind mutant that
# permutes 16-key partial sums); each further call against the first multiplies that down.
REPEAT_CALLS = 6


def _base(ctx: AttentionContext, name: str, bitwise: bool = False
          ) -> tuple[int, int, int] | Verdict:
    """(H, Hkv, L) of the shared base shape, or an untested verdict. ``bitwise``: the
    property demands bit-identity, which is only judged for a repeatable forward."""
    h, hkv = ctx.heads()
    length = ctx.length(BASE_LEN)
    if not ctx.supports(heads=h, kv_heads=hkv, lq=length, lk=length, causal=False):
        return Verdict(name, "untested", f"kernel declares no support for H={h}, Hkv={hkv},"
                       f" L={length}, d={ctx.head_dim}, {ctx.dtype}")
    if bitwise and not ctx.repeatable(length, length):
        return Verdict(name, "untested", "not judged: the forward is not repeatable (see"
                       " repeatability)")
    return h, hkv, length


def _recipe_couples_elements(recipe: str) -> bool:
    """A tensor-wide scale (e.g. NVFP4's optional FP32 tensor scale) legitimately couples
    all batch elements and heads."""
    r = reference.get_recipe(recipe)
    return any(s is not None and s.tensor_scale is not None for s in (r.q, r.k, r.v, r.p))


# ---------------------------------------------------------------------------
# independence, batch permutation
# ---------------------------------------------------------------------------


def _big(dtype: str) -> float:
    """A power of two that moves the changed elements' magnitude far away (scores ~2^32
    larger), so that any coupling through a shared max or scale shows; float16 (max 65504)
    gets less."""
    return 2.0**11 if dtype == "float16" else 2.0**16


def independence(ctx: AttentionContext) -> Verdict:
    """O (and dQ, dK, dV) of a batch element or head are bit-identical when only the other
    elements and heads get new values (of the same and of a far larger magnitude)."""
    name = "independence"
    base = _base(ctx, name, bitwise=True)
    if isinstance(base, Verdict):
        return base
    if _recipe_couples_elements(ctx.recipe):
        return Verdict(name, "untested", f"recipe {ctx.recipe}'s tensor scale couples batch"
                       " elements and heads")
    h, hkv, length = base
    group = h // hkv
    q, k, v = ctx.inputs(1, lq=length, lk=length)
    q2, k2, v2 = ctx.inputs(2, lq=length, lk=length)
    do = ctx.grad_output(3, q.shape)
    o, grads = ctx.forward_backward(*(ctx.tensor(a) for a in (q, k, v)), do)
    big = _big(ctx.dtype)

    def changed(batch: int | None, qh: list[int], kvh: list[int], gain: float
                ) -> tuple[Any, ...]:
        qa, ka, va = q.copy(), k.copy(), v.copy()
        if batch is not None:
            qa[batch], ka[batch], va[batch] = q2[batch] * gain, k2[batch] * gain, v2[batch]
        for i in qh:
            qa[:, i] = q2[:, i] * gain
        for j in kvh:
            ka[:, j], va[:, j] = k2[:, j] * gain, v2[:, j] * gain
        return qa, ka, va

    # (what changes, changed inputs, batch that must stay the same or query heads that must)
    experiments: list[tuple[str, tuple[Any, ...], int | None, list[int]]] = [
        ("batch 1", changed(1, [], [], 1.0), 0, []),
        ("batch 0 (values 2^k larger)", changed(0, [], [], big), 1, []),
        ("batch 1 (values 2^k larger)", changed(1, [], [], big), 0, []),
        (f"KV head 1 and query heads {group}..{h - 1}",
         changed(None, list(range(group, h)), [1], big), None, list(range(group))),
        (f"KV head 0 and query heads 0..{group - 1}",
         changed(None, list(range(group)), [0], big), None, list(range(group, h))),
    ]
    if group > 1:
        experiments.append(("query head 1 (same KV group)", changed(None, [1], [], big), None,
                            [0]))
    repeat_grads: tuple[Any, ...] | None = None
    for n, (what, inputs, b, heads) in enumerate(experiments):
        if n == 0 and grads is not None:  # gradients once, the other changes forward only
            o2, g2 = ctx.forward_backward(*(ctx.tensor(a) for a in inputs), do)
        else:
            o2, g2 = ctx.forward(*(ctx.tensor(a) for a in inputs)), None
        if b is not None:
            if not bits_equal(o[b], o2[b]):
                return Verdict(name, "fail", f"output of batch {b} depends on {what}",
                               {"max_change": max_diff(o[b], o2[b])})
        else:
            moved = [i for i in heads if not bits_equal(o[:, i], o2[:, i])]
            if moved:
                hint = " (GQA: query head h must read KV head h // group)" if group > 1 else ""
                return Verdict(name, "fail", f"output of head {moved[0]} depends on {what}{hint}",
                               {"max_change": max_diff(o[:, moved[0]], o2[:, moved[0]]),
                                "heads_changed": len(moved)})
        if grads is None or g2 is None or b is None:
            continue
        for gname, ga, gb in zip(("dQ", "dK", "dV"), grads, g2, strict=True):
            if bits_equal(ga[b], gb[b]):
                continue
            if repeat_grads is None:  # is the backward repeatable at all?
                _, repeat_grads = ctx.forward_backward(*(ctx.tensor(a) for a in (q, k, v)), do)
            assert repeat_grads is not None
            if all(bits_equal(x, y) for x, y in zip(grads, repeat_grads, strict=True)):
                return Verdict(name, "fail", f"{gname} of batch {b} depends on {what}",
                               {"max_change": max_diff(ga[b], gb[b])})
    return Verdict(name, "ok", f"O bit-identical under {len(experiments)} changes of other"
                   " batch elements / heads")


def batch_permutation(ctx: AttentionContext) -> Verdict:
    """Permuting the batch permutes O (bit-identically)."""
    name = "batch permutation"
    base = _base(ctx, name, bitwise=True)
    if isinstance(base, Verdict):
        return base
    _, _, length = base
    perm = [2, 0, 1]
    q, k, v = ctx.inputs(4, batch=3, lq=length, lk=length)
    o = ctx.forward(*(ctx.tensor(a) for a in (q, k, v)))
    op = ctx.forward(*(ctx.tensor(a[perm]) for a in (q, k, v)))
    for i, j in enumerate(perm):
        if not bits_equal(op[i], o[j]):
            return Verdict(name, "fail", f"batch permutation {perm} does not permute O: output"
                           f" of batch {j} moved to {i} differs",
                           {"max_diff": max_diff(op[i], o[j])})
    return Verdict(name, "ok", f"batch permutation {perm} permutes O bit-identically")


# ---------------------------------------------------------------------------
# equivariance under key-block permutations (non-causal)
# ---------------------------------------------------------------------------


def key_permutation(ctx: AttentionContext) -> Verdict:
    """Non-causal attention is a function of the set of (key, value) pairs: permuting whole
    key blocks of the quantization block (16) and of the tile (64), with V, must leave O
    unchanged up to the recipe's own change, judged by the FP4 tolerance rule against the
    reference on the permuted keys."""
    name = "key permutation"
    h, hkv = ctx.heads()
    lk, lq = 2 * KEY_TILE, ctx.length(32)
    if not ctx.supports(heads=h, kv_heads=hkv, lq=lq, lk=lk, causal=False):
        return Verdict(name, "untested", f"kernel declares no support for Lq={lq}, Lk={lk}")
    q, k, v = ctx.inputs(5, batch=1, lq=lq, lk=lk)
    nb = lk // QUANT_BLOCK
    perms = {
        "blocks of 16 within tiles": _blocks(QUANT_BLOCK, [3, 2, 1, 0, 7, 6, 5, 4]),
        "blocks of 16 across tiles": _blocks(QUANT_BLOCK, [5, 2, 7, 0, 3, 6, 1, 4]),
        "tiles of 64": _blocks(KEY_TILE, [1, 0]),
    }
    assert all(len(p) == nb * QUANT_BLOCK for p in perms.values())
    base = ctx.rule(q, k, v, False, backward=False, seed=5)
    if not base.ok:
        return Verdict(name, "fail", "fails the tolerance rule before any permutation (a recipe"
                       f" error, see the recipe check): {rule_summary(base)}")
    o = ctx.forward(*(ctx.tensor(a) for a in (q, k, v)))
    rec = reference.get_recipe(ctx.recipe)
    r0 = reference.fp4_attention_forward(*(torch.from_numpy(a) for a in (q, k, v)), rec).o
    numbers: dict[str, Any] = {}
    for what, idx in perms.items():
        kp, vp = (np.ascontiguousarray(a[:, :, idx]) for a in (k, v))
        out = ctx.rule(q, kp, vp, False, backward=False, seed=5)
        op = ctx.forward(*(ctx.tensor(a) for a in (q, kp, vp)))
        rp = reference.fp4_attention_forward(*(torch.from_numpy(a) for a in (q, kp, vp)), rec).o
        kernel_change, ref_change = max_diff(op, o), max_diff(rp, r0)
        numbers[f"dO[{what}]"] = kernel_change
        numbers[f"ref dO[{what}]"] = ref_change
        if not out.ok:
            return Verdict(name, "fail", f"O changes when key {what} are permuted with V: the"
                           f" kernel depends on key positions ({rule_summary(out)})",
                           {"kernel_change": kernel_change, "reference_change": ref_change})
    return Verdict(name, "ok", "O within the tolerance rule under 3 key-block permutations",
                   numbers)


def _blocks(size: int, order: list[int]) -> list[int]:
    return [b * size + i for b in order for i in range(size)]


# ---------------------------------------------------------------------------
# repeatability, stale state
# ---------------------------------------------------------------------------


def repeatability(ctx: AttentionContext) -> Verdict:
    """``REPEAT_CALLS`` calls on the same inputs: bit-identical O; the backward's differences
    (atomics order) are reported with their size, not failed."""
    name = "repeatability"
    base = _base(ctx, name)
    if isinstance(base, Verdict):
        return base
    _, _, length = base
    q, k, v = ctx.inputs(6, lq=length, lk=length)
    do = ctx.grad_output(7, q.shape)
    (o1, g1), *later = [ctx.forward_backward(*(ctx.tensor(a) for a in (q, k, v)), do)
                        for _ in range(REPEAT_CALLS)]
    for call, (o2, _) in enumerate(later, start=2):
        if not bits_equal(o1, o2):
            return Verdict(name, "fail", f"forward not repeatable: call {call} on the same"
                           " inputs differs from call 1", {"max_diff": max_diff(o1, o2)})
    if g1 is None or any(g is None for _, g in later):
        return Verdict(name, "ok", f"forward bit-identical over {REPEAT_CALLS} calls"
                       " (no backward declared)")
    diffs = {n: max(max_diff(a, g2[i]) for _, g2 in later)
             for i, (n, a) in enumerate(zip(("dQ", "dK", "dV"), g1, strict=True))}
    if any(d > 0 for d in diffs.values()):
        rel = {f"rel {n}": diffs[n] / max(float(g.abs().max()), 1e-30)
               for n, g in zip(("dQ", "dK", "dV"), g1, strict=True)}
        return Verdict(name, "info", "forward bit-identical; backward nondeterministic"
                       " (e.g. atomics order)", diffs | rel)
    return Verdict(name, "ok", f"forward and backward bit-identical over {REPEAT_CALLS} calls")


def stale_state(ctx: AttentionContext) -> Verdict:
    """New values of a shape already seen give new, correct outputs: written into the same
    tensors one input at a time, and as fresh tensors."""
    name = "stale state"
    h, hkv = ctx.heads()
    length = ctx.length(48)  # a shape no other property uses: the first call is a first
    if not ctx.supports(heads=h, kv_heads=hkv, lq=length, lk=length, causal=False):
        return Verdict(name, "untested", f"kernel declares no support for L={length}")
    xa = ctx.inputs(8, batch=1, lq=length, lk=length)
    xb = ctx.inputs(9, batch=1, lq=length, lk=length)
    first = ctx.rule(*xa, False, backward=False, seed=8)  # the first call on this shape
    if not first.ok:
        return Verdict(name, "untested", "not judged: the kernel fails the tolerance rule on a"
                       f" first call (a recipe error; see the recipe check): {rule_summary(first)}")
    live = [ctx.tensor(a) for a in xa]
    prev = ctx.forward(*live)
    for i, which in enumerate("qkv"):
        live[i].copy_(ctx.tensor(xb[i]))  # same tensor, same pointer, new values
        out = ctx.forward(*live)
        if bits_equal(out, prev):
            return Verdict(name, "fail", f"stale: output unchanged after new {which} values"
                           " (written into the same tensor)")
        prev = out
    fresh = ctx.forward(*(ctx.tensor(a) for a in xb))
    if not bits_equal(fresh, prev) and ctx.repeatable(length, length):
        return Verdict(name, "fail", "stale: output after new values written in place differs"
                       " from a call on fresh tensors with the same values",
                       {"max_diff": max_diff(fresh, prev)})
    xc = ctx.inputs(10, batch=1, lq=length, lk=length)
    oc = ctx.forward(*(ctx.tensor(a) for a in xc))
    if bits_equal(oc, fresh):
        return Verdict(name, "fail", "stale: output unchanged after new inputs (fresh tensors)")
    out = ctx.rule(*xc, False, backward=False, seed=10)
    if not out.ok:
        return Verdict(name, "fail", "stale: outputs for new inputs of a shape already seen"
                       f" fail the tolerance rule ({rule_summary(out)})")
    return Verdict(name, "ok", "new values (in place, per input, and fresh) give new outputs"
                   " within the tolerance rule")


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------


def cuda_graphs(ctx: AttentionContext) -> Verdict:
    """Capture the forward once, replay it with new values copied into the captured input
    buffers, compare with eager calls on the same values (bit-identical, else the rule)."""
    name = "CUDA graphs"
    if not str(ctx.device).startswith("cuda") or not torch.cuda.is_available():
        return Verdict(name, "untested", "needs a CUDA device")
    base = _base(ctx, name)
    if isinstance(base, Verdict):
        return base
    _, _, length = base
    xs = [ctx.inputs(20 + i, lq=length, lk=length) for i in range(3)]
    static = [ctx.tensor(a) for a in xs[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init) off the capture stream
        for _ in range(2):
            ctx.forward(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = ctx.forward(*static)
    except Exception as err:  # a loud refusal, not a silently wrong replay: not judged
        return Verdict(name, "untested", "cannot be captured in a CUDA graph:"
                       f" {kernel_error(err)}")
    numbers: dict[str, Any] = {}
    first = None
    for i, x in enumerate(xs[1:], start=1):
        for t, a in zip(static, x, strict=True):
            t.copy_(ctx.tensor(a))
        graph.replay()
        torch.cuda.synchronize()
        replayed = static_out.clone()
        eager = ctx.forward(*(ctx.tensor(a) for a in x))
        numbers[f"replay {i} max diff"] = max_diff(replayed, eager)
        if first is not None and bits_equal(replayed, first):
            return Verdict(name, "fail", "graph replay returned the previous output after new"
                           " inputs were copied into the captured buffers (stale)", numbers)
        first = replayed
        if not bits_equal(replayed, eager):
            out = ctx.rule(*x, False, backward=False, seed=20 + i)
            if not out.ok:
                return Verdict(name, "fail", "graph replay with new inputs disagrees with eager"
                               f" execution ({rule_summary(out)})", numbers)
    return Verdict(name, "ok", "forward graph replayed with 2 new inputs matches eager", numbers)


# ---------------------------------------------------------------------------
# inputs left untouched
# ---------------------------------------------------------------------------


def inputs_untouched(ctx: AttentionContext) -> Verdict:
    """q, k, v (and dO) bit-identical after the forward and after the backward."""
    name = "inputs untouched"
    if bool(getattr(ctx.spec, "modifies_inputs", False)):
        return Verdict(name, "untested", "kernel declares that it modifies its inputs in place")
    base = _base(ctx, name)
    if isinstance(base, Verdict):
        return base
    h, hkv, length = base
    modes = [False]
    if ctx.supports(heads=h, kv_heads=hkv, lq=length, lk=length, causal=True):
        modes.append(True)

    for causal in modes:
        q, k, v = (ctx.tensor(a, grad=ctx.backward) for a in ctx.inputs(11, lq=length, lk=length))
        do = ctx.grad_output(12, q.shape)
        saved = {n: t.detach().clone() for n, t in zip("qkv", (q, k, v), strict=True)}
        saved["dO"] = do.clone()
        live = {"q": q, "k": k, "v": v, "dO": do}
        ctx_mgr = torch.enable_grad() if ctx.backward else torch.no_grad()
        with ctx_mgr:
            o = ctx.kernel(q, k, v, causal, None)
        stage = "forward"
        for n in "qkv":
            if not bits_equal(live[n], saved[n]):
                return _modified(name, n, stage, causal, live[n], saved[n])
        if ctx.backward:
            torch.autograd.grad(o, (q, k, v), do.to(o.dtype))
            stage = "backward"
            for n in ("q", "k", "v", "dO"):
                if not bits_equal(live[n], saved[n]):
                    return _modified(name, n, stage, causal, live[n], saved[n])
    passes = "forward and backward" if ctx.backward else "forward"
    return Verdict(name, "ok", f"q, k, v{', dO' if ctx.backward else ''} bit-identical after"
                   f" {passes} ({'causal and non-causal' if len(modes) > 1 else 'non-causal'})")


def _modified(name: str, which: str, stage: str, causal: bool, now: Any, was: Any) -> Verdict:
    changed = int((now.detach().cpu() != was.cpu()).sum())
    return Verdict(name, "fail", f"modified its input {which} in place (during the {stage},"
                   f" {'causal' if causal else 'non-causal'})",
                   {"elements_changed": changed, "max_change": max_diff(now, was)})


# ---------------------------------------------------------------------------
# layouts and the output contract
# ---------------------------------------------------------------------------


def _transposed_view(t: Any) -> Any:
    """The same values stored as BLHD, seen as BHLD (a transposed, non-contiguous view)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sliced_heads(t: Any) -> Any:
    """Every other head of a tensor with twice the heads (non-contiguous)."""
    big = torch.empty((t.shape[0], 2 * t.shape[1], *t.shape[2:]), dtype=t.dtype, device=t.device)
    big.normal_()
    big[:, ::2] = t
    return big[:, ::2]


def _storage_offset(t: Any) -> Any:
    """A contiguous view starting 3 elements into a larger buffer (unaligned offset)."""
    flat = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device).normal_()
    view = flat[3:].view(t.shape)
    view.copy_(t)
    return view


LAYOUTS: dict[str, Callable[[Any], Any]] = {
    "transposed BLHD view": _transposed_view,
    "sliced heads": _sliced_heads,
    "storage offset": _storage_offset,
}


def layouts(ctx: AttentionContext) -> Verdict:
    """Non-contiguous inputs agree with contiguous copies (O bit-identical, else within the
    rule), or are rejected with a clear error."""
    name = "layouts"
    base = _base(ctx, name, bitwise=True)
    if isinstance(base, Verdict):
        return base
    _, _, length = base
    x = ctx.inputs(13, lq=length, lk=length)
    do = ctx.grad_output(14, x[0].shape)
    dense = [ctx.tensor(a) for a in x]
    o, grads = ctx.forward_backward(*dense, do)
    notes: list[str] = []
    for what, make in LAYOUTS.items():
        views = [make(t) for t in dense]
        try:
            o2, g2 = ctx.forward_backward(*views, do)
        except Exception as err:
            if clear_rejection(err):
                notes.append(f"{what} rejected ({kernel_error(err)[:80]})")
                continue
            return Verdict(name, "fail", f"{what} inputs crash without a clear error:"
                           f" {kernel_error(err)}")
        if not bits_equal(o2, o):
            culprit = _culprit(ctx, dense, make, o)
            return Verdict(name, "fail", f"non-contiguous {culprit} ({what}) read with wrong"
                           " strides", {"max_diff": max_diff(o2, o)})
        if g2 is not None and not _grads_close(ctx, grads, g2, x, do):
            return Verdict(name, "fail", f"gradients for non-contiguous inputs ({what}) differ"
                           " from those for contiguous copies",
                           {"max_diff": max(max_diff(a, b) for a, b in zip(grads, g2,
                                                                            strict=True))})
    if notes:
        return Verdict(name, "ok", "; ".join(notes))
    return Verdict(name, "ok", f"{len(LAYOUTS)} non-contiguous layouts agree with contiguous"
                   " copies (O, dQ, dK, dV)")


def _grads_close(ctx: AttentionContext, g1: Any, g2: Any, x: Any, do: Any) -> bool:
    if all(bits_equal(a, b) for a, b in zip(g1, g2, strict=True)):
        return True
    # bits may differ when the backward is not repeatable: compare with a second dense run
    _, g3 = ctx.forward_backward(*(ctx.tensor(a) for a in x), do)
    tol = max(max_diff(a, b) for a, b in zip(g1, g3, strict=True))
    return tol > 0 and all(max_diff(a, b) <= 2 * tol for a, b in zip(g1, g2, strict=True))


def _culprit(ctx: AttentionContext, dense: list[Any], make: Callable[[Any], Any], o: Any) -> str:
    """The input whose non-contiguous view alone changes O."""
    for i, which in enumerate(("Q", "K", "V")):
        args = list(dense)
        args[i] = make(dense[i])
        try:
            oi = ctx.forward(*args)
        except Exception:
            return which
        if not bits_equal(oi, o):
            return which
    return "Q/K/V (only together)"


def outputs(ctx: AttentionContext) -> Verdict:
    """For every declared input dtype, O has q's dtype, shape and device (the documented
    contract) and each gradient its input's."""
    name = "outputs"
    h, hkv = ctx.heads()
    length = ctx.length(16)
    dtypes = tuple(getattr(ctx.spec, "dtypes", None) or (ctx.dtype,))
    checked = []
    shapes = [(dtype, length) for dtype in dtypes] + [(dtypes[0], 1)]  # and decode, Lq = 1
    for dtype, lq in shapes:
        if not ctx.supports(heads=h, kv_heads=hkv, lq=lq, lk=length, causal=False,
                            dtype=dtype):
            continue
        sub = dataclasses.replace(ctx, dtype=dtype, _repeatable={})
        tensors = [sub.tensor(a) for a in sub.inputs(15, batch=1, lq=lq, lk=length)]
        do = sub.grad_output(16, tensors[0].shape)
        leaves = [t.requires_grad_(ctx.backward) for t in tensors]
        with torch.enable_grad():
            o = ctx.kernel(*leaves, False, None)
        if not isinstance(o, torch.Tensor):
            return Verdict(name, "fail", f"output is a {type(o).__name__}, not a torch.Tensor")
        checks = [("O", o, tensors[0])]
        if ctx.backward and o.shape == tensors[0].shape:
            grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
            checks += list(zip(("dQ", "dK", "dV"), grads, tensors, strict=True))
        for what, got, like in checks:
            for attr in ("dtype", "shape", "device"):
                a, b = getattr(got, attr), getattr(like, attr)
                if a != b:
                    return Verdict(name, "fail", f"{what} has {attr} {_show(a)} for {dtype}"
                                   f" inputs (Lq={lq}); documented {_show(b)} (the input's)")
        if dtype not in checked:
            checked.append(dtype)
    if not checked:
        return Verdict(name, "untested", f"kernel declares no support for L={length}")
    grads_text = ", dQ, dK, dV" if ctx.backward else ""
    return Verdict(name, "ok", f"O{grads_text} have the input's dtype, shape and device for"
                   f" {', '.join(checked)} inputs")


def _show(x: Any) -> str:
    return str(tuple(x)) if hasattr(x, "__len__") else str(x).removeprefix("torch.")


# ---------------------------------------------------------------------------
# edge lengths, special values
# ---------------------------------------------------------------------------


def edge_cases() -> list[tuple[str, int, int, bool]]:
    """(label, Lq, Lk, causal) drawn on purpose: decode (Lq = 1, 2) and Lq = 16 against Lk
    below, at and just above the block (16) and the tile (64) and Lk = 1; causal decode;
    fully masked causal rows (Lq > Lk, bottom-right alignment)."""
    lks = (1, QUANT_BLOCK - 1, QUANT_BLOCK, QUANT_BLOCK + 1, KEY_TILE - 1, KEY_TILE,
           KEY_TILE + 1)
    cases = [(f"Lq={lq} Lk={lk}", lq, lk, False) for lq in (1, 2, 16) for lk in lks]
    cases += [("causal decode Lq=1 Lk=80", 1, 80, True), ("causal Lq=2 Lk=80", 2, 80, True),
              ("masked rows causal Lq=20 Lk=5", 20, 5, True),
              ("masked rows causal Lq=70 Lk=65", 70, 65, True)]
    return cases


def edge_lengths(ctx: AttentionContext) -> Verdict:
    """Each edge case the kernel declares support for is checked against the reference under
    the tolerance rule (forward and backward); the others are listed as untested."""
    name = "edge lengths"
    h, hkv = (2, 1) if ctx.gqa else (1, 1)  # small: 25 cases, each with the backward
    untested, passed, numbers = [], 0, {}
    for label, lq, lk, causal in edge_cases():
        if not ctx.supports(heads=h, kv_heads=hkv, lq=lq, lk=lk, causal=causal):
            untested.append(label)
            continue
        q, k, v = ctx.inputs(30 + lq * 131 + lk, batch=1, heads=(h, hkv), lq=lq, lk=lk)
        out = ctx.rule(q, k, v, causal, backward=True, seed=lq * 131 + lk)
        if not out.ok:
            return Verdict(name, "fail", f"wrong result at {label}: {rule_summary(out)}",
                           {"passed_before": passed})
        passed += 1
    numbers["cases"] = passed
    if untested:
        numbers["untested"] = len(untested)
    if not passed:
        return Verdict(name, "untested", "kernel declares none: " + ", ".join(untested), numbers)
    cause = f"{passed} edge cases within the tolerance rule"
    if untested:
        cause += "; untested (not declared): " + ", ".join(untested)
    return Verdict(name, "ok", cause, numbers)


def special_values(ctx: AttentionContext) -> Verdict:
    """A NaN or Inf in one token must not make more rows non-finite than the reference does
    (its 'propagate' NaN policy): rows of O beyond the reference's, and rows of dQ, dK, dV
    beyond the reference's and the token's own reach through the formulas (``_reach``),
    never other batch elements or heads. A clear rejection of NaN/Inf input is fine."""
    name = "special values"
    h, hkv = ctx.heads()
    length = ctx.length(40)
    if not ctx.supports(heads=h, kv_heads=hkv, lq=length, lk=length, causal=False):
        return Verdict(name, "untested", f"kernel declares no support for L={length}")
    q, k, v = ctx.inputs(40, lq=length, lk=length)
    do = ctx.grad_output(41, q.shape)
    cases = [("NaN in q[0, 0, 5]", "q", (0, 0, 5, 3), np.nan),
             ("Inf in k[0, 0, 7]", "k", (0, 0, 7, 1), np.inf),
             ("NaN in v[0, 1, 9]", "v", (0, 1, 9, 0), np.nan)]
    notes: list[str] = []
    clean_error: list[str | None] = []  # the finite input's outcome, run once when needed
    for label, which, idx, value in cases:
        arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
        arrays[which][idx] = value
        tensors = [ctx.tensor(arrays[n]) for n in "qkv"]
        try:
            o, grads = ctx.forward_backward(*tensors, do)
        except Exception as err:
            if clear_rejection(err):
                # A rejection is evidence only if the same shape without the special value
                # runs: a kernel that raises on both has not looked at the value at all.
                if not clean_error:
                    try:
                        ctx.forward_backward(*(ctx.tensor(a) for a in (q, k, v)), do)
                        clean_error.append(None)
                    except Exception as clean:
                        clean_error.append(kernel_error(clean))
                if clean_error[0] is not None:
                    return Verdict(name, "untested", "the kernel raises on the same input "
                                   f"without a special value too ({clean_error[0][:80]})")
                notes.append(f"{label}: rejected ({kernel_error(err)[:60]})")
                continue
            raise
        ref_o, ref_grads = _reference_nonfinite(ctx, arrays, do)
        got = {"O": o} | ({} if grads is None else dict(zip(("dQ", "dK", "dV"), grads,
                                                             strict=True)))
        ref = {"O": ref_o} | dict(zip(("dQ", "dK", "dV"), ref_grads, strict=True))
        group = h // hkv
        for tname, t in got.items():
            bad = _bad_rows(t)
            own = _token_heads(tname, which, idx[1], group)
            spread = bad & ~ref[tname] & ~_reach(tname, which, idx, bad.shape, group)
            if spread.any():
                return Verdict(name, "fail", f"{label} spread to {int(spread.sum())} {tname}"
                               f" rows the reference keeps finite ({_where(spread, idx[0], own)})",
                               {"kernel_rows": int(bad.sum()), "reference_rows":
                                int(ref[tname].sum())})
    cause = "non-finite rows no wider than the reference's for 3 special tokens"
    if notes:
        cause = "; ".join(notes) if len(notes) == len(cases) else cause + "; " + "; ".join(notes)
    return Verdict(name, "ok", cause)


def _bad_rows(t: Any) -> np.ndarray:
    """(B, H, L) rows with a non-finite element."""
    return (~t.detach().float().cpu().isfinite()).any(dim=-1).numpy()


def _token_heads(tname: str, which: str, head: int, group: int) -> range:
    """Heads of tensor ``tname`` (query heads for O, dQ; KV heads for dK, dV) that the
    special token's own head is, or shares K, V with."""
    if tname in ("O", "dQ"):
        return range(head, head + 1) if which == "q" else range(head * group, (head + 1) * group)
    return range(head // group, head // group + 1) if which == "q" else range(head, head + 1)


def _reach(tname: str, which: str, idx: tuple[int, ...], shape: tuple[int, ...],
           group: int) -> np.ndarray:
    """Rows a special token reaches through the attention formulas themselves: its own O
    and dQ row (a query token); every dK, dV row of its KV head (dK_j, dV_j sum over all
    query rows of the group); for a key or value token, dQ, dK, dV of its heads. O rows are
    judged by the reference's own non-finite rows only."""
    m = np.zeros(shape, dtype=bool)
    b, head, i = idx[:3]
    if tname == "O" and which != "q":
        return m
    heads = _token_heads(tname, which, head, group)
    if which == "q" and tname in ("O", "dQ"):
        m[b, head, i] = True
    else:
        m[b, heads.start:heads.stop, :] = True
    return m


def _where(spread: np.ndarray, batch: int, heads: range) -> str:
    others = [i for i in range(spread.shape[0]) if i != batch]
    if others and spread[others].any():
        return "other batch elements"
    outside = [i for i in range(spread.shape[1]) if i not in heads]
    if outside and spread[batch][outside].any():
        return "other heads"
    return "other rows of the same head"


def _reference_nonfinite(ctx: AttentionContext, arrays: dict[str, np.ndarray], do: Any) -> Any:
    """The reference's non-finite rows (float32 accumulation, NaN policy 'propagate')."""
    rec = dataclasses.replace(reference.get_recipe(ctx.recipe), nan_policy="propagate")
    q, k, v = (torch.from_numpy(arrays[n]) for n in "qkv")
    fwd = reference.fp4_attention_forward(q, k, v, rec)
    grads = reference.attention_backward(rec.backward, fwd, q, k, v, do.float().cpu(), rec)
    return _bad_rows(fwd.o), tuple(_bad_rows(g) for g in grads)


ATTENTION_PROPERTIES: dict[str, Callable[[AttentionContext], Verdict]] = {
    "independence": independence,
    "batch permutation": batch_permutation,
    "key permutation": key_permutation,
    "repeatability": repeatability,
    "stale state": stale_state,
    "CUDA graphs": cuda_graphs,
    "inputs untouched": inputs_untouched,
    "layouts": layouts,
    "outputs": outputs,
    "edge lengths": edge_lengths,
    "special values": special_values,
}
