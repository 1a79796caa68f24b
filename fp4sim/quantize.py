"""Block quantization to NVFP4 / MXFP4: quantize, dequantize, fake_quantize.

Conventions (docs/numerics.md; each variant is a keyword setting, see QuantizeSettings):

NVFP4, per block of 16 along ``axis``, all arithmetic in float32:
  amax    = max |x| over the block (bit-pattern max, so a NaN anywhere gives NaN)
  s_block = E4M3_RNE_sat(amax / 6)                        scale_amax_op='divide' (default)
          = E4M3_RNE_sat(amax * float32(1/6))             scale_amax_op='reciprocal'
            with a tensor scale t: (amax / 6) / t, left to right, then rounded to E4M3
  s_eff   = s_block (no tensor scale) or float32(s_block * t)
  code    = E2M1_RNE_sat(x * float32(1 / s_eff))          scale_op='reciprocal' (default)
          = E2M1_RNE_sat(x / s_eff)                       scale_op='divide'
  value   = e2m1(code) * s_eff
  tensor_scale='amax': t = float32(amax_tensor / 2688) (2688 = 448 * 6); t = 1 when that
  is 0 (an all-zero tensor, or amax below ~1.9e-42 where the quotient underflows).
MXFP4, per block of 32: scale byte by the scale_rule (fp4sim.block_scale.mx_scale_bits),
  code = E2M1_RNE_sat(x * 2^-e) (exactly x / 2^e), value = e2m1(code) * 2^e.

Special values (documented bytes, never garbage):
  - Inf saturates: it counts as the largest finite float32 for the scale (NVFP4 scale 448 =
    0x7E unless the tensor scale changes that), and encodes as +-6 (code 7 / 15).
  - A NaN anywhere in a block makes the block scale NaN (E4M3 0x7F, E8M0 0xFF) and gives
    every element of the block the NaN code of a positive NaN under the element policy
    ('ptx': 7, 'ml_dtypes': 8); the block dequantizes to NaN.
  - A block whose scale is 0 (NVFP4 only: amax <= 6 * 2^-10 without tensor scale) gets codes
    per zero_scale_codes: 'zeros' (all 0) or 'reciprocal' (what x * (1/0) gives: +-Inf ->
    code 7 / 15 for non-zero x, 0 * Inf = NaN -> the positive-NaN code for zeros). It
    dequantizes to 0 either way and, if its amax is non-zero, counts in ``flushed_blocks``.
  - A block with amax = 0 gets MX scale byte 0 and codes 0.
  - Elements that round to zero keep their sign (code 8) in blocks with a non-zero scale.
Padding (pad=True): the block axis is padded with +0.0 up to a multiple of the block size;
``codes``/``packed``/scales cover the padded length, dequantize returns the original shape.
Speed and memory: the input is walked in pieces of whole blocks (fp4sim.pieces, at most 2^20
elements each), with float32 bit operations on chunks of 2^17 elements inside a piece; inputs
of 2^20 elements or more spread their pieces over up to 4 threads (kept between calls, as are
each thread's chunk temporaries). Every result is per block, so it does not depend on the
split, and the temporaries are bounded by the piece size:
fake_quantize needs about 1.15x the input beyond it (the output included), quantize about 0.7x.
dequantize validates a QuantizedTensor (dtypes, shapes, code range) before reading it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fp4sim.block_scale import (
    mx_data_multiplier,
    mx_scale_bits,
    nvfp4_block_scale_bits,
    saturate_inf,
)
from fp4sim.e2m1 import (
    E2M1_VALUES,
    MAX_MAGNITUDE_CODE,
    SIGN_CODE_BIT,
    as_random_words,
    e2m1_encode_bits_exact,
    e2m1_encode_bits_into,
    e2m1_nan_code,
)
from fp4sim.e4m3 import e4m3_decode
from fp4sim.e8m0 import e8m0_decode
from fp4sim.float_input import as_float32, normalize_axis
from fp4sim.formats import (
    E2M1,
    E4M3FN,
    NVFP4_TENSOR_SCALE_DIVISOR,
    BlockFormat,
    get_block_format,
)
from fp4sim.minifloat import F32_ABS_MASK, F32_INF_BITS, round_magnitude_stochastic
from fp4sim.pieces import Piece, piece_blocks, piece_target, split_into_pieces, store
from fp4sim.settings import QuantizeSettings  # re-exported: fp4sim.quantize.QuantizeSettings

TENSOR_SCALE_DIVISOR = np.float32(NVFP4_TENSOR_SCALE_DIVISOR)  # docs/numerics.md: 448 * 6
_ROWS_ELEMENTS = 1 << 17  # elements per chunk: 5 % faster than 2^16 or 2^18 (fewer calls)
_PARALLEL_MIN_ELEMENTS = 1 << 20  # below this, threads cost more than they save
_PIECE_ELEMENTS = 1 << 20  # elements per piece (fp4sim.pieces): bounds a call's temporaries
_MAX_WORKERS = 4
_CPUS = os.cpu_count() or 1  # read once: os.cpu_count() took 20 us per call on the 2-core VM


class _Scratch:
    """One worker's chunk-sized temporaries, kept across chunks and calls.

    Allocating the chunk temporaries (256 KiB each) afresh for every chunk made the encode
    pass about 4x slower on the 2-core CI VM (the lookup then ran on newly mapped pages).
    Each buffer is keyed by name; ``get`` returns a view of the requested size and dtype
    (contents undefined). About 0.8 MiB per worker thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype: type) -> np.ndarray:
        nbytes = size * np.dtype(dtype).itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < nbytes:
            buffer = self._buffers[name] = np.empty(max(nbytes, 4 * _ROWS_ELEMENTS), np.uint8)
        return buffer[:nbytes].view(dtype)


_IDLE_SCRATCH: queue.SimpleQueue = queue.SimpleQueue()  # _Scratch objects not in use


@contextmanager
def _scratch() -> Iterator[_Scratch]:
    """A _Scratch for the calling worker alone (threads never share one)."""
    try:
        scratch = _IDLE_SCRATCH.get_nowait()
    except queue.Empty:
        scratch = _Scratch()
    try:
        yield scratch
    finally:
        _IDLE_SCRATCH.put(scratch)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Result of ``quantize``. Arrays are in the input's axis order; scale-shaped arrays have
    the block axis divided by the block size.

    codes: uint8 E2M1 codes (unpacked; block axis padded when pad=True)
    packed: uint8, two codes per byte along ``axis`` (element 2i in the low nibble)
    scale_bits: uint8 raw scale bytes (E4M3 or E8M0)
    scales: float32 decoded block scales (without the tensor scale)
    tensor_scale: float32 tensor scale or None
    shape: the input's shape (before padding)
    block_amax: float32 max |x| per block (NaN if the block has a NaN)
    Derived on access: flushed_blocks, saturated_blocks, effective_scales.
    """

    codes: np.ndarray
    packed: np.ndarray
    scale_bits: np.ndarray
    scales: np.ndarray
    tensor_scale: np.float32 | None
    fmt: BlockFormat
    settings: QuantizeSettings
    axis: int
    shape: tuple[int, ...]
    block_amax: np.ndarray

    @property
    def flushed_blocks(self) -> np.ndarray:
        """bool, scale-shaped: blocks with a non-zero finite amax that dequantize to all 0."""
        return _block_flags(self.block_amax, self.effective_scales, self.settings)[0]

    @property
    def saturated_blocks(self) -> np.ndarray:
        """bool, scale-shaped: blocks where the largest |x| / s_eff exceeds 6 (clipped)."""
        return _block_flags(self.block_amax, self.effective_scales, self.settings)[1]

    @property
    def effective_scales(self) -> np.ndarray:
        """float32 s_eff = s_block (times the tensor scale when one is used)."""
        if self.tensor_scale is None:
            return self.scales
        with np.errstate(over="ignore"):
            return self.scales * np.float32(self.tensor_scale)


def block_flush_mask(q: QuantizedTensor) -> np.ndarray:
    """Blocks whose non-zero finite content all dequantizes to 0 (scale underflow)."""
    return q.flushed_blocks


def _pairwise_max_into(level: np.ndarray, spare: np.ndarray, width: int,
                       out: np.ndarray) -> None:
    """Per-row max of the flat (rows * width) uint32 ``level`` into ``out`` (rows,).

    Halving passes max(even, odd) cost about 0.5 ns per element in NumPy, a reduction over
    a short inner axis about 2 ns and one strided pass per column about 0.8 ns. ``level``
    and ``spare`` (at least half its size) are overwritten in turn.
    """
    while width % 2 == 0 and width > 2:
        half = spare[: level.size // 2]
        np.maximum(level[0::2], level[1::2], out=half)
        level, spare, width = half, level, width // 2
    if width == 2:
        np.maximum(level[0::2], level[1::2], out=out)
        return
    columns = level.reshape(-1, width)  # odd width: one strided pass per column
    np.maximum(columns[:, 0], columns[:, 1], out=out)
    for column in range(2, width):
        np.maximum(out, columns[:, column], out=out)


def _zero_scale_codes(x_rows: np.ndarray, policy: str, nan: str) -> np.ndarray:
    """Codes of blocks whose multiplier is infinite (scale 0 or 1/s_eff overflow)."""
    if policy == "zeros":
        return np.zeros(x_rows.shape, dtype=np.uint8)
    bits = x_rows.view(np.uint32)
    sign = ((bits >> 28) & SIGN_CODE_BIT).astype(np.uint8)
    is_zero = (bits & np.uint32(F32_ABS_MASK)) == 0
    # +-x * Inf = +-Inf saturates to +-6; 0 * Inf is NaN (taken as the positive NaN).
    return np.where(is_zero, np.uint8(e2m1_nan_code(nan)), sign | np.uint8(MAX_MAGNITUDE_CODE))


def _block_amax_bits_into(bits: np.ndarray, out: np.ndarray, scratch: _Scratch) -> None:
    """Pass 1: per-block max of |x| as uint32 patterns into ``out`` (NaN patterns exceed
    Inf's, so a NaN anywhere makes the block's max a NaN pattern)."""
    nblocks, width = bits.shape
    rows = max(1, _ROWS_ELEMENTS // width)
    for r0 in range(0, nblocks, rows):
        r1 = min(r0 + rows, nblocks)
        size = (r1 - r0) * width
        magnitudes = scratch.get("words", size, np.uint32)
        np.bitwise_and(bits[r0:r1].reshape(-1), np.uint32(F32_ABS_MASK), out=magnitudes)
        _pairwise_max_into(magnitudes, scratch.get("half", size // 2, np.uint32), width,
                           out[r0:r1])


def _tensor_scale_value(amax_bits: np.ndarray, settings: QuantizeSettings) -> np.float32 | None:
    """None, the given float32 value, or float32(amax_tensor / 2688) for 'amax'."""
    ts = settings.tensor_scale
    if ts is None:
        return None
    if ts != "amax":
        return np.float32(ts)
    tensor_amax_bits = amax_bits.max(initial=np.uint32(0))
    amax = saturate_inf(np.array([tensor_amax_bits], dtype=np.uint32).view(np.float32))[0]
    scale = np.float32(amax / TENSOR_SCALE_DIVISOR)  # NaN tensor -> NaN scale -> NaN blocks
    # All-zero tensors, and amax below ~1.9e-42 whose quotient underflows, get 1 (never / 0).
    return np.float32(1.0) if scale == 0 else scale


def _block_scales(amax: np.ndarray, fmt: BlockFormat, settings: QuantizeSettings,
                  tensor_scale: np.float32 | None):
    """Scale bytes, decoded scales, s_eff and the data multiplier (None for
    scale_op='divide') per block."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if fmt.scale == E4M3FN:
            scale_bits = nvfp4_block_scale_bits(amax, tensor_scale, settings.scale_amax_op,
                                                settings.scale_lower_clamp)
            scales = e4m3_decode(scale_bits)
            s_eff = scales if tensor_scale is None else scales * tensor_scale
            multiplier = np.float32(1.0) / s_eff if settings.scale_op == "reciprocal" else None
        else:
            scale_bits = mx_scale_bits(amax, settings.scale_rule)
            scales = s_eff = e8m0_decode(scale_bits)
            multiplier = mx_data_multiplier(scale_bits)
    return scale_bits, scales, s_eff, multiplier


def _encode_stochastic_into(y: np.ndarray, words: np.ndarray, out: np.ndarray, nan: str) -> None:
    y_bits = y.view(np.uint32).reshape(-1)
    abs_y = y_bits & np.uint32(F32_ABS_MASK)
    is_nan = abs_y > F32_INF_BITS
    mag = round_magnitude_stochastic(np.where(is_nan, np.uint32(0), abs_y), words, E2M1)
    encoded = np.minimum(mag, MAX_MAGNITUDE_CODE).astype(np.uint8)
    encoded |= ((y_bits >> 28) & SIGN_CODE_BIT).astype(np.uint8)
    encoded[is_nan] = e2m1_encode_bits_exact(y_bits[is_nan], nan)
    out.reshape(-1)[:] = encoded


def _encode_blocks_into(blocks: np.ndarray, s_eff: np.ndarray, multiplier: np.ndarray | None,
                        settings: QuantizeSettings, rbits: np.ndarray | None,
                        codes: np.ndarray, packed: np.ndarray | None,
                        scratch: _Scratch) -> None:
    """Pass 2: codes = E2M1(x * multiplier) (or x / s_eff), and their packed bytes (skipped
    when ``packed`` is None: fake_quantize does not need them)."""
    nblocks, width = blocks.shape
    rows = max(1, _ROWS_ELEMENTS // width)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for r0 in range(0, nblocks, rows):
            r1 = min(r0 + rows, nblocks)
            size = (r1 - r0) * width
            y = scratch.get("words", size, np.float32).reshape(r1 - r0, width)
            if multiplier is not None:
                np.multiply(blocks[r0:r1], multiplier[r0:r1, None], out=y)
            else:
                np.divide(blocks[r0:r1], s_eff[r0:r1, None], out=y)
            out = codes[r0:r1]
            if rbits is None:
                e2m1_encode_bits_into(y.view(np.uint32).reshape(-1), out.reshape(-1),
                                      settings.nan, index=scratch.get("index", size, np.uint32))
            else:
                _encode_stochastic_into(y, rbits[r0 * width:r1 * width], out, settings.nan)
            if packed is None:
                continue
            # docs/numerics.md packing: little-endian byte pairs, element 2i in the low nibble.
            pairs = out.view("<u2")
            pair = scratch.get("pairs", size // 2, np.uint16).reshape(pairs.shape)
            np.right_shift(pairs, 4, out=pair)
            np.bitwise_or(pair, pairs, out=pair)
            np.copyto(packed[r0:r1], pair, casting="unsafe")


def _fix_special_blocks(blocks: np.ndarray, codes: np.ndarray, packed: np.ndarray | None,
                        amax_bits: np.ndarray, s_eff: np.ndarray,
                        multiplier: np.ndarray | None, fmt: BlockFormat,
                        settings: QuantizeSettings, tensor_scale: np.float32 | None) -> None:
    """Whole-block rules (rare blocks only), so results never depend on a NaN's sign:
    NaN blocks, zero-scale blocks, overflowing reciprocals, MX blocks with amax 0."""
    # Cheap whole-array tests first (one reduction each); masks only when something is there.
    if amax_bits.size == 0:
        return
    tensor_nan = tensor_scale is not None and bool(np.isnan(tensor_scale))
    if tensor_nan:
        nan_blocks = np.ones(amax_bits.shape, dtype=bool)
    elif amax_bits.max() > F32_INF_BITS:
        nan_blocks = amax_bits > F32_INF_BITS
    else:
        nan_blocks = np.zeros(amax_bits.shape, dtype=bool)
    fixes = []
    if nan_blocks.any():
        fixes.append((nan_blocks, lambda rows: np.full(rows.shape, e2m1_nan_code(settings.nan),
                                                       dtype=np.uint8)))
    if fmt.scale == E4M3FN:
        # Without a tensor scale s_eff >= 2^-9 or 0, so 1/s_eff never overflows.
        if tensor_scale is not None or not s_eff.min() > 0:  # a 0 (or a NaN) is present
            zero_scale = (s_eff == 0) & ~nan_blocks
            if zero_scale.any():
                fixes.append((zero_scale, lambda rows: _zero_scale_codes(
                    rows, settings.zero_scale_codes, settings.nan)))
        if multiplier is not None and tensor_scale is not None:
            # 1/s_eff overflows for a tiny non-zero s_eff (tensor scale): x * Inf semantics.
            overflow = np.isinf(multiplier) & (s_eff > 0) & ~nan_blocks
            if overflow.any():
                fixes.append((overflow, lambda rows: _zero_scale_codes(
                    rows, "reciprocal", settings.nan)))
    elif amax_bits.min() == 0:
        zero_amax = amax_bits == 0
        fixes.append((zero_amax, lambda rows: np.zeros(rows.shape, dtype=np.uint8)))
    for mask, make_codes in fixes:
        new_codes = make_codes(blocks[mask])
        codes[mask] = new_codes
        if packed is not None:
            packed[mask] = new_codes[:, 0::2] | (new_codes[:, 1::2] << 4)


def _block_flags(amax: np.ndarray, s_eff: np.ndarray, settings: QuantizeSettings):
    """Per-block flags from the largest element, whose scaled value |x|max / s_eff is
    computed with the same float32 operations as the data (codes are monotone in it):
    flushed: non-zero finite amax but everything dequantizes to 0 (scale 0, or the largest
    scaled value rounds to 0); saturated: the largest scaled value exceeds 6 (Inf included)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if settings.scale_op == "divide":
            scaled = amax / s_eff
        else:
            scaled = amax * (np.float32(1.0) / s_eff)
    usable = ~np.isnan(amax) & np.isfinite(s_eff) & (s_eff > 0)
    flushed = (amax > 0) & np.isfinite(amax) & ((s_eff == 0) | (usable & (scaled <= 0.25)))
    saturated = usable & (scaled > 6)
    return flushed, saturated




def _axis_last(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` seen with ``axis`` moved last (``a`` itself when it already is: np.moveaxis
    costs more than the whole computation on small inputs)."""
    return a if axis in (-1, a.ndim - 1) else np.moveaxis(a, axis, -1)


def _axis_back(a: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of _axis_last."""
    return a if axis in (-1, a.ndim - 1) else np.moveaxis(a, -1, axis)


@dataclass(frozen=True)
class _Plan:
    """One call's input seen with its block axis last, and the pieces to walk it in."""

    x32: np.ndarray
    moved: np.ndarray
    axis: int
    fmt: BlockFormat
    settings: QuantizeSettings
    padded_shape: tuple[int, ...]
    pieces: list[Piece]
    workers: int

    @property
    def nblocks(self) -> int:
        return int(np.prod(self.padded_shape)) // self.fmt.block_size

    def in_input_order(self, moved_shape: tuple[int, ...]) -> tuple[int, ...]:
        """A shape given with the block axis last, in the input's axis order."""
        order = list(moved_shape[:-1])
        order.insert(self.axis, moved_shape[-1])
        return tuple(order)


def _piece_budget(total: int) -> tuple[int, int]:
    """(elements per piece, worker threads): pieces of at most _PIECE_ELEMENTS bound the
    temporaries; large inputs are spread over up to _MAX_WORKERS threads (NumPy releases the
    GIL inside its loops, and pieces write disjoint slices)."""
    workers = min(_CPUS, _MAX_WORKERS)
    if workers < 2 or total < _PARALLEL_MIN_ELEMENTS:
        return _PIECE_ELEMENTS, 1
    return min(_PIECE_ELEMENTS, max(_ROWS_ELEMENTS, -(-total // workers))), workers


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, helper threads), made on first use
_POOL_LOCK = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    """Helper threads kept between calls: starting a pool per call cost about 0.15 ms (5 %
    of a 2^20-element quantize). A forked child (other pid) makes its own."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            helpers = max(1, min(_CPUS, _MAX_WORKERS) - 1)
            _POOL = (os.getpid(), ThreadPoolExecutor(helpers, thread_name_prefix="fp4sim"))
        return _POOL[1]


def _for_each_piece(task, pieces: list[Piece], workers: int) -> None:
    """Run ``task`` on every piece: the calling thread and up to workers - 1 helper threads
    each take the next piece from a shared queue until none is left."""
    if workers < 2 or len(pieces) < 2:
        for piece in pieces:
            task(piece)
        return
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for piece in pieces:
        todo.put(piece)

    def drain() -> None:
        while True:
            try:
                piece = todo.get_nowait()
            except queue.Empty:
                return
            task(piece)

    pool = _helper_pool()
    helpers = [pool.submit(drain) for _ in range(min(workers, len(pieces)) - 1)]
    try:
        drain()
    finally:
        for helper in helpers:  # all pieces are done (or abandoned) before returning
            helper.result()


def _plan(x: object, fmt: str | BlockFormat, axis: int, settings: QuantizeSettings) -> _Plan:
    block_format = get_block_format(fmt)
    settings.check_format(block_format)
    x32 = as_float32(x)
    if x32.ndim == 0:
        raise ValueError("x must have at least one dimension")
    ax = normalize_axis(axis, x32.ndim)
    bs = block_format.block_size
    moved = _axis_last(x32, ax)
    length = moved.shape[-1]
    if length % bs and not settings.pad:
        raise ValueError(f"axis {ax} of x has length {length}, not a multiple of the "
                         f"{block_format.name} block size {bs}; pass pad=True to pad "
                         "with zeros")
    padded_length = -(-length // bs) * bs
    budget, workers = _piece_budget(moved.size)
    pieces = split_into_pieces(moved.shape[:-1], length, padded_length, bs, budget)
    return _Plan(x32, moved, ax, block_format, settings, moved.shape[:-1] + (padded_length,),
                 pieces, workers)


def _random_words(rbits: object, plan: _Plan):
    """Validated random words seen with the block axis last, and a function giving one
    piece's words (uint32, flat); None for RNE."""
    if plan.settings.rounding != "stochastic":
        if rbits is not None:
            raise ValueError("rbits is only used with rounding='stochastic'")
        return None
    if rbits is None:
        raise ValueError("rounding='stochastic' needs explicit random bits (rbits)")
    rb = np.asarray(rbits)
    if rb.dtype not in (np.uint32, np.uint8):
        raise TypeError(f"rbits must be a uint32 or uint8 array, got dtype {rb.dtype}")
    # Words are given in x's axis order, for x or for x padded along the block axis;
    # padding elements (zeros) get word 0, which cannot change a zero's code.
    moved = _axis_last(rb, plan.axis) if rb.ndim == plan.x32.ndim else rb
    padded = moved.shape == plan.padded_shape
    if not padded and moved.shape != plan.moved.shape:
        raise ValueError(f"rbits must have shape {plan.padded_shape} (one word per element), "
                         f"got {moved.shape}")

    def piece_words(piece: Piece) -> np.ndarray:
        words = moved[piece.dst] if padded else moved[piece.src]
        if not padded and piece.pad:
            words = np.pad(words, [(0, 0)] * (words.ndim - 1) + [(0, piece.pad)])
        words = np.ascontiguousarray(words)
        return as_random_words(words, words.shape).reshape(-1)

    return piece_words


def _amax_and_tensor_scale(plan: _Plan, amax_bits: np.ndarray) -> tuple[np.float32 | None, bool]:
    """The tensor scale, and whether ``amax_bits`` is already filled: 'amax' needs every
    block's amax before any block can be encoded (one extra pass over the input)."""
    if not isinstance(plan.settings.tensor_scale, str):
        return _tensor_scale_value(amax_bits, plan.settings), False
    bs = plan.fmt.block_size

    def task(piece: Piece) -> None:
        blocks = piece_blocks(plan.moved, piece, bs)
        with _scratch() as scratch:
            _block_amax_bits_into(blocks.view(np.uint32), amax_bits[piece.blocks], scratch)

    _for_each_piece(task, plan.pieces, plan.workers)
    return _tensor_scale_value(amax_bits, plan.settings), True


def _encode_piece(plan: _Plan, piece: Piece, ts: np.float32 | None, amax_bits: np.ndarray,
                  amax_ready: bool, words, codes: np.ndarray, packed: np.ndarray | None):
    """Quantize one piece into ``codes``/``packed``; returns (scale bytes, scales, s_eff)."""
    blocks = piece_blocks(plan.moved, piece, plan.fmt.block_size)
    bits = amax_bits[piece.blocks]
    with _scratch() as scratch:
        if not amax_ready:
            _block_amax_bits_into(blocks.view(np.uint32), bits, scratch)
        scale_bits, scales, s_eff, multiplier = _block_scales(bits.view(np.float32), plan.fmt,
                                                              plan.settings, ts)
        _encode_blocks_into(blocks, s_eff, multiplier, plan.settings,
                            None if words is None else words(piece), codes, packed, scratch)
    _fix_special_blocks(blocks, codes, packed, bits, s_eff, multiplier, plan.fmt,
                        plan.settings, ts)
    return scale_bits, scales, s_eff


def _dequantize_into(codes: np.ndarray, s_eff: np.ndarray, dest: np.ndarray, index: tuple,
                     pad: int) -> None:
    """dest[index] = e2m1(codes) * s_eff per block (float32), padding dropped."""
    view = dest[index]
    direct = not pad and view.flags.c_contiguous
    values = view.reshape(codes.shape) if direct else np.empty(codes.shape, np.float32)
    nblocks, width = codes.shape
    rows = max(1, _ROWS_ELEMENTS // width)  # np.take makes an intp copy of its indices
    with np.errstate(invalid="ignore", over="ignore"):
        for r0 in range(0, nblocks, rows):
            out = values[r0:r0 + rows]
            # Codes are known to lie in 0..15 here; 'clip' lets np.take write into ``out``.
            np.take(E2M1_VALUES, codes[r0:r0 + rows], out=out, mode="clip")
            np.multiply(out, s_eff[r0:r0 + rows, None], out=out)
    if not direct:
        store(dest, index, values, pad)


def quantize(x: object, fmt: str | BlockFormat = "nvfp4", axis: int = -1, *,
             rounding: str = "rne", rbits: object = None, nan: str = "ptx",
             scale_rule: str = "rceil", tensor_scale: str | float | None = None,
             scale_op: str = "reciprocal", scale_amax_op: str = "divide",
             scale_lower_clamp: bool = False, zero_scale_codes: str = "zeros",
             pad: bool = False) -> QuantizedTensor:
    """Quantize ``x`` to the block format ``fmt`` with blocks along ``axis``.

    See the module docstring for the exact arithmetic and special values. ``rbits``
    (stochastic rounding only): one uint32 (or uint8, used as the top byte) per element, with
    the shape of x or of x padded along ``axis``; element i's word rounds x_i / s_eff as in
    fp4sim.minifloat.round_magnitude_stochastic.
    """
    settings = QuantizeSettings(rounding=rounding, nan=nan, scale_rule=scale_rule,
                                tensor_scale=tensor_scale, scale_op=scale_op,
                                scale_amax_op=scale_amax_op, scale_lower_clamp=scale_lower_clamp,
                                zero_scale_codes=zero_scale_codes, pad=pad)
    plan = _plan(x, fmt, axis, settings)
    words = _random_words(rbits, plan)
    bs = plan.fmt.block_size
    amax_bits = np.empty(plan.nblocks, dtype=np.uint32)
    scale_bits = np.empty(plan.nblocks, dtype=np.uint8)
    scales = np.empty(plan.nblocks, dtype=np.float32)
    # Codes and packed bytes are written in place, in the input's axis order.
    packed_moved_shape = plan.padded_shape[:-1] + (plan.padded_shape[-1] // 2,)
    codes = np.empty(plan.in_input_order(plan.padded_shape), dtype=np.uint8)
    packed = np.empty(plan.in_input_order(packed_moved_shape), dtype=np.uint8)
    codes_moved = _axis_last(codes, plan.axis)
    packed_moved = _axis_last(packed, plan.axis)
    ts, amax_ready = _amax_and_tensor_scale(plan, amax_bits)

    def task(piece: Piece) -> None:
        piece_codes, codes_direct = piece_target(codes_moved, piece.dst, bs)
        piece_packed, packed_direct = piece_target(packed_moved, piece.pdst, bs // 2)
        sb, sc, _ = _encode_piece(plan, piece, ts, amax_bits, amax_ready, words, piece_codes,
                                  piece_packed)
        scale_bits[piece.blocks] = sb
        scales[piece.blocks] = sc
        if not codes_direct:
            store(codes_moved, piece.dst, piece_codes)
        if not packed_direct:
            store(packed_moved, piece.pdst, piece_packed)

    _for_each_piece(task, plan.pieces, plan.workers)
    scale_shape = plan.padded_shape[:-1] + (plan.padded_shape[-1] // bs,)

    def back(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(_axis_back(a.reshape(scale_shape), plan.axis))

    return QuantizedTensor(
        codes=codes,
        packed=packed,
        scale_bits=back(scale_bits),
        scales=back(scales),
        tensor_scale=ts,
        fmt=plan.fmt,
        settings=settings,
        axis=plan.axis,
        shape=tuple(plan.x32.shape),
        block_amax=back(amax_bits.view(np.float32)),
    )


def _check_quantized(q: object) -> None:
    """Reject a QuantizedTensor whose arrays do not fit together (e.g. one built by hand):
    dtypes, shapes against ``shape``/``axis``/``fmt``, codes in 0..15, the tensor scale."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}")
    if not isinstance(q.fmt, BlockFormat):
        raise TypeError(f"QuantizedTensor.fmt must be a BlockFormat, got {q.fmt!r}")
    shape = q.shape
    if not (isinstance(shape, tuple) and shape
            and all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape)):
        raise ValueError(f"QuantizedTensor.shape must be a non-empty tuple of sizes, got "
                         f"{shape!r}")
    if not (isinstance(q.axis, (int, np.integer)) and 0 <= q.axis < len(shape)):
        raise ValueError(f"QuantizedTensor.axis={q.axis!r} is out of range for shape {shape}")
    ax, bs = int(q.axis), q.fmt.block_size

    def along_axis(length: int) -> tuple[int, ...]:
        return shape[:ax] + (length,) + shape[ax + 1:]

    padded = -(-shape[ax] // bs) * bs
    expected = {
        "codes": (np.uint8, along_axis(padded)),
        "packed": (np.uint8, along_axis(padded // 2)),
        "scale_bits": (np.uint8, along_axis(padded // bs)),
        "scales": (np.float32, along_axis(padded // bs)),
        "block_amax": (np.float32, along_axis(padded // bs)),
    }
    for name, (dtype, want) in expected.items():
        arr = getattr(q, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise TypeError(f"QuantizedTensor.{name} must be a {np.dtype(dtype)} array, "
                            f"got {got}")
        if arr.shape != want:
            raise ValueError(f"QuantizedTensor.{name} has shape {arr.shape}, but shape {shape} "
                             f"with {q.fmt.name} blocks of {bs} along axis {ax} needs {want}")
    if q.codes.size and int(q.codes.max()) > 15:
        raise ValueError(f"QuantizedTensor.codes must be 4-bit E2M1 codes 0..15, got "
                         f"{int(q.codes.max())}")
    # dequantize reads ``scales`` and ``codes``; their twins must say the same, or one of the
    # two would be silently ignored. Small (one value per block), so checked whole.
    decoded = (e4m3_decode if q.fmt.scale is E4M3FN else e8m0_decode)(q.scale_bits)
    differ = (decoded != q.scales) & ~(np.isnan(decoded) & np.isnan(q.scales))
    if differ.any():
        raise ValueError(f"QuantizedTensor.scales disagree with scale_bits (decoded as "
                         f"{q.fmt.scale.name}) in {int(differ.sum())} block(s)")
    ts = q.tensor_scale
    if ts is not None:
        if not q.fmt.supports_tensor_scale:
            raise ValueError(f"{q.fmt.name} has no tensor scale; QuantizedTensor.tensor_scale "
                             f"must be None, got {ts!r}")
        if isinstance(ts, (bool, np.bool_)) or not isinstance(ts, (float, int, np.number)):
            raise TypeError(f"QuantizedTensor.tensor_scale must be a float32 scalar or None, "
                            f"got {ts!r}")
        # NaN is a legitimate tensor scale ('amax' of a tensor with a NaN); <= 0 and Inf are not.
        if np.float32(ts) <= 0 or np.isinf(np.float32(ts)):
            raise ValueError(f"QuantizedTensor.tensor_scale must be > 0 and finite (or NaN), "
                             f"got {ts!r}")


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """float32 values e2m1(code) * s_eff, in the input's shape (padding removed).

    ``q`` is validated first (see _check_quantized): a hand-built QuantizedTensor with
    inconsistent arrays raises TypeError/ValueError instead of returning garbage."""
    _check_quantized(q)
    bs = q.fmt.block_size
    codes_moved = _axis_last(q.codes, q.axis)
    s_eff = np.ascontiguousarray(_axis_last(q.effective_scales, q.axis)).reshape(-1)
    out = np.empty(q.shape, dtype=np.float32)
    out_moved = _axis_last(out, q.axis)
    budget, workers = _piece_budget(codes_moved.size)
    pieces = split_into_pieces(codes_moved.shape[:-1], out_moved.shape[-1],
                               codes_moved.shape[-1], bs, budget)

    packed_moved = _axis_last(q.packed, q.axis)

    def task(piece: Piece) -> None:
        codes = np.ascontiguousarray(codes_moved[piece.dst]).reshape(-1, bs)
        # packed must hold the same codes (element 2i in the low nibble); checked piece by
        # piece so that the check adds no array of the input's size.
        packed = packed_moved[piece.pdst].reshape(-1, bs // 2)
        if not np.array_equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4)):
            raise ValueError("QuantizedTensor.packed disagrees with codes (element 2i in the "
                             "low nibble along axis)")
        _dequantize_into(codes, s_eff[piece.blocks], out_moved, piece.src, piece.pad)

    _for_each_piece(task, pieces, workers)
    return out


def fake_quantize(x: object, fmt: str | BlockFormat = "nvfp4", axis: int = -1,
                  **settings: object) -> np.ndarray:
    """dequantize(quantize(x, fmt, axis, **settings)): float32, shape of x.

    Computed piece by piece (bit-identical to the composition), so the extra memory is the
    output plus a few pieces' temporaries rather than several copies of x."""
    rbits = settings.pop("rbits", None)
    unknown = sorted(set(settings) - set(QuantizeSettings.__dataclass_fields__))
    if unknown:
        raise TypeError(f"fake_quantize() got unexpected keyword argument(s) {unknown}")
    plan = _plan(x, fmt, axis, QuantizeSettings(**settings))
    words = _random_words(rbits, plan)
    bs = plan.fmt.block_size
    amax_bits = np.empty(plan.nblocks, dtype=np.uint32)
    out = np.empty(plan.x32.shape, dtype=np.float32)
    out_moved = _axis_last(out, plan.axis)
    ts, amax_ready = _amax_and_tensor_scale(plan, amax_bits)

    def task(piece: Piece) -> None:
        codes = np.empty((piece.blocks.stop - piece.blocks.start, bs), dtype=np.uint8)
        _, _, s_eff = _encode_piece(plan, piece, ts, amax_bits, amax_ready, words, codes, None)
        _dequantize_into(codes, s_eff, out_moved, piece.src, piece.pad)

    _for_each_piece(task, plan.pieces, plan.workers)
    return out
