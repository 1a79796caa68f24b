"""`fp4sim simulate`: training-stability simulation of FP4 attention backward variants."""
