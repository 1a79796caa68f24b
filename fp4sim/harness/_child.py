"""The worker process of ``KernelWorker``: imports the user's kernel once, then serves calls.

Run as ``python -m fp4sim.harness._child READ_FD WRITE_FD``; messages are pickled dicts on
two pipes (``multiprocessing.connection``), so the kernel's own prints on stdout/stderr
never mix with them.
"""

from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fp4sim.harness.loader import load_attention_kernel, load_kernel
from fp4sim.harness.spec import UsageError

# Phrases of unrecoverable GPU failures: the CUDA context is poisoned after them, so the
# worker is replaced (torch raises these as RuntimeError / AcceleratorError).
_CUDA_FATAL = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
               "cudaErrorLaunchFailure", "CUDA driver error")


def _numpy_out(x: Any, *, raw_bytes: bool) -> Any:
    """A picklable NumPy copy of a kernel output (1-byte dtypes as uint8 bytes)."""
    if x is None or isinstance(x, int | float):
        return x
    if type(x).__module__.startswith("torch"):
        # lazy: torch is optional: the harness loads with NumPy alone
        import torch

        t = x.detach().to("cpu")
        if raw_bytes and t.element_size() == 1:
            return t.contiguous().view(torch.uint8).numpy().copy()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy().copy()
    return np.array(x, copy=True)


def _dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _attention(kernel: Any, msg: dict[str, Any]) -> dict[str, Any]:
    # lazy: torch is optional: the harness loads with NumPy alone
    import torch

    dtype = getattr(torch, msg["dtype"])
    backward = msg["backward"]
    device = msg["device"]
    q, k, v = (
        torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
        .requires_grad_(backward)
        for a in (msg["q"], msg["k"], msg["v"])
    )
    o = kernel(q, k, v, msg["causal"], msg["sm_scale"])
    if not isinstance(o, torch.Tensor):
        return {"error": f"kernel returned {type(o).__name__}, not a torch.Tensor",
                "bad_output": True}
    info = {"O": (_dtype_name(o), str(o.device), tuple(o.shape))}
    outputs = {"O": o.detach().to("cpu", torch.float64).numpy()}
    if backward:
        if not o.requires_grad:
            return {"error": "the kernel's output does not require grad: the kernel must"
                             " support autograd (or pass --forward-only)", "bad_output": True,
                    "outputs": outputs, "info": info}
        do = torch.from_numpy(msg["do"]).to(device=o.device, dtype=o.dtype)
        grads = torch.autograd.grad(o, (q, k, v), do, allow_unused=True)
        for name, g, like in zip(("dQ", "dK", "dV"), grads, (q, k, v), strict=True):
            if g is None:  # no path from this input to O: a zero gradient
                g = torch.zeros_like(like)
            info[name] = (_dtype_name(g), str(g.device), tuple(g.shape))
            outputs[name] = g.detach().to("cpu", torch.float64).numpy()
    return {"outputs": outputs, "info": info}


def _quantize(kernel: Any, msg: dict[str, Any]) -> dict[str, Any]:
    x = np.array(msg["x"], dtype=np.float32, copy=True)
    if msg["input_type"] == "torch":
        # lazy: torch is optional: the harness loads with NumPy alone
        import torch

        x = torch.from_numpy(x).to(device=msg["device"], dtype=getattr(torch, msg["dtype"]))
    result = kernel(x)
    if not isinstance(result, tuple | list) or len(result) != 3:
        length = f" of length {len(result)}" if isinstance(result, tuple | list) else ""
        return {"error": "a quantizer kernel must return (packed uint8, scale bytes, tensor"
                         f" scale or None); got {type(result).__name__}{length}",
                "bad_output": True}
    packed, scales, tensor_scale = result
    info = {name: (_dtype_name(t), str(getattr(t, "device", "cpu")), tuple(t.shape))
            for name, t in (("packed", packed), ("scales", scales)) if hasattr(t, "dtype")}
    outputs = {
        "packed": _numpy_out(packed, raw_bytes=True),
        "scales": _numpy_out(scales, raw_bytes=True),
        "tensor_scale": _numpy_out(tensor_scale, raw_bytes=False),
    }
    return {"outputs": outputs, "info": info}


def _serve(conn_in: Connection, conn_out: Connection) -> None:
    load = conn_in.recv()
    for entry in reversed(load["sys_path"]):  # the parent's import path, cwd first
        if entry not in sys.path:
            sys.path.insert(1, entry)
    try:
        if load["kind"] == "quantizer":
            kernel: Any = load_kernel(load["target"], 1)
            conn_out.send({"ok": True, "spec": None})
        else:
            kernel = load_attention_kernel(load["target"], load["overrides"])
            conn_out.send({"ok": True, "spec": kernel.spec.to_json()})
    except UsageError as err:
        conn_out.send({"usage": str(err)})
        return
    handlers = {"attention": _attention, "quantize": _quantize}
    while True:
        try:
            msg = conn_in.recv()
        except EOFError:
            return
        if msg.get("op") == "close":
            return
        try:
            reply = handlers[msg["op"]](kernel, msg)
        except Exception as err:
            text = f"{type(err).__name__}: {err}"
            reply = {"error": f"kernel raised {text}",
                     "exc_type": type(err).__name__,
                     "traceback": traceback.format_exc(limit=-8),
                     "fatal": any(p in text for p in _CUDA_FATAL)}
        conn_out.send(reply)
        if reply.get("fatal"):
            return  # a poisoned CUDA context: let the parent start a fresh worker


def main(argv: list[str]) -> int:
    conn_in = Connection(int(argv[0]), writable=False)
    conn_out = Connection(int(argv[1]), readable=False)
    try:
        _serve(conn_in, conn_out)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    # fd 1 may be the parent's stdout; the kernel's prints go to stderr so that a CLI's
    # machine-readable stdout stays clean
    os.dup2(2, 1)
    sys.exit(main(sys.argv[1:]))
