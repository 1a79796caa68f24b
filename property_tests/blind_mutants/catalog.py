"""Answer key of the blind mutants: one entry per single-defect kernel.

Fields: ``name``, ``target`` ("module:attr"), ``kind`` ("attention" | "quantizer" | "system"),
``family`` (attention and quantizer mutants, see FAMILIES), ``format`` (quantizers),
``property`` (system mutants, see PROPERTIES), ``recipe`` (the recipe the kernel is faithful to
apart from its defect), ``defect`` (one sentence, as the kernel's author would describe the bug).
Faithful kernels are listed in FAITHFUL.
"""

from __future__ import annotations

_A = "property_tests.blind_mutants.attention"
_Q = "property_tests.blind_mutants.quantizers"
_S = "property_tests.blind_mutants.system"

FAMILIES: dict[str, str] = {
    "granularity": "quantization granularity or axis of an operand (forward or backward)",
    "scale_arithmetic": "scale arithmetic (divisor, E4M3 rounding direction, reciprocal vs "
    "division, clamps, tensor scales)",
    "quantized_operands": "which operand is or is not quantized at each product",
    "p_normalization": "where P is normalized and which P feeds l, O, O_hp and dV",
    "masking": "mask alignment and masking in the backward",
    "gqa_mapping": "head mapping for GQA",
    "missing_factors": "missing or doubled factors (sm_scale, log2 e)",
    "rescaling": "accumulator rescaling and the running max",
    "tail_blocks": "partial and padded tail blocks",
    "intermediate_rounding": "intermediate rounding to bf16/fp16",
    # quantizer-only families
    "special_values": "NaN, Inf, -0 and zero-scale-block handling",
    "rounding": "element rounding rule (ties)",
    "packing": "nibble order of packed codes",
    "clamping": "saturation of the scale",
}

PROPERTIES: tuple[str, ...] = (
    "independence", "permutation", "equivariance", "repeatability", "stale_state", "cuda_graph",
    "inputs_untouched", "layouts", "output_contract", "edge_lengths", "special_values",
)

FAITHFUL: list[dict] = [
    {"name": "faithful_attn_qat", "target": f"{_A}:faithful_attn_qat", "kind": "attention",
     "recipe": "attn-qat"},
    {"name": "faithful_bf16", "target": f"{_A}:faithful_bf16", "kind": "attention",
     "recipe": "bf16"},
    {"name": "faithful_nvfp4", "target": f"{_Q}:faithful_nvfp4", "kind": "quantizer",
     "format": "nvfp4"},
    {"name": "faithful_mxfp4", "target": f"{_Q}:faithful_mxfp4", "kind": "quantizer",
     "format": "mxfp4"},
]

_ATTENTION: list[tuple[str, str, str]] = [
    # (class name, family, defect)
    ("VBlockedAlongKeys", "granularity",
     "V is fake-quantized in 16-element NVFP4 blocks along the key (sequence) axis instead of "
     "along the head dimension d, so the forward's O and O_hp use the wrong V^."),
    ("KBlock32", "granularity",
     "K is quantized with one E4M3 scale per 32 elements along d instead of per 16 (wrong NVFP4 "
     "block size for K^), in the forward and the backward."),
    ("PBwdBlockedAlongQueries", "granularity",
     "In the backward, the P~ used for dV = P~^T dO is quantized along the query axis (blocks of "
     "16 queries of the transposed tile) instead of along the key axis."),
    ("PFwdBlock32", "granularity",
     "The forward quantizes P with one E4M3 scale per 32 keys instead of per 16-key block "
     "(the backward's P~ is correct)."),
    ("PScaleRoundUp", "scale_arithmetic",
     "The E4M3 block scale of P, amax/6, is rounded up (toward +inf) instead of to nearest even, "
     "in both the forward and the backward P quantizer."),
    ("KScaleTruncated", "scale_arithmetic",
     "K's E4M3 block scale amax/6 is truncated (rounded toward zero) instead of rounded to "
     "nearest, so K^ saturates more often."),
    ("PScaleLowerClamp", "scale_arithmetic",
     "P's block scale is clamped from below at the E4M3 minimum normal 2^-6 before encoding, so "
     "small-probability blocks that the recipe flushes to zero keep nonzero P~ (forward and "
     "backward)."),
    ("VTensorScale", "scale_arithmetic",
     "V is quantized with an extra per-tensor FP32 scale amax(V)/(448*6) (two-level NVFP4) that "
     "the recipe does not use for V."),
    ("QDataDivide", "scale_arithmetic",
     "Q's elements are divided by the decoded block scale (x / s) instead of multiplied by its "
     "float32 reciprocal (x * (1/s)) before E2M1 rounding, which flips codes at rounding ties."),
    ("VUnquantizedFwd", "quantized_operands",
     "The forward's P.V products (for O and O_hp) use the unquantized V instead of V^ (the "
     "backward's dP = dO V^T is correct)."),
    ("BwdScoresFromRawQK", "quantized_operands",
     "The backward recomputes S = tau Q K^T from the unquantized Q and K instead of Q^ and K^, "
     "so its P and P~ differ from the forward's."),
    ("BwdDpRawV", "quantized_operands",
     "The backward computes dP = dO V^T with the unquantized V instead of V^."),
    ("BwdDqRawK", "quantized_operands",
     "dQ = tau dS K is computed with the unquantized K instead of K^ (dK uses Q^ correctly)."),
    ("PUnquantizedFwd", "quantized_operands",
     "The forward skips FP4 quantization of P before the P.V product, so O equals O_hp (the "
     "backward still uses P~ for dV)."),
    ("LFromQuantizedP", "p_normalization",
     "The softmax denominator l accumulates the row sums of the quantized P~ instead of the "
     "high-precision P."),
    ("DFromFp4O", "p_normalization",
     "The backward's D = rowsum(dO * O) uses the FP4 output O instead of the high-precision O_hp."),
    ("DvFromHighPrecisionP", "p_normalization",
     "dV = P^T dO uses the high-precision P instead of the quantized P~."),
    ("DsFromQuantizedP", "p_normalization",
     "dS = P~ * (dP - D) multiplies by the quantized P~ instead of the high-precision P."),
    ("BwdPQuantizedBeforeNormalizing", "p_normalization",
     "The backward's P~ for dV is quantized before normalizing, FQ(exp(S - m_final)) / l, "
     "instead of quantizing the normalized P = exp(S - LSE)."),
    ("CausalTopLeft", "masking",
     "The causal mask is aligned top-left (key j visible iff j <= i) instead of bottom-right "
     "(j <= i + Lk - Lq), in the forward and the backward."),
    ("BwdNoCausalMask", "masking",
     "The backward does not apply the causal mask when recomputing S and P, so masked keys get "
     "gradient (the forward masks correctly)."),
    ("CausalExcludesDiagonal", "masking",
     "The causal mask is off by one: it uses j < i + Lk - Lq, hiding each query's diagonal key, "
     "in the forward and the backward."),
    ("GqaModulo", "gqa_mapping",
     "Query head h reads KV head h % Hkv instead of h // (H / Hkv), in the forward and the "
     "backward."),
    ("GqaMeanReduce", "gqa_mapping",
     "dK and dV of a KV head average the contributions of its query-head group instead of "
     "summing them."),
    ("GqaBwdModulo", "gqa_mapping",
     "Only the backward maps query head h to KV head h % Hkv (the forward's h // (H / Hkv) is "
     "correct), so dQ, dK, dV use the wrong K^, V^ and are reduced into the wrong KV heads."),
    ("DqMissingSmScale", "missing_factors",
     "dQ = dS K^ is missing the softmax scale factor tau (sm_scale)."),
    ("DkDoubleSmScale", "missing_factors",
     "dK is multiplied by the softmax scale twice (tau^2 dS^T Q^)."),
    ("IgnoresSmScale", "missing_factors",
     "The sm_scale argument is ignored: the kernel always uses 1/sqrt(d)."),
    ("LseBase2", "missing_factors",
     "The saved LSE is in base 2 (m*log2 e + log2 l) but the backward uses it as a natural log "
     "in P = exp(S - LSE), missing the ln 2 conversion."),
    ("AccNotRescaled", "rescaling",
     "The output accumulator (sum of P~ V^) is not rescaled by exp(m_old - m_new) when the "
     "running max increases (l and acc_hp are)."),
    ("AccHpNotRescaled", "rescaling",
     "The high-precision accumulator for O_hp (sum of P V^) is not rescaled by exp(m_old - "
     "m_new) when the running max increases, so only the backward's D is wrong."),
    ("PAgainstFinalMax", "rescaling",
     "The forward quantizes P = exp(S - m_final) against the final row max (two-pass) instead of "
     "against the running max of the key tiles seen so far."),
    ("TailKeysUnmasked", "tail_blocks",
     "The forward pads K, V with zero keys up to a multiple of the 64-key tile and does not mask "
     "them, so without a causal mask the padded keys (score 0) add exp(0 - m) to l."),
    ("TailPBlockUnquantized", "tail_blocks",
     "When Lk is not a multiple of 16, the last partial 16-key block of P is left unquantized "
     "(high-precision P) in the forward and backward P~."),
    ("BwdDropsTailTile", "tail_blocks",
     "The backward loops over Lk // 64 key tiles and skips the last partial tile, whose dK, dV "
     "stay zero and which adds nothing to dQ."),
    ("PBf16BeforeQuant", "intermediate_rounding",
     "P is rounded to bfloat16 before its FP4 quantization (double rounding), in the forward and "
     "the backward."),
    ("ScoresFp16", "intermediate_rounding",
     "The scores S = tau Q^ K^^T are rounded to float16 before the softmax, in the forward and "
     "the backward recompute."),
    ("OhpSavedBf16", "intermediate_rounding",
     "O_hp is saved in bfloat16 for the backward, so D = rowsum(dO * O_hp) uses a rounded O_hp."),
    ("AccBf16", "intermediate_rounding",
     "The P~ V^ output accumulator is rounded to bfloat16 after every key tile."),
]

_QUANTIZERS: list[tuple[str, str, str, str]] = [
    # (attr, format, family, defect)
    ("q_nvfp4_nan_to_zero", "nvfp4", "special_values",
     "NaN inputs are replaced by 0 (nan_to_num) before quantizing, so a block with a NaN gets a "
     "finite scale from its other elements and code 0 for the NaN instead of scale byte 0x7F and "
     "code +6."),
    ("q_nvfp4_flushed_block_codes", "nvfp4", "special_values",
     "A block whose E4M3 scale rounds to 0 keeps the codes of x * (1/0) (+-6, NaN -> +6) "
     "instead of being set to codes 0."),
    ("q_nvfp4_negative_zero_lost", "nvfp4", "special_values",
     "The sign bit is taken from the rounded value (rounded < 0), so negative inputs (and -0) "
     "that round to zero get code 0 (+0) instead of 8 (-0)."),
    ("q_nvfp4_ties_away", "nvfp4", "rounding",
     "E2M1 rounding breaks ties away from zero instead of to the even code."),
    ("q_nvfp4_bf16_double_rounding", "nvfp4", "intermediate_rounding",
     "The scaled value x * (1/s) is rounded to bfloat16 before E2M1 rounding (double rounding)."),
    ("q_nvfp4_nibble_swap", "nvfp4", "packing",
     "Packing puts element 2i in the high nibble and 2i+1 in the low nibble (swapped)."),
    ("q_nvfp4_scale_round_up", "nvfp4", "scale_arithmetic",
     "The E4M3 block scale amax/6 is rounded up (toward +inf) instead of to nearest even."),
    ("q_nvfp4_scale_not_saturated", "nvfp4", "clamping",
     "amax/6 is converted to E4M3 without saturation, so blocks with amax/6 >= 464 get the NaN "
     "scale byte 0x7F instead of 448."),
    ("q_nvfp4_scale_times_reciprocal", "nvfp4", "scale_arithmetic",
     "The block scale is computed as amax * float32(1/6) instead of amax / 6."),
    ("q_nvfp4_data_divide", "nvfp4", "scale_arithmetic",
     "Elements are divided by the decoded scale (x / s) instead of multiplied by the float32 "
     "reciprocal x * (1/s)."),
    ("q_nvfp4_scale_bf16", "nvfp4", "intermediate_rounding",
     "amax/6 is rounded to bfloat16 before E4M3 rounding (double rounding of the block scale)."),
    ("q_mxfp4_floor_scale", "mxfp4", "scale_arithmetic",
     "The E8M0 scale uses floor(log2 amax) - 2 (OCP example rule) instead of "
     "ceil(log2(amax / 6)) (rceil)."),
    ("q_mxfp4_nan_ignored_in_amax", "mxfp4", "special_values",
     "The block max ignores NaN elements (fmax semantics), so a block with a NaN gets a finite "
     "E8M0 scale and real codes for its other elements instead of scale byte 0xFF."),
    ("q_mxfp4_block16", "mxfp4", "granularity",
     "MXFP4 scales are computed over 16-element blocks instead of 32 (twice as many scale "
     "bytes)."),
]

_SYSTEM: list[tuple[str, str, str, str]] = [
    # (attr, recipe, property, defect)
    ("sys_BatchSharedMax", "bf16", "independence",
     "The softmax row max is also reduced over the batch dimension, so when another batch "
     "element has much larger scores, exp(S - m) of this element underflows and its output "
     "becomes 0."),
    ("sys_QBatchPowerOfTwoPrescale", "attn-qat", "independence",
     "Q is pre-multiplied by one power of two from the amax of the whole Q tensor (all batches "
     "and heads) before NVFP4, so a batch element with much larger Q pushes the other "
     "elements' block scales into the E4M3 subnormal range or to zero."),
    ("sys_GqaRepeatTiles", "attn-qat", "equivariance",
     "K, V are expanded to the query heads with repeat (tiling, head h reads KV head h % Hkv) "
     "instead of repeat_interleave (h // (H / Hkv)); correct for MHA and MQA, wrong only when "
     "1 < Hkv < H."),
    ("sys_CausalTileSkipTopLeft", "attn-qat", "edge_lengths",
     "In causal mode whole key tiles starting after the last query index (k0 > Lq - 1) are "
     "skipped, although the bottom-right mask makes them visible when Lk > Lq (e.g. decode "
     "with Lq = 1)."),
    ("sys_DecodeSplitKvNan", "bf16", "edge_lengths",
     "The Lq = 1 decode path splits the keys into 8 chunks of ceil(Lk / 8); an empty chunk has "
     "l = 0 and its partial output 0/0 = NaN poisons the combined output."),
    ("sys_ShortKeysPaddedUnmasked", "attn-qat", "edge_lengths",
     "For Lk < 16 the kernel pads K, V with zero keys up to 16 and uses the padded length in "
     "the mask, so the padding keys take part in the softmax."),
    ("sys_MaskedRowsNan", "attn-qat", "edge_lengths",
     "Query rows with no visible key (causal with Lq > Lk) compute O = acc / l = 0/0 = NaN "
     "without a guard where the reference gives 0, and the NaN reaches dQ and dK."),
    ("sys_CacheByShape", "attn-qat", "stale_state",
     "Results are cached by input shapes, dtype, causal and sm_scale, so a later call with the "
     "same shapes but new values returns the first call's output and gradients."),
    ("sys_GraphCapturedInputs", "attn-qat", "cuda_graph",
     "Like a CUDA graph captured at the first call, the kernel reuses the float32 copies of "
     "q, k, v made at capture whenever it is called with the same buffers, so new values "
     "copied into those buffers before a replay are ignored."),
    ("sys_QuantizesQInPlace", "attn-qat", "inputs_untouched",
     "The forward writes the fake-quantized Q^ back into the caller's q tensor (in-place "
     "quantization)."),
    ("sys_DqWrittenIntoDo", "attn-qat", "inputs_untouched",
     "The backward reuses the incoming dO buffer to store dQ, overwriting the caller's dO."),
    ("sys_assumes_contiguous", "attn-qat", "layouts",
     "The kernel reads q, k, v with contiguous (B, H, L, d) strides from their storage, "
     "ignoring the real strides, so a non-contiguous input such as a transposed (B, L, H, d) "
     "view is misread."),
    ("sys_OutputFloat32", "attn-qat", "output_contract",
     "The output is returned in float32 (the accumulator dtype) instead of the input dtype "
     "for bfloat16 and float16 inputs."),
    ("sys_decode_drops_query_axis", "attn-qat", "output_contract",
     "For Lq = 1 the output is returned with shape (B, H, d), the query axis squeezed away, "
     "instead of (B, H, 1, d)."),
    ("sys_RandomOrderRowSum", "attn-qat", "repeatability",
     "The softmax row sum l is accumulated over 16-key chunks in a random order (like atomic "
     "split-K adds), so two identical calls give bitwise different outputs."),
    ("sys_KTensorPowerOfTwoRange", "attn-qat", "special_values",
     "K is pre-multiplied by one power of two from the amax of the whole K tensor before "
     "NVFP4; an Inf anywhere in K makes that factor 0, so every output row of every batch "
     "becomes NaN where the reference saturates the Inf and stays finite."),
]

CATALOG: list[dict] = (
    [
        {"name": f"mut_{n}", "target": f"{_A}:mut_{n}", "kind": "attention", "family": fam,
         "recipe": "attn-qat", "defect": d}
        for n, fam, d in _ATTENTION
    ]
    + [
        {"name": n, "target": f"{_Q}:{n}", "kind": "quantizer", "format": fmt, "family": fam,
         "defect": d}
        for n, fmt, fam, d in _QUANTIZERS
    ]
    + [
        {"name": n, "target": f"{_S}:{n}", "kind": "system", "recipe": r, "property": p,
         "defect": d}
        for n, r, p, d in _SYSTEM
    ]
)


def entries(kind: str | None = None) -> list[dict]:
    """Catalog entries, optionally of one kind ('attention', 'quantizer', 'system')."""
    return [e for e in CATALOG if kind is None or e["kind"] == kind]
