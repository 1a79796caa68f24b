"""Pieces of whole blocks: how quantize, dequantize and fake_quantize walk a large array.

The array is seen with its block axis last (``np.moveaxis`` view, shape ``lead + (length,)``,
padded on the fly to ``padded_length``). A piece is a contiguous range of that view in C
order covering whole blocks, so every per-block result (scale, codes) is computed exactly as
on the whole array: results never depend on the split. Working piece by piece bounds the
temporaries of a call by the piece size instead of the input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """One piece. ``src`` indexes the (unpadded) block-axis-last view of the input; ``dst``
    the padded element arrays (codes, random words); ``pdst`` the packed arrays (half the
    block axis); ``blocks`` the flat range of block indices (C order of the padded view);
    ``pad`` the zeros appended to each row of the piece along the block axis."""

    src: tuple
    dst: tuple
    pdst: tuple
    blocks: slice
    pad: int


def split_into_pieces(lead: tuple[int, ...], length: int, padded_length: int, block: int,
                      budget: int) -> list[Piece]:
    """Pieces of at most about ``budget`` padded elements (at least one block each).

    Whole rows are grouped along the outermost axis whose single index fits the budget;
    rows longer than the budget are cut at block boundaries (the padding, if any, falls in
    the row's last piece)."""
    blocks_per_row = padded_length // block
    if math.prod(lead) * padded_length == 0:
        return []
    pieces = []
    for j in range(len(lead)):
        rows_per_index = math.prod(lead[j + 1:])
        slab = rows_per_index * padded_length  # padded elements under one index of axis j
        if slab > budget:
            continue
        step = max(1, budget // slab)
        for outer in np.ndindex(*lead[:j]):
            base = int(np.ravel_multi_index(outer, lead[:j])) * lead[j] if j else 0
            for a in range(0, lead[j], step):
                b = min(a + step, lead[j])
                index = outer + (slice(a, b),)
                rows = slice((base + a) * rows_per_index * blocks_per_row,
                             (base + b) * rows_per_index * blocks_per_row)
                pieces.append(Piece(index, index, index, rows, padded_length - length))
        return pieces
    step = max(1, budget // block) * block
    for row, outer in enumerate(np.ndindex(*lead)):
        first = row * blocks_per_row
        for a in range(0, padded_length, step):
            b = min(a + step, padded_length)
            end = min(b, length)
            pieces.append(Piece(outer + (slice(a, end),), outer + (slice(a, b),),
                                outer + (slice(a // 2, b // 2),),
                                slice(first + a // block, first + b // block), b - end))
    return pieces


def piece_blocks(moved: np.ndarray, piece: Piece, block: int) -> np.ndarray:
    """The piece's elements as a contiguous (nblocks, block) array, zero-padded (a view
    when the piece is already contiguous and unpadded)."""
    x = moved[piece.src]
    if piece.pad:
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, piece.pad)])
    return np.ascontiguousarray(x).reshape(-1, block)


def piece_target(dest: np.ndarray, index: tuple, width: int) -> tuple[np.ndarray, bool]:
    """(out, direct): where to write a piece's (n, width) result. ``direct`` when ``out`` is a
    view into ``dest`` (contiguous region); else a scratch array to copy in with
    ``store``."""
    view = dest[index]
    if view.flags.c_contiguous:
        return view.reshape(-1, width), True
    return np.empty((view.size // width, width), dtype=dest.dtype), False


def store(dest: np.ndarray, index: tuple, values: np.ndarray, pad: int = 0) -> None:
    """Write a piece's values (padded shape, any layout) into ``dest[index]``, dropping the
    ``pad`` trailing elements of each row."""
    view = dest[index]
    padded = values.reshape(view.shape[:-1] + (view.shape[-1] + pad,))
    view[...] = padded[..., : view.shape[-1]] if pad else padded
