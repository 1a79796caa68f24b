"""The Blackwell block-scaled MMA scale layout (docs/numerics.md, "The swizzled scale layout").

A [rows, cols] scale-byte matrix is padded to multiples of (128, 4); scale (i, j) goes to
  512 * ((i // 128) * ceil(cols / 4) + j // 4) + (i % 32) * 16 + ((i % 128) // 32) * 4 + j % 4
Padding bytes are 0: an E4M3 scale of 0 keeps padded data at zero (for E8M0 scales, byte 0
is 2^-127, which also multiplies zero data to zero).
"""

from __future__ import annotations

import numpy as np

ROW_TILE = 128
COL_TILE = 4
TILE_BYTES = ROW_TILE * COL_TILE  # 512


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def blackwell_scale_offsets(rows: int, cols: int) -> np.ndarray:
    """int64 [rows, cols] offsets of each scale byte in the swizzled buffer (the formula)."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    col_tiles = -(-cols // COL_TILE)
    return (TILE_BYTES * ((i // ROW_TILE) * col_tiles + j // COL_TILE)
            + (i % 32) * 16 + ((i % ROW_TILE) // 32) * 4 + j % COL_TILE)


def swizzle_scales_blackwell(scale_bytes_2d: object) -> np.ndarray:
    """Swizzle a 2-D uint8 scale matrix into a flat uint8 buffer of
    ceil(rows/128)*128 * ceil(cols/4)*4 bytes (padding 0)."""
    scales = np.asarray(scale_bytes_2d)
    if scales.dtype != np.uint8:
        raise TypeError(f"scale bytes must be uint8, got dtype {scales.dtype}")
    if scales.ndim != 2:
        raise ValueError(f"scale bytes must be 2-D [rows, cols], got shape {scales.shape}")
    rows, cols = scales.shape
    prows, pcols = _ceil_to(rows, ROW_TILE), _ceil_to(cols, COL_TILE)
    padded = np.zeros((prows, pcols), dtype=np.uint8)
    padded[:rows, :cols] = scales
    # Equivalent to scattering by blackwell_scale_offsets: tile (I, J) of 128x4 is laid out
    # as [i % 32][(i % 128) // 32][j % 4], tiles in row-major (I, J) order.
    tiles = padded.reshape(prows // ROW_TILE, 4, 32, pcols // COL_TILE, COL_TILE)
    return np.ascontiguousarray(tiles.transpose(0, 3, 2, 1, 4)).reshape(-1)


def unswizzle_scales_blackwell(swizzled: object, rows: int, cols: int) -> np.ndarray:
    """Inverse of ``swizzle_scales_blackwell``: the [rows, cols] uint8 scale matrix."""
    buf = np.asarray(swizzled)
    if buf.dtype != np.uint8:
        raise TypeError(f"swizzled scales must be uint8, got dtype {buf.dtype}")
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got {rows}, {cols}")
    prows, pcols = _ceil_to(rows, ROW_TILE), _ceil_to(cols, COL_TILE)
    if buf.size != prows * pcols:
        raise ValueError(f"swizzled buffer has {buf.size} bytes; rows={rows}, cols={cols} "
                         f"need {prows * pcols}")
    tiles = buf.reshape(prows // ROW_TILE, pcols // COL_TILE, 32, 4, COL_TILE)
    padded = tiles.transpose(0, 3, 2, 1, 4).reshape(prows, pcols)
    return np.ascontiguousarray(padded[:rows, :cols])
