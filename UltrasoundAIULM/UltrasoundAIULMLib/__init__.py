"""UltrasoundAIULM's Logic package (importable without qt/ctk).

Slicer puts only the module's folder on sys.path. Installed, the engine `ultrasound_ai` sits in that
folder; in a source checkout (Slicer's "Additional module paths" pointing at UltrasoundAIULM/) it sits one
level up, added here so that every import of this package, the module file's first, finds it.
"""

import os as _os
import sys as _sys

_checkout = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
if _os.path.isfile(_os.path.join(_checkout, "ultrasound_ai", "__init__.py")) and _checkout not in _sys.path:
    _sys.path.append(_checkout)
