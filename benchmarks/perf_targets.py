"""Issue 15's performance targets, judged from the GPU benchmarks' JSON files.

    python benchmarks/perf_targets.py --train DIR/attn_qat_bench.json --decode DIR/decode_bench.json

``--train`` is what ``gpu_attn_qat_bench.py`` writes, ``--decode`` what ``gpu_decode_bench.py
--prefill`` writes; either may be left out (its targets are then "not measured"). Prints one
row per target and shape: the measured ratio, the bound, and the verdict. Exit 0 when every
target was measured and met, 1 when any was missed or not measured, 2 on unreadable input.

Every ratio is taken inside one benchmark file (SDPA timed in the same process, as the issue
asks), never across files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

# Issue 15, "Targets": (method, timing) -> largest allowed ratio to SDPA in the same run.
TRAINING_TIME_BOUNDS: dict[tuple[str, str], float] = {
    ("bf16", "fwd_ms"): 1.15,
    ("bf16", "fwd_bwd_ms"): 1.15,
    ("attn-qat", "fwd_ms"): 2.2,
    ("attn-qat", "fwd_bwd_ms"): 1.8,
    ("attn-qat-consistent", "fwd_ms"): 2.8,
    ("attn-qat-consistent", "fwd_bwd_ms"): 2.0,
}
MEMORY_BOUND = 1.10  # issue 15: peak extra memory <= SDPA's + 10 %
PREFILL_BOUND = 2.5  # issue 15: FP4 prefill within 2.5x SDPA's forward
DECODE_MIN_SPEEDUP = 1.5  # issue 15: FP4 decode beats SDPA bf16 decode by >= 1.5x
FORMATS = ("nvfp4", "mxfp4")
TIMING_NAMES = {"fwd_ms": "forward", "fwd_bwd_ms": "forward+backward"}


@dataclass(frozen=True)
class Verdict:
    target: str
    case: str
    measured: float | None  # None: not in the file (skipped by a budget, or failed)
    bound: float | None  # None: a whole file is missing
    at_most: bool  # True: measured <= bound meets the target; False: measured >= bound
    wrong: bool = False  # timed, but the benchmark's own correctness check failed

    @property
    def status(self) -> str:
        if self.wrong:
            return "WRONG RESULT"
        if self.measured is None or self.bound is None:
            return "not measured"
        ok = self.measured <= self.bound if self.at_most else self.measured >= self.bound
        return "met" if ok else "MISSED"


def _shape(row: dict) -> str:
    return str(tuple(row["shape"]))


def training_verdicts(train: dict) -> list[Verdict]:
    """Time and memory ratios of each recipe to SDPA, per shape of the training benchmark."""
    rows = train.get("rows", [])
    sdpa = {_shape(r): r for r in rows if r["method"] == "sdpa"}
    by_key = {(r["method"], _shape(r)): r for r in rows}
    shapes = list(dict.fromkeys(_shape(r) for r in rows))
    out = []
    for shape in shapes:
        base = sdpa.get(shape)
        for (method, timing), bound in TRAINING_TIME_BOUNDS.items():
            row = by_key.get((method, shape))
            ratio = None
            if base is not None and row is not None and base[timing] > 0:
                ratio = row[timing] / base[timing]
            out.append(Verdict(f"{method} {TIMING_NAMES[timing]} / SDPA", shape, ratio, bound,
                               True))
        for method in dict.fromkeys(m for m, _ in TRAINING_TIME_BOUNDS):
            row = by_key.get((method, shape))
            ratio = None
            if base is not None and row is not None and base["peak_mib"] > 0:
                ratio = row["peak_mib"] / base["peak_mib"]
            out.append(Verdict(f"{method} peak extra memory / SDPA's", shape, ratio,
                               MEMORY_BOUND, True))
    return out


def decode_verdicts(decode: dict) -> list[Verdict]:
    """Decode speed-ups (each case, each format) and the default prefill path's ratio."""
    out = []
    for case in decode.get("cases", []):
        b, hq, hkv, lq, lk = case["shape"][:5]
        label = f"B={b}, Hq/Hkv={hq}/{hkv}, Lq={lq}, Lk={lk}" + (", causal" if case.get("causal")
                                                                else "")
        for fmt in FORMATS:
            res = case.get(fmt)
            # the kernel's defaults, what a user gets; files from before 2026-12-03 15:40 have
            # only the best configuration of the sweep, which is then judged and named
            which = "defaults"
            if isinstance(res, dict) and isinstance(res.get("default"), dict):
                res = res["default"]
            elif isinstance(res, dict):
                which = "best of the sweep"
            timed = isinstance(res, dict) and bool(res.get("ms"))
            out.append(Verdict(f"{fmt} decode speed-up over SDPA ({which})", label,
                               res["speedup_vs_sdpa"] if timed else None, DECODE_MIN_SPEEDUP,
                               False, wrong=timed and not res.get("ok", False)))
    for row in decode.get("prefill", []):
        for fmt in FORMATS:
            # the default path of fp4_inference_attention, which is what a user calls
            out.append(Verdict(f"{fmt} prefill (fp4_inference_attention) / SDPA forward",
                               _shape(row), row.get(f"{fmt}_inference_x_sdpa"), PREFILL_BOUND,
                               True))
    return out


def render(verdicts: list[Verdict], sources: list[str]) -> str:
    lines = [*sources, "", "| target | case | measured | bound | verdict |",
             "|---|---|---|---|---|"]
    for v in verdicts:
        m = "-" if v.measured is None else f"{v.measured:.2f}x"
        b = "-" if v.bound is None else f"{'<=' if v.at_most else '>='} {v.bound:.2f}x"
        lines.append(f"| {v.target} | {v.case} | {m} | {b} | {v.status} |")
    counts = {s: sum(v.status == s for v in verdicts)
              for s in ("met", "MISSED", "WRONG RESULT", "not measured")}
    lines += ["", f"{counts['met']} met, {counts['MISSED']} missed, {counts['WRONG RESULT']} "
                  f"with a wrong result, {counts['not measured']} not measured, of {len(verdicts)}"]
    return "\n".join(lines)


def _load(path: str) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", help="attn_qat_bench.json of gpu_attn_qat_bench.py")
    parser.add_argument("--decode", help="decode_bench.json of gpu_decode_bench.py --prefill")
    args = parser.parse_args(argv)
    verdicts, sources = [], []
    try:
        train = _load(args.train) if args.train else None
        decode = _load(args.decode) if args.decode else None
        if train is not None:
            verdicts += training_verdicts(train)
            sources.append(f"training: {train.get('card')}, {train.get('date')}")
        else:
            verdicts.append(Verdict("training targets (no --train file)", "-", None, None, True))
        if decode is not None:
            verdicts += decode_verdicts(decode)
            sources.append(f"decode/prefill: {decode.get('device')}, {decode.get('date_utc')}")
        else:
            verdicts.append(Verdict("decode and prefill targets (no --decode file)", "-", None,
                                    None, True))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"perf_targets: cannot read the benchmark files: {exc}", file=sys.stderr)
        return 2
    print(render(verdicts, sources))
    return 0 if all(v.status == "met" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
