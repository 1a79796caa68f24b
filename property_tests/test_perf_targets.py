"""``benchmarks/perf_targets.py``: issue 15's targets judged from benchmark JSON (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "perf_targets.py"
_SPEC = importlib.util.spec_from_file_location("perf_targets", _PATH)
perf_targets = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("perf_targets", perf_targets)  # dataclasses look their module up there
_SPEC.loader.exec_module(perf_targets)

SHAPE = [2, 16, 4096, 128]


def _row(method: str, fwd: float, fwd_bwd: float, peak: float) -> dict:
    return {"method": method, "shape": SHAPE, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
            "peak_mib": peak}


def _train(scale: float = 1.0) -> dict:
    """Every recipe exactly at its bounds when scale is 1 (time and memory)."""
    bounds = perf_targets.TRAINING_TIME_BOUNDS
    rows = [_row("sdpa", 1.0, 2.0, 100.0)]
    for method in ("bf16", "attn-qat", "attn-qat-consistent"):
        rows.append(_row(method, bounds[(method, "fwd_ms")] * scale,
                         2.0 * bounds[(method, "fwd_bwd_ms")] * scale,
                         100.0 * perf_targets.MEMORY_BOUND * scale))
    return {"card": "test card", "date": "today", "rows": rows}


def _decode(speedup: float, ok: bool = True, prefill: float = 2.5) -> dict:
    result = {"ms": 1.0, "speedup_vs_sdpa": speedup, "ok": ok}
    return {"device": "test card", "date_utc": "today",
            "cases": [{"shape": [1, 8, 1, 1, 8192, 128], "causal": False,
                       "nvfp4": dict(result), "mxfp4": dict(result)}],
            "prefill": [{"shape": SHAPE, "nvfp4_inference_x_sdpa": prefill,
                         "mxfp4_inference_x_sdpa": prefill}]}


def test_bounds_are_inclusive_and_a_little_over_misses() -> None:
    at = perf_targets.training_verdicts(_train(1.0))
    assert at and {v.status for v in at} == {"met"}
    over = perf_targets.training_verdicts(_train(1.001))
    assert {v.status for v in over} == {"MISSED"}
    assert {v.status for v in perf_targets.decode_verdicts(_decode(1.5))} == {"met"}
    low = perf_targets.decode_verdicts(_decode(1.49, prefill=2.51))
    assert {v.status for v in low} == {"MISSED"}


def test_a_missing_row_is_not_measured_and_a_wrong_result_is_not_met() -> None:
    train = _train(1.0)
    train["rows"] = [r for r in train["rows"] if r["method"] != "attn-qat"]
    statuses = {v.target: v.status for v in perf_targets.training_verdicts(train)}
    assert statuses["attn-qat forward / SDPA"] == "not measured"
    assert statuses["bf16 forward / SDPA"] == "met"
    wrong = perf_targets.decode_verdicts(_decode(9.0, ok=False))
    assert {v.status for v in wrong if "decode" in v.target} == {"WRONG RESULT"}


def test_decode_is_judged_on_the_defaults_when_the_file_has_them() -> None:
    """A sweep's best configuration may not be what the kernel does by default: the default
    call's speed-up decides, and the target names which one was judged."""
    decode = _decode(2.0)
    decode["cases"][0]["nvfp4"]["default"] = {"ms": 2.0, "speedup_vs_sdpa": 1.2, "ok": True}
    verdicts = {v.target: v for v in perf_targets.decode_verdicts(decode)
                if "decode" in v.target}
    assert verdicts["nvfp4 decode speed-up over SDPA (defaults)"].status == "MISSED"
    assert verdicts["mxfp4 decode speed-up over SDPA (best of the sweep)"].status == "met"
    decode["cases"][0]["nvfp4"]["default"]["ok"] = False
    wrong = [v for v in perf_targets.decode_verdicts(decode) if "(defaults)" in v.target]
    assert [v.status for v in wrong] == ["WRONG RESULT"]


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train, decode = tmp_path / "t.json", tmp_path / "d.json"
    train.write_text(json.dumps(_train(1.0)))
    decode.write_text(json.dumps(_decode(2.0)))
    assert perf_targets.main(["--train", str(train), "--decode", str(decode)]) == 0
    assert "0 missed" in capsys.readouterr().out
    # a file left out: its targets are not measured, so not every target is met
    assert perf_targets.main(["--train", str(train)]) == 1
    decode.write_text(json.dumps(_decode(1.0)))
    assert perf_targets.main(["--train", str(train), "--decode", str(decode)]) == 1
    decode.write_text("[1, 2]")
    assert perf_targets.main(["--train", str(train), "--decode", str(decode)]) == 2
    assert perf_targets.main(["--train", str(tmp_path / "missing.json")]) == 2


def _load_issue15():
    path = _PATH.parent / "gpu_issue15.py"
    spec = importlib.util.spec_from_file_location("gpu_issue15", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("train_rc, decode_rc, speedup, write_decode, want", [
    (0, 0, 2.0, True, 0),  # both ran, every target met
    (0, 0, 1.0, True, 1),  # both ran, decode targets missed
    (0, 1, 2.0, True, 2),  # the decode benchmark failed a correctness check
    (0, 0, 2.0, False, 2),  # the decode benchmark wrote no JSON
    (1, 0, 2.0, True, 2),  # the training benchmark failed
])
def test_issue15_runs_both_benchmarks_then_judges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_rc: int, decode_rc: int,
    speedup: float, write_decode: bool, want: int,
) -> None:
    """``gpu_issue15.py``: the training and the decode benchmark into one folder (decode with
    ``--prefill``), then perf_targets on both files; 2 when a benchmark failed."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    issue15 = _load_issue15()
    calls = []

    def fake_train(argv: list[str]) -> int:
        calls.append(("train", argv))
        (Path(argv[argv.index("--out") + 1]) / "attn_qat_bench.json").write_text(
            json.dumps(_train(1.0)))
        return train_rc

    def fake_decode(argv: list[str]) -> int:
        calls.append(("decode", argv))
        if write_decode:
            (Path(argv[argv.index("--out") + 1]) / "decode_bench.json").write_text(
                json.dumps(_decode(speedup)))
        return decode_rc

    monkeypatch.setattr(issue15.gpu_attn_qat_bench, "main", fake_train)
    monkeypatch.setattr(issue15.gpu_decode_bench, "main", fake_decode)
    rc = issue15.main(["--out", str(tmp_path), "--decode-args", "--budget-s 100"])
    assert rc == want
    assert [c[0] for c in calls] == ["train", "decode"]
    assert calls[0][1] == ["--out", str(tmp_path), "--methods", issue15.TRAIN_METHODS]
    assert calls[1][1] == ["--out", str(tmp_path), "--prefill", "--budget-s", "100"]


def test_training_bench_times_fastvideo_through_the_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``gpu_attn_qat_bench.py``'s ``fastvideo`` method: the adapter's call, non-causal, at the
    default tau (what issue 15's table timed); the script drops the method with a note when
    FastVideo's package is not importable (its ``main`` checks ``FASTVIDEO_PACKAGE``)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    bench = _load_issue15().gpu_attn_qat_bench
    from fp4sim.adapters import fastvideo_attn_qat_train as adapter

    seen = []
    monkeypatch.setattr(adapter, "attention", lambda q, k, v, causal, tau: seen.append(
        (q.shape, causal, tau)) or q)
    q = torch.zeros(1, 2, 8, 64)
    assert bench._fn("fastvideo", None)(q, q, q) is q
    assert seen == [(q.shape, False, 0.125)]
    assert bench.FASTVIDEO_PACKAGE == adapter.KERNEL_MODULE.split(".")[0]
