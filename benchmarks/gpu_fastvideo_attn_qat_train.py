"""FastVideo's attn_qat_train (through fp4sim.adapters) against the reference, on a GPU.

Needs FastVideo's kernel package on PYTHONPATH (README "Checking a public kernel"):
  PYTHONPATH=.:.thirdparty python benchmarks/gpu_fastvideo_attn_qat_train.py --out DIR

Three parts, each printed as a table and written to DIR/fastvideo_attn_qat_train.json:
1. verdicts: the FP4 tolerance rule of ``fp4sim check`` (O, dQ, dK, dV) against the recipe
   the kernel claims, per shape (non-causal and causal, L up to 4096, d 64 and 128), with the
   relative L2 error against its claimed recipe, against ``attn-qat`` (64-key tiles) and
   against unquantized attention;
2. the kernel's own Q/K/V fake quantizer against the emulator, bit for bit;
3. probes of declared-unsupported inputs: causal with Lq != Lk (top-left or bottom-right
   alignment?), and lengths that are not a multiple of 16.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import triton

import fp4sim
from fp4sim import reference
from fp4sim.harness.loader import load_kernel
from fp4sim.judge.attention import AttentionCheckConfig, evaluate_attention_case
from fp4sim.judge.inputs import AttentionCase, AttentionInputSpec, generate_attention_inputs
from fp4sim.reference.p_quant import quantize_p_tiles

GRID_LENGTHS = (256, 1000, 4096)
GRID_HEAD_DIMS = (64, 128)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


def kernel_run(kernel, q, k, v, do, causal, sm_scale, device):
    qt, kt, vt = (torch.from_numpy(x).to(device, torch.bfloat16).requires_grad_(True)
                  for x in (q, k, v))
    o = kernel(qt, kt, vt, causal, sm_scale)
    grads = torch.autograd.grad(o, (qt, kt, vt), torch.from_numpy(do).to(device, o.dtype))
    return [o.detach().float()] + [g.float() for g in grads]


def reference_run(recipe, q, k, v, do, causal, sm_scale, device):
    qt, kt, vt, dot = (torch.from_numpy(x).to(device) for x in (q, k, v, do))
    r = reference.get_recipe(recipe)
    fwd = reference.fp4_attention_forward(qt, kt, vt, r, causal=causal, sm_scale=sm_scale)
    variant = r.backward
    dq, dk, dv = reference.attention_backward(variant, fwd, qt, kt, vt, dot, r, causal=causal,
                                              sm_scale=sm_scale)
    return [fwd.o, dq, dk, dv]


def rule_verdict(kernel, recipe, spec, seed, causal, device, diagnose=True
                 ) -> tuple[bool, str]:
    """The FP4 tolerance rule of ``fp4sim check`` (fp4sim.judge.attention) on one case."""
    q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
    case = AttentionCase(spec, seed, causal, None, q, k, v)
    config = AttentionCheckConfig(kernel="adapter", recipe=recipe, causal=causal,
                                  device=device, dtypes=("bfloat16",),
                                  head_dims=(spec.head_dim,))
    out = evaluate_attention_case(kernel, case, config, diagnose=diagnose)
    return out.ok, out.describe(case)


def grid(kernel, device, lengths, head_dims, claims, log) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:  # shortest first: a time limit cuts the longest
        for d in head_dims:
            for causal in (False, True):
                heads = 2 if length < 4096 else 1
                spec = AttentionInputSpec(batch=1, heads=heads, kv_heads=heads, lq=length,
                                          lk=length, head_dim=d, distribution="student_t",
                                          df=4.0, dtype="bfloat16")
                seed = 1000 + length + d
                q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
                do = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(np.float32)
                do = torch.from_numpy(do).bfloat16().float().numpy()
                t0 = time.time()
                got = kernel_run(kernel, q, k, v, do, causal, None, device)
                row: dict[str, Any] = {"causal": causal, "L": length, "d": d, "heads": heads}
                for recipe in (claims, "attn-qat", "bf16"):
                    ref = reference_run(recipe, q, k, v, do, causal, None, device)
                    row[recipe] = {n: rel_l2(g, r) for n, g, r in
                                   zip(("O", "dQ", "dK", "dV"), got, ref, strict=True)}
                # diagnosis reruns the float64 reference several times: skipped at L >= 4096
                ok, text = rule_verdict(kernel, claims, spec, seed, causal, device,
                                        diagnose=length < 4096)
                row["rule_ok"] = ok
                row["rule"] = text
                row["seconds"] = round(time.time() - t0, 1)
                rows.append(row)
                log(f"causal={causal!s:5} d={d:3} L={length:4}: rule({claims})="
                    f"{'pass' if ok else 'FAIL' if ok is False else '?'}  relL2 O/dQ/dK/dV "
                    + "  ".join(f"{r}: " + "/".join(f"{row[r][n]:.4f}" for n in
                                                   ("O", "dQ", "dK", "dV"))
                                for r in (claims, "attn-qat", "bf16"))
                    + f"  ({row['seconds']} s)")
                if ok is False:
                    log("    " + text.replace("\n", "\n    "))
    return rows


def quantizer_probe(device, log) -> list[dict[str, Any]]:
    """Launch the kernel's fake_quantize_q on bf16 inputs and compare with the emulator."""
    mod = importlib.import_module("fastvideo_kernel.triton_kernels.quant_utils")
    out = []
    for d in GRID_HEAD_DIMS:
        for dist in ("student_t", "gaussian"):
            spec = AttentionInputSpec(batch=1, heads=2, kv_heads=2, lq=1000, lk=1000,
                                      head_dim=d, distribution=dist, df=3.0, dtype="bfloat16")
            x, _, _ = generate_attention_inputs(np.random.default_rng(d), spec)
            x = x * np.float32(2.0**-6)  # reach subnormal E4M3 scales as well
            xt = torch.from_numpy(x).to(device, torch.bfloat16)
            fq = torch.empty_like(xt)
            block = 32
            g = (triton.cdiv(xt.shape[2], block), xt.shape[0] * xt.shape[1], 1)
            mod.fake_quantize_q[g](xt, fq, *xt.stride(), *fq.stride(), xt.shape[1], xt.shape[2],
                                   BLOCK_M=block, HEAD_DIM=d, use_global_sf=False)
            want = fp4sim.fake_quantize(x, "nvfp4")
            want_bf16 = torch.from_numpy(want).bfloat16()
            got = fq.cpu()
            diff = (got.view(torch.int16) != want_bf16.view(torch.int16))
            n_bad = int(diff.sum())
            out.append({"d": d, "distribution": dist, "elements": int(diff.numel()),
                        "bit_differences": n_bad})
            log(f"fake_quantize_q d={d} {dist}: {n_bad} of {diff.numel()} elements differ"
                " from fp4sim.fake_quantize(x, 'nvfp4') (bf16 bit patterns)")
            if n_bad:
                idx = torch.nonzero(diff)[:3].tolist()
                for i in idx:
                    log(f"    at {i}: x={x[tuple(i)]!r} kernel={float(got[tuple(i)])!r} "
                        f"emulator={float(want_bf16[tuple(i)])!r}")
    return out


def probes(kernel, claims, device, log) -> dict[str, Any]:
    res: dict[str, Any] = {}
    # causal with Lq != Lk: which alignment does the kernel use?
    for lq, lk, d in ((256, 512, 64), (512, 256, 64)):
        spec = AttentionInputSpec(batch=1, heads=2, kv_heads=2, lq=lq, lk=lk, head_dim=d,
                                  dtype="bfloat16")
        q, k, v = generate_attention_inputs(np.random.default_rng(7), spec)
        do = torch.from_numpy(np.random.default_rng(8).standard_normal(q.shape)
                              .astype(np.float32)).bfloat16().float().numpy()
        got = kernel_run(kernel, q, k, v, do, True, None, device)
        br = reference_run(claims, q, k, v, do, True, None, device)
        n = min(lq, lk)
        if lq <= lk:  # top-left alignment = causal attention over the first Lq keys
            tl = reference_run(claims, q, k[:, :, :n], v[:, :, :n], do, True, None, device)
            tl[2] = torch.nn.functional.pad(tl[2], (0, 0, 0, lk - n))
            tl[3] = torch.nn.functional.pad(tl[3], (0, 0, 0, lk - n))
        else:
            tl = None
        nc = reference_run(claims, q, k, v, do, False, None, device)
        row = {}
        for i, name in enumerate(("O", "dQ", "dK", "dV")):
            row[name] = {"bottom_right": rel_l2(got[i], br[i]),
                         "non_causal": rel_l2(got[i], nc[i])}
            if tl is not None:
                row[name]["top_left"] = rel_l2(got[i], tl[i])
        res[f"causal Lq={lq} Lk={lk}"] = row
        log(f"causal Lq={lq} Lk={lk}: relL2 vs bottom-right / top-left / non-causal reference: "
            + "  ".join(f"{nm} " + "/".join(f"{row[nm].get(a, float('nan')):.3f}" for a in
                                            ("bottom_right", "top_left", "non_causal"))
                        for nm in row))
    # lengths that are not a multiple of 16: the rows of the last, partial key block
    for length in (1000, 1008, 1024):
        spec = AttentionInputSpec(batch=1, heads=2, kv_heads=2, lq=length, lk=length,
                                  head_dim=64, dtype="bfloat16", distribution="student_t", df=4.0)
        q, k, v = generate_attention_inputs(np.random.default_rng(9), spec)
        do = torch.from_numpy(np.random.default_rng(10).standard_normal(q.shape)
                              .astype(np.float32)).bfloat16().float().numpy()
        got = kernel_run(kernel, q, k, v, do, False, None, device)
        ref = reference_run(claims, q, k, v, do, False, None, device)
        err = (got[3].double().cpu() - ref[3].double().cpu()).norm(dim=-1)
        scale = ref[3].double().cpu().norm(dim=-1).mean()
        tail = length - (length // 16) * 16
        last = err[..., length - 16:].mean() / scale
        body = err[..., : length - 16].mean() / scale
        res[f"ragged L={length}"] = {"dV_rel_row_err_last16": float(last),
                                     "dV_rel_row_err_rest": float(body), "partial": tail}
        log(f"non-causal L={length} (partial key block of {tail}): dV row error, last 16 keys "
            f"{float(last):.4f} vs other keys {float(body):.4f} (relative to mean row norm)")
    return res


def emulated_dv(q, k, v, do, causal, sm_scale, device, *, bf16_l: bool, pollute: bool):
    """dV of the claimed recipe with two of the kernel's habits switched on or off.

    ``bf16_l``: the forward's row sum l adds the 32-key tiles' P rounded to bfloat16 (the
    kernel's high-precision P is bf16, attn_qat_train.py:153, quant_utils.py:28), so the saved
    LSE and the backward's normalized P move by up to 2^-9 relative. ``pollute``: the keys
    padding the last 16-key block get P = exp(0 - LSE) in the backward (zero-filled K rows,
    no mask in the non-causal path), which can raise that block's scale."""
    r = reference.get_recipe("fastvideo-attn-qat")
    qt, kt, vt, dot = (torch.from_numpy(x).to(device, torch.float64) for x in (q, k, v, do))
    fwd = reference.fp4_attention_forward(qt, kt, vt, r, causal=causal, sm_scale=sm_scale,
                                          accum_dtype=torch.float64)
    lq, lk = q.shape[2], k.shape[2]
    s = fwd.sm_scale * fwd.q_hat @ fwd.k_hat.transpose(-1, -2)
    if causal:
        vis = torch.arange(lk, device=device)[None, :] <= (torch.arange(lq, device=device)[:, None]
                                                          + lk - lq)
        s = s.masked_fill(~vis, float("-inf"))
    if bf16_l:
        bn = 32
        pad = (-lk) % bn
        st = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        st = st.reshape(*s.shape[:-1], -1, bn)
        m_tiles = torch.cummax(st.amax(dim=-1), dim=-1).values
        p_t = torch.exp(st - m_tiles.unsqueeze(-1)).to(torch.bfloat16).double()
        m = m_tiles[..., -1]
        l_row = (p_t.sum(dim=-1) * torch.exp(m_tiles - m.unsqueeze(-1))).sum(dim=-1)
        lse = m + torch.log(l_row)
    else:
        lse = fwd.lse.double()
    p = torch.exp(s - lse.unsqueeze(-1))
    lk16 = -(-lk // 16) * 16
    fill = torch.exp(-lse).unsqueeze(-1) if (pollute and not causal) else 0.0
    p = torch.cat([p, torch.zeros(*p.shape[:-1], lk16 - lk, dtype=p.dtype, device=device)
                   + fill], dim=-1)
    pq = quantize_p_tiles(p.reshape(*p.shape[:-1], lk16 // 16, 16), r.p, "block")
    p_tilde = pq.values.reshape(p.shape)[..., :lk]
    return p_tilde.transpose(-1, -2) @ dot


CAUSE_CASES = (
    # (label, spec fields, seed, causal, sm_scale): failing grid cases and the check's shrunk
    # cases, plus two passing ones
    ("grid nc d64 L256", dict(lq=256, lk=256, head_dim=64, heads=2, distribution="student_t",
                              df=4.0), 1320, False, None),
    ("grid c d64 L256", dict(lq=256, lk=256, head_dim=64, heads=2, distribution="student_t",
                             df=4.0), 1320, True, None),
    ("grid c d128 L256", dict(lq=256, lk=256, head_dim=128, heads=2, distribution="student_t",
                              df=4.0), 1384, True, None),
    ("grid nc d64 L1000", dict(lq=1000, lk=1000, head_dim=64, heads=2,
                               distribution="student_t", df=4.0), 2064, False, None),
    ("shrunk nc Lq1 Lk2", dict(lq=1, lk=2, head_dim=64, heads=1), 0, False, None),
    ("shrunk c L8 tau1/16", dict(lq=8, lk=8, head_dim=64, heads=2), 1, True, 0.0625),
    ("grid c d128 L1000", dict(lq=1000, lk=1000, head_dim=128, heads=2,
                               distribution="student_t", df=4.0), 2128, True, None),
    ("flat c L512 tau1/16", dict(lq=512, lk=512, head_dim=64, heads=2), 5, True, 0.0625),
)


def causes(kernel, device, log) -> list[dict[str, Any]]:
    out = []
    log("dV: relative L2 / max abs error of the kernel against the recipe's dV with the"
        " kernel's habits emulated (l from bf16 P; padded keys in the last P block)")
    for label, fields, seed, causal, tau in CAUSE_CASES:
        spec = AttentionInputSpec(batch=1, kv_heads=fields["heads"], dtype="bfloat16", **fields)
        q, k, v = generate_attention_inputs(np.random.default_rng(seed), spec)
        do = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(np.float32)
        do = torch.from_numpy(do).bfloat16().float().numpy()
        got = kernel_run(kernel, q, k, v, do, causal, tau, device)[3].double().cpu()
        row: dict[str, Any] = {"case": label}
        for name, bl, pol in (("recipe", False, False), ("bf16 l", True, False),
                              ("padded P", False, True), ("both", True, True)):
            ref = emulated_dv(q, k, v, do, causal, tau, device, bf16_l=bl, pollute=pol).cpu()
            row[name] = (rel_l2(got, ref), float((got - ref).abs().max()))
        out.append(row)
        log(f"  {label:22s} " + "  ".join(f"{n}: {row[n][0]:.4f}/{row[n][1]:.3f}" for n in
                                            ("recipe", "bf16 l", "padded P", "both")))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="fp4sim.adapters.fastvideo_attn_qat_train:attention")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default=",".join(map(str, GRID_LENGTHS)))
    ap.add_argument("--head-dims", default=",".join(map(str, GRID_HEAD_DIMS)))
    ap.add_argument("--parts", default="grid,quantizer,probes")
    ap.add_argument("--write-inputs", metavar="NPZ", default=None,
                    help="only write a student-t bf16 q, k, v of (1, 2, 4096, 128) for"
                    " `--inputs` and exit")
    args = ap.parse_args(argv)
    if args.write_inputs:
        spec = AttentionInputSpec(batch=1, heads=2, kv_heads=2, lq=4096, lk=4096, head_dim=128,
                                  distribution="student_t", df=4.0, dtype="bfloat16")
        q, k, v = generate_attention_inputs(np.random.default_rng(4096), spec)
        np.savez(args.write_inputs, q=q, k=k, v=v)
        return 0
    kernel = load_kernel(args.kernel, 5)
    spec = getattr(kernel, "fp4sim_spec", None)
    claims = (spec.get("claims") if isinstance(spec, dict) else getattr(spec, "claims", None))
    claims = claims or "attn-qat"
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    if args.device == "cuda":
        log(f"device: {torch.cuda.get_device_name()} (capability "
            f"{torch.cuda.get_device_capability()}), torch {torch.__version__}")
    parts = args.parts.split(",")
    result: dict[str, Any] = {"kernel": args.kernel, "claims": claims}
    if "quantizer" in parts:
        result["quantizer"] = quantizer_probe(args.device, log)
    if "probes" in parts:
        result["probes"] = probes(kernel, claims, args.device, log)
    if "causes" in parts:
        result["causes"] = causes(kernel, args.device, log)
    if "grid" in parts:
        lengths = tuple(int(x) for x in args.lengths.split(","))
        dims = tuple(int(x) for x in args.head_dims.split(","))
        result["grid"] = grid(kernel, args.device, lengths, dims, claims, log)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fastvideo_attn_qat_train.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(args.out, "fastvideo_attn_qat_train.log"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
