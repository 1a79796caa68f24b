"""Quantization of the attention probabilities P under each P policy, on key tiles.

P arrives as tiles of shape (B, H, Lq, T, block_n) (T key tiles of ``block_n`` keys each).
Scale groups (docs/attention-math.md "Forward" step 3, docs/numerics.md):

* ``block`` / ``consistent``: FP4 blocks (16 NVFP4 / 32 MXFP4) along keys, block scale from the
  block amax, no tensor scale.
* ``two_level``: per row segment of a tile (one query row, ``block_n`` keys),
  ``s1 = rowmax / (448 * 6)``; NVFP4 on ``P / s1``; dequantized values times ``s1``
  (docs/numerics.md "Two-level P quantization").
* ``tile_global``: one NVFP4 tensor scale per (``block_m`` query rows x ``block_n`` keys) tile,
  ``s_t = amax_tile / (448 * 6)``, then NVFP4 blocks with that tensor scale (numerics.md NVFP4).

A scale group whose amax is 0 (all masked or padded) quantizes to codes 0 and value 0. One
deliberate divergence from ``fp4sim.quantize_two_level``: a nonzero row max whose
``s1 = rowmax / 2688`` underflows to 0 in float32 (rowmax < ~1.9e-42) gets ``s1 = 1`` here
(fp4sim divides by 0 and returns Inf/NaN); the row's P is then plain NVFP4 and flushes to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4sim.reference.quant_torch import (
    E2M1_MAX,
    E4M3_MAX,
    TorchQuantized,
    mxfp4_blocks,
    nvfp4_blocks,
    tensor_scale_from_amax,
    true_divide,
)
from fp4sim.reference.recipes import QuantSpec


@dataclass(frozen=True)
class PQuantized:
    """P~ (``values`` in the input dtype, shape of the tiles), ``codes`` uint8 of the same shape,
    per-FP4-block ``scale_bits``, ``flushed`` (nonzero block whose scale is 0), ``nonzero``
    (block amax > 0), ``saturated`` (element clipped at 6)."""

    values: torch.Tensor
    codes: torch.Tensor
    scale_bits: torch.Tensor
    flushed: torch.Tensor
    nonzero: torch.Tensor
    saturated: torch.Tensor


def _nvfp4_kwargs(spec: QuantSpec) -> dict:
    s = spec.settings()
    s.pop("tensor_scale")
    return s


def _blocked(p32: torch.Tensor, blk: int) -> torch.Tensor:
    return p32.reshape(*p32.shape[:-1], p32.shape[-1] // blk, blk)


def _finish(q: TorchQuantized, blocks: torch.Tensor, shape, dtype, scale=None) -> PQuantized:
    values = q.values.reshape(shape)
    if scale is not None:
        values = values * scale
    return PQuantized(
        values=values.to(dtype),
        codes=q.codes.reshape(shape),
        scale_bits=q.scale_bits,
        flushed=q.flushed,
        nonzero=blocks.abs().amax(dim=-1) > 0,
        saturated=q.saturated.reshape(shape),
    )


def quantize_p_tiles(
    p_tiles: torch.Tensor, spec: QuantSpec, policy: str, block_m: int = 64
) -> PQuantized:
    """Quantize P tiles (B, H, Lq, T, block_n) under ``policy``; values in ``p_tiles.dtype``."""
    shape, dtype = p_tiles.shape, p_tiles.dtype
    p32 = p_tiles.to(torch.float32)
    blk = spec.block
    if policy in ("block", "consistent"):
        blocks = _blocked(p32, blk)
        if spec.fmt == "mxfp4":
            q = mxfp4_blocks(blocks, nan=spec.nan, scale_rule=spec.scale_rule)
        else:
            q = nvfp4_blocks(blocks, None, **_nvfp4_kwargs(spec))
        return _finish(q, blocks, shape, dtype)
    if policy == "two_level":
        # docs/numerics.md two-level: s1 = rowmax(P_r) / (448 * 6), per row segment of a tile
        rowmax = p32.abs().amax(dim=-1, keepdim=True)
        s1 = true_divide(rowmax, E4M3_MAX * E2M1_MAX)
        # zero rows get s1 = 1 (as fp4sim); so do rows whose s1 underflows (module docstring)
        s1 = torch.where(s1 == 0, torch.ones_like(s1), s1)
        blocks = _blocked(p32 / s1, blk)
        q = nvfp4_blocks(blocks, None, **_nvfp4_kwargs(spec))
        return _finish(q, blocks, shape, dtype, scale=s1.reshape(*shape[:-1], 1))
    if policy == "tile_global":
        b, h, lq, t, bn = shape
        pad_rows = (-lq) % block_m
        padded = torch.nn.functional.pad(p32, (0, 0, 0, 0, 0, pad_rows))
        rt = padded.shape[2] // block_m
        tiles = padded.reshape(b, h, rt, block_m, t, bn)
        amax = tiles.abs().amax(dim=(3, 5), keepdim=True)  # (b, h, rt, 1, t, 1)
        # docs/numerics.md: s_t = amax / (448 * 6) per tile (1 for an all-zero tile, as fp4sim)
        ts = tensor_scale_from_amax(amax)
        blocks = _blocked(padded, blk)  # (b, h, rows, t, bn/blk, blk)
        ts_blocks = ts.reshape(b, h, rt, 1, t, 1).expand(b, h, rt, block_m, t, 1)
        ts_blocks = ts_blocks.reshape(b, h, rt * block_m, t, 1)
        q = nvfp4_blocks(blocks, ts_blocks, **_nvfp4_kwargs(spec))
        q = TorchQuantized(
            codes=q.codes[:, :, :lq],
            scale_bits=q.scale_bits[:, :, :lq],
            scales=q.scales[:, :, :lq],
            tensor_scale=None,
            values=q.values[:, :, :lq],
            saturated=q.saturated[:, :, :lq],
            flushed=q.flushed[:, :, :lq],
        )
        return _finish(q, blocks[:, :, :lq], shape, dtype)
    raise ValueError(f"no P quantization for policy {policy!r}")
