"""The freehand training simulator: tissue phantoms, probe trajectories, IMU sensor model, sweep
simulation, and the fixed benchmark set built from them."""
