"""Network building blocks shared by the methods (selective scan, Mamba blocks, ...)."""
