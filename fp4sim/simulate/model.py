"""A small pre-LayerNorm causal transformer language model with pluggable attention.

The attention itself is a callable ``attention(q, k, v, causal, sm_scale) -> o`` on
(B, H, L, d) tensors, so the same model trains through the reference's FP4 autograd
wrapper, a Triton kernel or any external implementation. Each attention layer can carry
an ``observer`` that is shown its q, k, v and output (the diagnostics use it to look at
the first layer's actual activations and at the gradient reaching its output).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fp4sim.simulate.config import ModelConfig

AttentionFn = Callable[[Tensor, Tensor, Tensor, bool, float], Tensor]
AttentionObserver = Callable[[Tensor, Tensor, Tensor, Tensor], None]


def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin (L, head_dim / 2) of the rotary embedding, base 10000 (RoFormer, arXiv
    2104.09864, eq. 15): pair i of a head turns by position * 10000^(-2i / head_dim)."""
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device,
                                         dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` (B, H, L, d) with each pair (x[2i], x[2i+1]) rotated by its position's angle."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, attention: AttentionFn,
                 rotary: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = width // n_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attention = attention
        self.rotary = rotary
        self.observer: AttentionObserver | None = None

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4))
        if self.rotary:
            cos, sin = rotary_tables(length, self.head_dim, x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attention(q, k, v, True, 1.0 / math.sqrt(self.head_dim))
        if o.shape != q.shape:
            raise RuntimeError(f"attention returned shape {tuple(o.shape)}, "
                               f"expected {tuple(q.shape)}")
        o = o.to(x.dtype)
        if self.observer is not None:
            self.observer(q, k, v, o)
        return self.proj(o.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config.width, config.n_heads, attention,
                                        rotary=config.positions == "rotary")
        self.mlp_norm = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_ratio * config.width),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.width, config.width),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformerLM(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionFn) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        # absent with rotary positions, so that a rotary model has no absolute position
        self.position_embedding = (nn.Embedding(config.seq_len, config.width)
                                   if config.positions == "learned" else None)
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.apply(_init_weights)
        # created and initialized after everything else, so that every other parameter's
        # initialization from a seed is the same with and without it
        self.previous_token_embedding: nn.Embedding | None = None
        if config.token_shift:
            self.previous_token_embedding = nn.Embedding(config.vocab_size, config.width)
            _init_weights(self.previous_token_embedding)

    @property
    def attention_layers(self) -> list[CausalSelfAttention]:
        return [block.attn for block in self.blocks]

    def set_attention(self, attention: AttentionFn) -> None:
        for layer in self.attention_layers:
            layer.attention = attention

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds seq_len {self.config.seq_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        if self.previous_token_embedding is not None:
            # position 0 sees BOS as its previous token (every sequence starts with BOS)
            previous = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
            x = x + self.config.token_shift_scale * self.previous_token_embedding(previous)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def build_model(config: ModelConfig, attention: AttentionFn, seed: int) -> TinyTransformerLM:
    """The model initialized from ``seed`` alone, on the CPU (identical on every device
    once moved) and without touching the global RNG state of the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyTransformerLM(config, attention)


def masked_cross_entropy(logits: Tensor, targets: Tensor, scored: Tensor) -> Tensor:
    """Mean next-token cross entropy over the scored positions."""
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    weights = scored.reshape(-1).to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def masked_accuracy(logits: Tensor, targets: Tensor, scored: Tensor) -> Tensor:
    correct = (logits.argmax(dim=-1) == targets) & scored
    return correct.sum().float() / scored.sum().clamp_min(1).float()
