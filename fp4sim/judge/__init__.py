"""How a kernel's attention output is judged: shared by `fp4sim check` and `fp4sim report`.

A base of the comparison tier (docs/DESIGN.md): it builds on the emulator core, the
reference and the kernel harness, and imports none of the comparison layers (testing,
reports, simulate, CLI) nor Hypothesis. Nothing is imported here, so a module costs only
what it needs:

* ``inputs``: seeded NumPy input generators and ``AttentionCase`` (NumPy only);
* ``arrays``: NumPy copies of arrays or tensors (NumPy only);
* ``rule``: the FP4 tolerance rule on one tensor (NumPy only);
* ``bounds``: the rule's accumulation floors and P-flip allowances (torch, the reference);
* ``attention``: one attention case, kernel against reference, under the rule;
* ``diagnosis``: the differential diagnosis of a failing kernel (named hypotheses).
"""
