"""Differential diagnosis of a failing kernel: which named deviation of the reference
explains its output (attention: engine.py over hypotheses.py and deviant.py), or which
quantizer setting explains its bytes (quantizer.py)."""

from fp4sim.judge.diagnosis.engine import Diagnosis, diagnose_attention, retest_cases

__all__ = ["Diagnosis", "diagnose_attention", "retest_cases"]
