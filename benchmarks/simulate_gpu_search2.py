"""Second search for a stronger `gpu` preset of `fp4sim simulate` (issue 19).

The first search (``simulate_gpu_search.py``, docs/bench/simulate.md) found two groups of
tasks: recall, where the split shows but bf16 stays on the "values seen in the context"
plateau (20-30 % of the way from chance), and tasks bf16 solves within 100-300 steps
(copy, majority, ``pairs``), where the attention turns one-hot or the loss small before
o_only's and drop_in's gradient errors do damage. On the CPU the plateau turned out to be
the missing previous-token head; the token shift (``ModelConfig.token_shift``) supplies it,
and scaled down (``token_shift_scale``) it lets the lookup form only after a few hundred
steps on the plateau. This driver screens that family on the GPU and confirms the best.

Every job trains one (candidate, seed, variant) in its own spawned process with one torch
thread (``simulate_search.run_variant``: ``train_named_variant`` on the ``gpu`` preset with
overrides, as the command trains); jobs still running at ``--deadline`` stop at their next
progress line and keep their steps. Each (candidate, seed) is then judged with the
simulation's own verdict and split code (``simulate_search.judge``) at every multiple of
250 steps all its runs reached (50-step training-loss means) and, when every run
finished, at the end on the held-out loss.

    # device, screening (H19a): all plan jobs at once, 16 processes
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/simulate_gpu_search2.py --plan screen \\
        --deadline 430 --out "$OUT"
    # device, confirmation (H19b): one candidate x 5 variants x seeds 0, 1, 2
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/simulate_gpu_search2.py --plan confirm \\
        --candidate rs01-w128-b16 --deadline 500 --procs 15 --out "$OUT"
    # CPU dry runs
    PYTHONPATH=. python benchmarks/simulate_gpu_search2.py --plan screen --smoke --out /tmp/s
    PYTHONPATH=. python benchmarks/simulate_gpu_search2.py --plan screen --device cpu \\
        --set steps=8 log_every=4 --out /tmp/s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate_gpu_search import _f, run_jobs  # noqa: E402
from simulate_search import Entry, _chance, judge  # noqa: E402

ALL = ("bf16", "attn_qat", "p_only", "o_only", "drop_in")
SPLIT3 = ("bf16", "o_only", "drop_in")  # the two conditions that failed when bf16 solved
SEEDS = (0, 1, 2)
TAIL = 50  # training steps averaged for a loss at a checkpoint (as in simulate_search)
EVERY = 250  # checkpoint spacing
TARGET = 0.80  # the issue's bar: bf16 at least 80 % of the way from chance to zero

# Shared by every candidate: the `gpu` preset's model family (pre-LN, width 128, 4 heads
# of 32, 2 layers) and optimizer (AdamW, clipping 1.0), warm-up 100 steps, lr 3e-3 (the
# cpu preset's rate: the split showed from ~500 steps there), no diagnostics (they do not
# feed back into training), 2 held-out batches, a progress line (and deadline check)
# every 10 steps.
BASE: dict[str, Any] = {"width": 128, "n_heads": 4, "n_layers": 2, "lr": 3e-3,
                        "warmup_steps": 100, "eval_batches": 2, "diagnostic_checkpoints": 0,
                        "log_every": 10}


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    why: str
    overrides: dict[str, Any]
    variants: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)

    def entry(self, device: str, extra: dict[str, Any] | None = None,
              variants: tuple[str, ...] | None = None,
              seeds: tuple[int, ...] | None = None) -> Entry:
        return Entry(self.name, device, BASE | self.overrides | (extra or {}),
                     variants or self.variants, seeds or self.seeds)


# Before this family, on the CPU (width 64, batch 32, lr 3e-3, SDPA attention, bf16):
# recall without help stays on the plateau (24 % at 3000 steps; with rotary positions 24 %
# at 1500); with the token shift recall is solved by step 150 and o_only trains like bf16
# (0.0004 at 600 steps), manykeys with 256 keys by step 300 (o_only 0.02 at 700, like
# bf16); pairs with 32 keys sits at chance to step 300 and reaches 80 % at step 600, o_only
# with it. What separated o_only so far was a long stretch of spread attention with a
# large output gradient: absentkeys keeps that for an eighth of the queries for good while
# the rest are exact lookups bf16 solves (on the CPU at batch 32 o_only still trained like
# bf16 to step 800: 0.275 against 0.284); manykeys at batch 8 separated o_only on one seed
# of three (a race between the plateau's end and o_only's drift).


def _s(name: str, scale: float, width: int, batch: int, variants: tuple[str, ...],
       why: str, seeds: tuple[int, ...] = (0,), **more: Any) -> Candidate:
    """recall (vocabulary 17: 8 keys, 8 values, 8 pairs), the token shift scaled by
    ``scale``, cosine decay to 0.1 x lr over 1500 steps."""
    return Candidate(name, why, {"task": "recall", "vocab_size": 17, "seq_len": 64,
                                 "width": width, "n_heads": width // 32, "batch_size": batch,
                                 "token_shift": True, "token_shift_scale": scale,
                                 "lr_schedule": "cosine", "steps": 1500} | more,
                     variants, seeds)


BO = ("bf16", "o_only")
# The lever: a scaled-down token shift. With AdamW the table then learns at scale x lr, so
# the lookup it enables forms late but on schedule: the model first sits on the recall
# plateau (spread attention over the context's values, where o_only's key-bias drift does
# its damage, as in the cpu preset) and then solves the task. On the CPU (exact SDPA
# attention, width 64, batch 16, vocabulary 17, constant lr 3e-3): scale 0.03 left the
# plateau at step ~250, 0.01 at ~450-600 (seeds 0 and 1, solved by 800-900), 0.003 not by
# 1800. With the reference's variants at scale 0.01 (seed 0, constant lr, 1200 steps):
# bf16 held-out 0.072 (left the plateau at ~450), o_only unlearned from step 400 (2.00,
# 10 spikes), but bf16 also had 10 spikes after converging (norms 20-40 at loss 0.03):
# hence the cosine decay here.
CANDIDATES: tuple[Candidate, ...] = (
    _s("rs01-w128-b16", 0.01, 128, 16, ALL, "scale 0.01, the gpu preset's width"),
    _s("rs01-w64-b16", 0.01, 64, 16, ALL, "scale 0.01, width 64 (the CPU probe)"),
    _s("rs005-w128-b16", 0.005, 128, 16, BO, "scale 0.005: a longer plateau"),
    _s("rs02-w128-b16", 0.02, 128, 16, BO, "scale 0.02: a shorter plateau"),
    _s("rs01-w128-b32", 0.01, 128, 32, BO, "scale 0.01, batch 32"),
)

# The second device call: the width-64 candidate (on the CPU, 1200 steps: bf16 at 99.9 %
# of the way, the split in the issue's wording on seeds 0-2) on seeds 0, 1, 2, and bf16 at
# width 128 beside it (the first screen's width-128 models stayed at chance for 2000 steps
# on manykeys, where width 64 learned on the CPU). 1200 steps, not more: with 2000 (seed 1,
# CPU) bf16 counted 23 spikes in its converged tail (norms near 1e-3), which hides o_only's.
CONFIRM2: tuple[Candidate, ...] = (
    _s("rs01-w64-b16", 0.01, 64, 16, ALL, "scale 0.01, width 64, 1200 steps",
       seeds=SEEDS, steps=1200),
    _s("rs01-w128-b16", 0.01, 128, 16, ("bf16",), "the same at width 128", steps=1200),
)

SMOKE: tuple[Candidate, ...] = (
    Candidate("tiny-k", "smoke", {"task": "absentkeys", "vocab_size": 41, "seq_len": 16,
                                  "width": 32, "n_heads": 2, "batch_size": 4, "steps": 60,
                                  "warmup_steps": 2, "token_shift": True}, SPLIT3),
    Candidate("tiny-r", "smoke", {"task": "recall", "vocab_size": 11, "seq_len": 16,
                                  "width": 32, "n_heads": 2, "batch_size": 4, "steps": 60,
                                  "warmup_steps": 2, "positions": "rotary"}, ("bf16",)),
)


def tail_mean(losses: list[float], upto: int) -> float | None:
    window = losses[upto - TAIL:upto]
    if upto < TAIL or len(window) < TAIL or not all(math.isfinite(x) for x in window):
        return None
    return sum(window) / TAIL


def issue_split(judged: dict[str, Any] | None) -> dict[str, bool | None] | None:
    """The conditions as issue 19 words them, from the verdict texts: attn_qat and p_only
    learn like bf16; o_only fails, or learns worse and is unstable; drop_in diverges or
    fails. (The product's ``paper_split`` also asks attn_qat to be stable and o_only and
    drop_in to be unstable whatever their loss.) None where a variant was not judged."""
    if judged is None:
        return None
    texts = {name: v["verdict"] for name, v in judged["variants"].items()}

    def check(name: str, test: Any) -> bool | None:
        text = texts.get(name)
        return None if text is None or text.startswith("inconclusive") else test(text)

    return {
        "attn_qat learns like bf16": check("attn_qat", lambda t: t.startswith("learns like")),
        "p_only learns like bf16": check("p_only", lambda t: t.startswith("learns like")),
        "o_only fails, or learns worse and is unstable": check(
            "o_only", lambda t: t.startswith(("fails", "diverged"))
            or (t.startswith("learns worse") and "unstable" in t)),
        "drop_in diverges or fails": check("drop_in",
                                           lambda t: t.startswith(("fails", "diverged"))),
    }


def summarize(entry: Entry, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """bf16's progress curve; the judged split at every checkpoint all runs reached and at
    the end; compact series (50-step loss means, 50-step norm maxima)."""
    chance = _chance(entry)
    bf16 = runs.get("bf16", {"loss": []})
    progress = {t: (chance - m) / chance for t in range(TAIL, len(bf16["loss"]) + 1, TAIL)
                if (m := tail_mean(bf16["loss"], t)) is not None}
    reach = next((t for t, p in sorted(progress.items()) if p >= TARGET), None)
    checkpoints: dict[str, Any] = {}
    longest = max((len(r["loss"]) for r in runs.values()), default=0)
    for t in range(EVERY, longest + 1, EVERY):
        judged = judge(runs, chance, t)
        if judged is not None:
            judged["issue_split"] = issue_split(judged)
            checkpoints[str(t)] = judged
    final = judge(runs, chance, None)
    if final is not None:
        final["issue_split"] = issue_split(final)
    compact = {}
    for name, run in runs.items():
        loss, norm = run["loss"], run["grad_norm"]
        compact[name] = {
            "loss50": [round(sum(loss[i:i + TAIL]) / len(loss[i:i + TAIL]), 4)
                       if all(math.isfinite(x) for x in loss[i:i + TAIL]) else None
                       for i in range(0, len(loss), TAIL)],
            "norm_max50": [round(max(norm[i:i + TAIL]), 3)
                           if all(math.isfinite(x) for x in norm[i:i + TAIL]) else None
                           for i in range(0, len(norm), TAIL)]}
    return {
        "name": entry.name, "seed": seed, "overrides": entry.overrides, "chance_loss": chance,
        "bf16_progress_best": max(progress.values(), default=None),
        "bf16_progress_last": progress[max(progress)] if progress else None,
        "bf16_steps_to_80": reach,
        "runs": {n: {k: r.get(k) for k in ("status", "steps", "planned_steps", "train_s",
                                            "eval_loss", "eval_accuracy", "gpu_mib")}
                 | {"ms_per_step": round(1000 * r["train_s"] / r["steps"], 1)
                    if r.get("steps") else None,
                    "error": (r.get("error") or "").strip().splitlines()[-1:] or None}
                 for n, r in runs.items()},
        "final": final,
        "checkpoints": checkpoints,
        "series": compact,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU preset search 2, plan {report['plan']} ({report['device_name']}, "
             f"{report['date_utc']} UTC, torch {report['torch']})", "",
             f"Wall {report['wall_s']:.0f} s, deadline {report['deadline_s']:.0f} s.", "",
             "| candidate | seed | chance | bf16 best / last progress | bf16 80 % at | "
             "runs (steps, ms/step, status) |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        runs = "; ".join(f"{n} {r['steps']} st {_f(r['ms_per_step'])} ms {r['status']}"
                         for n, r in row["runs"].items())
        lines.append(f"| {row['name']} | {row['seed']} | {row['chance_loss']:.3f} | "
                     f"{_f(row['bf16_progress_best'])} / {_f(row['bf16_progress_last'])} | "
                     f"{_f(row['bf16_steps_to_80'])} | {runs} |")
    lines += ["", "Judged (training-loss mean of 50 steps at a checkpoint; `end`: held-out):",
              ""]
    for row in report["rows"]:
        if len(row["runs"]) < 2:
            continue
        stages = list(row["checkpoints"].items()) + [("end", row["final"])]
        for at, judged in stages:
            if judged is None:
                continue
            cells = " / ".join(f"{n} {_f(v['loss'])} ({v['spikes']}) {v['verdict']}"
                               for n, v in judged["variants"].items())
            issue = judged.get("issue_split") or {}
            issue_holds = bool(issue) and all(v is True for v in issue.values())
            lines.append(f"- {row['name']} s{row['seed']} @{at}: holds {judged['holds']} "
                         f"(complete {judged['complete']}; issue's wording: {issue_holds}), bf16 "
                         f"{_f(judged['bf16_fraction'])}: {cells}")
    return "\n".join(lines) + "\n"


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=("screen", "confirm", "confirm2"), required=True)
    parser.add_argument("--candidate", help="confirm: the candidate's name")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides on top of every candidate (JSON values)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny candidates on the CPU")
    parser.add_argument("--deadline", type=float, default=430.0)
    parser.add_argument("--procs", type=int, default=16)
    parser.add_argument("--device", default=None,
                        help="cpu for a dry run of the real candidates (default cuda; "
                             "cpu with --smoke)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t0 = time.time()
    device = args.device or ("cpu" if args.smoke else "cuda")
    candidates = {c.name: c for c in (SMOKE if args.smoke else CANDIDATES)}
    if args.plan in ("screen", "confirm2"):
        plan = CANDIDATES if args.plan == "screen" else CONFIRM2
        entries = [c.entry(device, parse_sets(args.set)) for c in (SMOKE if args.smoke else plan)]
    else:
        if args.candidate not in candidates:
            parser.error(f"--candidate must be one of {', '.join(candidates)}")
        seeds = tuple(int(s) for s in args.seeds.split(","))
        entries = [candidates[args.candidate].entry(device, parse_sets(args.set), ALL, seeds)]
    jobs = [(e, seed, v) for e in entries for seed in e.seeds for v in e.variants]
    # bf16 first: a shortage of workers delays the FP4 runs, never the baselines
    jobs.sort(key=lambda job: job[2] != "bf16")
    print(f"plan {args.plan}: {len(jobs)} jobs on {device}, deadline {args.deadline:.0f} s",
          flush=True)
    results = run_jobs(jobs, t0 + args.deadline, device, args.procs, args.plan, t0)
    rows = []
    for e in entries:
        for seed in e.seeds:
            runs = {v: results[(e.name, seed, v)] for v in e.variants
                    if (e.name, seed, v) in results}
            rows.append(summarize(e, seed, runs))
    import torch

    report = {"plan": args.plan, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "device": device, "torch": torch.__version__, "wall_s": time.time() - t0,
              "deadline_s": args.deadline, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"search2_{args.plan}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / f"search2_{args.plan}.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
