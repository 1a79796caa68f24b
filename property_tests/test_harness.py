"""fp4sim.harness: the kernel contract shared by check, report and simulate (issues 12, 14)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fp4sim.cli import main
from fp4sim.harness import (
    KernelSpec,
    KernelWorker,
    UsageError,
    add_kernel_options,
    kernel_spec_from_args,
    load_attention_kernel,
    load_inputs_file,
    load_kernel,
)

_KERNELS = '''
import os, signal, time
import numpy as np
import torch
import fp4sim


def sdpa(q, k, v, causal, sm_scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                            scale=sm_scale)


def sdpa_blhd(q, k, v, causal, sm_scale):
    assert q.shape[2] == 3, "BLHD expected: heads on axis 2"
    o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, sm_scale)
    return o.transpose(1, 2)


sdpa_blhd.fp4sim_spec = {"layout": "blhd", "gqa": False, "dtypes": ["bfloat16"]}


def hang(q, k, v, causal, sm_scale):
    time.sleep(3600)


def segfault(q, k, v, causal, sm_scale):
    os.kill(os.getpid(), signal.SIGSEGV)


def raises(q, k, v, causal, sm_scale):
    raise ValueError("bad input")


def _out(q):
    return q.packed, q.scale_bits, q.tensor_scale


def _x(x):
    return np.asarray(x.float().numpy() if hasattr(x, "float") else x, np.float32)


def reciprocal_zero_codes(x):
    return _out(fp4sim.quantize(_x(x), "nvfp4", zero_scale_codes="reciprocal"))


def negative_zeros(x):
    q = fp4sim.quantize(_x(x), "nvfp4")
    codes = np.where(q.codes == 0, 8, q.codes).astype(np.uint8)
    return fp4sim.pack_fp4(codes), q.scale_bits, None


def negative_zeros_and_a_bug(x):
    q = fp4sim.quantize(_x(x), "nvfp4")
    codes = np.where(q.codes == 0, 8, q.codes).astype(np.uint8)
    codes = np.where(codes == 2, 3, codes).astype(np.uint8)  # 1.0 written as 1.5
    return fp4sim.pack_fp4(codes), q.scale_bits, None
'''


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with its own `kernels` package, as the current folder."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "mine.py").write_text(textwrap.dedent(_KERNELS))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[name]  # the user's package must not leak into other tests


def test_spec_supports_and_lists_what_is_untested() -> None:
    spec = KernelSpec(gqa=False, causal_unequal=False, head_dims=(64,), dtypes=("bfloat16",),
                      length_multiple=16, backward=False)
    ok = {"heads": 2, "kv_heads": 2, "lq": 32, "lk": 32, "head_dim": 64, "dtype": "bfloat16",
          "causal": True}
    assert spec.supports(**ok)
    for change in ({"kv_heads": 1}, {"lq": 16}, {"head_dim": 128}, {"dtype": "float32"},
                   {"lq": 24, "lk": 24}):
        assert not spec.supports(**{**ok, **change}), change
    text = "\n".join(spec.untested())
    for word in ("GQA", "Lq != Lk", "head dims other than 64", "float32, float16",
                 "multiple of 16", "backward"):
        assert word in text, text
    assert KernelSpec().untested() == []
    with pytest.raises(UsageError):
        KernelSpec(dtypes=("int8",))


def test_loader_takes_the_current_folder_first(project: Path) -> None:
    # a user's own `kernels` package wins over anything installed (fp4sim's are fp4sim.kernels)
    fn = load_kernel("kernels.mine:sdpa", 5)
    assert Path(sys.modules["kernels.mine"].__file__).parent.parent == project
    assert fn.__name__ == "sdpa"
    with pytest.raises(UsageError, match="cannot import module 'nope'"):
        load_kernel("nope:f", 5)
    with pytest.raises(UsageError, match="MODULE:ATTR"):
        load_kernel("kernels.mine", 5)
    with pytest.raises(UsageError, match="positional argument"):
        load_kernel("kernels.mine:sdpa", 1)


def test_declared_spec_layout_and_flag_overrides(project: Path) -> None:
    loaded = load_attention_kernel("kernels.mine:sdpa_blhd")
    assert loaded.spec.layout == "blhd" and not loaded.spec.gqa
    q = torch.randn(1, 3, 5, 8, dtype=torch.bfloat16)  # BHLD in, BHLD out
    o = loaded(q, q, q, False, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert o.shape == q.shape and torch.equal(o, ref)
    parser = argparse.ArgumentParser()
    add_kernel_options(parser)
    args = parser.parse_args(["--kernel", "kernels.mine:sdpa_blhd", "--kernel-dtype",
                              "float16,float32", "--head-dims", "64,128", "--no-causal-unequal"])
    spec = load_attention_kernel(args.kernel, kernel_spec_from_args(args)).spec
    assert spec.dtypes == ("float16", "float32") and spec.head_dims == (64, 128)
    assert not spec.causal_unequal and spec.layout == "blhd"  # the rest from fp4sim_spec


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_inputs_file_formats(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arrays = {"q": rng.standard_normal((1, 4, 8, 16)), "k": rng.standard_normal((1, 2, 6, 16)),
              "v": rng.standard_normal((1, 2, 6, 16)), "do": rng.standard_normal((1, 4, 8, 16))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    path = tmp_path / f"acts{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    elif suffix == ".pt":
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    got = load_inputs_file(str(path))
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
    np.savez(tmp_path / "bad.npz", q=arrays["q"], k=arrays["k"])
    with pytest.raises(UsageError, match="missing v"):
        load_inputs_file(str(tmp_path / "bad.npz"))
    (tmp_path / "x.txt").write_text("q")
    with pytest.raises(UsageError, match="unknown file type"):
        load_inputs_file(str(tmp_path / "x.txt"))


def _qkv() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)


def test_worker_survives_hangs_crashes_and_exceptions(project: Path) -> None:
    q = _qkv()
    call = {"do": q, "causal": False, "sm_scale": None, "dtype": "bfloat16", "backward": True}
    with KernelWorker("kernels.mine:hang", timeout=2) as worker:
        res = worker.attention(q, q, q, **call)
        assert res.failure == "timed out after 2 s" and res.outputs is None
    with KernelWorker("kernels.mine:segfault", timeout=30) as worker:
        res = worker.attention(q, q, q, **call)
        assert res.failure == "crashed with signal 11 (SIGSEGV)"
        res = worker.attention(q, q, q, **call)  # restarted, crashes again
        assert res.failure.startswith("crashed with signal 11") and worker.starts == 2
    with KernelWorker("kernels.mine:raises", timeout=30) as worker:
        res = worker.attention(q, q, q, **call)
        assert res.error == "kernel raised ValueError: bad input" and worker.starts == 1
    with KernelWorker("kernels.mine:sdpa", timeout=30) as worker:
        res = worker.attention(q, q, q, **call)
        assert res.ok and res.out_dtype == "bfloat16" and set(res.outputs) == {
            "O", "dQ", "dK", "dV"}
        assert res.info["dK"] == ("bfloat16", "cpu", q.shape)
    with pytest.raises(UsageError, match="no attribute"):
        KernelWorker("kernels.mine:nothing")


@pytest.mark.parametrize(
    ("kernel", "code", "said"),
    [
        ("reciprocal_zero_codes", 0, "agrees with `--zero-scale-codes reciprocal`"),
        ("negative_zeros", 0, "-0 vs +0 code(s)"),
        ("negative_zeros_and_a_bug", 1, "compared after conventions"),
    ],
)
def test_value_neutral_conventions_are_not_bugs(
    project: Path, capsys: pytest.CaptureFixture[str], kernel: str, code: int, said: str
) -> None:
    argv = ["check", "quantizer", "--format", "nvfp4", "--kernel", f"kernels.mine:{kernel}",
            "--distributions", "zero_blocks,gaussian", "--examples", "20", "--timeout", "60",
            "--shrink-seconds", "5", "--input", "numpy", "--repro-out", str(project / "r.py")]
    assert main(argv) == code
    out = capsys.readouterr().out
    assert said in out, out
    if code:  # only the value that changed is reported, not the -0 codes around it
        lines = out.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("  codes     : expected"))
        expected = lines[at].split("expected")[1].split()
        kernel_codes = lines[at + 1].split("kernel")[1].split()
        assert sum(a != b for a, b in zip(expected, kernel_codes, strict=True)) == 1, out
        assert "-0 vs +0" in out
