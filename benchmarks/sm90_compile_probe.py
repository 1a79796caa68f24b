"""Offline sm_90 (H100) compile probe of the Attn-QAT training attention Triton kernels.

Not a test; needs no GPU. Compiles ``_attn_fwd_kernel``, ``_attn_bwd_dkdv_kernel`` and
``_attn_bwd_dq_kernel`` of ``kernels/training_attention.py`` for ``GPUTarget("cuda", 90, 32)``
with Triton's bundled ptxas/nvdisasm and reports per kernel and config: registers, spill bytes,
shared memory, ``ttg.convert_layout`` ops, wgmma, ``div.rn.f32`` / ``div.full.f32`` / ``ex2`` /
``cvt.rn.satfinite.e4m3x2`` counts in the PTX, and the SASS size of the innermost hot loop with
the share of the P quantizer (the ``_fake_quantize_probs`` wrapper and all of
``kernels/fp4_jit.py``) and that loop's top SASS opcodes.

Why: the resource report and the disassembly answer most cost questions (are the wgmma there,
did the quantizer add layout conversions, spills or instructions) without spending GPU time:
read what costs nothing before timing what costs device minutes.

Run from the repository root (``--all``, 8 variants, about 10 s on 2 cores):

    python benchmarks/sm90_compile_probe.py --all
    python benchmarks/sm90_compile_probe.py fwd --hd 128 --bm 64 --bn 64 --warps 4 --stages 3 \\
        --quant-p 1 --quiet

Artifacts (``<tag>.{ttir,ttgir,ptx,cubin,sass,ptxas.log,json}``) go to ``out/compile_probe/``
(``--out`` to change); the ``.ttgir`` keeps MLIR source locations. Method: pointers are 16-byte
divisible, as the JIT specializes torch allocations; ``H``/``GROUP``/``Lq``/``Lk`` are
unspecialized i32 (the kernels' ``do_not_specialize``); registers, spills and smem come from
running ptxas again with ``-v --gpu-name=sm_90a``; the "hot loop" is the smallest backward-branch
loop over 200 instructions (for dK/dV the start_m loop, not the GQA loop). The amax reduce
combine is tagged with Triton's standard.py, so it is not counted as quantizer work (~56 SASS).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HOT_LOOP_MIN_INSTRUCTIONS = 200
KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
FP32_POINTERS = {"M_OUT", "L_OUT", "LSE_OUT", "LQ_OUT", "PDBG", "PQDBG",  # forward outputs
                 "LSE", "M_IN", "L_IN", "DELTA"}  # backward inputs
INT_ARGS = {"H", "GROUP", "Lq", "Lk", "LK_PAD"}
PACKED_POINTERS = {"QC", "QS", "KC", "KS", "VC", "VS"}  # codes / scale bytes (uint8)
TABLE_HEADER = (
    "| variant | regs | spill st/ld B | smem KiB | convert_layout | wgmma (ptx) | div.rn | div.full"
    " | cvt e4m3 | SASS loop instr | of which P quantizer |\n" + "|---" * 11 + "|"
)
# Per listing: source-line marker, label, instruction and backward-branch target syntax.
PTX_SYNTAX = dict(
    source=re.compile(r"^\.loc\s+(\d+)\s+(\d+)"),
    label=re.compile(r"^(\$L__\w+):"),
    instruction=re.compile(r"^((?:@!?%\w+\s+)?[a-z].*)"),  # not directives, braces, operands
    branch=re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);"),
)
SASS_SYNTAX = dict(
    source=re.compile(r'^//## File "([^"]+)", line (\d+)'),  # innermost of an inlined chain
    label=re.compile(r"^(\.L_x_\d+):"),
    instruction=re.compile(r"^/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;"),
    branch=re.compile(r"\bBRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)"),
)
Instruction = tuple[str, str, int]  # (text, source file name, source line)


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str  # a KERNELS key
    head_dim: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    quant_p: int = 1
    quant_qkv: int = 0
    consistent: int = 0
    causal: int = 0
    dtype: str = "bf16"
    fast: int = 1  # ex2.approx.ftz exp (attn_qat_jit._exp)
    packed: int = 0  # backward reads packed Q^, K^, V^
    tma: int = 0  # forward K, V through tensor descriptors
    ws: int = 0  # warp-specialized forward key loop

    @property
    def tag(self) -> str:
        optional = (f"_qkv{self.quant_qkv}" if self.quant_qkv else "") + (
            "_cons" if self.consistent else "") + ("_causal" if self.causal else "")
        optional += "".join(f"_{name}" for name in ("packed", "tma", "ws")
                            if getattr(self, name)) + ("" if self.fast else "_slowexp")
        return (f"{self.kernel}_d{self.head_dim}_m{self.block_m}_n{self.block_n}"
                f"_w{self.warps}_s{self.stages}_qp{self.quant_p}{optional}")


def load_attention() -> ModuleType:
    # Import from this checkout whether or not the package is installed.
    sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("fp4sim.kernels.training_attention")


def quantizer_filter(attention: ModuleType) -> Callable[[str, int], bool]:
    """Predicate (file, line) -> part of the P quantizer: all of fp4_jit.py (home of the
    kernel's ``nvfp4_fake_quantize_probs``) plus the ``_fake_quantize_probs`` wrapper."""
    source_lines, first = inspect.getsourcelines(attention._fake_quantize_probs.fn)
    wrapper_lines = range(first, first + len(source_lines))
    attention_file = Path(attention.__file__).name
    return lambda file, line: file == "fp4_jit.py" or (
        file == attention_file and line in wrapper_lines)


def mask_filter() -> Callable[[str, int], bool]:
    """Predicate (file, line) -> inside the tile mask function ``attn_qat_jit._visible``."""
    jit = importlib.import_module("fp4sim.kernels.attn_qat_jit")
    source_lines, first = inspect.getsourcelines(jit._visible.fn)
    lines = range(first, first + len(source_lines))
    return lambda file, line: file == Path(jit.__file__).name and line in lines


def signature(kernel: triton.JITFunction, variant: Variant) -> tuple[dict, dict, dict]:
    flags = dict(HEAD_DIM=variant.head_dim, BLOCK_M=variant.block_m, BLOCK_N=variant.block_n,
                 CAUSAL=bool(variant.causal), CAUSAL_SHIFT=0, QUANT_QKV=bool(variant.quant_qkv),
                 QUANT_P=bool(variant.quant_p), CONSISTENT=bool(variant.consistent), DIAG=False,
                 STORE_P=False, STATIC_END=0, STATIC_GROUP=0, UPCAST=False,
                 FAST=bool(variant.fast), PACKED=bool(variant.packed), USE_TMA=bool(variant.tma),
                 WARP_SPEC=bool(variant.ws))
    # Kernels take different flag subsets; a constexpr the table lacks takes its default (a
    # constexpr without one fails here: typed as a pointer it would compile a different kernel).
    constexprs = {name: value for name, value in flags.items() if name in kernel.arg_names}
    for param in kernel.params:
        if param.is_constexpr and param.name not in constexprs:
            if not param.has_default:
                raise ValueError(f"{kernel.__name__}: constexpr {param.name} has no default "
                                 "and no value in the probe's flags")
            constexprs[param.name] = param.default
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "sm_scale":
            types[name] = "fp32"
        elif name in INT_ARGS:
            types[name] = "i32"
        elif name.startswith("desc_") and variant.tma:
            # the forward and dQ descriptors tile keys (block_n), dK/dV's tile queries
            rows = variant.block_m if variant.kernel == "dkdv" else variant.block_n
            types[name] = f"tensordesc<{variant.dtype}[1, {rows}, {variant.head_dim}]>"
        elif name in PACKED_POINTERS:
            types[name] = "*u8"
        else:
            types[name] = "*fp32" if name in FP32_POINTERS else "*" + variant.dtype
    pointer_attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                     for name, arg_type in types.items() if arg_type.startswith("*")}
    return types, constexprs, pointer_attrs


def hot_loop(text: str, syntax: dict[str, re.Pattern[str]], files: dict[str, str],
             is_mask: Callable[[str, int], bool] = lambda file, line: False,
             ) -> tuple[list[Instruction], list[Instruction]]:
    """All instructions of a listing (each tagged with the last source marker seen) and the body
    of its hot loop: the smallest backward-branch loop above the size threshold, preferring
    loops without mask instructions (the kernels run the unmasked copy of the loop on every
    tile but the ragged or diagonal ones)."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}  # label -> index of the instruction it precedes
    source = ("?", 0)
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if match := syntax["source"].match(line):
            source = (files.get(match.group(1), Path(match.group(1)).name), int(match.group(2)))
        elif match := syntax["label"].match(line):
            labels[match.group(1)] = len(instructions)
        elif match := syntax["instruction"].match(line):
            instructions.append((match.group(1), *source))
    loops = []
    for index, (instruction_text, _, _) in enumerate(instructions):
        match = syntax["branch"].search(instruction_text)
        if match and labels.get(match.group(1), index + 1) <= index:
            loops.append(instructions[labels[match.group(1)]:index + 1])
    hot = [body for body in loops if len(body) > HOT_LOOP_MIN_INSTRUCTIONS] or loops
    unmasked = [body for body in hot if not any(is_mask(f, n) for _, f, n in body)]
    return instructions, min(unmasked or hot, key=len, default=[])


def convert_layout_sites(ttgir: str) -> list[dict[str, str]]:
    """Each ``ttg.convert_layout``: layouts and source chain (innermost first) from the MLIR
    location table at the end of the TTGIR."""
    definitions = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)$", ttgir, re.M))
    reference = re.compile(r'"([^"]+)":(\d+):\d+|(#loc\d*)')

    def resolve(key: str, depth: int = 0) -> list[str]:
        sites = []
        for file, line, ref in reference.findall(definitions.get(key, "")):
            if file:
                sites.append(f"{Path(file).name}:{line}")
            elif ref != key and depth < 30:  # guard against a cyclic table
                sites += resolve(ref, depth + 1)
        return sites

    op = re.compile(r"= ttg\.convert_layout \S+ : (tensor<.*>) -> (tensor<.*>)\s+loc\((#loc\d*)\)")
    return [dict(src=src, dst=dst, loc=" <- ".join(resolve(loc)[:6]))
            for src, dst, loc in op.findall(ttgir)]


def sass_opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def run_ptxas(ptx_path: Path, cubin_path: Path) -> tuple[str, dict[str, int]]:
    # Triton does not keep ptxas's -v report, so assemble again (with line info for nvdisasm).
    command = [str(TOOLS_DIR / "ptxas"), "-lineinfo", "-v", "--gpu-name=sm_90a",
               str(ptx_path), "-o", str(cubin_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return log, dict(regs=number(r"Used (\d+) registers"),
                     spill_store_B=number(r"(\d+) bytes spill stores"),
                     spill_load_B=number(r"(\d+) bytes spill loads"),
                     stack_B=number(r"(\d+) bytes stack frame"))


def compile_variant(attention: ModuleType, variant: Variant, out_dir: Path) -> dict:
    kernel = getattr(attention, KERNELS[variant.kernel])
    captured = {}

    def capture_ttgir(backend: object, stages: dict, *_: object) -> None:
        # compiled.asm["ttgir"] has no source locations; keep the module text that has them.
        make_ttgir = stages["ttgir"]

        def ttgir_stage(source: object, metadata: dict) -> object:
            module = make_ttgir(source, metadata)
            captured["ttgir"] = module.str()
            return module

        stages["ttgir"] = ttgir_stage

    knobs.runtime.add_stages_inspection_hook = capture_ttgir
    source = triton.compiler.ASTSource(kernel, *signature(kernel, variant))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=variant.warps, num_stages=variant.stages))
    base = out_dir / variant.tag
    ttgir = captured.get("ttgir", compiled.asm["ttgir"])
    ptx = compiled.asm["ptx"]
    for suffix, text in (("ttir", compiled.asm["ttir"]), ("ttgir", ttgir), ("ptx", ptx)):
        base.with_suffix(f".{suffix}").write_text(text)
    log, resources = run_ptxas(base.with_suffix(".ptx"), base.with_suffix(".cubin"))
    base.with_suffix(".ptxas.log").write_text(log)
    sass = subprocess.run([str(TOOLS_DIR / "nvdisasm"), "-gi", str(base.with_suffix(".cubin"))],
                          capture_output=True, text=True, check=True).stdout
    base.with_suffix(".sass").write_text(sass)

    is_quantizer = quantizer_filter(attention)
    # `.file N "path"` or `.file N "dir", "name"`, depending on the LLVM version.
    file_table = re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:,\s*"([^"]+)")?', ptx, re.M)
    ptx_files = {number: Path(name or path).name for number, path, name in file_table}
    is_mask = mask_filter()
    _, ptx_loop = hot_loop(ptx, PTX_SYNTAX, ptx_files, is_mask)
    sass_instructions, sass_loop = hot_loop(sass, SASS_SYNTAX, {}, is_mask)
    loop_ops = Counter(sass_opcode(text) for text, _, _ in sass_loop)
    quantizer_ops = Counter(
        sass_opcode(text) for text, file, line in sass_loop if is_quantizer(file, line))
    convert_layouts = convert_layout_sites(ttgir)

    def ptx_count(pattern: str) -> int:
        return len(re.findall(pattern, ptx))

    summary = dict(
        tag=variant.tag, **resources, shared_B=compiled.metadata.shared, num_warps=variant.warps,
        convert_layout=len(convert_layouts),
        warp_group_dot=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        wgmma_ptx=ptx_count(r"wgmma\.mma_async"), mma_sync_ptx=ptx_count(r"\bmma\.sync"),
        div_rn_f32=ptx_count(r"div\.rn\.f32"), div_full_f32=ptx_count(r"div\.full\.f32"),
        ex2_approx=ptx_count(r"ex2\.approx"),
        cvt_e4m3x2=ptx_count(r"cvt\.rn\.satfinite\.e4m3x2"),
        ptx_loop_n=len(ptx_loop),
        ptx_loop_quantizer_n=sum(is_quantizer(file, line) for _, file, line in ptx_loop),
        sass_instr=len(sass_instructions),
        sass_loop_n=len(sass_loop),
        sass_loop_quantizer_n=sum(quantizer_ops.values()),
        sass_loop_top_ops=dict(loop_ops.most_common(25)),
        sass_loop_quantizer_ops=dict(quantizer_ops.most_common(15)),
    )
    loop_lines = Counter(f"{file}:{line}" for _, file, line in sass_loop)
    detail = dict(summary=summary, convert_layouts=convert_layouts,
                  sass_loop_by_line=dict(loop_lines.most_common(40)))
    base.with_suffix(".json").write_text(json.dumps(detail, indent=1))
    return detail


def table_row(summary: dict) -> str:
    cells = [summary["tag"], summary["regs"],
             f"{summary['spill_store_B']}/{summary['spill_load_B']}",
             f"{summary['shared_B'] / 1024:g}", summary["convert_layout"], summary["wgmma_ptx"],
             summary["div_rn_f32"], summary["div_full_f32"], summary["cvt_e4m3x2"],
             summary["sass_loop_n"], summary["sass_loop_quantizer_n"]]
    return "| " + " | ".join(map(str, cells)) + " |"


def standard_variants(attention: ModuleType) -> list[Variant]:
    """Forward with and without the P quantizer, dK/dV and dQ, at d = 64 and 128, each at the
    kernel's default H100 launch config (read from the module so the table follows tuning)."""
    variants = []
    for head_dim in (64, 128):
        configs = attention._default_configs(head_dim, on_cuda=True)
        for kernel, quant_p in (("fwd", 1), ("fwd", 0), ("dkdv", 1), ("dq", 1)):
            config = configs[kernel]
            variants.append(Variant(kernel, head_dim, config.block_m, config.block_n,
                                    config.num_warps, config.num_stages, quant_p))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kernel", nargs="?", choices=KERNELS)
    parser.add_argument("--all", action="store_true", help="standard set, one table row each")
    int_options = dict(hd=128, bm=64, bn=64, warps=4, stages=3, quant_p=1, quant_qkv=0,
                       consistent=0, causal=0, fast=1, packed=0, tma=0, ws=0)
    for name, default in int_options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "compile_probe")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    args = parser.parse_args()
    if args.all == (args.kernel is not None):
        parser.error("give either a kernel or --all")
    args.out.mkdir(parents=True, exist_ok=True)
    attention = load_attention()
    # Recompile every time (so the TTGIR hook runs) into a throwaway cache, not the source tree.
    knobs.compilation.always_compile = True
    with tempfile.TemporaryDirectory(prefix="triton_cache_") as cache_dir:
        knobs.cache.dir = cache_dir
        if args.all:
            print(TABLE_HEADER, flush=True)
            for variant in standard_variants(attention):
                detail = compile_variant(attention, variant, args.out)
                print(table_row(detail["summary"]), flush=True)
            return
        variant = Variant(args.kernel, args.hd, args.bm, args.bn, args.warps, args.stages,
                          args.quant_p, args.quant_qkv, args.consistent, args.causal, args.dtype,
                          args.fast, args.packed, args.tma, args.ws)
        detail = compile_variant(attention, variant, args.out)
        print(json.dumps(detail["summary"]) if args.quiet else json.dumps(detail, indent=1))


if __name__ == "__main__":
    main()
