"""UltrasoundAI's Logic package (importable without qt/ctk).

Names are imported on first use, so that a job worker importing ``UltrasoundAILib.scenarios`` (the
cancel scenario's task) does not pay for importing ``slicer``.
"""

__all__ = ["UltrasoundAILogic"]


def __getattr__(name):
    if name == "UltrasoundAILogic":
        from .logic import UltrasoundAILogic

        return UltrasoundAILogic
    raise AttributeError(f"module 'UltrasoundAILib' has no attribute {name!r}")
