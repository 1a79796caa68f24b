"""FP4 block quantization kernel: NVFP4 and MXFP4 along the last axis, packed bytes out.

``quantize_fp4(x, fmt, tensor_scale)`` reproduces ``fp4sim.quantize(x, fmt, axis=-1)`` with
the emulator's default settings bit for bit (codes, packed bytes, scale bytes, tensor scale);
the numerics are the device functions of ``kernels.fp4_jit`` (their docstring lists the exact
op order). Layout: element 2i of a row goes to the low nibble of byte i (docs/numerics.md,
'Packing'); scale bytes have the input's shape with the last axis divided by the block size
(16 NVFP4 / E4M3, 32 MXFP4 / E8M0).

Tensor scale (NVFP4 only, ``tensor_scale="amax"``): ``t = float32(max |x|) / 2688.0`` over the
whole tensor, one IEEE float32 division (448 * 6 = 2688 exactly; docs/numerics.md, NVFP4),
computed with torch, as fp4sim: an Inf counts as the largest finite float32, a NaN anywhere gives
t = NaN (every code 7, every scale byte 0x7F), and an all-zero tensor gives t = 1. A float
``tensor_scale`` is rounded to float32 and used as given.

Inputs: float32, float16 or bfloat16 (cast to float32 exactly in the kernel), on a CUDA device
or on the CPU under ``TRITON_INTERPRET=1``. A non-contiguous input is copied to a contiguous one
first (documented cost: one extra read and write of ``x``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fp4sim.formats import BLOCK_SIZES, NVFP4_TENSOR_SCALE_DIVISOR  # NVFP4 16, MXFP4 32; 448*6
from fp4sim.kernels import fp4_jit

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["BLOCK_SIZES", "check_device", "format_name", "quantize_fp4"]


def format_name(fmt: object) -> str:
    """'nvfp4' or 'mxfp4' from a string or an object with a ``name`` (e.g. fp4sim BlockFormat)."""
    name = getattr(fmt, "name", fmt)
    if not isinstance(name, str) or name.lower() not in BLOCK_SIZES:
        raise ValueError(f"unsupported FP4 format {fmt!r}; expected 'nvfp4' or 'mxfp4'")
    return name.lower()


def check_device(*tensors: torch.Tensor) -> None:
    """Raise unless all tensors share one device that Triton can run on here."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return
        raise RuntimeError(
            "CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or move the tensors to a CUDA device"
        )
    raise RuntimeError(
        f"unsupported device {device}; expected CUDA (or CPU with TRITON_INTERPRET=1)"
    )


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    ts_ptr,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK: tl.constexpr,
    IS_MX: tl.constexpr,
    HAS_TS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows64[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if IS_MX:
        codes, scale_bits, _s = fp4_jit.mxfp4_quantize_rows(x, BLOCK)
    elif HAS_TS:
        t = tl.load(ts_ptr)
        codes, scale_bits, _s = fp4_jit.nvfp4_quantize_rows_tensor_scale(x, t, BLOCK)
    else:
        codes, scale_bits, _s = fp4_jit.nvfp4_quantize_rows(x, BLOCK)
    # Element 2i in the low nibble, 2i + 1 in the high nibble (docs/numerics.md, 'Packing').
    packed = fp4_jit.pack_fp4_rows(codes)
    pcols = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
    pmask = (rows[:, None] < n_rows) & (pcols[None, :] < n_cols // 2)
    tl.store(packed_ptr + rows64[:, None] * (n_cols // 2) + pcols[None, :], packed, mask=pmask)
    scols = pid_c * (BLOCK_C // BLOCK) + tl.arange(0, BLOCK_C // BLOCK)
    smask = (rows[:, None] < n_rows) & (scols[None, :] < n_cols // BLOCK)
    tl.store(
        scale_ptr + rows64[:, None] * (n_cols // BLOCK) + scols[None, :], scale_bits, mask=smask
    )


def _tensor_scale_value(x: torch.Tensor, tensor_scale: object) -> torch.Tensor | None:
    if tensor_scale is None:
        return None
    if isinstance(tensor_scale, str):
        if tensor_scale != "amax":
            raise ValueError(f"tensor_scale must be None, 'amax' or a float, got {tensor_scale!r}")
        if x.numel() == 0:  # an empty tensor has amax 0: t = 1, as in fp4sim.quantize
            return torch.ones((), dtype=torch.float32, device=x.device)
        amax = x.abs().amax().to(torch.float32)  # NaN propagates (torch.amax)
        amax = torch.clamp(amax, max=torch.finfo(torch.float32).max)  # Inf counts as FLT_MAX
        t = amax / torch.tensor(NVFP4_TENSOR_SCALE_DIVISOR, dtype=torch.float32, device=x.device)
        t = torch.where(amax == 0, torch.ones_like(t), t)  # all-zero tensor: t = 1 (fp4sim)
        return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)  # canonical NaN
    if isinstance(tensor_scale, (int, float)) and not isinstance(tensor_scale, bool):
        t = torch.tensor(float(tensor_scale), dtype=torch.float32)
        if not (torch.isfinite(t) and t > 0):  # as fp4sim.QuantizeSettings: finite, > 0
            raise ValueError(
                f"tensor_scale must be finite and > 0 in float32, got {tensor_scale!r}"
            )
        return t.to(x.device)
    if isinstance(tensor_scale, torch.Tensor) and tensor_scale.numel() == 1:
        return tensor_scale.detach().reshape(()).to(device=x.device, dtype=torch.float32)
    raise TypeError(f"tensor_scale must be None, 'amax' or a float, got {type(tensor_scale)}")


def quantize_fp4(
    x: torch.Tensor, fmt: object = "nvfp4", tensor_scale: object = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` to NVFP4 or MXFP4 along its last axis (fp4sim defaults, bit-exact).

    Returns ``(packed, scale_bits, tensor_scale)``: ``packed`` uint8 of shape
    ``(..., n // 2)`` (element 2i in the low nibble), ``scale_bits`` uint8 of shape
    ``(..., n // block)`` (E4M3 bytes for NVFP4, E8M0 bytes for MXFP4), and the float32 0-d tensor
    scale (NVFP4 with ``tensor_scale`` set) or None. ``n`` must be a multiple of the block size.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    name = format_name(fmt)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")
    if x.dim() == 0:
        raise ValueError("cannot block-quantize a 0-d tensor")
    check_device(x)
    block = BLOCK_SIZES[name]
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last axis length {n} is not a multiple of the {name} block size {block}")
    if name == "mxfp4" and tensor_scale is not None:
        raise ValueError("tensor_scale applies to nvfp4 only (MXFP4 has no tensor scale)")
    x = x.contiguous()  # documented: non-contiguous inputs are copied
    ts = _tensor_scale_value(x, tensor_scale)
    lead = x.shape[:-1]
    packed = torch.empty((*lead, n // 2), dtype=torch.uint8, device=x.device)
    scale_bits = torch.empty((*lead, n // block), dtype=torch.uint8, device=x.device)
    n_rows = x.numel() // n if n else 0
    if n_rows == 0 or n == 0:
        return packed, scale_bits, ts
    block_c = max(block, min(128, triton.next_power_of_2(n)))
    block_m = max(1, min(64, 4096 // block_c, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n, block_c))
    ts_arg = ts if ts is not None else scale_bits  # unused pointer when HAS_TS is False
    _quantize_rows_kernel[grid](
        x,
        packed,
        scale_bits,
        ts_arg,
        n_rows,
        n,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK=block,
        IS_MX=name == "mxfp4",
        HAS_TS=ts is not None,
    )
    return packed, scale_bits, ts
