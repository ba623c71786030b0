"""UltrasoundAIULM's Logic package (no qt/ctk). Slicer puts only UltrasoundAIULM/ on sys.path: from a source checkout
the engine is one level up, added here, before the module file imports the Logic (installed, it is beside)."""
import sys as _sys
from os.path import abspath, dirname, isfile, join

_root = dirname(dirname(dirname(abspath(__file__))))
if isfile(join(_root, "ultrasound_ai", "__init__.py")) and _root not in _sys.path:
    _sys.path.append(_root)
