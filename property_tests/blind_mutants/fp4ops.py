"""The fixtures' own FP4 arithmetic in torch (independent of fp4sim.reference's quantizers).

Rules (docs/numerics.md / OCP MX v1.0 5.3.3 / PTX cvt.rn.satfinite): E2M1 by round-to-nearest-even
with saturation at 6, NaN -> +6; NVFP4 blocks of 16 with an E4M3 scale RNE(amax / 6) and data
x * (1 / s); MXFP4 blocks of 32 with an E8M0 scale 2^ceil(log2(amax / 6)) (rceil) and data x / s.
Keyword knobs exist only so that single-defect mutants can reuse the code.
"""

from __future__ import annotations

import torch

# Written out here on purpose, not imported from fp4sim.formats: these fixtures stand in for
# a third party's kernels, written blind, and import nothing from fp4sim.
E2M1_MAX = 6.0  # OCP MX v1.0 5.3.3: largest E2M1 magnitude
E4M3_MAX = 448.0  # OCP 8-bit FP spec: E4M3 "fn" max
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX v1.0 5.3.3


def e2m1_round(y: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """Nearest E2M1 value of float32 ``y`` (saturating, NaN -> +6), as float32 with y's sign.

    Steps are 0.5 below 2, 1 below 4 and 2 up to 6; ``torch.round`` rounds half to even,
    which on these integer grids is exactly E2M1's tie-to-even-code rule.
    """
    a = y.abs().clamp(max=E2M1_MAX)
    if ties == "even":
        rnd = torch.round
    elif ties == "away":
        def rnd(t):
            return torch.floor(t + 0.5)
    else:
        raise ValueError(ties)
    r = torch.where(a < 2.0, rnd(a * 2.0) * 0.5, torch.where(a < 4.0, rnd(a), rnd(a * 0.5) * 2.0))
    r = torch.copysign(r.clamp(max=E2M1_MAX), y)
    return torch.where(torch.isnan(y), torch.full_like(y, E2M1_MAX), r)


def e2m1_codes(y_rounded: torch.Tensor, sign_source: torch.Tensor) -> torch.Tensor:
    """4-bit codes (sign in bit 3) of E2M1 values; the sign bit comes from ``sign_source``."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=y_rounded.device)
    mag = torch.searchsorted(grid, y_rounded.abs().contiguous()).to(torch.uint8)
    sign = torch.signbit(sign_source).to(torch.uint8) << 3
    return mag | sign


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def e4m3_round(s: torch.Tensor, direction: str = "nearest") -> torch.Tensor:
    """E4M3 "fn" value of nonnegative float32 ``s`` (saturating at 448, NaN stays NaN)."""
    c = s.clamp(max=E4M3_MAX)
    r = c.to(torch.float8_e4m3fn).to(torch.float32)
    if direction == "nearest":
        return r
    bits = r.to(torch.float8_e4m3fn).view(torch.uint8)
    if direction == "up":
        nxt = (bits + 1).clamp(max=0x7E).view(torch.float8_e4m3fn).to(torch.float32)
        return torch.where(r < c, nxt, r)
    if direction == "down":
        prv = (bits.to(torch.int16) - 1).clamp(min=0).to(torch.uint8)
        prv = prv.view(torch.float8_e4m3fn).to(torch.float32)
        return torch.where(r > c, prv, r)
    raise ValueError(direction)


def e4m3_byte(s_rounded: torch.Tensor) -> torch.Tensor:
    b = s_rounded.to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(s_rounded), torch.full_like(b, 0x7F), b)


def to_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """(..., n) -> (..., ceil(n / block), block), zero-padded; returns blocks and n."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block), n


def from_blocks(b: torch.Tensor, n: int) -> torch.Tensor:
    return b.reshape(*b.shape[:-2], -1)[..., :n]


def nvfp4_scale(
    amax: torch.Tensor, divisor: float = E2M1_MAX, direction: str = "nearest",
    lower_clamp: float | None = None, amax_op: str = "divide",
) -> torch.Tensor:
    """Decoded E4M3 block scale of float32 block amax (Inf counts as the largest float32)."""
    a = torch.where(torch.isinf(amax), torch.finfo(torch.float32).max, amax)
    if amax_op == "divide":
        s = a / torch.tensor(divisor, dtype=torch.float32, device=a.device)
    else:
        s = a * torch.tensor(1.0 / divisor, dtype=torch.float32, device=a.device)
    if lower_clamp is not None:
        s = s.clamp(min=lower_clamp)
    return e4m3_round(s, direction)


def nvfp4_fake(
    x: torch.Tensor, axis: int = -1, block: int = 16, tensor_scale: bool = False,
    data_op: str = "reciprocal", bf16_scaled: bool = False, **scale_knobs,
) -> torch.Tensor:
    """Fake-quantized float32 copy of ``x`` in NVFP4 along ``axis`` (zero-padded tail block)."""
    xm = torch.movedim(x.to(torch.float32), axis, -1)
    blocks, n = to_blocks(xm, block)
    ts = None
    if tensor_scale:
        t_amax = blocks.abs().amax()
        ts = torch.where(t_amax == 0, 1.0, t_amax / torch.tensor(E4M3_MAX * E2M1_MAX))
    amax = blocks.abs().amax(dim=-1)
    s = nvfp4_scale(amax if ts is None else amax / ts, **scale_knobs)
    total = (s if ts is None else s * ts).unsqueeze(-1)
    if data_op == "reciprocal":
        y = blocks * (torch.ones_like(total) / total)
    else:
        y = blocks / total
    if bf16_scaled:
        y = y.to(torch.bfloat16).to(torch.float32)
    vals = torch.where(total == 0, 0.0, e2m1_round(y) * total)
    return torch.movedim(from_blocks(vals, n), -1, axis)


def quantize_p(p: torch.Tensor, **knobs) -> torch.Tensor:
    """P~ along the key axis (last), NVFP4 blocks of 16 from key 0 of the tile."""
    return nvfp4_fake(p, -1, **knobs)
