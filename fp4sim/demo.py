"""`fp4sim demo`: quantize a seeded heavy-tailed tensor with NVFP4 and MXFP4 and print the
codes, scale bytes and errors (a small real run of the emulator)."""

from __future__ import annotations

import argparse

import numpy as np

from fp4sim.e2m1 import E2M1_VALUES
from fp4sim.quantize import dequantize, quantize


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="NumPy seed (default 0)")
    parser.add_argument("--rows", type=int, default=64, help="rows of the tensor (default 64)")
    parser.add_argument("--cols", type=int, default=128,
                        help="columns, a multiple of 32 (default 128)")
    parser.add_argument("--df", type=float, default=3.0,
                        help="Student-t degrees of freedom of the entries (default 3)")
    parser.add_argument("--outlier-scale", type=float, default=30.0,
                        help="one planted outlier channel is multiplied by this (default 30)")


def make_tensor(seed: int, rows: int, cols: int, df: float, outlier_scale: float) -> np.ndarray:
    """Student-t entries with one outlier column: the shape of real activations."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df, size=(rows, cols))
    x[:, rng.integers(cols)] *= outlier_scale
    return x.astype(np.float32)


def _format_codes(codes: np.ndarray) -> str:
    return " ".join(f"{int(c):x}" for c in codes)


def _summary(name: str, x: np.ndarray, **settings: object) -> list[str]:
    q = quantize(x, name, **settings)
    deq = dequantize(q)
    err = deq.astype(np.float64) - x
    rel_l2 = np.linalg.norm(err) / max(np.linalg.norm(x.astype(np.float64)), 1e-300)
    bs = q.fmt.block_size
    shown = min(bs, 16)
    hist = np.bincount(q.codes.reshape(-1) & 7, minlength=8)
    lines = [
        f"== {name.upper()} (block {bs}, {q.fmt.scale.name} scale"
        + (f", settings {settings}" if settings else "") + ")",
        f"row 0, block 0, first {shown} elements:",
        f"  input   {np.array2string(x[0, :shown], precision=3, max_line_width=200)}",
        f"  codes   {_format_codes(q.codes[0, :shown])}",
        f"  packed  {q.packed[0, :shown // 2].tobytes().hex(' ')}",
        f"row 0 scale bytes    : {q.scale_bits[0].tobytes().hex(' ')}"
        f"  (values {np.array2string(q.scales[0], precision=6)})",
        f"  dequant {np.array2string(deq[0, :shown], precision=3, max_line_width=200)}",
        f"relative L2 error {rel_l2:.4%}, max abs error {np.max(np.abs(err)):.4g}",
        f"blocks {q.scale_bits.size}: flushed {int(q.flushed_blocks.sum())}, "
        f"saturated {int(q.saturated_blocks.sum())}",
        "code magnitude histogram: " + ", ".join(
            f"{float(E2M1_VALUES[i]):g}:{int(n)}" for i, n in enumerate(hist)),
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    if args.rows < 1 or args.cols < 32 or args.cols % 32:
        print(f"fp4sim demo: --cols must be a positive multiple of 32 and --rows >= 1, got "
              f"rows={args.rows}, cols={args.cols}")
        return 2
    x = make_tensor(args.seed, args.rows, args.cols, args.df, args.outlier_scale)
    # A closed stdout (`fp4sim demo | head`) is handled for every command in fp4sim.cli.main.
    print(f"fp4sim demo: {args.rows}x{args.cols} float32, Student-t df={args.df}, one "
          f"outlier column x{args.outlier_scale}, seed {args.seed}; blocks along the last axis")
    for lines in (_summary("nvfp4", x), _summary("nvfp4", x, tensor_scale="amax"),
                  _summary("mxfp4", x), _summary("mxfp4", x, scale_rule="floor")):
        print("\n".join(lines))
    return 0
