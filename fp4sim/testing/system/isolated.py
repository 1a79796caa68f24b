"""The system properties of a kernel named ``MODULE:ATTR``, run in a child process (as
``fp4sim check`` runs kernels): a hang or a hard crash becomes the failing verdict of the
property that was running, and the child restarts for the remaining properties.

The child (``python -m fp4sim.testing.system.isolated JSON``) prints one JSON line when a
property starts and one with its verdict.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fp4sim.harness import describe_exit, load_attention_kernel, load_kernel
from fp4sim.testing.system import ATTENTION_PROPERTIES, QUANTIZER_PROPERTIES, run_system_properties
from fp4sim.testing.system.verdict import Verdict, format_verdicts

__all__ = ["check_after_recipe", "property_names", "run_isolated"]


def property_names(quantizer: bool) -> list[str]:
    return list(QUANTIZER_PROPERTIES if quantizer else ATTENTION_PROPERTIES)


def _probe_input_type(kernel: Callable[..., Any], fmt: str, device: str) -> str:
    """torch first, then NumPy (on the CPU), as ``check quantizer`` probes."""
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    try:
        kernel(torch.from_numpy(x).to(device))
        return "torch"
    except Exception:
        if device != "cpu":
            return "torch"
    return "numpy"


def _child(job: dict[str, Any]) -> int:
    if job["quantizer"]:
        kernel: Any = load_kernel(job["kernel"], 1)
        spec = None
        input_type = job.get("input_type") or "auto"
        if input_type == "auto":
            input_type = _probe_input_type(kernel, job["recipe"], job["device"])
    else:
        kernel = load_attention_kernel(job["kernel"], job.get("overrides") or {})
        spec, input_type = kernel.spec, "torch"
    for name in job["only"]:
        print(json.dumps({"start": name}), flush=True)
        (verdict,) = run_system_properties(
            kernel, spec, recipe=job["recipe"], device=job["device"], seed=job["seed"],
            quantizer=job["quantizer"], input_type=input_type, only=[name],
        )
        print(json.dumps({"verdict": verdict.to_json()}), flush=True)
    return 0


def run_isolated(
    kernel: str,
    *,
    recipe: str,
    device: str = "cpu",
    seed: int = 0,
    quantizer: bool = False,
    overrides: dict[str, Any] | None = None,
    input_type: str = "auto",
    timeout: float = 300.0,
    only: list[str] | None = None,
) -> list[Verdict]:
    """Run every property (or those in ``only``) in a child process; ``timeout`` bounds
    each property."""
    todo = [n for n in property_names(quantizer) if only is None or n in only]
    verdicts: list[Verdict] = []
    while todo:
        job = {"kernel": kernel, "recipe": recipe, "device": device, "seed": seed,
               "quantizer": quantizer, "overrides": overrides or {}, "input_type": input_type,
               "only": todo}
        done, stopped, started = _one_child(job, timeout)
        verdicts += done
        todo = todo[len(done):]
        if not todo:
            break
        if not started:  # the kernel did not even load: one line, no restarts
            why = "timed out" if stopped is None else f"{describe_exit(stopped[0])}: {stopped[1]}"
            verdicts.append(Verdict("system properties", "fail", f"could not load {kernel} in a"
                                    f" child process ({why})"))
            break
        name = todo.pop(0)
        if stopped is None:
            cause = f"kernel timed out after {timeout:g} s during this property"
        else:
            cause = f"kernel {describe_exit(stopped[0])} during this property"
            if stopped[1]:
                cause += f": {stopped[1]}"
        verdicts.append(Verdict(name, "fail", cause))
    return verdicts


def _one_child(job: dict[str, Any], timeout: float
               ) -> tuple[list[Verdict], tuple[int | None, str] | None, bool]:
    """Verdicts until the child ends; then (exit code, last stderr line), or None when it
    was killed for running past ``timeout``; and whether any property started."""
    cmd = [sys.executable, "-m", "fp4sim.testing.system.isolated", json.dumps(job)]
    with tempfile.TemporaryFile("w+") as errfile:  # a file: a chatty child cannot block
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True,
                              cwd=os.getcwd()) as proc:  # closes the pipe, waits
            done, killed, started = _read_child(proc, timeout)
        errfile.seek(0)
        err_lines = [ln for ln in errfile.read().splitlines() if ln.strip()]
    if killed:
        return done, None, started
    if proc.returncode == 0 and len(done) == len(job["only"]):
        return done, None, started
    return done, (proc.returncode, err_lines[-1][:200] if err_lines else ""), started


def _read_child(proc: Any, timeout: float) -> tuple[list[Verdict], bool, bool]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        return _read_lines(proc, sel, timeout)


def _read_lines(proc: Any, sel: Any, timeout: float) -> tuple[list[Verdict], bool, bool]:
    started = False
    done: list[Verdict] = []
    # loading torch and the kernel may take a while on a busy machine: at least 120 s
    deadline = time.monotonic() + max(timeout, 120.0)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(timeout=left):
            proc.kill()
            proc.wait()
            return done, True, started
        line = proc.stdout.readline()
        if not line:
            break
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # the kernel's own prints
        if "start" in msg:
            started = True
            deadline = time.monotonic() + timeout
        elif "verdict" in msg:
            v = msg["verdict"]
            done.append(Verdict(v["name"], v["status"], v["cause"], v["numbers"], v["seconds"]))
    proc.wait()
    return done, False, started


def check_after_recipe(config: Any, target: str, code: int) -> int:
    """``fp4sim check``'s second half: print the system properties' verdict lines after the
    recipe check's output; the exit code becomes 1 when a property fails."""
    quantizer = target == "quantizer"
    start = time.perf_counter()
    verdicts = run_isolated(
        config.kernel,
        recipe=config.fmt if quantizer else config.recipe,
        device=config.device,
        seed=config.seed,
        quantizer=quantizer,
        overrides=None if quantizer else dict(getattr(config, "kernel_overrides", {}) or {}),
        input_type=getattr(config, "input_type", "auto"),
        timeout=float(getattr(config, "timeout", 300.0)),
    )

    took = time.perf_counter() - start
    print(format_verdicts(verdicts, title=f"fp4sim check {target}: system properties"
                          f" ({took:.1f} s with the child process)"))
    return 1 if any(v.status == "fail" for v in verdicts) else code


if __name__ == "__main__":
    raise SystemExit(_child(json.loads(sys.argv[1])))
