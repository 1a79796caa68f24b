"""A whole simulation: every variant trained, then summarized and judged.

Every variant's attention is resolved (and unknown names rejected) before any training,
so a typo fails at once rather than after the first variants have trained. With
``config.jobs > 1`` the variants train at the same time in separate (spawned) processes
on the same device: small models leave a GPU mostly idle, so this divides the wall time.
Each process computes what a sequential run computes, but a library may round the last
bits differently in another process, so runs are reproducible for a given seed, device
and ``jobs`` (on a CPU the processes share the cores: meant for GPUs). With ``--device cuda``
the jobs spread over every visible GPU: variant i trains on ``cuda:(i mod
torch.cuda.device_count())`` (``device_for_job``); an explicit ``cuda:N`` keeps them all on
GPU N.
"""

from __future__ import annotations

import datetime
import multiprocessing
import platform
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fp4sim.publish.console import progress_line
from fp4sim.simulate.config import SimulationConfig
from fp4sim.simulate.metrics import NormSummary, Verdict, paper_split, summarize_norms, verdict
from fp4sim.simulate.tasks import get_task
from fp4sim.simulate.training import Logger, VariantRun, train_variant
from fp4sim.simulate.variants import (
    SimulationSetupError,
    Variant,
    build_variant,
    check_variant_names,
    resolve_recipe,
)


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    status: str
    final_loss: float | None
    final_accuracy: float | None
    final_train_loss: float | None
    norms: NormSummary
    verdict: Verdict
    train_seconds: float


@dataclass
class SimulationResult:
    config: SimulationConfig
    chance_loss: float
    environment: dict[str, Any]
    runs: list[VariantRun]
    summaries: list[VariantSummary] = field(default_factory=list)
    split: dict[str, bool | None] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def any_failed(self) -> bool:
        return any(run.status == "failed" for run in self.runs)


def _variant_of(config: SimulationConfig, name: str) -> Variant:
    return build_variant(name, config.recipe, config.block_n, config.kernel, config.kernel_dtype,
                         config.kernel_timeout)


def tail_mean(values: list[float], fraction: float = 0.05) -> float | None:
    """Mean of the last ``fraction`` of a series (at least one value); None when empty."""
    if not values:
        return None
    count = max(1, int(round(len(values) * fraction)))
    return float(np.mean(values[-count:]))


def summarize_runs(runs: list[VariantRun], chance_loss: float) -> list[VariantSummary]:
    """Norm statistics and the verdict of every run, judged against the bf16 run."""
    norms = {run.variant: summarize_norms(run.series.get("grad_norm", [])) for run in runs}
    baseline = next((run for run in runs if run.variant == "bf16" and run.status == "ok"), None)
    baseline_loss = baseline.eval.get("loss") if baseline else None
    baseline_spikes = norms["bf16"].spikes if baseline else 0
    summaries = []
    for run in runs:
        final_loss = run.eval.get("loss") if run.status == "ok" else None
        judged = verdict(status=run.status, final_loss=final_loss, spikes=norms[run.variant].spikes,
                         baseline_loss=baseline_loss, baseline_spikes=baseline_spikes,
                         chance_loss=chance_loss, is_baseline=run is baseline)
        summaries.append(VariantSummary(
            variant=run.variant, status=run.status, final_loss=final_loss,
            final_accuracy=run.eval.get("accuracy") if run.status == "ok" else None,
            final_train_loss=tail_mean(run.series.get("loss", [])),
            norms=norms[run.variant], verdict=judged, train_seconds=run.train_seconds))
    return summaries


def describe_environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _stderr_log(line: str) -> None:
    progress_line(line)  # the --jobs workers share stderr: one write per line


def train_named_variant(config: SimulationConfig, name: str,
                        log: Logger | None = None) -> VariantRun:
    """Build variant ``name`` and train it (also the entry point of a worker process)."""
    log = log or _stderr_log
    variant = _variant_of(config, name)
    diagnostics_recipe = resolve_recipe(config.recipe, config.block_n)
    log(f"[{variant.name}] training: {variant.description}")
    run = train_variant(config, variant, diagnostics_recipe, log)
    log(f"[{variant.name}] {run.status} after {run.steps_completed} steps in "
        f"{run.train_seconds:.1f} s (+{run.diagnostics_seconds:.1f} s diagnostics)")
    return run


def device_for_job(job: int, device: str, n_gpus: int) -> str:
    """The device of parallel job ``job`` (the variant's index): ``cuda`` spreads the jobs
    round-robin over the ``n_gpus`` visible GPUs; ``cpu``, an explicit ``cuda:N`` or a
    machine with at most one GPU keep ``device``."""
    if device != "cuda" or n_gpus <= 1:
        return device
    return f"cuda:{job % n_gpus}"


def _train_on(config: SimulationConfig, name: str) -> VariantRun:
    """A worker process's job: ``config.device`` made the current CUDA device first (Triton
    kernels launch on the current device, not on their tensors' one)."""
    if config.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(config.device))
    return train_named_variant(config, name)


def _result_or_failure(future: Future, config: SimulationConfig, name: str) -> VariantRun:
    """The worker's run, or a failed run carrying the traceback if the worker died."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - a crashed worker is reported like a failing kernel
        variant = _variant_of(config, name)
        return VariantRun(variant=name, description=variant.description,
                          recipe=variant.recipe_name, backward=variant.backward,
                          status="failed", error=traceback.format_exc())


def run_simulation(config: SimulationConfig, log: Logger | None = None) -> SimulationResult:
    """Train every variant of ``config`` and judge them; raises
    :class:`SimulationSetupError` for unknown variants, recipes, tasks or kernels."""
    log = log or (lambda line: None)
    check_variant_names(list(config.variants), config.kernel)
    try:
        task = get_task(config.task)
        chance = task.chance_loss(config.model.seq_len, config.model.vocab_size)
    except ValueError as error:
        raise SimulationSetupError(str(error)) from error
    for name in config.variants:  # fail fast on a bad recipe or kernel
        _variant_of(config, name)
    result = SimulationResult(config=config, chance_loss=chance,
                              environment=describe_environment(config.device), runs=[])
    start = time.perf_counter()
    if config.jobs > 1 and len(config.variants) > 1:
        workers = min(config.jobs, len(config.variants))
        gpus = torch.cuda.device_count() if config.device == "cuda" else 0
        devices = [device_for_job(i, config.device, gpus) for i in range(len(config.variants))]
        log(f"training {len(config.variants)} variants in {workers} parallel processes on "
            f"{', '.join(dict.fromkeys(devices))}")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_train_on, replace(config, device=device), name)
                       for name, device in zip(config.variants, devices, strict=True)]
            result.runs = [_result_or_failure(future, config, name)
                           for future, name in zip(futures, config.variants, strict=True)]
    else:
        result.runs = [train_named_variant(config, name, log) for name in config.variants]
    result.wall_seconds = time.perf_counter() - start
    result.summaries = summarize_runs(result.runs, chance)
    result.split = paper_split({s.variant: s.verdict for s in result.summaries})
    return result
