"""``fp4sim.publish.console.progress_line``: one write per line, so processes sharing a pipe
(torchrun ranks, ``simulate --jobs`` workers) never interleave mid-line."""

from __future__ import annotations

import io
import sys

import pytest

from fp4sim.publish.console import progress_line


class _Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return super().write(s)


def test_one_write_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    progress_line("rank 1/2 [part 2/4] gaussian x attn-qat x kv head 1: 0.7 s")
    progress_line("second")
    assert stream.calls == ["rank 1/2 [part 2/4] gaussian x attn-qat x kv head 1: 0.7 s\n",
                            "second\n"]


def test_the_progress_loggers_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fp4sim.reports import runner as report_runner
    from fp4sim.simulate import cli as simulate_cli
    from fp4sim.simulate import runner as simulate_runner

    for log in (report_runner.log, simulate_runner._stderr_log, simulate_cli._log):
        stream = _Writes()
        monkeypatch.setattr(sys, "stderr", stream)
        log("a line")
        assert stream.calls == ["a line\n"], log
