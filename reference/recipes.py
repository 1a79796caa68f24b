"""Recipes: frozen descriptions of an FP4 attention (what is quantized, how, which backward)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fp4sim.formats import BLOCK_SIZES
from fp4sim.settings import FormatSettings, check_applicable, settings_of

P_POLICIES = ("none", "block", "tile_global", "two_level", "consistent")
BACKWARD_VARIANTS = (
    "exact", "drop_in", "p_only", "o_only", "attn_qat", "ste_autograd", "ste_tiled"
)
V_AXES = ("head_dim", "keys")
NAN_POLICIES = ("raise", "propagate")


@dataclass(frozen=True)
class QuantSpec(FormatSettings):
    """One tensor's FP4 format ``fmt`` and its fp4sim settings: the keyword-only
    ``fp4sim.settings.FormatSettings`` (names, defaults, allowed values and the formats each
    applies to are shared with ``fp4sim.quantize``). ``rounding`` (RNE only here) and ``pad``
    (chosen per call) are not part of a spec."""

    fmt: str = "nvfp4"

    def __post_init__(self):
        if self.fmt not in BLOCK_SIZES:
            raise ValueError(f"QuantSpec.fmt must be one of {tuple(BLOCK_SIZES)}, got {self.fmt!r}")
        super().__post_init__()
        # A setting of the other format would be dropped by settings(): reject it instead.
        check_applicable(self.fmt, self.setting_values())

    @property
    def block(self) -> int:
        return BLOCK_SIZES[self.fmt]

    def settings(self, **overrides) -> dict:
        """Keyword settings for ``fp4sim.quantize`` / ``quantize_torch`` (format-relevant only)."""
        values = self.setting_values()
        out = {name: values[name] for name in settings_of(self.fmt) if name in values}
        out.update(overrides)
        return out


NVFP4 = QuantSpec("nvfp4")
NVFP4_TENSOR = QuantSpec("nvfp4", tensor_scale="amax")
MXFP4 = QuantSpec("mxfp4", scale_rule="rceil")


@dataclass(frozen=True)
class Recipe:
    """A complete FP4 attention recipe.

    ``q``, ``k``, ``v``, ``p``: QuantSpec or None (not quantized). Q, K are blocked along the head
    dim; V along ``v_axis`` ('head_dim' as the paper's training kernel, 'keys' as an FP4 P.V
    product needs); P along keys in tiles of ``block_n`` keys (and ``block_m`` query rows for the
    ``tile_global`` policy). ``backward`` is the default backward variant. ``v_pad_keys``: pad V
    with zero keys up to a block multiple when blocked along keys (else an error at call time).
    ``nan_policy``: 'raise' (NaN or Inf input raises ValueError) or 'propagate'.
    ``kv_splits``: the forward of a split-KV (flash-decoding) kernel: the key tiles cut into
    ``kv_splits`` contiguous splits of ceil(T / kv_splits) tiles each (T the number of key
    tiles; FlashAttention-2's split-KV rule, ``n_blocks_per_split`` in
    csrc/flash_attn/src/flash_fwd_kernel.h, and ``kernels.decode``'s), each split's running
    max starting afresh, the splits merged exactly; 1 is one pass. It changes which max each
    tile's P is quantized against (tiled mode), nothing else, so the backward is unchanged.
    ``kv_split_keys``: the same with splits of a fixed number of keys (a multiple of
    ``block_n``; the last split shorter) instead of a fixed number of splits; 0 is unused.
    """

    name: str = "custom"
    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    p: QuantSpec | None = None
    v_axis: str = "head_dim"
    p_policy: str = "none"
    block_n: int = 64
    block_m: int = 64
    backward: str = "attn_qat"
    v_pad_keys: bool = True
    nan_policy: str = "raise"
    kv_splits: int = 1
    kv_split_keys: int = 0

    def __post_init__(self):
        for field in ("q", "k", "v", "p"):
            spec = getattr(self, field)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(f"Recipe.{field} must be a QuantSpec or None, got {spec!r}")
        if self.v_axis not in V_AXES:
            raise ValueError(f"Recipe.v_axis must be one of {V_AXES}, got {self.v_axis!r}")
        if self.p_policy not in P_POLICIES:
            raise ValueError(f"Recipe.p_policy must be one of {P_POLICIES}, got {self.p_policy!r}")
        if self.backward not in BACKWARD_VARIANTS:
            raise ValueError(
                f"Recipe.backward must be one of {BACKWARD_VARIANTS}, got {self.backward!r}"
            )
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"Recipe.nan_policy must be one of {NAN_POLICIES}")
        if (self.p is None) != (self.p_policy == "none"):
            raise ValueError(
                f"contradictory recipe {self.name!r}: p={self.p!r} with p_policy="
                f"{self.p_policy!r} (P is quantized iff p_policy != 'none')"
            )
        if self.p is not None:
            if self.p.tensor_scale is not None:
                raise ValueError(
                    "Recipe.p must not carry a tensor_scale; the P scale is set by p_policy"
                )
            if self.p_policy in ("tile_global", "two_level") and self.p.fmt != "nvfp4":
                raise ValueError(f"p_policy {self.p_policy!r} needs an NVFP4 P format")
        for field in ("block_n", "block_m", "kv_splits"):
            val = getattr(self, field)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"Recipe.{field} must be a positive int, got {val!r}")
        keys = self.kv_split_keys
        if not isinstance(keys, int) or isinstance(keys, bool) or keys < 0 or keys % self.block_n:
            raise ValueError(f"Recipe.kv_split_keys must be 0 or a positive multiple of block_n="
                             f"{self.block_n}, got {keys!r}")
        if keys and self.kv_splits > 1:
            raise ValueError("Recipe.kv_splits and kv_split_keys both set: give one of them")
        if (self.kv_splits > 1 or keys) and self.p_policy == "consistent":
            raise ValueError("split-KV (kv_splits, kv_split_keys) with the consistent P policy: "
                             "its second pass quantizes against the final max, so splits have "
                             "no meaning")
        blocks = [s.block for s in (self.p,) if s is not None]
        if self.v is not None and self.v_axis == "keys":
            blocks.append(self.v.block)
        for b in blocks:
            if self.block_n % b:
                raise ValueError(
                    f"Recipe.block_n={self.block_n} must be a multiple of the key-axis block {b}"
                )

    @property
    def quantizes_anything(self) -> bool:
        return any(s is not None for s in (self.q, self.k, self.v, self.p))


_ATTN_QAT = Recipe(
    name="attn-qat", q=NVFP4, k=NVFP4, v=NVFP4, p=NVFP4, v_axis="head_dim", p_policy="block"
)

PRESETS: dict[str, Recipe] = {
    "bf16": Recipe(name="bf16", backward="exact"),
    "attn-qat": _ATTN_QAT,
    "attn-qat-consistent": dataclasses.replace(
        _ATTN_QAT, name="attn-qat-consistent", p_policy="consistent"
    ),
    "sage3-like": Recipe(
        name="sage3-like", q=NVFP4, k=NVFP4, v=NVFP4, p=NVFP4, v_axis="keys", p_policy="two_level"
    ),
    "nvfp4-tensor-scale": Recipe(
        name="nvfp4-tensor-scale",
        q=NVFP4_TENSOR,
        k=NVFP4_TENSOR,
        v=NVFP4_TENSOR,
        p=NVFP4,
        v_axis="head_dim",
        p_policy="tile_global",
    ),
    "infer-nvfp4": Recipe(
        name="infer-nvfp4", q=NVFP4, k=NVFP4, v=NVFP4, p=NVFP4, v_axis="keys", p_policy="block"
    ),
    "infer-mxfp4": Recipe(
        name="infer-mxfp4", q=MXFP4, k=MXFP4, v=MXFP4, p=MXFP4, v_axis="keys", p_policy="block"
    ),
    # FastVideo attn_qat_train (github.com/hao-ai-lab/FastVideo @2f3d4074, fastvideo-kernel/
    # python/fastvideo_kernel/triton_kernels/attn_qat_train.py) with its training backend's flags
    # (fastvideo/attention/backends/attn_qat_train.py:75-90): plain NVFP4 blocks for Q, K, V
    # along d and for P along keys (nvfp4_utils.py:54-58: E4M3(amax/6), data x * (1/s)); the
    # forward walks 32-key tiles on its Hopper path (attn_qat_train.py:1169), so P is quantized
    # against a running max updated every 32 keys; l sums the unquantized P (:153); the
    # backward re-quantizes the normalized P for dV (:497) and takes D from O_hp (:1308).
    "fastvideo-attn-qat": dataclasses.replace(_ATTN_QAT, name="fastvideo-attn-qat", block_n=32),
    # FastVideo attn_qat_infer (same commit, fastvideo-kernel/attn_qat_infer/): V blocked
    # along keys (quantization/fp4_quantization_4d.cu:266), single-level P blocks (api.py:163)
    # against a running max over 128-key tiles (blackwell/block_config.h:26). Not expressed:
    # its P data is divided by the unrounded block scale (blackwell/softmax_fused.h:142-151).
    "fastvideo-attn-qat-infer": Recipe(
        name="fastvideo-attn-qat-infer", q=NVFP4, k=NVFP4, v=NVFP4, p=NVFP4, v_axis="keys",
        p_policy="block", block_n=128,
    ),
}
RECIPE_NAMES: tuple[str, ...] = tuple(PRESETS)


# Recipe fields a recipe name may set after '@' ("infer-nvfp4@kv_splits=3"): the name then
# crosses the command line, child processes and reports as one string.
NAME_OPTIONS: tuple[str, ...] = ("kv_splits", "kv_split_keys")


def get_recipe(name_or_recipe: str | Recipe) -> Recipe:
    """The preset called ``name`` (or the recipe itself); ``preset@field=N`` sets one of
    ``NAME_OPTIONS`` (a positive int) on the preset, its name kept as given. Unknown names and
    bad options raise ValueError."""
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if not isinstance(name_or_recipe, str):
        raise ValueError(f"a recipe is a name or a Recipe, got {name_or_recipe!r}")
    preset, _, option = name_or_recipe.partition("@")
    if preset not in PRESETS:
        raise ValueError(f"unknown recipe {preset!r}; valid names: {', '.join(RECIPE_NAMES)}")
    if not option:
        return PRESETS[preset]
    field_name, _, value = option.partition("=")
    if field_name not in NAME_OPTIONS or not value.isdigit() or int(value) < 1:
        raise ValueError(f"recipe option {option!r} in {name_or_recipe!r}: expected "
                         f"{' or '.join(f'{f}=N' for f in NAME_OPTIONS)} with N >= 1")
    return dataclasses.replace(PRESETS[preset], name=name_or_recipe,
                               **{field_name: int(value)})
