"""UltrasoundAIULM's Logic package (importable without qt/ctk).

Names are imported on first use, so that a job worker importing ``UltrasoundAIULMLib.scenarios`` (the
cancel scenario's task) does not pay for importing ``slicer``.
"""

__all__ = ["UltrasoundAIULMLogic"]


def __getattr__(name):
    if name == "UltrasoundAIULMLogic":
        from .logic import UltrasoundAIULMLogic

        return UltrasoundAIULMLogic
    raise AttributeError(f"module 'UltrasoundAIULMLib' has no attribute {name!r}")
