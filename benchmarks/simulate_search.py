"""Search for a `fp4sim simulate` configuration that shows the paper's split.

One job trains one variant of one (configuration, seed) in its own process with a fixed
number of torch threads, so many run side by side on a larger host: CPU jobs in one pool,
CUDA jobs in another, both at once. The jobs of a (configuration, seed) are then judged
together with the simulation's own rules (``fp4sim.simulate.metrics``):

- at the end of training, on the held-out loss (what ``fp4sim simulate`` reports);
- at earlier checkpoint steps, on the mean training loss of the 50 steps before the
  checkpoint (fresh batches every step, so close to a held-out loss) and the spikes up to
  it. With a constant learning rate a run of N steps is the first N steps of a longer one,
  so one long run answers "would N steps reproduce the split?" for every N at once.

A job still training at ``--deadline`` stops at its next progress line and keeps the steps
it did. One JSON line per (configuration, seed, device) goes to ``--out``; a table goes
to stdout.

    PYTHONPATH=. python benchmarks/simulate_search.py --plan cpu1 --cpu-procs 10 \
        --gpu-procs 6 --deadline 120 --out search.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import re
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

CHECKPOINTS = (300, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000, 4000)
TAIL = 50  # training steps averaged for a checkpoint's loss

SEARCH = ("bf16", "attn_qat", "o_only")
WITH_DROP = ("bf16", "attn_qat", "o_only", "drop_in")
ALL = ("bf16", "attn_qat", "p_only", "o_only", "drop_in")

# The CPU search's base: recall, 2 layers, width 64, 2 heads of 32 (two NVFP4 blocks),
# sequence 64, batch 16, no diagnostics (they do not feed back into training).
CPU_BASE: dict[str, Any] = {"task": "recall", "width": 64, "n_heads": 2, "seq_len": 64,
                            "batch_size": 16, "eval_batches": 2, "diagnostic_checkpoints": 0,
                            "warmup_steps": 0}
GPU_BASE: dict[str, Any] = {"task": "recall", "width": 128, "n_heads": 4, "seq_len": 128,
                            "batch_size": 64, "eval_batches": 2, "diagnostic_checkpoints": 0}


@dataclass(frozen=True)
class Entry:
    """One configuration of a plan: every listed variant on every listed seed."""

    name: str
    device: str  # cpu | cuda
    overrides: dict[str, Any]
    variants: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    threads: int = 1


def _cpu(name: str, variants: tuple[str, ...] = SEARCH, seeds: tuple[int, ...] = (0,),
         threads: int = 1, **changes: Any) -> Entry:
    return Entry(name, "cpu", CPU_BASE | changes, variants, seeds, threads)


def _gpu(name: str, variants: tuple[str, ...] = SEARCH, seeds: tuple[int, ...] = (0,),
         **changes: Any) -> Entry:
    return Entry(name, "cuda", GPU_BASE | changes, variants, seeds, 1)


PLANS: dict[str, list[Entry]] = {
    # A few steps of a tiny model: checks the driver itself.
    "smoke": [
        _cpu("tiny", WITH_DROP, seeds=(0, 1), width=32, seq_len=16, batch_size=4, steps=12,
             vocab_size=11),
    ],
    # First device call: the recall task at width 64 / sequence 64 with a smaller vocabulary
    # (vocab 17 = 8 key-value pairs, 11 = 5, 32 = 15), learning rate and P tile width; GPU
    # preset candidates beside it.
    "cpu1": [
        _cpu("r17-lr3e-3", WITH_DROP, vocab_size=17, lr=3e-3, steps=2000),
        _cpu("r11-lr3e-3", WITH_DROP, vocab_size=11, lr=3e-3, steps=2000),
        _cpu("r17-lr2e-3", vocab_size=17, lr=2e-3, steps=2000),
        _cpu("r32-lr3e-3", vocab_size=32, lr=3e-3, steps=2000),
        _cpu("r17-lr5e-3", vocab_size=17, lr=5e-3, steps=2000),
        _cpu("r17-lr3e-3-bn16", vocab_size=17, lr=3e-3, block_n=16, steps=2000),
        _gpu("g-r17-s128-lr2e-3", vocab_size=17, lr=2e-3, steps=3000),
        _gpu("g-r17-s64-lr2e-3", vocab_size=17, lr=2e-3, seq_len=64, steps=3000),
    ],
    # Second device call: the configuration that held best on seed 0 in cpu1 (vocab 17), run
    # as the `cpu` preset would run it (1000 steps, 4 held-out batches, 3 diagnostic
    # checkpoints), every variant, 3 seeds; then the majority task (bf16 solves it, the
    # attention stays spread) on the CPU and, for the `gpu` preset, on the GPU; then vocab 11.
    "confirm2": [
        _cpu("r17-lr3e-3-1000", ALL, seeds=(0, 1, 2), vocab_size=17, lr=3e-3, steps=1000,
             eval_batches=4, diagnostic_checkpoints=3),
        _cpu("maj-lr3e-3", WITH_DROP, task="majority", vocab_size=17, batch_size=32, lr=3e-3,
             steps=1500),
        _cpu("r11-lr3e-3-1000", ALL, seeds=(1, 2, 0), vocab_size=11, lr=3e-3, steps=1000,
             eval_batches=4, diagnostic_checkpoints=3),
        _gpu("g-maj-lr3e-3", WITH_DROP, task="majority", vocab_size=17, seq_len=64,
             batch_size=128, lr=3e-3, steps=3000, log_every=50),
        _gpu("g-maj-lr5e-3", SEARCH, task="majority", vocab_size=17, seq_len=64,
             batch_size=128, lr=5e-3, steps=3000, log_every=50),
    ],
}


def expand(plan: list[Entry]) -> list[tuple[Entry, int, str]]:
    """The plan's jobs in priority order: entry by entry, seed by seed, variant by variant."""
    return [(entry, seed, variant) for entry in plan for seed in entry.seeds
            for variant in entry.variants]


class SearchDeadline(RuntimeError):
    """Raised from the progress logger to stop a run at the search's deadline."""


_PROGRESS = re.compile(r"\] step \d+/\d+ ")


def run_variant(entry: Entry, seed: int, variant: str, deadline_at: float) -> dict[str, Any]:
    """Train one variant (in a worker process); the series come back whole."""
    if time.time() > deadline_at:  # queued past the deadline: not started
        return {"variant": variant, "status": "skipped", "error": None, "steps": 0,
                "train_s": 0.0, "loss": [], "grad_norm": [], "eval_loss": None}
    import torch

    torch.set_num_threads(entry.threads)
    from fp4sim.simulate.config import get_preset, with_overrides
    from fp4sim.simulate.runner import train_named_variant

    base = get_preset("gpu" if entry.device == "cuda" else "cpu")
    config = with_overrides(base, seed=seed, device=entry.device, smoke=False, jobs=1,
                            variants=(variant,), **entry.overrides)

    def log(line: str) -> None:
        if _PROGRESS.search(line):
            # each step's forward result stays alive in a reference cycle until the cyclic
            # gc runs, which does not see GPU memory (docs/bench/simulate.md, call of
            # 2026-12-02 18:52)
            gc.collect()
            if time.time() > deadline_at:
                raise SearchDeadline("search deadline")

    start = time.perf_counter()
    run = train_named_variant(config, variant, log)
    truncated = run.status == "failed" and "SearchDeadline" in (run.error or "")
    return {"variant": variant, "status": "truncated" if truncated else run.status,
            "error": None if truncated else run.error,
            "steps": run.steps_completed, "planned_steps": config.training.steps,
            "train_s": round(run.train_seconds, 2),
            "wall_s": round(time.perf_counter() - start, 2),
            "loss": run.series.get("loss", []), "grad_norm": run.series.get("grad_norm", []),
            "eval_loss": run.eval.get("loss"), "eval_accuracy": run.eval.get("accuracy")}


def _chance(entry: Entry) -> float:
    from fp4sim.simulate.config import get_preset, with_overrides
    from fp4sim.simulate.tasks import get_task

    base = get_preset("gpu" if entry.device == "cuda" else "cpu")
    config = with_overrides(base, **entry.overrides)
    return get_task(config.task).chance_loss(config.model.seq_len, config.model.vocab_size)


def judge(runs: dict[str, dict[str, Any]], chance: float,
          upto: int | None) -> dict[str, Any] | None:
    """Verdicts and split at ``upto`` steps (None: the end, on the held-out loss); None when
    some run neither reached ``upto`` nor diverged before it."""
    from fp4sim.simulate.metrics import paper_split, spike_steps, verdict

    state: dict[str, tuple[str, float | None, int, float]] = {}
    for name, run in runs.items():
        losses, norms = run["loss"], run["grad_norm"]
        diverged_at = len(losses) if run["status"] == "diverged" else None
        if upto is None:
            if run["status"] not in ("ok", "diverged"):
                return None
            final = run["eval_loss"] if run["status"] == "ok" else None
            window = norms
        elif diverged_at is not None and diverged_at <= upto:
            final, window = None, norms
        elif len(losses) >= upto:
            final, window = float(sum(losses[upto - TAIL:upto]) / TAIL), norms[:upto]
        else:
            return None
        status = "diverged" if final is None else "ok"
        finite = [n for n in window if math.isfinite(n)]
        state[name] = (status, final, len(spike_steps(window)),
                       max(finite) if finite else float("nan"))
    if "bf16" not in state:
        return None
    base_status, base_loss, base_spikes, _ = state["bf16"]
    verdicts = {name: verdict(status=s, final_loss=loss, spikes=spikes,
                              baseline_loss=base_loss if base_status == "ok" else None,
                              baseline_spikes=base_spikes, chance_loss=chance,
                              is_baseline=name == "bf16")
                for name, (s, loss, spikes, _) in state.items()}
    split = paper_split(verdicts)
    known = [v for v in split.values() if v is not None]
    return {
        "variants": {name: {"loss": state[name][1], "spikes": state[name][2],
                            "norm_max": state[name][3], "verdict": verdicts[name].text,
                            "progress": verdicts[name].progress} for name in state},
        "bf16_fraction": None if base_loss is None else (chance - base_loss) / chance,
        "split": split,
        "holds": bool(known) and all(known),
        "complete": all(v is not None for v in split.values()),
    }


def summarize(entry: Entry, seed: int, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    chance = _chance(entry)
    longest = max((len(r["loss"]) for r in runs.values()), default=0)
    checkpoints = {}
    for step in CHECKPOINTS:
        if step > longest:
            break
        judged = judge(runs, chance, step)
        if judged is not None:
            checkpoints[str(step)] = judged
    return {
        "name": entry.name, "device": entry.device, "threads": entry.threads, "seed": seed,
        "overrides": entry.overrides, "chance_loss": chance,
        "runs": {name: {k: v for k, v in run.items() if k not in ("loss", "grad_norm")}
                 | {"ms_per_step": round(1000 * run["train_s"] / max(1, run["steps"]), 1)}
                 for name, run in runs.items()},
        "final": judge(runs, chance, None),
        "checkpoints": checkpoints,
        "series": {name: {"loss": run["loss"], "grad_norm": run["grad_norm"]}
                   for name, run in runs.items()},
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def print_table(row: dict[str, Any]) -> None:
    runs = row["runs"]
    timing = " ".join(f"{n}:{r['steps']}st/{r['ms_per_step']}ms/{r['status']}"
                      for n, r in runs.items())
    print(f"== {row['name']} seed {row['seed']} {row['device']} chance "
          f"{row['chance_loss']:.3f} | {timing}", flush=True)
    stages = list(row["checkpoints"].items()) + [("final", row["final"])]
    for step, judged in stages:
        if judged is None:
            continue
        cells = " | ".join(f"{n} {_fmt(v['loss'])} s{v['spikes']} {v['verdict']}"
                           for n, v in judged["variants"].items())
        frac = judged["bf16_fraction"]
        print(f"  @{step}: holds={judged['holds']} bf16_frac={_fmt(frac)} | {cells}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=sorted(PLANS), required=True)
    parser.add_argument("--cpu-procs", type=int, default=8)
    parser.add_argument("--gpu-procs", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds after which running jobs stop at their next progress line")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    jobs = expand(PLANS[args.plan])
    deadline_at = time.time() + args.deadline
    context = multiprocessing.get_context("spawn")
    pools = {"cpu": ProcessPoolExecutor(max(1, args.cpu_procs), mp_context=context)}
    if any(entry.device == "cuda" for entry, _, _ in jobs):
        pools["cuda"] = ProcessPoolExecutor(max(1, args.gpu_procs), mp_context=context)
    futures: dict[Future, tuple[Entry, int, str]] = {
        pools[entry.device].submit(run_variant, entry, seed, variant, deadline_at):
            (entry, seed, variant) for entry, seed, variant in jobs}
    results: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for future in wait(futures).done:
        entry, seed, variant = futures[future]
        try:
            run = future.result()
        except Exception as err:  # noqa: BLE001 - one broken job must not end the search
            run = {"variant": variant, "status": "crashed", "error": repr(err), "steps": 0,
                   "train_s": 0.0, "loss": [], "grad_norm": [], "eval_loss": None}
        results.setdefault((entry.name, seed), {})[variant] = run
    for pool in pools.values():
        pool.shutdown()
    entries = {entry.name: entry for entry, _, _ in jobs}
    with open(args.out, "w") as out:
        for (name, seed), runs in results.items():
            entry = entries[name]
            ordered = {v: runs[v] for v in entry.variants if v in runs}
            row = summarize(entry, seed, ordered)
            out.write(json.dumps(row) + "\n")
            print_table(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
