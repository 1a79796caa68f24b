"""The differential-diagnosis table of issue 13 for BENCHMARKS.md: for each blind mutant
(property_tests/blind_mutants/catalog.py; attention and quantizer), whether `fp4sim check`
catches it, the examples it needed, the top hypothesis it names beside the catalog's defect
sentence, and whether that hypothesis is the real defect; then the false-alarm rate on correct
kernels and references.

    python property_tests/diagnosis_table.py --seeds 5 [--examples 100] [--only NAME,...]

"Real defect" is judged by reading the catalog's sentence: JUDGED maps each mutant to the
hypothesis ids (fp4sim.judge.diagnosis) that state that defect; the table prints both
sentences side by side so a reader can check the judgement.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from property_tests import mutant_kernels  # noqa: E402
from property_tests.blind_mutants import catalog  # noqa: E402
from property_tests.test_check_mutants import run_check  # noqa: E402

# mutant -> hypothesis ids that name its defect (my reading of the catalog's sentence)
JUDGED: dict[str, tuple[str, ...]] = {
    "mut_VBlockedAlongKeys": ("granularity:v:axis",),
    "mut_KBlock32": ("granularity:k:block32",),
    "mut_PBwdBlockedAlongQueries": ("granularity:p_for_dv:axis", "granularity:p:axis:bwd_only"),
    "mut_PFwdBlock32": ("granularity:p:block32:fwd_only",),
    "mut_PScaleRoundUp": ("scale:p:e4m3_up",),
    "mut_KScaleTruncated": ("scale:k:e4m3_down",),
    "mut_PScaleLowerClamp": ("scale:p:lower_clamp",),
    "mut_VTensorScale": ("scale:v:tensor_scale",),
    "mut_QDataDivide": ("scale:q:divide",),
    "mut_VUnquantizedFwd": ("which:v:none:fwd_only",),
    "mut_BwdScoresFromRawQK": ("which:s_bwd:none",),
    "mut_BwdDpRawV": ("which:v_for_dp:none", "which:v:none:bwd_only"),
    "mut_BwdDqRawK": ("which:k_for_dq:none",),
    "mut_PUnquantizedFwd": ("which:p:none:fwd_only",),
    "mut_LFromQuantizedP": ("p_flow:l_from:tilde",),
    "mut_DFromFp4O": ("p_flow:d_from:o",),
    # the backward's P~ feeds only dV: an unquantized backward P is the same defect
    "mut_DvFromHighPrecisionP": ("p_flow:dv_from:hp", "which:p:none:bwd_only"),
    "mut_DsFromQuantizedP": ("p_flow:ds_from:tilde",),
    "mut_BwdPQuantizedBeforeNormalizing": ("running_max:p_max:final:bwd_only",),
    "mut_CausalTopLeft": ("mask:top_left",),
    "mut_BwdNoCausalMask": ("mask:flip:bwd_only",),
    "mut_CausalExcludesDiagonal": ("mask:offset-1",),
    "mut_GqaModulo": ("gqa:modulo",),
    "mut_GqaMeanReduce": ("gqa:dkv_mean",),
    "mut_GqaBwdModulo": ("gqa:modulo:bwd_only",),
    "mut_DqMissingSmScale": ("factor:dq_mult:missing_sm_scale",),
    "mut_DkDoubleSmScale": ("factor:dk_mult:double_sm_scale",),
    "mut_IgnoresSmScale": ("factor:s:ignored_sm_scale",),
    "mut_LseBase2": ("factor:lse:base2",),
    "mut_AccNotRescaled": ("running_max:no_acc_rescale",),
    "mut_AccHpNotRescaled": ("running_max:no_acc_hp_rescale",),
    "mut_PAgainstFinalMax": ("running_max:p_max:final:fwd_only",),
    "mut_TailKeysUnmasked": ("tail:softmax:64",),
    "mut_TailPBlockUnquantized": ("tail:p_unquantized",),
    "mut_BwdDropsTailTile": ("tail:bwd_drops_tile",),
    "mut_PBf16BeforeQuant": ("rounding:round_p:bfloat16",),
    "mut_ScoresFp16": ("rounding:round_s:float16",),
    "mut_OhpSavedBf16": ("rounding:round_o_hp:bfloat16",),
    "mut_AccBf16": ("rounding:round_acc:bfloat16",),
    # NaN codes are a convention (compared by value): these two are then the same defect,
    # "a NaN does not make its block's scale NaN"
    "q_nvfp4_nan_to_zero": ("nan:to_zero", "nan:ignored_in_amax"),
    "q_nvfp4_flushed_block_codes": ("zero_scale:other",),
    "q_nvfp4_negative_zero_lost": ("neg_zero:positive",),
    "q_nvfp4_ties_away": ("ties:away", "ties:away_add_half"),
    "q_nvfp4_bf16_double_rounding": ("double:bf16",),
    "q_nvfp4_nibble_swap": ("nibbles:swapped",),
    "q_nvfp4_scale_round_up": ("scale:e4m3_up",),
    "q_nvfp4_scale_not_saturated": ("scale:no_upper_clamp",),
    "q_nvfp4_scale_times_reciprocal": ("scale:amax_op",),
    "q_nvfp4_data_divide": ("scale:op",),
    "q_nvfp4_scale_bf16": ("scale:amax_bf16",),
    "q_mxfp4_floor_scale": ("scale:mx_floor",),
    "q_mxfp4_nan_ignored_in_amax": ("nan:ignored_in_amax", "nan:to_zero"),
    "q_mxfp4_block16": ("block:16",),
}

# settings a mutant's family needs to show at all (the check's options a user would pass)
FAMILY_ARGS: dict[str, tuple[str, ...]] = {"masking": ("--causal",)}
FAMILY_OVERRIDES: dict[str, dict[str, object]] = {
    # several 64-key tiles: the running max and the rescaling only act across tiles
    "rescaling": {"max_len": 160, "max_kv_heads": 1, "max_group": 1},
    "tail_blocks": {"max_len": 100},
}
_HYP = re.compile(r"\[(?:hypothesis )?([\w:+.\-]+)[;:]")


def top_hypothesis(causes: list[str]) -> tuple[str | None, str]:
    """(hypothesis id, sentence) of the named cause, or (None, the first line)."""
    if not causes:
        return None, "(no cause line)"
    first = causes[0]
    if first.startswith("no known hypothesis") or first.startswith("no diagnosis"):
        return None, first
    found = _HYP.search(first)
    return (found.group(1) if found else None), first.split(" [")[0]


def run_mutant(entry: dict, seed: int, examples: int) -> dict:
    kind = entry["kind"]
    target = entry.get("recipe") or entry.get("format")
    family = entry.get("family", "")
    extra = FAMILY_ARGS.get(family, ())
    overrides = FAMILY_OVERRIDES.get(family)
    start = time.monotonic()
    result = run_check(kind, entry["target"], target, extra, examples=examples, seed=seed,
                       fast=True, overrides=overrides)
    hyp, text = top_hypothesis(result.causes)
    return {
        "caught": not result.ok,
        "needed": result.first_failure_at,
        "hyp": hyp,
        "text": text,
        "right": hyp is not None and hyp in JUDGED.get(entry["name"], ()),
        "seconds": time.monotonic() - start,
    }


def table(seeds: int, examples: int, only: list[str] | None) -> str:
    lines = [
        "| mutant | kind | caught | examples to catch (median / max) | top hypothesis named"
        " (seed 0) | catalog defect | real defect named |",
        "|---|---|---|---|---|---|---|",
    ]
    named_total = caught_total = n = 0
    for entry in catalog.entries():
        if entry["kind"] not in ("attention", "quantizer"):
            continue
        if only and entry["name"] not in only:
            continue
        runs = [run_mutant(entry, seed, examples) for seed in range(seeds)]
        caught = [r for r in runs if r["caught"]]
        right = sum(r["right"] for r in caught)
        needed = [r["needed"] for r in caught if r["needed"] is not None]
        spread = f"{statistics.median(needed):g} / {max(needed)}" if needed else "-"
        first = caught[0] if caught else runs[0]
        named = f"{first['text']} [{first['hyp'] or '-'}]" if first["caught"] else "-"
        lines.append(
            f"| {entry['name']} | {entry['kind']} | {len(caught)}/{seeds} | {spread} | "
            f"{named} | {entry['defect']} | {right}/{len(caught) or seeds} |"
        )
        n += 1
        caught_total += bool(caught)
        named_total += bool(caught) and right == len(caught)
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append("")
    lines.append(f"Caught: {caught_total}/{n}; real defect named on every seed that caught it:"
                 f" {named_total}/{n}.")
    return "\n".join(lines)


def false_alarms(seeds: int, examples: int) -> str:
    rows = ["| correct kernel or reference | kind | flagged | given a cause |", "|---|---|---|---|"]
    correct = [(e["name"], e["kind"], e["target"], e.get("recipe") or e.get("format"), ())
               for e in catalog.FAITHFUL]
    correct += [(name, kind, target, what, extra)
                for name, (kind, target, what, extra) in mutant_kernels.CORRECT.items()]
    for name, kind, target, what, extra in correct:
        flagged = caused = 0
        for seed in range(seeds):
            result = run_check(kind, target, what, tuple(extra), examples=examples, seed=seed,
                               fast=True)
            flagged += not result.ok
            caused += bool(result.causes)
        rows.append(f"| {name} | {kind} | {flagged}/{seeds} | {caused}/{seeds} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--correct-examples", type=int, default=20)
    parser.add_argument("--only", default=None, help="comma-separated mutant names")
    parser.add_argument("--no-false-alarms", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.examples < 1:
        print("--seeds and --examples must be >= 1", file=sys.stderr)
        return 2
    start = time.monotonic()
    only = args.only.split(",") if args.only else None
    print(table(args.seeds, args.examples, only))
    if not args.no_false_alarms:
        print()
        print(false_alarms(args.seeds, args.correct_examples))
    print(f"\n({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
