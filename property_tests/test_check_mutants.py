"""`fp4sim check` against deliberately broken kernels (property_tests/mutant_kernels.py).

Default run (CI): every mutant is flagged with seed 0 and the correct kernels pass over a few
seeds, with small inputs. ``slow``: the detection table over many seeds, written to
docs/bench/testing.md; also runnable as a script:

    python property_tests/test_check_mutants.py [--seeds 10] [--examples 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fp4sim.testing import check_attention, check_driver, check_quantizer  # noqa: E402
from property_tests import mutant_kernels  # noqa: E402

# Small inputs keep the default run fast; the detection table uses the CLI defaults.
FAST_ATTENTION = {"max_len": 40, "head_dims": (64,), "max_batch": 1, "shrink_seconds": 5.0}
FAST_QUANTIZER = {"shrink_seconds": 5.0}
# P against the wrong max only shows with more than one key tile (block_n = 64 keys).
FAST_OVERRIDES: dict[str, dict[str, object]] = {
    "p_wrong_max": {"max_len": 96, "max_kv_heads": 1, "max_group": 1}
}


def run_check(
    kind: str,
    kernel: str,
    target: str,
    extra: tuple[str, ...],
    *,
    examples: int,
    seed: int,
    fast: bool,
    shrink_seconds: float = 10.0,
    overrides: dict[str, object] | None = None,
    device: str = "cpu",
) -> check_driver.CheckResult:
    """Run one check through the Python API with the settings the CLI would use (``fast``:
    the small inputs of the default CI run)."""
    if kind == "quantizer":
        settings = (("tensor_scale", "amax"),) if "--tensor-scale" in extra else ()
        config = check_quantizer.QuantizerCheckConfig(
            kernel=kernel,
            fmt=target,
            settings=settings,
            examples=examples,
            seed=seed,
            device=device,
            **(FAST_QUANTIZER if fast else {"shrink_seconds": shrink_seconds}),
        )
        return check_quantizer.run_quantizer_check(config)
    config = check_attention.AttentionCheckConfig(
        kernel=kernel,
        recipe=target,
        causal="--causal" in extra,
        dtypes=("bfloat16", "float16")
        if "--dtypes" in extra
        else ("float32", "bfloat16", "float16"),
        examples=examples,
        seed=seed,
        device=device,
        **({**FAST_ATTENTION, **(overrides or {})} if fast else {"shrink_seconds": shrink_seconds}),
    )
    return check_attention.run_attention_check(config)


@pytest.mark.parametrize("name", sorted(mutant_kernels.CORRECT))
def test_check_passes_correct_kernels(name: str) -> None:
    kind, kernel, target, extra = mutant_kernels.CORRECT[name]
    examples = 40 if kind == "quantizer" else 6
    for seed in (0, 1):
        result = run_check(kind, kernel, target, extra, examples=examples, seed=seed, fast=True)
        assert result.ok, f"{name} flagged (seed {seed}):\n{result.diagnosis}"


def _triton_runs() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_device() -> str:
    """Where the Triton kernels run: the interpreter takes CPU tensors, compiled kernels CUDA."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.interpreter
@pytest.mark.skipif(not _triton_runs(), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", sorted(mutant_kernels.TRITON_CORRECT))
def test_check_passes_triton_kernels(name: str) -> None:
    kind, kernel, target, extra = mutant_kernels.TRITON_CORRECT[name]
    examples = 20 if kind == "quantizer" else 2  # the interpreter runs ~10 s per attention call
    overrides = {"max_len": 24} if kind == "attention" else None
    result = run_check(
        kind, kernel, target, extra, examples=examples, seed=0, fast=True, overrides=overrides,
        device=_triton_device(),
    )
    assert result.ok, f"{name} flagged:\n{result.diagnosis}"


# Diagnoses the mutants must produce (a substring of one likely cause).
EXPECTED_CAUSE = {
    "ties_away_from_zero": "ties rounded away from zero",
    "swapped_nibbles": "nibble order swapped",
    "scale_rounded_up": "block scale rounded up",
    "bf16_double_rounding": "double rounding",
    "block_32_not_16": "32-element blocks",
    "v_wrong_axis": "V blocked along the wrong axis",
    "p_wrong_max": "P quantized against the wrong max",
    "d_from_quantized_o": "D from the quantized O",
    "s_high_precision_bwd": "recomputes S in high precision",
    "causal_off_by_one": "causal mask off by one",
    "padded_keys_leak": "padded keys of the last, partial key block",
    "no_quantization": "nothing quantized",
}


@pytest.mark.parametrize("name", sorted(mutant_kernels.MUTANTS))
def test_check_flags_each_mutant(name: str) -> None:
    """Caught within 100 examples (seed 0), shrunk, and the known cause named."""
    kind, kernel, target, extra, _ = mutant_kernels.MUTANTS[name]
    result = run_check(
        kind,
        kernel,
        target,
        extra,
        examples=100,
        seed=0,
        fast=True,
        overrides=FAST_OVERRIDES.get(name),
    )
    assert not result.ok, f"{name} was not caught in 100 examples"
    assert result.case is not None and result.diagnosis
    if name in EXPECTED_CAUSE:
        assert any(EXPECTED_CAUSE[name] in cause for cause in result.causes), result.diagnosis


# ---------------------------------------------------------------------------
# detection table (slow; also a script)
# ---------------------------------------------------------------------------


def detection_table(seeds: int, examples: int, correct_examples: int) -> str:
    """Markdown: per mutant, the examples each seed needed (first failing draw)."""
    lines = [
        "| kernel | kind | caught | examples to catch: median / max (per seed) | cause named |",
        "|---|---|---|---|---|",
    ]
    for name, (kind, kernel, target, extra, description) in mutant_kernels.MUTANTS.items():
        needed: list[int] = []
        named = 0
        for seed in range(seeds):
            result = run_check(
                kind, kernel, target, extra, examples=examples, seed=seed, fast=False
            )
            if not result.ok and result.first_failure_at is not None:
                needed.append(result.first_failure_at)
                want = EXPECTED_CAUSE.get(name)
                named += bool(want and any(want in c for c in result.causes))
        caught = f"{len(needed)}/{seeds}"
        spread = (
            f"{statistics.median(needed):g} / {max(needed)} ({', '.join(map(str, needed))})"
            if needed
            else "-"
        )
        cause = f"{named}/{seeds}" if name in EXPECTED_CAUSE else "(location hint only)"
        lines.append(f"| {name}: {description} | {kind} | {caught} | {spread} | {cause} |")
    for name, (kind, kernel, target, extra) in mutant_kernels.CORRECT.items():
        n = correct_examples if kind == "quantizer" else max(1, correct_examples // 4)
        passed = sum(
            run_check(kind, kernel, target, extra, examples=n, seed=seed, fast=False).ok
            for seed in range(seeds)
        )
        lines.append(
            f"| {name} (correct) | {kind} | flagged {seeds - passed}/{seeds} | {n} examples"
            " per seed agree | - |"
        )
    return "\n".join(lines)


def write_table(path: Path, seeds: int, examples: int, correct_examples: int) -> str:
    start = time.monotonic()
    table = detection_table(seeds, examples, correct_examples)
    elapsed = time.monotonic() - start
    text = path.read_text() if path.exists() else ""
    begin, end = "<!-- detection-table:begin -->", "<!-- detection-table:end -->"
    block = (
        f"{begin}\n"
        f"Generated by `python property_tests/test_check_mutants.py --seeds {seeds}"
        f" --examples {examples}` ({elapsed:.0f} s on this machine).\n\n{table}\n{end}"
    )
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)
    return table


@pytest.mark.slow
def test_detection_table(tmp_path: Path) -> None:
    table = write_table(tmp_path / "testing.md", seeds=5, examples=200, correct_examples=100)
    for row in table.splitlines()[2:]:
        if "(correct)" in row:
            assert "flagged 0/" in row, row
        else:
            assert "| 5/5 |" in row, row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--correct-examples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "testing.md")
    args = parser.parse_args(argv)
    print(write_table(args.out, args.seeds, args.examples, args.correct_examples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
