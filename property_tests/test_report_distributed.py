"""The sharded report's head split (reports.head_parts, reports.distributed; issue 16).

A streamed scenario is computed per kv head (its exact part and each recipe's), in one
process or over torchrun's ranks; the merged report must equal the single-process one in
every number, and the streamed numbers must equal the dense path's to rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fp4sim.reports import distributed, head_parts, runner
from fp4sim.reports.scenarios import get_scenario

SEED = 0
U32 = 2.0**-24


def _pairs(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """Every (dense, streamed) comparison block of two cases."""
    pairs = [(a["forward"][k], b["forward"][k]) for k in ("o_vs_exact", "o_hp_vs_exact")]
    for variant, block in a["gradients"].items():
        for g in ("dq", "dk", "dv"):
            pairs += [(cmp, b["gradients"][variant][g][ref]) for ref, cmp in block[g].items()]
    return pairs


def test_head_parts_give_the_dense_numbers_to_rounding() -> None:
    """Multi-head (2 kv heads: 2 parts) and grouped-query (2 query heads on 1 kv head)
    scenarios, with and without an operand tensor scale (frozen at the whole tensor's value in
    every part): the streamed report's relative L2 and P-mass numbers equal the dense path's
    to float32 rounding, |x_stream - x_dense| <= 64 u (1 + x), u = 2^-24 (as
    test_reports.test_streamed_reference_gives_the_dense_numbers_to_rounding)."""
    scenarios = (get_scenario("gaussian"), get_scenario("causal-d128-Lq64-Lk256"))
    assert scenarios[0].spec.kv_heads == 2
    assert scenarios[1].spec.heads == 2 and scenarios[1].spec.kv_heads == 1
    base = dict(scenarios=scenarios, recipes=("attn-qat", "nvfp4-tensor-scale"),
                implementations=(runner.REFERENCE,), seed=SEED)
    dense = runner.compute(runner.ReportConfig(**base), progress=lambda _m: None)
    streamed = runner.compute(runner.ReportConfig(**base, stream_above=0),
                              progress=lambda _m: None)
    checked = 0
    for a, b in zip(dense.cases, streamed.cases, strict=True):
        assert a["status"] == b["status"] == "ok", b.get("error")
        for x, y in _pairs(a, b):
            xv, yv = x["metrics"]["relative_l2"], y["metrics"]["relative_l2"]
            assert abs(xv - yv) <= 64 * U32 * (1 + xv), (a["scenario"], a["recipe"], xv, yv)
            checked += 1
        for key in ("mass_kept_forward", "mass_kept_backward", "code_mismatch_rate"):
            pa, pb = a["diagnostics"]["p"][key], b["diagnostics"]["p"][key]
            assert abs(pa - pb) <= 64 * U32 * max(abs(pa), 1.0), (a["scenario"], key, pa, pb)
        # integer diagnostics (code histograms, flushed blocks) are exact
        ra = a["diagnostics"]["reference_diagnostics"]
        rb = b["diagnostics"]["reference_diagnostics"]
        for key, value in ra.items():
            if isinstance(value, int) or (isinstance(value, list) and key.endswith("histogram")):
                assert rb[key] == value, (a["scenario"], a["recipe"], key)
    assert checked > 100


def test_work_items_split_streamed_scenarios_by_kv_head() -> None:
    scenarios = (get_scenario("gaussian"), get_scenario("smoke"),
                 get_scenario("llm-L131072-decode"))
    config = runner.ReportConfig(scenarios=scenarios, recipes=("attn-qat", "bf16"),
                                 implementations=(runner.REFERENCE,), stream_above=1 << 14)
    streamed, work = distributed.work_items(config)
    # gaussian (2 x 128 x 128 scores) streams above 2^14, smoke (32 x 64) does not; the
    # production scenario always streams, and its one kv head is one part
    assert [u.scenario.name for u in streamed] == ["gaussian"] * 2 + ["llm-L131072-decode"] * 2
    units = [w for w in work if isinstance(w, runner.Unit)]
    parts = [w for w in work if isinstance(w, head_parts.HeadTask)]
    assert [u.scenario.name for u in units] == ["smoke", "smoke"]
    keys = [p.key for p in parts]
    assert keys[:6] == [("gaussian", None, 0), ("gaussian", None, 1),
                        ("gaussian", "attn-qat", 0), ("gaussian", "attn-qat", 1),
                        ("gaussian", "bf16", 0), ("gaussian", "bf16", 1)]
    assert keys[6:] == [("llm-L131072-decode", None, 0), ("llm-L131072-decode", "attn-qat", 0),
                        ("llm-L131072-decode", "bf16", 0)]
    shares = distributed.assign(work, 2)
    assert sorted(id(w) for s in shares for w in s) == sorted(id(w) for w in work)
    # without the (much larger) decode scenario, the two kv heads of one recipe's part go
    # to different ranks (equal costs alternate)
    config = runner.ReportConfig(scenarios=scenarios[:2], recipes=("attn-qat", "bf16"),
                                 implementations=(runner.REFERENCE,), stream_above=1 << 14)
    shares = distributed.assign(distributed.work_items(config)[1], 2)
    owner = {w.key: r for r, s in enumerate(shares) for w in s
             if isinstance(w, head_parts.HeadTask)}
    assert owner[("gaussian", "attn-qat", 0)] != owner[("gaussian", "attn-qat", 1)]


def _without_timing(case: dict) -> dict:
    return {k: v for k, v in case.items() if k != "seconds"}


def test_torchrun_head_split_report_equals_the_single_process_one(tmp_path) -> None:
    """`torchrun --standalone --nproc-per-node 2 -m fp4sim report` with every scenario
    streamed: the kv heads of the 2-kv-head `gaussian` case are computed on both ranks and
    merged by rank 0; report.json equals the single-process run's case by case (every
    number; an operand tensor scale recipe included, its scale frozen in each part)."""
    args = ["--scenarios", "gaussian", "smoke-causal", "--recipes", "attn-qat",
            "nvfp4-tensor-scale", "--stream-above", "0", "--seed", str(SEED)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one_proc = subprocess.run(
        [sys.executable, "-m", "fp4sim", "report", *args, "--out", str(single)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "fp4sim", "report", *args, "--out", str(sharded)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr + done.stdout
    for rank in (0, 1):  # the one case's heads went to both ranks
        assert any(line.startswith(f"rank {rank}/2 ") and "gaussian x attn-qat x kv head" in line
                   for line in log.splitlines()), log[-3000:]
    one = json.loads((single / "report.json").read_text())
    two = json.loads((sharded / "report.json").read_text())
    assert two["timing"]["ranks"] == 2
    assert len(one["cases"]) == len(two["cases"]) == 4
    for a, b in zip(one["cases"], two["cases"], strict=True):
        assert a["status"] == "ok", a.get("error")
        assert _without_timing(a) == _without_timing(b), (a["scenario"], a["recipe"])
    for key in ("ranking", "findings", "identities", "actions"):
        assert one["summary"][key] == two["summary"][key], key
    assert one["exit_code"] == two["exit_code"]
