"""A throw-away user project for end-to-end tests of the installed ``fp4sim`` command.

The folder holds the user's own ``reference.py`` and ``kernels/`` package (names a user's
kernel project very likely has), so a test shows that the suite's modules, reached only as
``fp4sim.*``, are not shadowed by them and that ``--kernel kernels.attention:NAME`` is
imported from the current folder. No GPU: the kernels are PyTorch on the CPU.

API::

    project = make_user_project(tmp_path)            # writes the files, returns the folder
    done = run_fp4sim(project, "check", "attention", "--kernel", kernel("plain"), ...)
    done.returncode, done.stdout, done.stderr

Kernels (``kernel(NAME)`` -> "kernels.attention:NAME"), all ``fn(q, k, v, causal, sm_scale)``
on BHLD tensors:

* ``plain``: exact softmax attention computed in float32, returned in the input dtype; no
  GQA support (k, v must have q's head count), so it fails if GQA inputs are drawn;
* ``unquantized``: the same maths for any head count (GQA by repeating k, v): correct for
  the ``bf16`` recipe, wrong for ``attn-qat``;
* ``bf16_only``: ``unquantized`` that raises TypeError unless q, k, v are bfloat16;
* ``nan``: returns NaN everywhere (keeps autograd);
* ``float64_out``: correct values in float64 whatever the input dtype;
* ``always_raises``: raises RuntimeError;
* ``hang``: sleeps for an hour;
* ``segfault``: kills its own process with SIGSEGV.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["KERNEL_MODULE", "kernel", "make_user_project", "run_fp4sim", "subprocess_env"]

KERNEL_MODULE = "kernels.attention"

_REFERENCE_PY = '''\
"""The user's own reference module: fp4sim must never import it in place of its own."""

USER_REFERENCE = True


def get_recipe(name):
    raise RuntimeError("the user's reference.py was imported by fp4sim")
'''

_ATTENTION_PY = '''\
"""The user's attention kernels (test doubles for fp4sim's end-to-end tests)."""

import os
import signal
import time

import torch


def _softmax_attention(q, k, v, causal, sm_scale):
    """Exact attention in float32 (bottom-right aligned causal mask), input dtype out."""
    d = q.shape[-1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qf, kf, vf = q.float(), k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        rows = torch.arange(lq).unsqueeze(1) + (lk - lq)
        s = s.masked_fill(torch.arange(lk).unsqueeze(0) > rows, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if causal:  # a query row that sees no key (Lq > Lk) gives 0, as in the reference
        p = torch.where(torch.isinf(s).all(dim=-1, keepdim=True), 0.0, p)
    return torch.matmul(p, vf).to(q.dtype)


def plain(q, k, v, causal, sm_scale):
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"plain attention needs as many k/v heads as q heads: {tuple(q.shape)}"
                         f" vs {tuple(k.shape)}")
    return _softmax_attention(q, k, v, causal, sm_scale)


plain.fp4sim_spec = {"gqa": False}


def unquantized(q, k, v, causal, sm_scale):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return _softmax_attention(q, k, v, causal, sm_scale)


def bf16_only(q, k, v, causal, sm_scale):
    if not all(t.dtype == torch.bfloat16 for t in (q, k, v)):
        raise TypeError(f"bf16_only takes bfloat16 tensors, got {q.dtype}")
    return unquantized(q, k, v, causal, sm_scale)


def nan(q, k, v, causal, sm_scale):
    return unquantized(q, k, v, causal, sm_scale) * float("nan")


def float64_out(q, k, v, causal, sm_scale):
    return unquantized(q.double(), k.double(), v.double(), causal, sm_scale)


def always_raises(q, k, v, causal, sm_scale):
    raise RuntimeError("this kernel always fails")


def hang(q, k, v, causal, sm_scale):
    time.sleep(3600)


def segfault(q, k, v, causal, sm_scale):
    os.kill(os.getpid(), signal.SIGSEGV)
'''


def make_user_project(root: Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write the user project into ``root`` (created if needed): ``reference.py``,
    ``kernels/__init__.py``, ``kernels/attention.py`` and any ``extra_files`` (relative
    path -> text). Returns ``root``."""
    root = Path(root)
    (root / "kernels").mkdir(parents=True, exist_ok=True)
    (root / "reference.py").write_text(_REFERENCE_PY)
    (root / "kernels" / "__init__.py").write_text('"""The user\'s kernels package."""\n')
    (root / "kernels" / "attention.py").write_text(_ATTENTION_PY)
    for rel, text in (extra_files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def kernel(name: str) -> str:
    """``MODULE:ATTR`` of one of the project's kernels."""
    return f"{KERNEL_MODULE}:{name}"


def subprocess_env() -> dict[str, str]:
    """The environment for the subprocess: no PYTHONPATH (the repository root must not be
    importable: its top-level ``reference/`` would shadow the user's ``reference.py``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_fp4sim(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m fp4sim.cli ARGS`` with the project folder as the current folder, as a
    user would run the installed ``fp4sim`` command there."""
    return subprocess.run(
        [sys.executable, "-m", "fp4sim.cli", *args], cwd=project, env=subprocess_env(),
        capture_output=True, text=True, timeout=timeout,
    )
