"""fp4sim: bit-exact NumPy emulation of FP4 (E2M1) with block scales."""
