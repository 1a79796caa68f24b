"""The training loop: one small model per variant, same initialization, same data.

Per step it records the scored loss, the scored token accuracy, the global gradient
norm before clipping and, per layer, the gradient norm of the attention's qkv
projection (weight and bias). At a few checkpoint steps it also records the FP4
diagnostics of the first layer (:mod:`fp4sim.simulate.diagnostics`). A run stops early
when the loss or the gradient norm becomes non-finite (status ``diverged``); an
exception from the attention (for example an external kernel) ends the run with status
``failed`` and its traceback, and the other variants still train.

Determinism: the initialization, the training data and the evaluation data come from
three seeds derived from the one seed, each independent of the device and of the
variant; the global torch RNG is reseeded before every run and PyTorch's deterministic
algorithms are switched on (``warn_only``: an op without a deterministic implementation
warns instead of failing the run).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fp4sim.simulate.config import SimulationConfig
from fp4sim.simulate.diagnostics import (
    FirstLayerCapture,
    checkpoint_steps,
    first_layer_diagnostics,
)
from fp4sim.simulate.model import (
    TinyTransformerLM,
    build_model,
    masked_accuracy,
    masked_cross_entropy,
)
from fp4sim.simulate.tasks import TokenBatch, batch_stream, fixed_batches, get_task
from fp4sim.simulate.variants import Variant

Logger = Callable[[str], None]


@dataclass(frozen=True)
class Seeds:
    init: int
    data: int
    eval: int


def derive_seeds(seed: int) -> Seeds:
    """Three independent seeds (model init, training data, evaluation data) from one."""
    children = np.random.SeedSequence(seed).spawn(3)
    init, data, evaluation = (int(child.generate_state(1)[0]) for child in children)
    return Seeds(init=init, data=data, eval=evaluation)


@dataclass(frozen=True)
class DeviceBatch:
    inputs: Tensor
    targets: Tensor
    scored: Tensor


def to_device(batch: TokenBatch, device: torch.device | str) -> DeviceBatch:
    return DeviceBatch(
        inputs=torch.from_numpy(batch.inputs).to(device),
        targets=torch.from_numpy(batch.targets).to(device),
        scored=torch.from_numpy(batch.scored).to(device),
    )


@dataclass(frozen=True)
class StepStats:
    loss: float
    accuracy: float
    grad_norm: float
    attention_grad_norms: tuple[float, ...]


def global_gradient_norm(parameters: Iterable[nn.Parameter]) -> Tensor:
    """L2 norm over the gradients of all ``parameters`` together (those without one skip)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float())
             for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def attention_gradient_norms(model: TinyTransformerLM) -> list[Tensor]:
    """Per layer, the gradient norm of the attention's qkv projection (weight and bias)."""
    return [global_gradient_norm(layer.qkv.parameters()) for layer in model.attention_layers]


def training_step(model: TinyTransformerLM, optimizer: torch.optim.Optimizer,
                  batch: DeviceBatch, grad_clip: float) -> StepStats:
    """Forward, backward, record, clip the global norm to ``grad_clip``, update."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(batch.inputs)
    loss = masked_cross_entropy(logits, batch.targets, batch.scored)
    loss.backward()
    attention_norms = attention_gradient_norms(model)
    grad_norm = global_gradient_norm(model.parameters())
    if torch.isfinite(grad_norm):
        scale = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale.to(parameter.grad.dtype))
        optimizer.step()
    accuracy = masked_accuracy(logits.detach(), batch.targets, batch.scored)
    values = torch.stack([loss.detach().float(), accuracy.float(), grad_norm.float(),
                          *(n.float() for n in attention_norms)]).tolist()
    return StepStats(loss=values[0], accuracy=values[1], grad_norm=values[2],
                     attention_grad_norms=tuple(values[3:]))


@torch.no_grad()
def evaluate(model: TinyTransformerLM, batches: list[DeviceBatch]) -> dict[str, float]:
    """Mean scored loss and accuracy over ``batches`` (the model's own attention)."""
    was_training = model.training
    model.eval()
    losses, accuracies = [], []
    for batch in batches:
        logits = model(batch.inputs)
        losses.append(masked_cross_entropy(logits, batch.targets, batch.scored).item())
        accuracies.append(masked_accuracy(logits, batch.targets, batch.scored).item())
    model.train(was_training)
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accuracies))}


@dataclass
class VariantRun:
    """Everything recorded for one variant (``series`` hold one value per step)."""

    variant: str
    description: str
    recipe: str
    backward: str | None
    status: str = "ok"  # ok | diverged | failed
    error: str | None = None
    steps_completed: int = 0
    train_seconds: float = 0.0
    diagnostics_seconds: float = 0.0
    series: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)

    def append(self, stats: StepStats) -> None:
        self.series.setdefault("loss", []).append(stats.loss)
        self.series.setdefault("accuracy", []).append(stats.accuracy)
        self.series.setdefault("grad_norm", []).append(stats.grad_norm)
        for layer, value in enumerate(stats.attention_grad_norms):
            self.series.setdefault(f"attention_grad_norm.layer{layer}", []).append(value)
        self.steps_completed += 1


def configure_determinism(enabled: bool) -> None:
    if enabled:
        # cuBLAS needs a fixed workspace for reproducible results; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(config: SimulationConfig, variant: Variant, diagnostics_recipe: Any,
                  log: Logger | None = None) -> VariantRun:
    """Train one model with ``variant``'s attention; never raises for a failing attention."""
    log = log or (lambda line: None)
    run = VariantRun(variant=variant.name, description=variant.description,
                     recipe=variant.recipe_name, backward=variant.backward)
    device = torch.device(config.device)
    configure_determinism(config.deterministic)
    seeds = derive_seeds(config.seed)
    task = get_task(config.task)
    model_config, training = config.model, config.training
    model = build_model(model_config, variant.attention, seeds.init).to(device)
    torch.manual_seed(seeds.init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, betas=training.betas,
                                  weight_decay=training.weight_decay)
    if training.warmup_steps > 0 or training.lr_schedule != "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_factor)
    else:
        scheduler = None
    stream = batch_stream(task, seeds.data, training.batch_size, model_config.seq_len,
                          model_config.vocab_size)
    checkpoints = set(checkpoint_steps(training.steps, training.diagnostic_checkpoints))
    sm_scale = 1.0 / math.sqrt(model_config.head_dim)
    first_layer = model.attention_layers[0]

    start = time.perf_counter()
    try:
        for step in range(training.steps):
            batch = to_device(next(stream), device)
            capture = FirstLayerCapture(training.diagnostic_batch) if step in checkpoints \
                else None
            first_layer.observer = capture
            stats = training_step(model, optimizer, batch, training.grad_clip)
            first_layer.observer = None
            if scheduler is not None:
                scheduler.step()
            run.append(stats)
            if capture is not None:
                diagnostics_start = time.perf_counter()
                run.diagnostics.append(_diagnostics_entry(step, capture, diagnostics_recipe,
                                                          sm_scale))
                run.diagnostics_seconds += time.perf_counter() - diagnostics_start
            if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
                run.status = "diverged"
                log(f"[{variant.name}] step {step + 1}: non-finite loss or gradient norm "
                    f"(loss {stats.loss}, norm {stats.grad_norm}); stopping this run")
                break
            if (step + 1) % training.progress_interval == 0 or step + 1 == training.steps:
                elapsed = time.perf_counter() - start
                log(f"[{variant.name}] step {step + 1}/{training.steps} loss {stats.loss:.4f} "
                    f"acc {stats.accuracy:.3f} grad-norm {stats.grad_norm:.4g} ({elapsed:.1f} s)")
        _synchronize(device)
        run.train_seconds = time.perf_counter() - start - run.diagnostics_seconds
        if run.status == "ok":
            eval_batches = [to_device(b, device) for b in fixed_batches(
                task, seeds.eval, training.eval_batches, training.batch_size,
                model_config.seq_len, model_config.vocab_size)]
            run.eval = evaluate(model, eval_batches)
    except Exception:  # noqa: BLE001 - a failing attention is reported, not raised
        run.status = "failed"
        run.error = traceback.format_exc()
        log(f"[{variant.name}] FAILED at step {run.steps_completed + 1}:\n{run.error}")
        if not run.train_seconds:
            run.train_seconds = time.perf_counter() - start - run.diagnostics_seconds
    finally:
        first_layer.observer = None
    return run


def _diagnostics_entry(step: int, capture: FirstLayerCapture, recipe: Any,
                       sm_scale: float) -> dict[str, Any]:
    try:
        return {"step": step, **first_layer_diagnostics(capture, recipe, sm_scale)}
    except Exception:  # noqa: BLE001 - diagnostics must not stop training
        return {"step": step, "error": traceback.format_exc()}
