"""One-call search for a stronger `gpu` preset of `fp4sim simulate` (issue 19).

Goal: bf16 gets at least 80 % of the way from chance loss to zero on its task, and the
paper's split (the seven conditions of ``fp4sim.simulate.metrics.paper_split``) holds on
3 seeds. Two time-boxed phases on one GPU, every run in its own spawned process with one
torch thread (``benchmarks.simulate_search.run_variant``, i.e. ``train_named_variant`` on a
``gpu`` preset with overrides, as the command trains):

1. Screening: every candidate configuration trains bf16 and o_only on seed 0 (o_only is the
   condition that failed whenever bf16 solved its task; bf16 alone cannot tell whether a
   candidate still separates it; ``--phase1-variants bf16`` screens bf16 only). At the
   deadline running jobs stop at their next progress line and keep their steps.
2. Confirmation: the winner's five variants x 3 seeds (15 processes), planned for the
   steps bf16 needed plus a margin, judged with the simulation's own verdict and split code
   (held-out loss when a run finished, else the 50-step training-loss mean at the largest
   checkpoint every run reached; ``simulate_search.judge``).

The winner rule is :func:`pick_winner`. Results: ``gpu_search.json`` and ``gpu_search.md``
under ``--out``; a short table at the end of stdout.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/simulate_gpu_search.py --out "$OUT"
    PYTHONPATH=. python benchmarks/simulate_gpu_search.py --smoke --out /tmp/s   # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate_search import Entry, judge, run_variant  # noqa: E402

ALL = ("bf16", "attn_qat", "p_only", "o_only", "drop_in")
SEEDS = (0, 1, 2)
TAIL = 50  # training steps averaged for a loss at a checkpoint (as in simulate_search)
TARGET = 0.80  # the bar: bf16 at least 80 % of the way from chance to zero
PREFERRED = 0.85  # the winner must reach this in screening, so that 3 seeds clear TARGET
STEP_QUANTUM = 250
MIN_STEPS = 1000  # o_only needs time on spread attention for its drift to show

# Shared by every candidate: the `gpu` preset's optimizer (AdamW, clipping 1.0) and model
# family (pre-LN, learned positions, width 128), no diagnostics (they do not feed back
# into training), 2 held-out batches.
BASE: dict[str, Any] = {"task": "recall", "width": 128, "n_heads": 4, "n_layers": 2,
                        "eval_batches": 2, "diagnostic_checkpoints": 0,
                        "log_every": 10}  # the deadline is checked at progress lines


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, Any]
    why: str
    entry: Entry = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entry", Entry(self.name, "cuda", BASE | self.overrides, ALL))

    def work(self) -> float:
        """GPU work of one step relative to the old preset (B 64, H 4, L 128, 2 layers):
        the reference materializes (B, H, L, L) tensors, so an FP4 step is bandwidth-bound
        in B * H * L^2 * layers (from the old preset's timings: ~75 FP4 steps/s on the GPU
        in total, with 5 or 7 processes)."""
        o = self.entry.overrides
        return (o["batch_size"] * o["n_heads"] * o["seq_len"] ** 2 * o["n_layers"]
                / (64 * 4 * 128 ** 2 * 2))


def _c(name: str, why: str, **changes: Any) -> Candidate:
    base = {"vocab_size": 17, "seq_len": 64, "batch_size": 128, "lr": 3e-3,
            "warmup_steps": 100, "steps": 6000}
    return Candidate(name, base | changes, why)


CANDIDATES: tuple[Candidate, ...] = (
    _c("r17-b128-lr3e-3", "recall 8 pairs, 2x the old preset's sequences, warm-up"),
    _c("r17-b256-lr3e-3", "4x the data per step", batch_size=256),
    _c("r17-b128-3l", "3 layers: slack for the two-step lookup", n_layers=3),
    _c("r17-L32-b512", "sequence 32 (8 pairs, 8 queries, one P tile): 8x the contexts per "
       "step for the work of r17-b128", seq_len=32, batch_size=512),
    _c("r11-b128-lr3e-3", "5 pairs: the easiest recall", vocab_size=11),
    # one token per pair: a one-step lookup by content, no previous-token head
    _c("pairs81-b128", "one token per pair, 8 keys x 8 values", task="pairs", vocab_size=81),
    _c("pairs169-b128", "one token per pair, 12 x 12", task="pairs", vocab_size=169),
    _c("pairs289-b128", "one token per pair, 16 x 16", task="pairs", vocab_size=289),
)

SMOKE: tuple[Candidate, ...] = (
    Candidate("tiny-a", {"vocab_size": 11, "seq_len": 16, "width": 32, "n_heads": 2,
                         "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "steps": 150}, "smoke"),
    Candidate("tiny-b", {"task": "pairs", "vocab_size": 25, "seq_len": 16, "width": 32,
                         "n_heads": 2,
                         "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "steps": 150}, "smoke"),
)


def chance_of(candidate: Candidate) -> float:
    from fp4sim.simulate.config import get_preset, with_overrides
    from fp4sim.simulate.tasks import get_task

    config = with_overrides(get_preset("gpu"), **candidate.entry.overrides)
    return get_task(config.task).chance_loss(config.model.seq_len, config.model.vocab_size)


def tail_means(losses: list[float], every: int = TAIL) -> dict[int, float]:
    """Mean training loss of the ``TAIL`` steps before every multiple of ``every``."""
    return {t: sum(losses[t - TAIL:t]) / TAIL for t in range(every, len(losses) + 1, every)
            if t >= TAIL and all(math.isfinite(x) for x in losses[t - TAIL:t])}


def screen(candidate: Candidate, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """bf16's progress curve (50-step training-loss means) and, where o_only ran, o_only's
    verdict against bf16 at the last step both reached, and from which step on it stayed
    separated (learns worse and unstable)."""
    chance = chance_of(candidate)
    bf16 = runs.get("bf16", {"loss": [], "status": "missing", "steps": 0})
    means = tail_means(bf16["loss"])
    progress = {t: (chance - m) / chance for t, m in means.items()}
    reach = {thr: next((t for t, p in sorted(progress.items()) if p >= thr), None)
             for thr in (TARGET, PREFERRED)}
    best = max(progress.values(), default=None)
    row: dict[str, Any] = {
        "name": candidate.name, "why": candidate.why, "overrides": candidate.entry.overrides,
        "chance_loss": chance, "work": candidate.work(),
        "bf16_steps": bf16.get("steps", 0), "bf16_status": bf16.get("status"),
        "bf16_ms_per_step": _ms(bf16), "bf16_progress_best": best,
        "bf16_progress_last": progress[max(progress)] if progress else None,
        "steps_to_target": reach[TARGET], "steps_to_preferred": reach[PREFERRED],
        "curve": {str(t): round(p, 4) for t, p in progress.items() if t % 250 == 0},
        "bf16_error": _last_line(bf16.get("error")),
    }
    if "o_only" in runs:
        # judged as late as both runs got (o_only may learn first and unlearn later);
        # sep_from: the first multiple of 250 steps from which o_only stays separated
        o_only = runs["o_only"]
        row["o_only_steps"] = o_only.get("steps", 0)
        row["o_only_status"] = o_only.get("status")
        row["o_only_ms_per_step"] = _ms(o_only)
        row["o_only_gpu_mib"] = o_only.get("gpu_mib")
        row["o_only_error"] = _last_line(o_only.get("error"))
        bf16_steps = bf16.get("steps", 0)
        reached = bf16_steps if o_only.get("status") == "diverged" else o_only.get("steps", 0)
        upto = (min(bf16_steps, reached) // TAIL) * TAIL
        separated: dict[int, bool] = {}
        for t in [*range(STEP_QUANTUM, upto, STEP_QUANTUM), upto]:
            judged = judge(runs, chance, t) if t >= TAIL else None
            separated[t] = bool(judged) and all(
                judged["split"].get(k) for k in ("o_only learns worse than bf16",
                                                   "o_only fails or is unstable"))
            if t == upto:
                row["o_only_verdict"] = (judged or {}).get("variants", {}).get(
                    "o_only", {}).get("verdict")
        row["o_only_judged_at"] = upto
        row["o_only_separated"] = separated.get(upto, False)
        sep_from = None
        for t in sorted(separated, reverse=True):
            if not separated[t]:
                break
            sep_from = t
        row["o_only_separated_from"] = sep_from
    return row


def _last_line(error: str | None) -> str | None:
    return error.strip().splitlines()[-1] if error and error.strip() else None


def _ms(run: dict[str, Any]) -> float | None:
    return round(1000 * run["train_s"] / run["steps"], 1) if run.get("steps") else None


def estimate_capacity(rows: list[dict[str, Any]], seconds: float) -> None:
    """Sets each row's ``capacity``: the steps its 15 confirmation runs should reach in
    ``seconds``, scaling the screening's measured ms/step by the GPU load (sum of work per
    step over the processes, a bf16 step counted as a third of an FP4 one, as measured on
    the old preset: 33 against 92 ms)."""
    has_o = any(r.get("o_only_ms_per_step") for r in rows)
    load1 = sum(r["work"] * ((1 + 1 / 3) if has_o else 1 / 3) for r in rows)
    for r in rows:
        fp4_ms = r.get("o_only_ms_per_step") or (3 * r["bf16_ms_per_step"]
                                                if r["bf16_ms_per_step"] else None)
        if not fp4_ms:
            r["capacity"] = 0
            continue
        est_ms = fp4_ms * max(1.0, (12 + 3 / 3) * r["work"] / load1)
        r["est_confirm_ms_per_step"] = round(est_ms, 1)
        r["capacity"] = int(1000 * max(0.0, seconds) / est_ms)


def pick_winner(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The rule: among the candidates whose bf16 reached PREFERRED (85 %; else TARGET,
    80 %), those whose o_only was already separated (learns worse and unstable at the
    judged step) come first, then those whose planned steps fit the confirmation's
    estimated capacity; then the least GPU work to reach the threshold (steps x work per
    step, what the 15 confirmation runs will cost). When no bf16 reached 80 %, the
    candidate with the best bf16 progress is returned, flagged as not a preset."""
    for threshold, key in ((PREFERRED, "steps_to_preferred"), (TARGET, "steps_to_target")):
        reached = [r for r in rows if r[key] is not None]
        if reached:
            reached.sort(key=lambda r: (not r.get("o_only_separated", True),
                                        planned_steps(r) > r.get("capacity", 0),
                                        r[key] * r["work"]))
            return reached[0], f"bf16 reached {threshold:.0%} at step {reached[0][key]}"
    ranked = [r for r in rows if r["bf16_progress_best"] is not None]
    if not ranked:
        return None, "no candidate trained"
    best = max(ranked, key=lambda r: r["bf16_progress_best"])
    return best, (f"no bf16 reached {TARGET:.0%}; best {best['bf16_progress_best']:.2f}: "
                  f"confirmation run for the record, not a preset")


def planned_steps(row: dict[str, Any]) -> int:
    """Steps for the confirmation: 1.25 x what bf16 needed (85 %, else 80 %, else all it
    did), at least MIN_STEPS and at least the step from which o_only stayed separated."""
    reach = row["steps_to_preferred"] or row["steps_to_target"] or row["bf16_steps"]
    steps = max(MIN_STEPS, int(math.ceil(1.25 * reach / STEP_QUANTUM)) * STEP_QUANTUM)
    return max(steps, row.get("o_only_separated_from") or 0)


def _worker(entry: Entry, seed: int, variant: str, deadline_at: float,
            device: str) -> dict[str, Any]:
    """``run_variant`` on ``device``, with one progress line per 250 steps on stdout and the
    peak GPU memory."""
    import dataclasses

    entry = dataclasses.replace(entry, device=device)
    started = time.time()
    result = run_variant(entry, seed, variant, deadline_at)
    result["gpu_mib"] = None
    if device == "cuda":
        import torch

        result["gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    losses = result.get("loss", [])
    tail = sum(losses[-TAIL:]) / max(1, len(losses[-TAIL:])) if losses else float("nan")
    print(f"  done {entry.name} s{seed} {variant}: {result['status']} {result['steps']} steps "
          f"in {time.time() - started:.0f} s, last-50 loss {tail:.3f}, "
          f"{result.get('gpu_mib')} MiB", flush=True)
    return result


def run_jobs(jobs: list[tuple[Entry, int, str]], deadline_at: float, device: str,
             procs: int, label: str, t0: float) -> dict[tuple[str, int, str], dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    results: dict[tuple[str, int, str], dict[str, Any]] = {}
    with ProcessPoolExecutor(max(1, procs), mp_context=context) as pool:
        futures: dict[Future, tuple[str, int, str]] = {
            pool.submit(_worker, entry, seed, variant, deadline_at, device):
                (entry.name, seed, variant) for entry, seed, variant in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=30, return_when=FIRST_COMPLETED)
            for future in done:
                key = futures[future]
                try:
                    results[key] = future.result()
                except Exception as err:  # noqa: BLE001 - one broken job must not end it
                    results[key] = {"variant": key[2], "status": "crashed", "error": repr(err),
                                    "steps": 0, "train_s": 0.0, "loss": [], "grad_norm": [],
                                    "eval_loss": None}
            print(f"[{label} {time.time() - t0:.0f} s] {len(results)}/{len(futures)} jobs done",
                  flush=True)
    return results


def confirm(candidate: Candidate, steps: int, results: dict[tuple[str, int, str], Any]
            ) -> list[dict[str, Any]]:
    """Per seed: the verdicts and the split at the end (held-out) if every run finished,
    else at the largest multiple of 250 steps every non-diverged run reached."""
    chance = chance_of(candidate)
    rows = []
    for seed in SEEDS:
        runs = {v: results[(candidate.name, seed, v)] for v in ALL
                if (candidate.name, seed, v) in results}
        finished = all(r["status"] in ("ok", "diverged") for r in runs.values())
        if finished and len(runs) == len(ALL):
            judged, at = judge(runs, chance, None), f"end ({steps} steps, held-out)"
        else:
            alive = [r["steps"] for r in runs.values() if r["status"] != "diverged"]
            upto = (min(alive, default=0) // TAIL) * TAIL
            judged = judge(runs, chance, upto) if upto >= TAIL else None
            at = f"{upto} steps (training-loss mean of {TAIL})"
        rows.append({"seed": seed, "judged_at": at, "judged": judged,
                     "runs": {v: {k: r.get(k) for k in ("status", "steps", "train_s",
                                                         "eval_loss", "eval_accuracy",
                                                         "gpu_mib")}
                              | {"ms_per_step": _ms(r), "error": _last_line(r.get("error"))}
                              for v, r in runs.items()}})
    return rows


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU preset search ({report['device_name']}, {report['date_utc']})", "",
             f"Wall {report['wall_s']:.0f} s (screening {report['phase1_s']:.0f} s, "
             f"confirmation {report['phase2_s']:.0f} s).", "",
             "## Screening (seed 0)", "",
             "| candidate | chance | bf16 steps | bf16 ms/step | bf16 best progress | "
             "80 % at | 85 % at | o_only steps | o_only verdict (at step) | o_only MiB | "
             "capacity |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["screening"]:
        lines.append(
            f"| {r['name']} | {r['chance_loss']:.3f} | {r['bf16_steps']} | "
            f"{_f(r['bf16_ms_per_step'])} | {_f(r['bf16_progress_best'])} | "
            f"{_f(r['steps_to_target'])} | {_f(r['steps_to_preferred'])} | "
            f"{_f(r.get('o_only_steps'))} | {_f(r.get('o_only_verdict'))} "
            f"({_f(r.get('o_only_judged_at'))}; separated from "
            f"{_f(r.get('o_only_separated_from'))}) | {_f(r.get('o_only_gpu_mib'))} | "
            f"{_f(r.get('capacity'))} |")
    lines += ["", f"Winner: **{report['winner']}** ({report['winner_reason']}); "
                  f"confirmation planned for {report['planned_steps']} steps.", ""]
    if report["confirmation"]:
        lines += ["## Confirmation (3 seeds)", "",
                  "| seed | judged at | variant | verdict | loss | progress | spikes | "
                  "norm max | steps | ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["confirmation"]:
            judged = row["judged"] or {"variants": {}}
            for v in ALL:
                j = judged["variants"].get(v, {})
                r = row["runs"].get(v, {})
                lines.append(f"| {row['seed']} | {row['judged_at']} | {v} | "
                             f"{j.get('verdict', '-')} | {_f(j.get('loss'))} | "
                             f"{_f(j.get('progress'))} | "
                             f"{_f(j.get('spikes'))} | {_f(j.get('norm_max'))} | "
                             f"{_f(r.get('steps'))} | {_f(r.get('ms_per_step'))} |")
            if row["judged"]:
                split = row["judged"]["split"]
                lines.append(f"| {row['seed']} | split | "
                             + "; ".join(f"{k}: {_f(v)}" for k, v in split.items())
                             + f" | bf16 progress {_f(row['judged']['bf16_fraction'])} "
                             f"| holds {row['judged']['holds']} | | | | | |")
    lines += ["", f"**Preset found: {report['found']}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny candidates on the CPU")
    parser.add_argument("--phase1-seconds", type=float, default=170.0)
    parser.add_argument("--total-seconds", type=float, default=430.0,
                        help="the confirmation stops this long after the start")
    parser.add_argument("--phase1-variants", default="bf16,o_only")
    parser.add_argument("--procs", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t0 = time.time()
    device = "cpu" if args.smoke else "cuda"
    candidates = SMOKE if args.smoke else CANDIDATES
    screen_variants = tuple(args.phase1_variants.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Phase 1: screening; bf16 jobs are submitted first, so a shortage of workers
    # delays the o_only screens, never the bf16 curves.
    jobs = [(c.entry, 0, v) for v in screen_variants for c in candidates]
    print(f"phase 1: {len(jobs)} jobs ({len(candidates)} candidates x "
          f"{','.join(screen_variants)}) for {args.phase1_seconds:.0f} s", flush=True)
    p1 = run_jobs(jobs, t0 + args.phase1_seconds, device, args.procs, "phase 1", t0)
    phase1_s = time.time() - t0
    rows = [screen(c, {v: p1[(c.name, 0, v)] for v in screen_variants
                       if (c.name, 0, v) in p1}) for c in candidates]
    for r in rows:
        print(f"  {r['name']}: bf16 {r['bf16_steps']} steps, best progress "
              f"{_f(r['bf16_progress_best'])}, 80% at {r['steps_to_target']}, 85% at "
              f"{r['steps_to_preferred']}; o_only {r.get('o_only_steps')} steps "
              f"{r.get('o_only_verdict')} @ {r.get('o_only_judged_at')}", flush=True)
    # kept even if the confirmation is cut short
    (out / "gpu_search_screening.json").write_text(json.dumps(rows, indent=1))
    # 25 s for spawning 15 processes, CUDA start-up, evaluation and the last progress line
    estimate_capacity(rows, args.total_seconds - (time.time() - t0) - 25)
    winner_row, reason = pick_winner(rows)
    print(f"winner: {winner_row and winner_row['name']} ({reason})", flush=True)

    confirmation: list[dict[str, Any]] = []
    steps = 0
    t1 = time.time()
    if winner_row is not None:
        winner = next(c for c in candidates if c.name == winner_row["name"])
        steps = planned_steps(winner_row) if not args.smoke else winner.entry.overrides["steps"]
        entry = Entry(winner.name, device, winner.entry.overrides | {"steps": steps}, ALL)
        winner = Candidate(winner.name, entry.overrides, winner.why)
        jobs = [(winner.entry, seed, v) for seed in SEEDS for v in ALL]
        print(f"phase 2: {winner.name} x {len(ALL)} variants x seeds {SEEDS}, {steps} steps, "
              f"until {args.total_seconds:.0f} s", flush=True)
        p2 = run_jobs(jobs, t0 + args.total_seconds, device, max(args.procs, len(jobs)),
                      "phase 2", t0)
        confirmation = confirm(winner, steps, p2)
    phase2_s = time.time() - t1

    import torch

    found = (winner_row is not None and winner_row["steps_to_target"] is not None
             and bool(confirmation)
             and all(r["judged"] and r["judged"]["holds"] and r["judged"]["complete"]
                     and (r["judged"]["bf16_fraction"] or 0) >= TARGET for r in confirmation))
    report = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "wall_s": time.time() - t0, "phase1_s": phase1_s,
        "phase2_s": phase2_s, "screening": rows,
        "winner": winner_row and winner_row["name"], "winner_reason": reason,
        "planned_steps": steps,
        "winner_overrides": winner_row and {**winner_row["overrides"], "steps": steps},
        "confirmation": confirmation, "found": found,
    }
    (out / "gpu_search.json").write_text(json.dumps(report, indent=1))
    # the series, for the record (training loss and norm per step)
    series = {"phase1": {f"{k[0]}|{k[1]}|{k[2]}": {"loss": r.get("loss"),
                                                    "grad_norm": r.get("grad_norm")}
                         for k, r in p1.items()}}
    if winner_row is not None:
        series["phase2"] = {f"{k[0]}|{k[1]}|{k[2]}": {"loss": r.get("loss"),
                                                       "grad_norm": r.get("grad_norm")}
                            for k, r in p2.items()}
    (out / "gpu_search_series.json").write_text(json.dumps(series))
    md = markdown(report)
    (out / "gpu_search.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
