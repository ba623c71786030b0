"""UltrasoundAI engine: ultrasound deep-learning methods behind the 3D Slicer extension.

The engine imports without Qt, Slicer or mamba_ssm; heavy dependencies (torch, SimpleITK, vtk) are
imported by the subpackages that need them.
"""

__version__ = "0.1.0"
