"""Configuration of a training-stability simulation: model, task, optimizer, presets.

Three presets exist. Two are on the associative-recall task. ``gpu`` is the experiment of the
Attn-QAT ablation (2 layers, width 128, 4 heads of 32, vocabulary 32, sequence 128, batch
64, AdamW at 1e-3, 1500 steps, gradient clipping at 1.0). ``cpu`` is the default when no
CUDA device is present, found by a search on 2-thread CPU processes
(benchmarks/simulate_search.py) so that ``tox -e simulate`` shows the paper's full split on
a 2-core machine in minutes: vocabulary 17 (8 key-value pairs), width 64, sequence 64,
batch 16, AdamW at 3e-3, 1000 steps. ``gpu-strong`` (issue 19) is the cpu preset's recall
made solvable by a scaled-down token shift, with cosine decay. docs/bench/simulate.md has
the searches and the runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DEFAULT_VARIANTS: tuple[str, ...] = ("bf16", "attn_qat", "p_only", "o_only", "drop_in")
DEFAULT_RECIPE = "attn-qat"
DEFAULT_BLOCK_N = 32
POSITION_KINDS: tuple[str, ...] = ("learned", "rotary")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-LayerNorm causal transformer language model."""

    vocab_size: int = 32
    seq_len: int = 128
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    # "learned": absolute position embeddings added to the tokens; "rotary": none added,
    # q and k rotated by their position (RoFormer, arXiv 2104.09864), so a head can attend
    # by relative offset. Tried for recall's previous-token head (issue 19; it did not
    # shorten the plateau, docs/bench/simulate.md "Second search"); used by no preset.
    positions: str = "learned"
    # Adds an embedding of the previous token to each position's input (a width-2 causal
    # "token shift", as in RWKV or the short convolutions of H3 / Zoology, arXiv
    # 2312.04927), so that recall's key is already at its value's position and the lookup
    # is one attention step by content; without it the 2-layer model has to grow a
    # previous-token head first and stays on the "values in the context" plateau for
    # thousands of steps (docs/bench/simulate.md, "Second search").
    token_shift: bool = False
    # Multiplies the previous-token embedding (with AdamW: that table learns at this times
    # the learning rate); below 1 it delays the lookup the shift makes possible.
    token_shift_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {', '.join(POSITION_KINDS)}, got "
                             f"{self.positions!r}")
        if not self.token_shift_scale > 0:
            raise ValueError(f"token_shift_scale must be > 0, got {self.token_shift_scale}")
        if self.positions == "rotary" and (self.width // max(1, self.n_heads)) % 2:
            raise ValueError(f"rotary positions need an even head dimension, got "
                             f"{self.width // self.n_heads}")
        if self.width % self.n_heads:
            raise ValueError(f"width {self.width} is not divisible by n_heads {self.n_heads}")
        for name in ("vocab_size", "seq_len", "width", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads


@dataclass(frozen=True)
class TrainingConfig:
    """AdamW with a constant or cosine-decaying learning rate (after an optional linear
    warm-up) and clipping of the global gradient norm; the norm is recorded before
    clipping."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)  # torch defaults
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # "constant" after the warm-up, or "cosine": from the end of the warm-up down to
    # min_lr_ratio x lr at the last step (SGDR, arXiv 1608.03983, without restarts), which
    # keeps a run that has solved its task from the late gradient spikes of a high rate
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    eval_batches: int = 4
    diagnostic_checkpoints: int = 5
    diagnostic_batch: int = 8
    log_every: int = 0  # 0: about 20 progress lines per variant

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_factor(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) as a multiple of ``lr``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    @property
    def progress_interval(self) -> int:
        return self.log_every if self.log_every > 0 else max(1, self.steps // 20)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything one ``fp4sim simulate`` invocation needs besides the output folder."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    task: str = "copy"
    seed: int = 0
    device: str = "cpu"
    recipe: str = DEFAULT_RECIPE
    block_n: int = DEFAULT_BLOCK_N
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    kernel: str | None = None
    kernel_dtype: str = "float32"  # q, k, v are cast to this before the kernel is called
    kernel_timeout: float | None = None  # seconds per kernel call (--timeout); None: no limit
    smoke: bool = False
    deterministic: bool = True
    jobs: int = 1  # variants at once, one process each; cuda: over the GPUs (runner.device_for_job)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        if self.block_n < 0:
            raise ValueError(f"block_n must be >= 0 (0 keeps the recipe's), got {self.block_n}")
        if self.kernel_timeout is not None and not self.kernel_timeout > 0:
            raise ValueError(f"kernel_timeout must be > 0 seconds or None, got "
                             f"{self.kernel_timeout}")


GPU_PRESET = SimulationConfig(
    name="gpu",
    model=ModelConfig(vocab_size=32, seq_len=128, width=128, n_layers=2, n_heads=4),
    training=TrainingConfig(steps=1500, batch_size=64, lr=1e-3),
    # recall, not copy: on copy the attention turns one-hot, P quantizes almost exactly and
    # o_only trains like bf16 (docs/bench/simulate.md); recall keeps o_only's D error alive.
    task="recall",
    device="cuda",
)

# Reduced for 2 CPU cores: width 64, 2 heads of d = 32 (two NVFP4 blocks), sequence 64 (rows
# end with 2 P tiles of 32 keys, so tiling and the flush threshold still matter), batch 16.
# Recall with vocabulary 17 (8 key-value pairs, chance log 8): in 1000 steps at lr 3e-3 bf16,
# attn_qat and p_only reach the same loss (22-24 % of the way from chance: the "values seen
# in the context" plateau, which keeps the attention spread and o_only's D error alive);
# o_only unlearns with gradient spikes; drop_in blows up. The split held on seeds 0, 1, 2
# (docs/bench/simulate.md); the former copy preset at lr 1e-3 did not separate o_only.
CPU_PRESET = SimulationConfig(
    name="cpu",
    model=ModelConfig(vocab_size=17, seq_len=64, width=64, n_layers=2, n_heads=2),
    training=TrainingConfig(steps=1000, batch_size=16, lr=3e-3, eval_batches=4,
                            diagnostic_checkpoints=3),
    task="recall",
    device="cpu",
)

# Issue 19's stronger GPU preset: bf16 must get at least 80 % of the way from chance to zero
# and the split still hold. Recall without help keeps bf16 on the "values in the context"
# plateau (20-30 %) in every run so far: the 2-layer model does not grow the previous-token
# head that recall's two-step lookup needs. The token shift hands it that copy; scaled by
# 0.01 (with AdamW the shift table learns at 0.01 x lr) the lookup forms only after a few
# hundred steps on the plateau, where the attention is spread over the context's values and
# o_only's key bias drifts (its exact gradient is zero; AdamW moves it about lr a step), so
# bf16, attn_qat and p_only then solve the task while o_only has already unlearned and
# drop_in blown up. The cosine decay keeps the solved runs free of late spikes.
# Run on the CPU and on an H200 (seeds 0-2, 1200 steps: bf16 at 99.9 % of the way; the split
# on all three): docs/bench/simulate.md, "Second search" and "The gpu-strong preset".
GPU_STRONG_PRESET = SimulationConfig(
    name="gpu-strong",
    # width 64 as in the cpu preset: at width 128 the same kind of lookup (manykeys) stayed
    # at chance for 2000 steps on the H200 where width 64 learned it on the CPU
    model=ModelConfig(vocab_size=17, seq_len=64, width=64, n_layers=2, n_heads=2,
                      token_shift=True, token_shift_scale=0.01),
    # 1200 steps: bf16 solves the task by ~900; a longer converged tail only adds spikes
    # of its near-zero gradient norm, against which the others' are counted
    training=TrainingConfig(steps=1200, batch_size=16, lr=3e-3, warmup_steps=100,
                            lr_schedule="cosine"),
    task="recall",
    device="cuda",
)

PRESETS: dict[str, SimulationConfig] = {"gpu": GPU_PRESET, "cpu": CPU_PRESET,
                                        "gpu-strong": GPU_STRONG_PRESET}


def get_preset(name: str) -> SimulationConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown config {name!r}; valid configs: {', '.join(sorted(PRESETS))}"
        ) from None


def with_overrides(config: SimulationConfig, **overrides: object) -> SimulationConfig:
    """``config`` with top-level, ``model.*`` or ``training.*`` fields replaced; keys are
    plain field names and ``None`` values are ignored (unset command-line options)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    training_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    top_fields = {f.name for f in dataclasses.fields(SimulationConfig)}
    model_changes: dict[str, object] = {}
    training_changes: dict[str, object] = {}
    top_changes: dict[str, object] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in model_fields:
            model_changes[key] = value
        elif key in training_fields:
            training_changes[key] = value
        elif key in top_fields and key not in ("model", "training"):
            top_changes[key] = value
        else:
            raise ValueError(f"unknown configuration field {key!r}")
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model_changes),
        training=dataclasses.replace(config.training, **training_changes),
        **top_changes,
    )
