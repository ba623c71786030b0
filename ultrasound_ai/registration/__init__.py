"""MRI-TRUS rigid fusion: phantom simulator, Attention-Reg, Mattes-MI baseline, SRE."""
