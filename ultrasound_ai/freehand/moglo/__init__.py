"""MoGLo-Net (Kim et al., IEEE TMI 2025): network (`model`), losses, training task and the "moglo" pose
method (`method`)."""
