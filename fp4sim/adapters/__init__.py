"""Thin adapters that put public FP4 attention kernels behind the suite's kernel contract.

Each adapter is a module with an ``attention(q, k, v, causal, sm_scale) -> o`` callable that
carries an ``fp4sim_spec`` (what the kernel supports and the recipe it claims). The kernel's own
package is imported only when the adapter is called, never at import time, and no kernel code
is vendored here. README "Checking a public kernel" has the command lines.

* ``fp4sim.adapters.fastvideo_attn_qat_train``: FastVideo's Attn-QAT Triton training kernel
  (Hopper and newer), with the flag settings of FastVideo's training backend.
* ``fp4sim.adapters.fastvideo_attn_qat_infer``: FastVideo's Blackwell (sm_120) FP4 inference
  kernel (``attn_qat_infer``, derived from SageAttention3), fed packed FP4 data and swizzled
  scales made by the fp4sim emulator. Unverified on hardware.
"""

__all__ = ["fastvideo_attn_qat_infer", "fastvideo_attn_qat_train"]
