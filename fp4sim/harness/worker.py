"""``KernelWorker``: user kernels run in a child process, so that a hang or a hard crash
becomes one case's failure ("timed out after 30 s", "crashed with signal 11 (SIGSEGV)")
instead of hanging or killing the suite. The child is restarted on the next call.

Costs (measured, see the README): one start per worker and per restart (a Python
interpreter importing torch and the kernel), and per call one pickled round trip of the
inputs and outputs over a pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fp4sim.harness.spec import KernelSpec, UsageError

__all__ = ["KernelCallResult", "KernelWorker", "describe_exit"]

# Importing torch and the user's module (and, on a GPU, creating the CUDA context) can take
# far longer than one call on a busy machine: the load gets at least this long.
_MIN_LOAD_TIMEOUT = 120.0


@dataclass
class KernelCallResult:
    """One call of the kernel in the worker.

    ``outputs``: float64 copies ("O", and "dQ", "dK", "dV" with the backward; "packed",
    "scales", "tensor_scale" for a quantizer, as returned). ``error``: the kernel raised
    (or returned something unusable). ``failure``: the worker timed out or crashed (it was
    restarted). ``info``: name -> (dtype, device, shape) of each returned tensor.
    """

    outputs: dict[str, Any] | None = None
    out_dtype: str | None = None
    error: str | None = None
    failure: str | None = None
    info: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)
    bad_output: bool = False
    exc_type: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.failure is None

    @property
    def problem(self) -> str | None:
        """The failure or error line, or None."""
        return self.failure or self.error


def describe_exit(returncode: int | None) -> str:
    """'crashed with signal 11 (SIGSEGV)' or 'exited with code 3'."""
    if returncode is None:
        return "stopped responding"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"crashed with signal {-returncode} ({name})"
    return f"exited with code {returncode}"


class KernelWorker:
    """A child process that imports ``target`` once and runs calls on it with a time limit.

    ``kind`` is "attention" (``fn(q, k, v, causal, sm_scale)``, capabilities from
    ``fp4sim_spec`` and ``spec_overrides``) or "quantizer" (``fn(x)``). Construction loads
    the kernel in the child and raises ``UsageError`` when it cannot be loaded.
    """

    def __init__(
        self,
        target: str,
        *,
        spec_overrides: Mapping[str, Any] | None = None,
        timeout: float = 300.0,
        device: str = "cpu",
        kind: str = "attention",
    ) -> None:
        if kind not in ("attention", "quantizer"):
            raise ValueError(f"kind must be 'attention' or 'quantizer', got {kind!r}")
        if not timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {timeout}")
        self.target = target
        self.kind = kind
        self.timeout = float(timeout)
        self.device = device
        self.spec_overrides = dict(spec_overrides or {})
        self.spec: KernelSpec | None = None
        self.starts = 0
        self.start_seconds: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._start()

    # -- process management -------------------------------------------------------------

    def _start(self) -> None:
        t0 = time.perf_counter()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fp4sim.harness._child", str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w),
                stdin=subprocess.DEVNULL,
                cwd=os.getcwd(),
                start_new_session=True,  # a kill reaches the kernel's own children too
            )
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._send = Connection(req_w, readable=False)
        self._recv = Connection(rep_r, writable=False)
        self.starts += 1
        self._send.send({
            "target": self.target,
            "kind": self.kind,
            "overrides": self.spec_overrides,
            "sys_path": [p for p in sys.path if p],
        })
        load_timeout = max(self.timeout, _MIN_LOAD_TIMEOUT)
        reply = self._receive(load_timeout)
        if isinstance(reply, str):
            self._kill()
            raise UsageError(f"loading {self.target} {reply}")
        if "usage" in reply:
            self._kill()
            raise UsageError(reply["usage"])
        if reply.get("spec") is not None:
            self.spec = KernelSpec(**reply["spec"])
        self.start_seconds.append(time.perf_counter() - t0)

    def _receive(self, timeout: float) -> dict[str, Any] | str:
        """The child's reply, or a failure line after which the child is gone."""
        assert self._recv is not None and self._proc is not None
        try:
            ready = self._recv.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self._kill()
            return f"timed out after {timeout:g} s"
        try:
            return self._recv.recv()
        except (EOFError, OSError):
            try:
                returncode = self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                returncode = None
            self._kill()
            return describe_exit(returncode)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the kernel's children too
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _call(self, message: dict[str, Any]) -> KernelCallResult:
        t0 = time.perf_counter()
        if self._proc is None:
            try:
                self._start()
            except UsageError as err:
                return KernelCallResult(failure=f"could not restart the worker: {err}")
        assert self._send is not None
        try:
            self._send.send(message)
        except (BrokenPipeError, OSError):
            reply: dict[str, Any] | str = "worker died before the call"
            self._kill()
        else:
            reply = self._receive(self.timeout)
        seconds = time.perf_counter() - t0
        if isinstance(reply, str):
            return KernelCallResult(failure=reply, seconds=seconds)
        if reply.get("fatal"):  # CUDA context poisoned: the child exits, start afresh next time
            self._kill()
            return KernelCallResult(failure=f"crashed: {reply['error']}", seconds=seconds,
                                    exc_type=reply.get("exc_type"),
                                    traceback=reply.get("traceback"))
        info = reply.get("info") or {}
        first = "O" if self.kind == "attention" else "packed"
        return KernelCallResult(
            outputs=reply.get("outputs"),
            out_dtype=info[first][0] if first in info else None,
            error=reply.get("error"),
            info=info,
            bad_output=bool(reply.get("bad_output")),
            exc_type=reply.get("exc_type"),
            traceback=reply.get("traceback"),
            seconds=seconds,
        )

    # -- calls -------------------------------------------------------------------------------

    def attention(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray | None, *,
        causal: bool, sm_scale: float | None, dtype: str, backward: bool,
    ) -> KernelCallResult:
        """Call the attention kernel on BHLD float32 arrays cast to ``dtype`` (on the
        worker's device); with ``backward``, also dQ, dK, dV for the output gradient ``do``."""
        if self.kind != "attention":
            raise TypeError("this worker holds a quantizer")
        if backward and do is None:
            raise ValueError("backward needs do")
        return self._call({
            "op": "attention", "q": np.asarray(q, np.float32), "k": np.asarray(k, np.float32),
            "v": np.asarray(v, np.float32),
            "do": None if do is None else np.asarray(do, np.float32),
            "causal": bool(causal), "sm_scale": sm_scale, "dtype": dtype,
            "backward": bool(backward), "device": self.device,
        })

    def quantize(self, x: np.ndarray, *, dtype: str, input_type: str) -> KernelCallResult:
        """Call the quantizer on ``x`` as a torch tensor of ``dtype`` (``input_type``
        "torch") or a float32 NumPy array ("numpy"); outputs: packed, scales, tensor_scale."""
        if self.kind != "quantizer":
            raise TypeError("this worker holds an attention kernel")
        return self._call({
            "op": "quantize", "x": np.asarray(x, np.float32), "dtype": dtype,
            "input_type": input_type, "device": self.device,
        })

    def close(self) -> None:
        """Stop the child (politely, then by force)."""
        if self._proc is None:
            return
        try:
            assert self._send is not None
            self._send.send({"op": "close"})
            self._proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired, AssertionError):
            pass
        self._kill()

    def __enter__(self) -> KernelWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up with
            pass
