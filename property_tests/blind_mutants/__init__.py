"""Blind single-defect FP4 kernels (test fixtures): attention and quantizer mutants written
without reading the diagnosis engine, with a machine-readable answer key in ``catalog``.

Modules: ``fp4ops`` (the fixtures' own FP4 arithmetic), ``attention`` (recipe-conformance
attention mutants), ``quantizers`` (quantizer mutants), ``system`` (program-property mutants),
``catalog`` (the answer key).
"""
